"""Model loading: deterministic random init, local checkpoints and folders, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from clipsvd.errors import ModelError
from clipsvd.models import (MODEL_CONFIG_DIR, encode_class_prompts, encode_images, load_model,
                            logits, state_dict_fingerprint)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_clip_random_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = load_model("tiny-clip", None, init_seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    second = load_model("tiny-clip", None, init_seed=0)
    other = load_model("tiny-clip", None, init_seed=1)
    assert first.fingerprint == second.fingerprint
    assert _same_weights(first.model, second.model)
    assert other.fingerprint != first.fingerprint
    assert first.pretrained is None and first.name == "tiny-clip"
    assert first.image_size == 64 and len(first.mean) == 3 and len(first.std) == 3
    assert not first.model.training
    tokens = first.tokenizer(["a photo of a cat."])
    assert tokens.dtype == torch.long and tokens.shape == (1, 32)


def test_fingerprint_depends_on_values():
    loaded = load_model("tiny-clip", None, init_seed=0)
    before = state_dict_fingerprint(loaded.model)
    assert before == loaded.fingerprint
    with torch.no_grad():
        loaded.model.logit_scale.add_(1e-3)
    assert state_dict_fingerprint(loaded.model) != before


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_reproduces_model(tmp_path, suffix):
    source = load_model("tiny-clip", None, init_seed=1)
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = load_model("tiny-clip", str(path), init_seed=0)
    assert loaded.pretrained == str(path)
    assert loaded.fingerprint == source.fingerprint
    assert _same_weights(loaded.model, source.model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), source.model.encode_image(images))


def test_local_dir_folder(tmp_path):
    source = load_model("tiny-clip", None, init_seed=2)
    config = json.loads((MODEL_CONFIG_DIR / "tiny-clip.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    loaded = load_model(f"local-dir:{tmp_path}")
    assert loaded.fingerprint == source.fingerprint
    assert loaded.image_size == 64


def test_checkpoint_of_another_shape_is_a_model_error(tmp_path):
    state = dict(load_model("tiny-clip", None).model.state_dict())
    state.pop("logit_scale")
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ModelError, match="do not fit"):
        load_model("tiny-clip", str(path))


def test_unknown_model_name():
    with pytest.raises(ModelError, match=r"unknown model name 'ViT-Q-99'.*list_models"):
        load_model("ViT-Q-99")


def test_unknown_pretrained_tag_lists_valid_tags():
    with pytest.raises(ModelError) as info:
        load_model("ViT-B-16", "not_a_tag")
    message = str(info.value)
    assert "not_a_tag" in message and "openai" in message and "\n" not in message


def test_missing_checkpoint_file(tmp_path):
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(ModelError, match="not found"):
        load_model("tiny-clip", str(missing))


def test_missing_local_dir(tmp_path):
    with pytest.raises(ModelError, match="open_clip_config.json"):
        load_model(f"local-dir:{tmp_path / 'absent'}")


def _run_offline(code: str, tmp_path, marker: str, timeout: int = 120) -> list[str]:
    """Run ``code`` in a fresh interpreter with the Hugging Face hub offline and an empty cache;
    return its output lines that start with ``marker`` (at least one)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
    assert lines, result.stdout + result.stderr
    return lines


def test_hf_hub_offline_without_cache_says_what_to_do(tmp_path):
    code = ("from clipsvd.models import load_model\n"
            "from clipsvd.errors import ModelError\n"
            "try:\n"
            "    load_model('hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224')\n"
            "except ModelError as exc:\n"
            "    print('MODELERROR', exc)\n")
    lines = _run_offline(code, tmp_path, "MODELERROR")
    assert "HF_HUB_OFFLINE" in lines[0] and "local-dir:" in lines[0]


def test_class_prompts_are_normalised_averaged_and_differentiable():
    loaded = load_model("tiny-clip", None)
    templates = ["a photo of a {}.", "an image of {}."]
    features = encode_class_prompts(loaded, ["big_cat", "dog"], templates)
    assert features.shape == (2, 32)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert features.requires_grad
    tokens = loaded.tokenizer([t.format("big cat") for t in templates])
    single = torch.nn.functional.normalize(loaded.model.encode_text(tokens), dim=-1)
    expected = torch.nn.functional.normalize(single.mean(0), dim=-1)
    assert torch.allclose(features[0], expected, atol=1e-6)
    images = encode_images(loaded.model, torch.randn(3, 3, 64, 64))
    assert torch.allclose(images.norm(dim=-1), torch.ones(3), atol=1e-6)
    scores = logits(loaded.model, images, features, 100.0)
    assert scores.shape == (3, 2)
    assert torch.allclose(scores, 100.0 * images @ features.t())
    learned = logits(loaded.model, images, features)
    assert torch.allclose(learned, loaded.model.logit_scale.exp() * images @ features.t())
    with pytest.raises(ModelError, match="no '\\{\\}'"):
        encode_class_prompts(loaded, ["dog"], ["a photo"])


def test_tiny_biomedclip_loads_with_hub_offline_and_an_empty_cache(tmp_path):
    """BiomedCLIP's layout (timm trunk + Hugging Face BERT text tower) comes from files in the
    package: no hub download, no cache, and the BERT tower is random, not from_pretrained."""
    code = ("from clipsvd.models import load_model\n"
            "loaded = load_model('tiny-biomedclip', None, init_seed=3)\n"
            "tokens = loaded.tokenizer(['a photo of a glioma tumor.'])\n"
            "print('OK', type(loaded.model.text).__name__, tuple(tokens.shape), "
            "tuple(loaded.model.encode_text(tokens).shape), loaded.fingerprint)\n")
    lines = _run_offline(code, tmp_path, "OK", timeout=180)
    assert lines[0].split()[1:6] == ["HFTextEncoder", "(1,", "32)", "(1,", "32)"]
    assert lines[0].split()[-1] == load_model("tiny-biomedclip", None, init_seed=3).fingerprint
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))
