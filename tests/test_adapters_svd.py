"""CLIP-SVD: exact at init, only singular values train, files hold only them and reload exactly."""
from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from clipsvd.adapters import SVDAdapter, SVDConfig, freeze
from clipsvd.adapters.svd import SingularValueDelta, resolve_layers
from adapter_helpers import predict as _predict, train_steps as _train
from clipsvd.errors import ModelError
from clipsvd.models import load_model



def _is_singular_value(name: str) -> bool:
    return ".parametrizations." in name and ".s." in name


@pytest.fixture()
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("execution", ["recompose", "auto"])
@pytest.mark.parametrize("grad", [False, True])
def test_adapted_model_equals_pretrained_at_init(images, grad, execution):
    """Compared like for like: nn.MultiheadAttention takes its fused fast path only when no
    input needs grad, and the two kernels differ by ~1e-7, so the reference runs in the same
    autograd state as the adapted model (frozen under no_grad, trainable under grad).

    The recomposed delta form is bit-identical; under auto, training-mode calls with few
    tokens take the factored form, which differs only by the round-off of U diag(s0) Vh."""
    reference = load_model("tiny-clip", None, init_seed=0)
    if not grad:
        freeze(reference.model)
    adapted = load_model("tiny-clip", None, init_seed=0)
    SVDAdapter.attach(adapted.model, SVDConfig(execution=execution))
    with torch.set_grad_enabled(grad):
        expected = _predict(reference, images)
        got = _predict(adapted, images)
    # logits are 100 x cosine: a cosine round-off of 1e-7 is 1e-5 here
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    if execution == "recompose" or not grad:
        assert torch.equal(got, expected)  # the delta is exactly zero at init
    else:
        assert not torch.equal(got, expected)  # the MLP layers really took the factored form


def test_multihead_attention_fast_path_uses_adapted_weights(monkeypatch, images):
    """In eval mode without grad, nn.MultiheadAttention runs its fused kernel; it must see the
    parametrised in_proj_weight / out_proj.weight, trained values included."""
    loaded = load_model("tiny-clip", None, init_seed=0)
    adapter = SVDAdapter.attach(loaded.model, SVDConfig(encoders=("vision",)))
    calls = []
    native = torch._native_multi_head_attention

    def spy(*args, **kwargs):
        calls.append(args[5])  # in_proj_weight
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", spy)
    with torch.no_grad():
        for parameter in adapter.trainable_parameters():
            parameter.mul_(1.5)
        fast = loaded.model.encode_image(images)
    assert calls, "the fast path was not taken"
    block = loaded.model.visual.transformer.resblocks[0].attn
    assert torch.equal(calls[0], block.in_proj_weight)
    assert not torch.equal(calls[0], block.parametrizations.in_proj_weight.original)
    with torch.enable_grad():
        slow = loaded.model.encode_image(images)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_only_singular_values_are_trainable_and_get_gradients(images):
    loaded = load_model("tiny-clip", None)
    adapter = SVDAdapter.attach(loaded.model, SVDConfig())
    trainable = {id(p) for p in adapter.trainable_parameters()}
    loaded.model.train()
    F.cross_entropy(_predict(loaded, images), torch.tensor([0, 1, 2, 0])).backward()
    for name, parameter in loaded.model.named_parameters():
        if id(parameter) in trainable:
            assert _is_singular_value(name) and parameter.requires_grad
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    assert len(trainable) == len(adapter.targets) == 2 * 2 * 6


def test_gradient_is_diagonal_of_projected_weight_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(5, 7)
    delta = SingularValueDelta(layer.weight, 1, [0])
    parametrize.register_parametrization(layer, "weight", delta, unsafe=True)
    with torch.no_grad():
        delta.s["0"].add_(torch.randn(5) * 0.1)  # away from s0, so the check is not trivial
    x = torch.randn(11, 5)
    (layer(x).sin().sum()).backward()
    weight = layer.weight.detach().clone().requires_grad_(True)
    F.linear(x, weight, layer.bias.detach()).sin().sum().backward()
    u, _, vh = delta.factors(0)
    expected = torch.diagonal(u.t() @ weight.grad @ vh.t())
    assert torch.allclose(delta.s["0"].grad, expected, atol=1e-5)


def test_fused_blocks_are_decomposed_separately():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    original = attention.in_proj_weight.detach().clone()
    delta = SingularValueDelta(attention.in_proj_weight, 3, [0, 2])
    parametrize.register_parametrization(attention, "in_proj_weight", delta, unsafe=True)
    assert set(delta.s.keys()) == {"0", "2"}
    for block in (0, 2):
        u, s0, vh = delta.factors(block)
        rows = original[block * 8:(block + 1) * 8]
        assert torch.allclose((u * s0) @ vh, rows, atol=1e-6)
    with torch.no_grad():
        delta.s["0"].mul_(2.0)
        delta.s["2"].mul_(0.5)
    weight = attention.in_proj_weight
    assert torch.equal(weight[8:16], original[8:16])  # the unselected k block is untouched
    assert not torch.equal(weight[:8], original[:8])
    u, s0, vh = delta.factors(0)
    assert torch.allclose(weight[:8], (u * (2 * s0)) @ vh, atol=1e-5)


def test_training_changes_only_selected_singular_values():
    loaded = load_model("tiny-clip", None)
    config = SVDConfig(encoders=("vision",), matrices=("q", "mlp"), layers="top1")
    adapter = SVDAdapter.attach(loaded.model, config)
    assert sorted(adapter.named_trainable()) == [
        "vision.layer1.mlp_fc", "vision.layer1.mlp_proj", "vision.layer1.q"]
    base_before = {k: v.clone() for k, v in loaded.model.state_dict().items()
                   if not _is_singular_value(k)}
    s_before = {k: v.detach().clone() for k, v in adapter.named_trainable().items()}
    blocks = loaded.model.visual.transformer.resblocks
    effective_before = {
        "vision0.in_proj": blocks[0].attn.in_proj_weight.detach().clone(),
        "vision0.c_fc": blocks[0].mlp.c_fc.weight.detach().clone(),
        "vision1.kv": blocks[1].attn.in_proj_weight[64:].detach().clone(),
        "vision1.out": blocks[1].attn.out_proj.weight.detach().clone(),
        "text1.in_proj": loaded.model.transformer.resblocks[1].attn.in_proj_weight.detach().clone(),
    }
    _train(loaded, adapter, steps=3)
    after = loaded.model.state_dict()
    for key, value in base_before.items():
        assert torch.equal(after[key], value), key
    for key, value in s_before.items():
        assert not torch.equal(adapter.named_trainable()[key].detach(), value), key
    effective_after = {
        "vision0.in_proj": blocks[0].attn.in_proj_weight,
        "vision0.c_fc": blocks[0].mlp.c_fc.weight,
        "vision1.kv": blocks[1].attn.in_proj_weight[64:],
        "vision1.out": blocks[1].attn.out_proj.weight,
        "text1.in_proj": loaded.model.transformer.resblocks[1].attn.in_proj_weight,
    }
    for key, value in effective_before.items():
        assert torch.equal(effective_after[key].detach(), value), key
    assert not isinstance(blocks[0].mlp.c_fc, parametrize.ParametrizationList)
    assert not parametrize.is_parametrized(blocks[0].mlp.c_fc)


def test_save_holds_only_singular_values_and_reload_is_exact(tmp_path, images):
    loaded = load_model("tiny-clip", None)
    adapter = SVDAdapter.attach(loaded.model, SVDConfig())
    _train(loaded, adapter, steps=2)
    path = tmp_path / "adapter.safetensors"
    adapter.save(path, {"dataset": "busi", "seed": "1"})
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        header = handle.metadata()
        sizes = {k: handle.get_tensor(k).numel() for k in keys}
    assert keys == set(adapter.named_trainable())
    assert "vision.layer0.q" in keys and "text.layer1.mlp_fc" in keys
    assert all(size == 64 for size in sizes.values())  # min(out, in) of every 64-wide matrix
    assert sum(sizes.values()) == adapter.num_trainable() == 2 * 2 * 6 * 64
    assert header["adapter_kind"] == "clip_svd" and header["dataset"] == "busi"
    assert header["model_fingerprint"] == loaded.fingerprint
    with torch.no_grad():
        expected = _predict(loaded, images)

    fresh = load_model("tiny-clip", None)
    fresh_adapter = SVDAdapter.attach(fresh.model, SVDConfig())
    with torch.no_grad():
        assert not torch.equal(_predict(fresh, images), expected)
    fresh_adapter.load(path)
    with torch.no_grad():
        assert torch.equal(_predict(fresh, images), expected)


def test_loading_into_another_model_or_adapter_is_a_clear_error(tmp_path):
    loaded = load_model("tiny-clip", None)
    adapter = SVDAdapter.attach(loaded.model, SVDConfig())
    path = tmp_path / "adapter.safetensors"
    adapter.save(path, {})

    narrow_vision = {"image_size": 64, "layers": 2, "width": 32, "head_width": 16,
                     "patch_size": 8}
    narrow = open_clip.create_model("tiny-clip", vision_cfg=narrow_vision)
    narrow_adapter = SVDAdapter.attach(narrow, SVDConfig())
    with pytest.raises(ModelError) as info:
        narrow_adapter.load(path)
    message = str(info.value)
    assert str(path) in message and "vision.layer0.q" in message
    assert "(32,)" in message and "(64,)" in message

    only_vision = SVDAdapter.attach(load_model("tiny-clip", None).model,
                                    SVDConfig(encoders=("vision",)))
    with pytest.raises(ModelError, match="text.layer0"):
        only_vision.load(path)

    other_weights = SVDAdapter.attach(load_model("tiny-clip", None, init_seed=5).model,
                                      SVDConfig())
    with pytest.raises(ModelError, match="base model"):
        other_weights.load(path)
    other_weights.load(path, check_fingerprint=False)

    lora_file = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(lora_file), metadata={"adapter_kind": "lora"})
    with pytest.raises(ModelError, match="lora"):
        adapter.load(lora_file)


def test_layer_selection():
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers("top2", 12) == [10, 11]
    assert resolve_layers("bottom1", 12) == [0]
    assert resolve_layers("middle", 12) == [4, 5, 6, 7]
    assert resolve_layers([0, -1, 3], 12) == [0, 3, 11]
    with pytest.raises(ModelError, match="out of range"):
        resolve_layers([12], 12, "vision")
    with pytest.raises(ModelError, match="13"):
        resolve_layers("top13", 12)
    with pytest.raises(ModelError, match="invalid"):
        SVDConfig(layers="sideways")
    with pytest.raises(ModelError, match="matrices"):
        SVDConfig(matrices=("q", "gate"))
    with pytest.raises(ModelError, match="unknown svd option"):
        SVDConfig.from_dict({"rank": 4})

    loaded = load_model("tiny-clip", None)
    adapter = SVDAdapter.attach(loaded.model, SVDConfig.from_dict(
        {"layers": [-1], "matrices": ["out"]}))
    assert sorted(adapter.named_trainable()) == ["text.layer1.out", "vision.layer1.out"]
    rows = adapter.describe()
    assert rows[0]["encoder"] == "vision" and rows[0]["layer"] == 1
    assert rows[0]["shape"] == [64, 64] and rows[0]["trained"] == 64
    with pytest.raises(ModelError, match="out of range"):
        SVDAdapter.attach(load_model("tiny-clip", None).model, SVDConfig(layers=[2]))
    with pytest.raises(ModelError, match="already has an adapter"):
        SVDAdapter.attach(loaded.model, SVDConfig())


def test_unknown_architecture_lists_module_types():
    with pytest.raises(ModelError, match="Linear"):
        SVDAdapter.attach(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), SVDConfig())


def _independent_count(blocks) -> int:
    total = 0
    for block in blocks:
        d = block.attn.in_proj_weight.shape[1]
        total += 3 * min(block.attn.in_proj_weight.shape[0] // 3, d)
        for weight in (block.attn.out_proj.weight, block.mlp.c_fc.weight, block.mlp.c_proj.weight):
            total += min(weight.shape)
    return total


@pytest.mark.slow
def test_vit_b16_trained_count_matches_layer_shapes():
    loaded = load_model("ViT-B-16", None)
    vision = _independent_count(loaded.model.visual.transformer.resblocks)
    text = _independent_count(loaded.model.transformer.resblocks)
    assert vision == 12 * 4608 and text == 12 * 3072
    total_parameters = sum(p.numel() for p in loaded.model.parameters())
    adapter = SVDAdapter.attach(loaded.model, SVDConfig())
    assert adapter.num_trainable() == vision + text == 92_160
    assert adapter.trainable_fraction() == pytest.approx(92_160 / total_parameters)
    assert len(adapter.describe()) == 2 * 12 * 6


def test_timm_trunk_layout_is_adapted_exactly(images):
    """tiny-timm-clip has BiomedCLIP's vision layout (timm Block: fused attn.qkv, fc1/fc2)."""
    reference = load_model("tiny-timm-clip", None)
    freeze(reference.model)
    loaded = load_model("tiny-timm-clip", None)
    adapter = SVDAdapter.attach(loaded.model, SVDConfig(encoders=("vision",)))
    modules = [row["module"] for row in adapter.describe()]
    assert modules[:2] == ["visual.trunk.blocks.0.attn.qkv.weight[block 0]",
                           "visual.trunk.blocks.0.attn.qkv.weight[block 1]"]
    assert "visual.trunk.blocks.1.mlp.fc2.weight" in modules
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), reference.model.encode_image(images))
    loaded.model.train()
    loaded.model.encode_image(images).sum().backward()
    trainable = {id(p) for p in adapter.trainable_parameters()}
    for name, parameter in loaded.model.named_parameters():
        assert (parameter.grad is not None) == (id(parameter) in trainable), name
    assert adapter.num_trainable() == 2 * 6 * 64
