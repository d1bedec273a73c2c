"""CLIP-SVD's faster paths stay exact: every per-layer execution (recompose, factored, chosen by
the cost model) gives the reference's outputs and gradients, and the SVD cache returns the very
same factors, also when several jobs fill it at once."""
from __future__ import annotations

import multiprocessing
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

from clipsvd import svd_cache
from clipsvd.adapters import SVDAdapter
from clipsvd.adapters.svd import (SingularValueDelta, _adaptive_linear_forward,
                                  choose_execution, execution_costs)
from clipsvd.errors import ModelError
from clipsvd.models import load_model

CLASSES = ["a", "b", "c"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(svd_cache.ENV, str(tmp_path / "svd-cache"))
    return tmp_path / "svd-cache"


def _adapted(name: str, mode: str, config=None):
    loaded = load_model(name, None, init_seed=3)
    adapter = SVDAdapter.attach(loaded.model, config or {})
    adapter.set_execution(mode)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():  # move away from s0 so the delta is not zero
        for p in adapter.trainable_parameters():
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=generator))
    return loaded, adapter


def _step(loaded, adapter, batch: int = 3):
    generator = torch.Generator().manual_seed(5)
    size = loaded.image_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.tensor([0, 2, 1])[:batch]
    model = loaded.model
    model.eval()  # no dropout (BERT has some), so the runs compare like for like; grads still flow
    tokens = loaded.tokenizer([f"a photo of {c}" for c in CLASSES])
    with adapter.cached():
        text = F.normalize(model.encode_text(tokens), dim=-1)
        feats = F.normalize(model.encode_image(images), dim=-1)
        logits = 50 * feats @ text.t()
        loss = F.cross_entropy(logits, labels)
        for p in adapter.trainable_parameters():
            p.grad = None
        loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in adapter.named_trainable().items()}
    return logits.detach(), grads


def test_cost_model_picks_per_layer_shape_and_tokens():
    assert choose_execution(768, 768, 32 * 197) == "recompose"  # batch-32 ViT-B/16 step
    assert choose_execution(768, 768, 100) == "factored"
    # the 4x-wide MLP layers take the factored form at any token count
    for tokens in (1, 770, 32 * 197, 10 ** 6):
        assert choose_execution(3072, 768, tokens) == "factored"
        assert choose_execution(768, 3072, tokens) == "factored"
    assert choose_execution(768, 768, 100, training=False) == "recompose"
    recompose, factored = execution_costs(64, 64, 10)
    assert recompose == 3 * 10 * 64 * 64 + 2 * 64 ** 3 and factored == 2 * 10 * 64 * 128
    # the crossover for a square layer sits at T = 2d
    assert choose_execution(300, 300, 599) == "factored"
    assert choose_execution(300, 300, 601) == "recompose"


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-timm-clip", "tiny-biomedclip"])
def test_every_execution_gives_the_reference_outputs_and_gradients(name):
    ref_logits, ref_grads = _step(*_adapted(name, "recompose"))
    for mode in ("factored", "auto"):
        loaded, adapter = _adapted(name, mode)
        logits, grads = _step(loaded, adapter)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert grads.keys() == ref_grads.keys()
        for key in grads:
            # float32 sums in another order: an element near zero may differ by a few ulps of
            # the tensor's largest terms (3e-6 of 2.1 seen on an AMX CPU), so atol grows with them
            atol = max(1e-6, 1e-5 * float(ref_grads[key].abs().max()))
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-3, atol=atol,
                                       msg=lambda m, key=key: f"{mode} gradient of {key}: {m}")


def test_which_layers_can_choose():
    _, adapter = _adapted("tiny-clip", "auto")
    can = adapter.executions()
    assert can["vision.layer0.mlp_fc"] and can["text.layer1.mlp_proj"]
    # fused q/k/v and nn.MultiheadAttention's out_proj always recompose
    assert not any(can[f"vision.layer0.{m}"] for m in ("q", "k", "v", "out"))
    _, timm_adapter = _adapted("tiny-timm-clip", "auto")
    assert timm_adapter.executions()["vision.layer0.out"]  # timm attn.proj is a plain Linear
    with pytest.raises(ModelError, match="execution"):
        adapter.set_execution("fast")


def test_factored_linear_matches_explicit_float64_weight():
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    w0, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    delta = SingularValueDelta(layer.weight, 1, [0], cache=None)
    parametrize.register_parametrization(layer, "weight", delta, unsafe=True)
    layer.forward = types.MethodType(_adaptive_linear_forward, layer)
    with torch.no_grad():
        delta.s["0"].mul_(torch.linspace(0.5, 1.5, delta.s["0"].numel()))
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    u, s0, vh = (t.double() for t in delta.factors(0))
    s = delta.s["0"].detach().double().requires_grad_(True)
    reference = x @ (w0.double() + (u * (s - s0)) @ vh).t() + bias.double()
    reference.square().sum().backward()
    for mode in ("recompose", "factored"):
        delta.execution = mode
        delta.s["0"].grad = None
        out = layer(x.float())
        out.square().sum().backward()
        torch.testing.assert_close(out.double(), reference.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(delta.s["0"].grad.double(), s.grad, rtol=1e-4, atol=1e-4)


def test_recompose_is_exact_and_factored_within_round_off_at_init():
    loaded = load_model("tiny-clip", None, init_seed=3)
    images = torch.randn(2, 3, loaded.image_size, loaded.image_size)
    loaded.model.train()  # the same (non fast-path) attention kernels before and after
    with torch.no_grad():
        before = loaded.model.encode_image(images)
    adapter = SVDAdapter.attach(loaded.model, {"execution": "recompose"})
    outputs = {}
    for mode in ("recompose", "factored"):
        adapter.set_execution(mode)
        with torch.enable_grad(), adapter.cached():
            outputs[mode] = loaded.model.encode_image(images).detach()
    assert torch.equal(before, outputs["recompose"])
    torch.testing.assert_close(outputs["factored"], before, rtol=1e-5, atol=1e-5)
    assert not torch.equal(outputs["factored"], before)


def test_execution_is_a_validated_config_key():
    from clipsvd.adapters import config_for

    assert config_for("clip_svd", {"execution": "factored", "lr": 0.1}).execution == "factored"
    with pytest.raises(ModelError, match="execution 'fast' invalid"):
        config_for("clip_svd", {"execution": "fast"})


def test_second_attach_reads_the_cache_bit_for_bit(_cache, monkeypatch):
    first = SVDAdapter.attach(load_model("tiny-clip", None, init_seed=3).model, {})
    files = sorted(Path(_cache).glob("*.safetensors"))
    # fused q/k/v thirds are separate entries: 2 encoders x 2 blocks x 6 matrices
    assert len(files) == 24
    assert not list(Path(_cache).glob("*.tmp"))

    def refuse(matrix):
        raise AssertionError("SVD recomputed although cached")

    monkeypatch.setattr(svd_cache, "compute", refuse)
    second = SVDAdapter.attach(load_model("tiny-clip", None, init_seed=3).model, {})
    for a, b in zip(first.targets, second.targets):
        assert a.key == b.key
        for x, y in zip(a.factors(), b.factors()):
            assert torch.equal(x, y)
        assert torch.equal(a.s, b.s)


def test_cache_matches_uncached_and_survives_damage(tmp_path):
    matrix = torch.randn(30, 20)
    direct = svd_cache.decompose(matrix, None)
    cached = svd_cache.decompose(matrix, tmp_path)
    again = svd_cache.decompose(matrix, tmp_path)
    for x, y, z in zip(direct, cached, again):
        assert torch.equal(x, y) and torch.equal(x, z)
    entry = tmp_path / f"{svd_cache.matrix_key(matrix)}.safetensors"
    entry.write_bytes(b"not a safetensors file")
    repaired = svd_cache.decompose(matrix, tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(direct, repaired))
    assert torch.equal(load_file(str(entry))["U"], direct[0])
    # a different matrix (even one value) is a different entry
    changed = matrix.clone()
    changed[0, 0] += 1
    assert svd_cache.matrix_key(changed) != svd_cache.matrix_key(matrix)


def test_cache_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv(svd_cache.ENV, "off")
    assert svd_cache.cache_dir() is None
    monkeypatch.delenv(svd_cache.ENV)
    assert svd_cache.cache_dir() == Path("results/cache/svd")


def _fill(args):
    directory, seed = args
    matrix = torch.randn(200, 120, generator=torch.Generator().manual_seed(seed))
    factors = [svd_cache.decompose(matrix, directory) for _ in range(3)]
    return [tuple(t.numpy().tobytes() for t in f) for f in factors]


def test_concurrent_jobs_filling_the_same_entries_all_succeed(tmp_path):
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.map(_fill, [(str(tmp_path), seed % 2) for seed in range(8)])
    for seed in (0, 1):
        same = [r for i, r in enumerate(results) if i % 2 == seed]
        flat = [f for r in same for f in r]
        assert all(f == flat[0] for f in flat)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not list(tmp_path.glob("*.tmp"))
