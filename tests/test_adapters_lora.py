"""CLIP-LoRA and Comp-LoRA: exact at init, only A/B train, Comp-LoRA stays off the protected
subspace, files hold only A/B and reload exactly (and only into the matching adapter)."""
from __future__ import annotations

import copy
import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from clipsvd.adapters import (ADAPTERS, CONFIGS, CompLoRAAdapter, CompLoRAConfig, LoRAAdapter,
                              LoRAConfig, SVDAdapter, SVDConfig, config_for, protected_rank)
from clipsvd.adapters.comp_lora import CompLoRABranch
from clipsvd.adapters.lora import LoRABranch, LoRALinear, LoRAMultiheadAttention
from adapter_helpers import predict as _predict, train_steps as _train
from clipsvd.errors import ModelError
from clipsvd.models import load_model

KINDS = {"clip_lora": (LoRAAdapter, LoRAConfig), "comp_lora": (CompLoRAAdapter, CompLoRAConfig)}
EVERY_MATRIX = ("q", "k", "v", "out", "mlp")


@functools.lru_cache(maxsize=None)
def _cached(name: str, seed: int):
    return load_model(name, None, init_seed=seed)


def _fresh(name: str = "tiny-clip", seed: int = 0):
    """A private copy of a (cached) random-weight model: loading is the slow part."""
    loaded = _cached(name, seed)
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))


@pytest.fixture()
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-timm-clip"])
@pytest.mark.parametrize("kind", ["clip_lora", "comp_lora"])
def test_output_unchanged_at_init(images, name, kind):
    """Compared like for like (see the CLIP-SVD test): nn.MultiheadAttention takes a fused fast
    path when nothing needs grad, which differs from the explicit computation by ~1e-7."""
    adapter_class, config_class = KINDS[kind]
    reference = _fresh(name)
    adapted = _fresh(name)
    adapter_class.attach(adapted.model, config_class(matrices=EVERY_MATRIX))
    for grad in (False, True):
        for parameter in reference.model.parameters():
            parameter.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            expected = _predict(reference, images)
            got = _predict(adapted, images)
        error = (got - expected).abs().max()
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (grad, error)
        assert torch.equal(got, expected), grad  # eval: nn.MultiheadAttention's own code path
    # Branches really sit in the forward path (B = 0 is what keeps the output unchanged).
    lora_modules = [m for m in adapted.model.modules() if isinstance(m, (LoRALinear,
                                                                         LoRAMultiheadAttention))]
    assert lora_modules


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_replacement_matches_multihead_attention(batch_first):
    """Both paths of LoRAMultiheadAttention against nn.MultiheadAttention: the explicit one
    (training with branch dropout) to 1e-5, the merged one (otherwise) bit for bit at init;
    masks as open_clip passes them (2-D causal, additive) and the other forms MHA accepts."""
    torch.manual_seed(0)
    width, heads, batch, length = 16, 4, 3, 5
    reference = nn.MultiheadAttention(width, heads, batch_first=batch_first)
    with torch.no_grad():
        reference.in_proj_bias.normal_()
        reference.out_proj.bias.normal_()
    copied = copy.deepcopy(reference)
    copied.out_proj = LoRALinear(copied.out_proj, {0: LoRABranch(width, width, 2, 0.5, 0.25)})
    replaced = LoRAMultiheadAttention(copied, {
        block: LoRABranch(width, width, 2, 0.5, 0.25) for block in (0, 1, 2)})
    shape = (batch, length, width) if batch_first else (length, batch, width)
    x = torch.randn(*shape)
    memory = torch.randn(*((batch, length + 2, width) if batch_first
                           else (length + 2, batch, width)))
    causal = torch.full((length, length), float("-inf")).triu(1)  # open_clip's text mask
    per_head = torch.randn(batch * heads, length, length)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, -2:] = True
    cases = [dict(), dict(attn_mask=causal), dict(attn_mask=causal.isinf()),
             dict(attn_mask=per_head), dict(key_padding_mask=padding),
             dict(attn_mask=causal,  # same mask types together (MHA deprecates mixing)
                  key_padding_mask=torch.zeros(padding.shape).masked_fill(padding, -math.inf))]
    for name, parameter in replaced.named_parameters():  # frozen base, as attach leaves it
        parameter.requires_grad_(".lora." in f".{name}")
    for training in (True, False):
        reference.train(training)
        replaced.train(training)
        assert replaced.dropout_active() == training
        for grad in (True, False):
            reference.requires_grad_(grad)  # like for like: see test_output_unchanged_at_init
            for need_weights in (False, True):
                for case in cases:
                    with torch.set_grad_enabled(grad):
                        want, want_w = reference(x, x, x, need_weights=need_weights, **case)
                        got, got_w = replaced(x, x, x, need_weights=need_weights, **case)
                    where = (training, grad, need_weights, case)
                    assert torch.allclose(got, want, atol=1e-5, rtol=0), where
                    if not training:
                        assert torch.equal(got, want), where
                    if need_weights:
                        assert torch.allclose(got_w, want_w, atol=1e-6), where
            with torch.set_grad_enabled(grad):  # cross-attention: separate key/value inputs
                want = reference(x, memory, memory, need_weights=False)[0]
                got = replaced(x, memory, memory, need_weights=False)[0]
            assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # With trained-looking branches the two paths still agree (eval: no dropout).
    with torch.no_grad():
        for branch in replaced._branches():
            branch.B.normal_()
        for case in cases:
            merged = replaced(x, x, x, need_weights=False, **case)[0]
            explicit = replaced.forward_explicit(x, x, x, need_weights=False, **case)[0]
            assert torch.allclose(merged, explicit, atol=1e-5, rtol=0), case
            assert not torch.allclose(merged, reference(x, x, x, need_weights=False, **case)[0])
    # The base parameters are the original objects under the original names.
    names = {n for n, _ in replaced.named_parameters() if ".lora." not in f".{n}"}
    assert names == set(dict(reference.named_parameters()))
    assert replaced.in_proj_weight is copied.in_proj_weight


def test_dropout_only_on_the_branch_input():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = LoRALinear(base, {0: LoRABranch(8, 6, 2, 1 / math.sqrt(2), 0.5)})
    x = torch.randn(32, 8)
    layer.train()
    assert torch.equal(layer(x), base(x))  # B = 0: dropout cannot touch the output
    with torch.no_grad():
        layer.lora["0"].B.normal_()
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)  # dropout active in training
    layer.eval()
    branch = layer.lora["0"]
    expected = base(x) + (x @ branch.A.t() @ branch.B.t()) / math.sqrt(2)  # alpha / √rank
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.equal(layer(x), layer(x))


def test_training_changes_only_a_and_b():
    loaded = _fresh("tiny-timm-clip")
    adapter = LoRAAdapter.attach(loaded.model, LoRAConfig(matrices=("q", "v", "mlp")))
    trainable = {id(p) for p in adapter.trainable_parameters()}
    for name, parameter in loaded.model.named_parameters():
        assert parameter.requires_grad == (id(parameter) in trainable), name
        if id(parameter) in trainable:
            assert name.endswith((".A", ".B")) and ".lora." in name, name
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    _train(loaded, adapter, steps=3)
    after = loaded.model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        if key.endswith((".A", ".B")) and ".lora." in key:
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key


def _probe_delta(branch: LoRABranch) -> torch.Tensor:
    """ΔW read back through the branch's forward: its output on the identity, in eval mode."""
    was_training = branch.training
    branch.eval()
    with torch.no_grad():
        eye = torch.eye(branch.A.shape[1])
        delta = branch(eye).t()
    branch.train(was_training)
    return delta


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-timm-clip"])
def test_comp_lora_update_stays_orthogonal_to_protected_subspace(name):
    loaded = _fresh(name)
    adapter = CompLoRAAdapter.attach(loaded.model, CompLoRAConfig(matrices=EVERY_MATRIX,
                                                                  protect_energy=0.5))
    _train(loaded, adapter, steps=4, lr=5e-2)
    assert len(adapter.targets) == 2 * 2 * 6
    for target in adapter.targets:
        basis = adapter.protected_basis(target.key)
        assert 0 < basis.shape[1] < basis.shape[0]
        delta = _probe_delta(target.branch)
        assert torch.allclose(delta, adapter.delta_weight(target.key), atol=1e-6)
        norm = delta.norm()
        assert norm > 1e-4, target.key  # it did train
        ratio = (basis.t() @ delta).norm() / norm
        assert ratio < 1e-5, (target.key, float(ratio))
    # Through a whole LoRALinear module too (timm's fused qkv: the v block's rows).
    if name == "tiny-timm-clip":
        qkv = loaded.model.visual.trunk.blocks[1].attn.qkv
        assert isinstance(qkv, LoRALinear)
        with torch.no_grad():
            eye = torch.eye(qkv.in_features)
            delta = (qkv(eye) - F.linear(eye, qkv.weight, qkv.bias)).t()[128:]
        basis = adapter.protected_basis("vision.layer1.v")
        assert (basis.t() @ delta).norm() / delta.norm() < 1e-5

    # Not vacuous: plain LoRA trained the same way writes into those directions.
    plain = _fresh(name)
    lora = LoRAAdapter.attach(plain.model, LoRAConfig(matrices=EVERY_MATRIX))
    _train(plain, lora, steps=4, lr=5e-2)
    key = "vision.layer0.q"
    basis = adapter.protected_basis(key)
    delta = lora.delta_weight(key).detach()
    assert (basis.t() @ delta).norm() / delta.norm() > 0.1


def test_protected_rank_from_energy_on_known_spectrum():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0])  # energies 16, 9, 4, 1 of 30
    assert protected_rank(values, energy=0.5) == 1          # 16/30 = 0.533
    assert protected_rank(values, energy=0.6) == 2          # 25/30 = 0.833
    assert protected_rank(values, energy=25 / 30) == 2      # reached exactly
    assert protected_rank(values, energy=0.9) == 3          # 29/30 = 0.967
    assert protected_rank(values, energy=0.99) == 4
    assert protected_rank(values, energy=1.0) == 4
    assert protected_rank(values, count=3) == 3
    with pytest.raises(ModelError, match="exceeds"):
        protected_rank(values, count=5)

    torch.manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    weight = (left[:, :4] * values.double()) @ right.t()  # 6 × 4 with singular values 4,3,2,1
    branch = CompLoRABranch(weight.float(), rank=2, scaling=1.0, dropout=0.0,
                            protect_rank=None, protect_energy=0.9)
    assert branch.protected == 3
    assert branch.protected_energy == pytest.approx(29 / 30)
    # U spans the top-3 left singular directions (up to sign).
    projector = branch.U.double() @ branch.U.double().t()
    expected = left[:, :3] @ left[:, :3].t()
    assert torch.allclose(projector, expected, atol=1e-5)
    with pytest.raises(ModelError, match="no room"):
        CompLoRABranch(weight[:4].float(), 2, 1.0, 0.0, protect_rank=4, protect_energy=None)


@pytest.mark.parametrize("kind", ["clip_lora", "comp_lora"])
def test_save_holds_only_a_and_b_and_reload_is_exact(tmp_path, images, kind):
    adapter_class, config_class = KINDS[kind]
    config = config_class(matrices=("q", "k", "v", "out"), layers="top1")
    loaded = _fresh()
    adapter = adapter_class.attach(loaded.model, config)
    _train(loaded, adapter, steps=2)
    path = tmp_path / "adapter.safetensors"
    adapter.save(path, {"dataset": "busi"})
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        header = handle.metadata()
    assert keys == set(adapter.named_trainable())
    assert "vision.layer1.q.A" in keys and "text.layer1.out.B" in keys and len(keys) == 16
    assert header["adapter_kind"] == kind and header["dataset"] == "busi"
    with torch.no_grad():
        expected = _predict(loaded, images)

    fresh = _fresh()
    fresh_adapter = adapter_class.attach(fresh.model, config)
    with torch.no_grad():
        assert not torch.equal(_predict(fresh, images), expected)
    fresh_adapter.load(path)
    with torch.no_grad():
        assert torch.equal(_predict(fresh, images), expected)

    svd = SVDAdapter.attach(_fresh().model, SVDConfig())
    with pytest.raises(ModelError, match=f"holds a {kind} adapter, not clip_svd"):
        svd.load(path)
    other_kind = "comp_lora" if kind == "clip_lora" else "clip_lora"
    other_class, other_config = KINDS[other_kind]
    other = other_class.attach(_fresh().model, other_config(matrices=config.matrices,
                                                            layers="top1"))
    with pytest.raises(ModelError, match=f"holds a {kind} adapter, not {other_kind}"):
        other.load(path)
    wider = adapter_class.attach(_fresh().model, dataclasses.replace(config, rank=4))
    with pytest.raises(ModelError, match="rank 2"):
        wider.load(path)
    rescaled = adapter_class.attach(_fresh().model, dataclasses.replace(config, alpha=2.0))
    with pytest.raises(ModelError, match="alpha"):
        rescaled.load(path)
    if kind == "comp_lora":
        shifted = adapter_class.attach(_fresh().model,
                                       dataclasses.replace(config, protect_energy=0.5))
        with pytest.raises(ModelError, match="protect_energy"):
            shifted.load(path)


def test_svd_file_refused_by_lora(tmp_path):
    path = tmp_path / "svd.safetensors"
    SVDAdapter.attach(_fresh().model, SVDConfig()).save(path)
    lora = LoRAAdapter.attach(_fresh().model, LoRAConfig())
    with pytest.raises(ModelError, match="holds a clip_svd adapter, not clip_lora"):
        lora.load(path)


def _count_from_shapes(model: nn.Module, rank: int) -> int:
    """rank × (in + out) per adapted matrix, from the modules' own weight shapes."""
    total = 0
    for module in model.modules():
        if isinstance(module, LoRAMultiheadAttention):
            total += len(module.lora) * rank * (module.embed_dim + module.embed_dim)
        elif isinstance(module, LoRALinear):
            total += len(module.lora) * rank * (module.in_features + module.block_rows)
    return total


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-timm-clip"])
def test_num_trainable_matches_shapes(name):
    loaded = _fresh(name)
    adapter = CompLoRAAdapter.attach(loaded.model, CompLoRAConfig(matrices=EVERY_MATRIX,
                                                                  rank=3, protect_rank=4))
    # 2 encoders × 2 blocks × (q, k, v, out: 3·(64+64) each; mlp: 3·(64+256) twice)
    assert adapter.num_trainable() == _count_from_shapes(loaded.model, 3) == 4 * (
        4 * 3 * 128 + 2 * 3 * 320)
    assert sum(row["trained"] for row in adapter.describe()) == adapter.num_trainable()
    assert all(row["protected"] == 4 for row in adapter.describe())
    qkv = LoRAAdapter.attach(_fresh(name).model, LoRAConfig())
    assert qkv.num_trainable() == 2 * 2 * 3 * 2 * 128
    assert [row["key"] for row in qkv.describe()[:3]] == [
        "vision.layer0.q", "vision.layer0.k", "vision.layer0.v"]


def test_configs_and_registry():
    config = LoRAConfig()
    assert config.matrices == ("q", "k", "v") and config.rank == 2
    assert config.scaling == pytest.approx(1 / math.sqrt(2))
    assert config.dropout == 0.25
    for bad, match in [({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"),
                       ({"alpha": 0}, "alpha"), ({"layers": "sideways"}, "clip_lora layers"),
                       ({"matrices": ["gate"]}, "clip_lora matrices")]:
        with pytest.raises(ModelError, match=match):
            LoRAConfig.from_dict(bad)
    with pytest.raises(ModelError, match="unknown clip_lora option"):
        LoRAConfig.from_dict({"protect_rank": 3})
    with pytest.raises(ModelError, match="both are null"):
        CompLoRAConfig(protect_energy=None)
    with pytest.raises(ModelError, match="protect_energy"):
        CompLoRAConfig(protect_energy=1.5)
    with pytest.raises(ModelError, match="cannot configure"):
        LoRAConfig.from_dict(SVDConfig())
    comp = config_for("comp_lora", {"rank": 4, "protect_rank": 8, "lr": 2e-4, "batch_size": 32})
    assert isinstance(comp, CompLoRAConfig) and comp.rank == 4 and comp.protect_rank == 8
    assert isinstance(config_for("clip_svd", {"layers": "top1"}), SVDConfig)
    with pytest.raises(ModelError, match="no adapter"):
        config_for("zero_shot", {})
    assert ADAPTERS["clip_lora"] is LoRAAdapter and ADAPTERS["comp_lora"] is CompLoRAAdapter
    assert set(ADAPTERS) == set(CONFIGS), "every adapter has its config class"
    assert CompLoRAConfig().to_dict()["protect_energy"] == 0.9

    loaded = _fresh()
    LoRAAdapter.attach(loaded.model, LoRAConfig(layers=[-1]))
    with pytest.raises(ModelError, match="already has an adapter"):
        LoRAAdapter.attach(loaded.model, LoRAConfig())
    with pytest.raises(ModelError, match="already has an adapter"):
        SVDAdapter.attach(loaded.model, SVDConfig())
    with pytest.raises(ModelError, match="out of range"):
        LoRAAdapter.attach(_fresh().model, LoRAConfig(layers=[2]))
    with pytest.raises(ModelError, match="CLIP-LoRA found no transformer blocks"):
        LoRAAdapter.attach(nn.Sequential(nn.Linear(4, 4)), LoRAConfig())


def _attention_blocks(model) -> dict[str, list]:
    return {"vision": list(model.visual.transformer.resblocks),
            "text": list(model.transformer.resblocks)}


def _energy_rank(weight: torch.Tensor, energy: float) -> int:
    """k recomputed here from numpy's SVD: the smallest k holding ``energy`` of Σ s²."""
    import numpy as np

    s = np.linalg.svd(weight.detach().double().numpy(), compute_uv=False)
    fraction = np.cumsum(s ** 2) / np.sum(s ** 2)
    return int(np.argmax(fraction >= energy - 1e-9)) + 1


def test_comp_lora_protects_each_pretrained_matrix_by_its_own_spectrum():
    """On the pretrained miniature, whose spectra decay unevenly (unlike a random matrix's,
    where every block needs about the same share of its directions), the protected rank at
    90 % energy is each q/k/v block's own, recomputed from numpy's SVD of that block; the
    ranks vary across matrices (11 to 62 of 128 directions) and stay below the random
    model's (65 or 66 for every block). Caught when tried: energy summed over s instead of s²
    (80 directions protected where the block's spectrum gives 19)."""
    ranks = {}
    for weights in ("medmnist", None):
        loaded = load_model("mini-clip", weights)
        originals = {}
        for encoder, blocks in _attention_blocks(loaded.model).items():
            for layer, block in enumerate(blocks):
                fused = block.attn.in_proj_weight.detach().clone()
                for index, matrix in enumerate(("q", "k", "v")):
                    rows = fused.shape[0] // 3
                    originals[f"{encoder}.layer{layer}.{matrix}"] = fused[index * rows:(index + 1) * rows]
        adapter = CompLoRAAdapter.attach(loaded.model, CompLoRAConfig(protect_energy=0.9))
        assert sorted(t.key for t in adapter.targets) == sorted(originals)
        ranks[weights] = {}
        for target in adapter.targets:
            expected = _energy_rank(originals[target.key], 0.9)
            assert target.branch.protected == expected, target.key
            ranks[weights][target.key] = expected
    pretrained, random = ranks["medmnist"], ranks[None]
    assert max(pretrained.values()) - min(pretrained.values()) >= 20  # uneven spectra
    assert max(random.values()) - min(random.values()) <= 5  # a random block's are alike
    assert sum(pretrained.values()) < sum(random.values())
