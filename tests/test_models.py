"""Model loading: deterministic random init, local checkpoints and folders, clear errors."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clipsvd.errors import ModelError
from clipsvd.models import (MODEL_CONFIG_DIR, encode_class_prompts, encode_images, load_model,
                            logits, model_fingerprint)


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
    before = model_fingerprint(loaded.model)
    assert before == loaded.fingerprint
    with torch.no_grad():
        loaded.model.logit_scale.add_(1e-3)
    assert model_fingerprint(loaded.model) != before


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


def test_every_pretrained_tag_gets_the_activation_its_weights_were_trained_with():
    """Issue 16.1, for every (model, tag) open_clip can load: the architecture clipsvd builds
    uses QuickGELU exactly when the tag's weights were trained with it (ViT-B-16 + openai among
    them; open_clip builds GELU there and only warns). The one pair whose config and tag
    disagree the other way (roberta-ViT-B-32 + laion2b_s12b_b32k) is refused, not guessed.
    No weights are loaded. Catches the QuickGELU switch removed (27 pairs wrong)."""
    from clipsvd.models import model_architecture

    refused = []
    for name, tag in open_clip.list_pretrained():
        wanted = open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False)
        try:
            config = model_architecture(name, tag)["model_cfg"]
        except ModelError as exc:
            assert "QuickGELU" in str(exc) and tag in str(exc)
            refused.append((name, tag))
            continue
        assert config.get("quick_gelu", False) == wanted, (name, tag)
    assert refused == [("roberta-ViT-B-32", "laion2b_s12b_b32k")]


def _same_weights_other_activation(seed: int = 5) -> tuple[torch.nn.Module, torch.nn.Module]:
    gelu = load_model("tiny-clip", None, init_seed=seed).model
    with torch.random.fork_rng(devices=[]):
        quick = open_clip.create_model("tiny-clip", force_quick_gelu=True)
    quick.load_state_dict(gelu.state_dict())
    return gelu, quick.eval()


def test_gelu_and_quickgelu_models_of_the_same_weights_differ_in_fingerprint_and_adapters(
        tmp_path):
    """Issue 16.1: the fingerprint covered the weights only, so a model built with GELU and one
    built with QuickGELU from the same weights had one fingerprint, and an adapter trained on
    the wrong one loaded into the right one. Now the fingerprint covers the architecture, and
    such an adapter is refused. Catches the module classes (or the recorded config) left out
    of model_fingerprint."""
    from clipsvd.adapters import SVDAdapter

    gelu, quick = _same_weights_other_activation()
    assert gelu.state_dict().keys() == quick.state_dict().keys()
    assert all(torch.equal(gelu.state_dict()[k], quick.state_dict()[k])
               for k in gelu.state_dict())
    assert model_fingerprint(gelu) != model_fingerprint(quick)
    adapter = SVDAdapter.attach(gelu, {"matrices": ["q"], "layers": [0]})
    adapter.save(tmp_path / "adapter.safetensors")
    other = SVDAdapter.attach(quick, {"matrices": ["q"], "layers": [0]})
    with pytest.raises(ModelError, match="trained on base model"):
        other.load(tmp_path / "adapter.safetensors")


def test_fingerprint_covers_the_recorded_configuration():
    """Two models of the same modules and weights but another recorded open_clip config (the
    record load_model keeps, e.g. quick_gelu for a tower whose activation is not a module)
    differ. Catches the recorded config left out of model_fingerprint."""
    from clipsvd.models import ARCHITECTURE_ATTRIBUTE

    loaded = load_model("tiny-clip", None, init_seed=0)
    before = model_fingerprint(loaded.model)
    record = json.loads(json.dumps(getattr(loaded.model, ARCHITECTURE_ATTRIBUTE)))
    record["preprocess"]["mean"] = [0.5, 0.5, 0.5]
    setattr(loaded.model, ARCHITECTURE_ATTRIBUTE, record)
    assert model_fingerprint(loaded.model) != before


@pytest.mark.slow
def test_vit_b16_openai_from_an_offline_cache_uses_quickgelu(tmp_path):
    """Issue 16.1 end to end, the README's row for OpenAI CLIP: ViT-B-16 + openai, with weights
    (random values, real architecture) in a fake offline Hugging Face cache laid out where
    open_clip resolves the tag (timm/vit_base_patch16_clip_224.openai, open_clip_model.
    safetensors), builds QuickGELU blocks and no GELU, logs no open_clip warning, and has
    another fingerprint than the GELU model loaded from the same file. Its input size and
    normalisation from config alone equal the built model's. One process, ~2 GiB.
    Catches: the tag's QuickGELU not applied (the GELU model, and open_clip's warning)."""
    code = """
import json, logging, os, sys
from pathlib import Path
import torch, open_clip
from safetensors.torch import save_file
from clipsvd.models import load_model, model_preprocessing

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
snapshot = (Path(os.environ['HF_HOME']) / 'hub' / 'models--timm--vit_base_patch16_clip_224.openai'
            / 'snapshots' / ('0' * 40))
snapshot.mkdir(parents=True)
(snapshot.parents[1] / 'refs').mkdir()
(snapshot.parents[1] / 'refs' / 'main').write_text('0' * 40)
torch.manual_seed(0)
model = open_clip.create_model('ViT-B-16-quickgelu')
weights = snapshot / 'open_clip_model.safetensors'
save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(weights))
del model
print('LOADING', file=sys.stderr, flush=True)
openai = load_model('ViT-B-16', 'openai')
kinds = {type(m).__name__ for m in openai.model.modules()}
config = model_preprocessing('ViT-B-16', 'openai')
print('RESULT', json.dumps({
    'quick': 'QuickGELU' in kinds, 'gelu': 'GELU' in kinds, 'fingerprint': openai.fingerprint,
    'size': [openai.image_size, config.image_size], 'mean': [openai.mean, config.mean],
    'std': [openai.std, config.std]}))
state = {k: v.clone() for k, v in openai.model.state_dict().items()}
del openai
gelu = load_model('ViT-B-16', str(weights))
same = all(torch.equal(v, state[k]) for k, v in gelu.model.state_dict().items())
kinds = {type(m).__name__ for m in gelu.model.modules()}
print('GELU', json.dumps({'quick': 'QuickGELU' in kinds, 'gelu': 'GELU' in kinds,
                          'fingerprint': gelu.fingerprint, 'same_weights': same}))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
             for line in result.stdout.splitlines() if line.startswith(("RESULT ", "GELU "))}
    openai, gelu = lines["RESULT"], lines["GELU"]
    assert openai["quick"] and not openai["gelu"]
    assert gelu["gelu"] and not gelu["quick"] and gelu["same_weights"]
    assert openai["fingerprint"] != gelu["fingerprint"]
    assert openai["size"] == [224, 224]
    assert openai["mean"][0] == openai["mean"][1] and openai["std"][0] == openai["std"][1]
    log = result.stderr.split("LOADING\n", 1)[1]  # what loading logged, not the cache's making
    assert "QuickGELU mismatch" not in log and "INFO:clipsvd.models:ViT-B-16 is built with " \
        "QuickGELU" in log
    assert not [line for line in log.splitlines() if line.startswith("WARNING")]


def _refuse_building(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built (weights loaded) to learn its preprocessing")

    monkeypatch.setattr(open_clip, "create_model", refuse)


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-timm-clip", "tiny-biomedclip"])
def test_preprocessing_from_config_equals_the_built_models(name, monkeypatch):
    """Issue 16.6: `prepare` loaded the whole model to learn its input size. The size and
    normalisation now come from the configuration (no model is built: create_model is
    disabled while they are read) and equal what the built model reports. Catches a
    configuration reading that diverges from open_clip's (size, mean or std)."""
    from clipsvd.models import model_image_size, model_preprocessing

    built = load_model(name, None)
    with monkeypatch.context() as patch:
        _refuse_building(patch)
        config = model_preprocessing(name)
        assert model_image_size(name) == config.image_size
    assert (config.image_size, config.mean, config.std) == (built.image_size, built.mean,
                                                            built.std)


def test_local_dir_preprocessing_comes_from_its_config(tmp_path, monkeypatch):
    """A `local-dir:` folder's own preprocess_cfg (here another mean and std) is what both the
    configuration reading and the built model use, with its single weights file under a name
    open_clip does not prefer (open_clip warns even then; that warning is expected, not
    logged). Two such files are ambiguous and refused naming them. Catches a preprocessing
    that ignores the folder's preprocess_cfg."""
    from clipsvd.models import model_preprocessing

    source = load_model("tiny-clip", None, init_seed=2)
    config = json.loads((MODEL_CONFIG_DIR / "tiny-clip.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": config, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25] * 3}}))
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()},
              str(tmp_path / "weights.safetensors"))
    with monkeypatch.context() as patch:
        _refuse_building(patch)
        read = model_preprocessing(f"local-dir:{tmp_path}")
    loaded = load_model(f"local-dir:{tmp_path}")
    assert read.mean == loaded.mean == (0.5, 0.5, 0.5) and read.std == loaded.std == (0.25,) * 3
    assert read.image_size == loaded.image_size == 64
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match=r"several weights files \(other.safetensors, "
                                         r"weights.safetensors\)"):
        load_model(f"local-dir:{tmp_path}")


def test_hf_hub_preprocessing_needs_only_the_cached_config(tmp_path):
    """An `hf-hub:` model's size and normalisation come from the open_clip_config.json in the
    offline Hugging Face cache, with no weights there; loading it then says the weights are
    missing offline. Catches a preprocessing that loads the model (it would fail here)."""
    config = json.loads((MODEL_CONFIG_DIR / "tiny-clip.json").read_text())
    code = f"""
import json, os
from pathlib import Path
snapshot = (Path(os.environ['HF_HOME']) / 'hub' / 'models--lab--tiny' / 'snapshots' / ('1' * 40))
snapshot.mkdir(parents=True)
(snapshot.parents[1] / 'refs').mkdir()
(snapshot.parents[1] / 'refs' / 'main').write_text('1' * 40)
(snapshot / 'open_clip_config.json').write_text(json.dumps({{
    'model_cfg': {config!r}, 'preprocess_cfg': {{'mean': [0.1, 0.2, 0.3], 'std': [1, 1, 1]}}}}))
from clipsvd.models import load_model, model_preprocessing
from clipsvd.errors import ModelError
print('PRE', model_preprocessing('hf-hub:lab/tiny'))
try:
    load_model('hf-hub:lab/tiny')
except ModelError as exc:
    print('LOAD', exc)
"""
    lines = _run_offline(code, tmp_path, ("PRE", "LOAD"))
    assert len(lines) == 2, lines
    assert "image_size=64" in lines[0] and "mean=(0.1, 0.2, 0.3)" in lines[0]
    load = lines[1:]
    assert "not available offline" in load[0] and "HF_HUB_OFFLINE" in load[0]


def test_random_weights_log_no_warning(caplog):
    """open_clip logs "No pretrained weights loaded ... initialized randomly" as a WARNING for
    every random-weight model, into every demo log; that is what was asked for, so it is not
    logged. Catches the open_clip warning collector removed."""
    with caplog.at_level(logging.INFO):
        load_model("tiny-clip", None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_any_other_open_clip_warning_is_an_error(monkeypatch):
    """Whatever else open_clip warns about while building a model stops the load with one
    line quoting it, instead of a warning in a log next to a model open_clip doubts. Catches
    a collector that keeps warnings out of the log but lets the model through."""
    real = open_clip.create_model

    def warning_create_model(*args, **kwargs):
        model = real(*args, **kwargs)
        warnings.warn_explicit("Something about this model is odd.", UserWarning,
                               open_clip.factory.__file__, 1)
        return model

    monkeypatch.setattr(open_clip, "create_model", warning_create_model)
    with pytest.raises(ModelError, match=r"open_clip warned while building 'tiny-clip': "
                                         r"Something about this model is odd\."):
        load_model("tiny-clip", None)
