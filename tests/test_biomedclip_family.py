"""BiomedCLIP's layout in miniature, offline: ``tiny-biomedclip`` has a timm ViT trunk (fused
``attn.qkv``, ``mlp.fc1``/``fc2``) and a 2-layer BERT text tower that ``transformers`` builds
from ``resources/tiny-bert`` (config.json + vocab.txt), loaded through ``load_model`` like the
real ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``. No test here may
touch the network: every model is built under a socket guard."""
from __future__ import annotations

import copy
import dataclasses
import socket

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from adapter_helpers import CLASSES, TEMPLATES, predict, train_steps
from clipsvd.adapters import LoRAAdapter, LoRAConfig, SVDAdapter, SVDConfig, freeze
from clipsvd.adapters.lora import LoRALinear
from clipsvd.models import MODEL_CONFIG_DIR, load_model

NAME = "tiny-biomedclip"
TINY_BERT = MODEL_CONFIG_DIR.parent / "resources" / "tiny-bert"
BERT_MATRICES = {"q": "attention.self.query", "k": "attention.self.key",
                 "v": "attention.self.value", "out": "attention.output.dense",
                 "mlp_fc": "intermediate.dense", "mlp_proj": "output.dense"}


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


@pytest.fixture(scope="module")
def base():
    """One random-weight tiny-biomedclip (building it is the slow part), made with every socket
    connection refused, so a hub lookup by transformers or open_clip fails the test."""
    guard = pytest.MonkeyPatch()
    guard.setattr(socket.socket, "connect", _no_network)
    guard.setattr(socket, "create_connection", _no_network)
    try:
        loaded = load_model(NAME, None, init_seed=0)
        loaded.tokenizer(["warm up the tokenizer."])
        yield loaded
    finally:
        guard.undo()


def _fresh(loaded):
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))


@pytest.fixture()
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def test_config_points_at_the_packaged_bert_and_survives_a_rescan():
    text_cfg = open_clip.get_model_config(NAME)["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == str(TINY_BERT)
    assert text_cfg["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    assert text_cfg["hf_proj_type"] == "mlp"
    open_clip.add_model_config(MODEL_CONFIG_DIR)  # open_clip rescans its config folders
    assert open_clip.get_model_config(NAME)["text_cfg"]["hf_model_name"] == str(TINY_BERT)
    assert NAME in open_clip.list_models()


def test_random_init_is_deterministic_offline(base, monkeypatch):
    from open_clip.hf_model import HFTextEncoder
    from timm.models.vision_transformer import VisionTransformer

    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    again = load_model(NAME, None, init_seed=0)
    other = load_model(NAME, None, init_seed=1)
    assert again.fingerprint == base.fingerprint != other.fingerprint
    state, again_state = base.model.state_dict(), again.model.state_dict()
    assert state.keys() == again_state.keys()
    assert all(torch.equal(state[k], again_state[k]) for k in state)
    assert isinstance(base.model.text, HFTextEncoder)
    assert isinstance(base.model.visual.trunk, VisionTransformer)
    assert type(base.model.text.transformer).__name__ == "BertModel"
    assert len(base.model.text.transformer.encoder.layer) == 2
    assert base.pretrained is None and not base.model.training
    assert base.image_size == 64


def test_tokenizer_knows_the_prompts(base):
    tokens = base.tokenizer(["a photo of a glioma tumor.", "an MRI of a Meningioma."])
    assert tokens.dtype == torch.long and tokens.shape == (2, 32)
    vocab = base.tokenizer.tokenizer
    assert vocab.unk_token_id not in tokens[0].tolist()
    assert tokens[0, 0] == vocab.cls_token_id
    pieces = vocab.convert_ids_to_tokens([t for t in tokens[0].tolist() if t != 0])
    assert pieces == ["[CLS]", "a", "photo", "of", "a", "glioma", "tumor", ".", "[SEP]"]
    assert tokens[1].tolist().count(vocab.unk_token_id) == 0  # lowercased
    every = base.tokenizer([t.format(c.replace("_", " ")) for c in CLASSES for t in TEMPLATES])
    assert vocab.unk_token_id not in every.flatten().tolist()
    with torch.no_grad():
        features = base.model.encode_text(tokens)
    assert features.shape == (2, 32) and torch.isfinite(features).all()


def test_svd_targets_timm_vision_and_bert_text(base):
    loaded = _fresh(base)
    adapter = SVDAdapter.attach(loaded.model, SVDConfig())
    rows = {row["key"]: row for row in adapter.describe()}
    for layer in range(2):
        for matrix, path in BERT_MATRICES.items():
            row = rows[f"text.layer{layer}.{matrix}"]
            assert row["module"] == f"text.transformer.encoder.layer.{layer}.{path}.weight"
        assert rows[f"vision.layer{layer}.k"]["module"] == (
            f"visual.trunk.blocks.{layer}.attn.qkv.weight[block 1]")
        assert rows[f"vision.layer{layer}.mlp_proj"]["module"] == (
            f"visual.trunk.blocks.{layer}.mlp.fc2.weight")
    assert len(rows) == 2 * 2 * 6
    assert rows["text.layer0.mlp_fc"]["shape"] == [256, 64]
    assert rows["text.layer1.mlp_proj"]["shape"] == [64, 256]


def _count_from_shapes(model: nn.Module) -> int:
    """min(out, in) per adapted matrix (q, k, v each counted once: one third of timm's qkv)."""
    total = 0
    for block in model.visual.trunk.blocks:
        qkv = block.attn.qkv.weight
        total += 3 * min(qkv.shape[0] // 3, qkv.shape[1])
        total += sum(min(m.weight.shape) for m in (block.attn.proj, block.mlp.fc1, block.mlp.fc2))
    for layer in model.text.transformer.encoder.layer:
        total += sum(min(layer.get_submodule(path).weight.shape)
                     for path in BERT_MATRICES.values())
    return total


def test_svd_trained_count_matches_shapes(base):
    loaded = _fresh(base)
    adapter = SVDAdapter.attach(loaded.model, SVDConfig())
    assert adapter.num_trainable() == _count_from_shapes(loaded.model) == 2 * 2 * 6 * 64
    assert sum(row["trained"] for row in adapter.describe()) == adapter.num_trainable()


@pytest.mark.parametrize("grad", [False, True])
def test_svd_logits_equal_the_unadapted_model_at_init(base, images, grad):
    reference = _fresh(base)
    if not grad:
        freeze(reference.model)
    adapted = _fresh(base)
    SVDAdapter.attach(adapted.model, SVDConfig())
    with torch.set_grad_enabled(grad):
        expected = predict(reference, images)
        got = predict(adapted, images)
    # float32 round-off of U·diag(s)·Vᵀ against W (observed 1e-4 on logits of 10-16), so the
    # bound is relative to the logits' size.
    assert torch.allclose(got, expected, atol=1e-5, rtol=2e-5)


def test_svd_only_singular_values_get_gradients(base, images):
    loaded = _fresh(base)
    adapter = SVDAdapter.attach(loaded.model, SVDConfig())
    trainable = {id(p) for p in adapter.trainable_parameters()}
    loaded.model.train()
    F.cross_entropy(predict(loaded, images), torch.tensor([0, 1, 2, 0])).backward()
    for name, parameter in loaded.model.named_parameters():
        assert (parameter.grad is not None) == (id(parameter) in trainable), name
    text_grads = [p.grad for n, p in loaded.model.named_parameters()
                  if id(p) in trainable and n.startswith("text.transformer.encoder.layer")]
    assert len(text_grads) == 2 * 6 and all(g.abs().sum() > 0 for g in text_grads)


def test_svd_save_and_reload_reproduces_predictions(base, images, tmp_path):
    loaded = _fresh(base)
    adapter = SVDAdapter.attach(loaded.model, SVDConfig())
    train_steps(loaded, adapter, steps=2)
    path = tmp_path / "adapter.safetensors"
    adapter.save(path, {"dataset": "brain_tumor"})
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(adapter.named_trainable())
    assert {"text.layer0.q", "text.layer1.mlp_proj", "vision.layer1.v"} <= keys
    with torch.no_grad():
        expected = predict(loaded, images)

    fresh = _fresh(base)
    fresh_adapter = SVDAdapter.attach(fresh.model, SVDConfig())
    with torch.no_grad():
        assert not torch.equal(predict(fresh, images), expected)
    fresh_adapter.load(path)
    with torch.no_grad():
        assert torch.equal(predict(fresh, images), expected)


def test_lora_wraps_bert_qkv_and_leaves_logits_unchanged(base, images):
    reference = _fresh(base)
    adapted = _fresh(base)
    adapter = LoRAAdapter.attach(adapted.model, LoRAConfig())
    layer = adapted.model.text.transformer.encoder.layer[0]
    for path in ("attention.self.query", "attention.self.key", "attention.self.value"):
        assert isinstance(layer.get_submodule(path), LoRALinear), path
    assert not isinstance(layer.get_submodule("attention.output.dense"), LoRALinear)
    keys = [row["key"] for row in adapter.describe()]
    assert [k for k in keys if k.startswith("text.layer1.")] == [
        "text.layer1.q", "text.layer1.k", "text.layer1.v"]
    assert adapter.num_trainable() == 2 * 2 * 3 * 2 * (64 + 64)
    for grad in (False, True):
        for parameter in reference.model.parameters():
            parameter.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            expected = predict(reference, images)
            got = predict(adapted, images)
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), grad
