"""Loading CLIP-style models through open_clip, and the encoders' small helpers.

One factory (:func:`load_model`) turns a name into a model, its tokenizer and its image
preprocessing constants, whether the weights come from an open_clip pretrained tag, a
Hugging Face ``hf-hub:`` id, a ``local-dir:`` folder, a local checkpoint file, or nowhere
(random weights, for the offline demo and for benchmarks). Every failure a user can cause
becomes a one-line :class:`~clipsvd.errors.ModelError` saying what to do.

The tiny architectures shipped in ``model_configs/`` (``tiny-clip``, ``tiny-timm-clip``,
``tiny-biomedclip``) are registered with open_clip at import, so they are ordinary open_clip
names everywhere. ``tiny-biomedclip`` is BiomedCLIP's layout in miniature (timm ViT trunk, a
2-layer BERT text tower built by ``transformers`` from ``resources/tiny-bert``); loading it
needs the ``transformers`` package but no network.

``mini-clip`` (same folder) is the one architecture with shipped weights: ``pretrained:
medmnist`` loads ``pretrained/mini-clip-medmnist.safetensors``, which ``clipsvd pretrain`` made
from real medical images (:mod:`clipsvd.pretrain`, docs/miniature.md).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import urllib.error
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import (TORCHSCRIPT, ScriptedCheckpoint, checkpoint_format, convert_hint,
                          read_torchscript)
from .errors import ModelError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
TIMM_MICRO_VIT = "clipsvd_vit_micro_patch8_64"
# Weights made by `clipsvd pretrain` and shipped in the package, as (model, tag) -> file.
PACKAGED_WEIGHTS = {("mini-clip", "medmnist"): "mini-clip-medmnist.safetensors"}


def clipsvd_vit_micro_patch8_64(pretrained: bool = False, **kwargs) -> nn.Module:
    """A 2-block, 64-wide timm ViT, so ``tiny-timm-clip`` exercises the timm trunk layout of
    BiomedCLIP (fused ``attn.qkv``, ``mlp.fc1``/``fc2``) offline and in seconds; open_clip
    configs can only name timm models, not set their sizes."""
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        raise ModelError(f"{TIMM_MICRO_VIT} has no pretrained weights; use pretrained=None")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                              mlp_ratio=4.0, **kwargs)
    model.pretrained_cfg = model.default_cfg = {"input_size": (3, 64, 64), "num_classes": 0}
    return model


def _register_timm_micro_vit() -> None:
    import timm
    from timm.models import register_model

    if not timm.is_model(TIMM_MICRO_VIT):
        register_model(clipsvd_vit_micro_patch8_64)


def _register_hf_text_configs(folder: Path) -> None:
    """Register the configs in ``folder`` written like a hub ``open_clip_config.json``
    (``{"model_cfg": {...}}``), whose ``hf_model_name``/``hf_tokenizer_name`` name a local folder
    relative to the file ("../resources/tiny-bert"); transformers needs that folder's absolute
    path, which only exists once the package is installed, so it is filled in here.

    open_clip's public ``add_model_config`` only reads flat configs and skips these files (no
    top-level ``embed_dim``), so they go into its registry dict directly; a later rescan
    (another ``add_model_config``) keeps entries it has no file for, so they stay registered.
    """
    from open_clip import factory

    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        config = data.get("model_cfg") if isinstance(data, dict) else None
        if not isinstance(config, dict):
            continue
        text_cfg = config.get("text_cfg", {})
        for key in ("hf_model_name", "hf_tokenizer_name"):
            value = text_cfg.get(key)
            if isinstance(value, str) and value.startswith(("./", "../")):
                text_cfg[key] = str((path.parent / value).resolve())
        factory._MODEL_CONFIGS[path.stem] = config


def _register_packaged_weights() -> None:
    """Make the shipped weights ordinary open_clip pretrained tags (``name: mini-clip``,
    ``pretrained: medmnist``): open_clip reads a tag's local ``file`` instead of downloading.
    They were trained with nn.GELU and OpenAI's normalisation (clipsvd.pretrain)."""
    from open_clip import pretrained as registry

    for (name, tag), file_name in PACKAGED_WEIGHTS.items():
        registry._PRETRAINED.setdefault(name, {})[tag] = {
            "file": str(PRETRAINED_DIR / file_name), "quick_gelu": False,
            "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}


_register_timm_micro_vit()
open_clip.add_model_config(MODEL_CONFIG_DIR)
_register_hf_text_configs(MODEL_CONFIG_DIR)
_register_packaged_weights()

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz")
EXAMPLE_MODELS = ("mini-clip", "tiny-clip", "tiny-timm-clip", "tiny-biomedclip", "ViT-B-16",
                  "ViT-B-32", "ViT-L-14",
                  "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
# The weight files open_clip looks for in a 'local-dir:' folder, most preferred first
# (open_clip.factory._find_checkpoint_in_dir).
LOCAL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
                     "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
# Tensors an OpenAI TorchScript checkpoint holds that are no weights: the causal mask (an
# attribute of every text block there) and three sizes stored as tensors.
SCRIPTED_NON_WEIGHTS = ("attn_mask", "input_resolution", "context_length", "vocab_size")
# Keys of an open_clip model config that say how to initialise a tower, not what it is.
_LOADING_FLAGS = ("timm_model_pretrained", "hf_model_pretrained")
ARCHITECTURE_ATTRIBUTE = "clipsvd_architecture"

__all__ = ["LoadedModel", "Preprocessing", "load_model", "model_architecture",
           "model_preprocessing", "model_image_size", "check_model_request",
           "encode_class_prompts", "encode_images", "logits", "format_prompts",
           "model_fingerprint", "MODEL_CONFIG_DIR"]

_OFFLINE_HINT = ("put the weights in the Hugging Face cache and set HF_HUB_OFFLINE=1, "
                 "or pass a local checkpoint file as pretrained, or a 'local-dir:' folder")


@dataclass(frozen=True)
class Preprocessing:
    """How images reach the model: input size (square, pixels), normalisation, and how
    open_clip's own evaluation transform resizes (interpolation, resize_mode)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str


@dataclass
class LoadedModel:
    """A model with what is needed to feed it: tokenizer and image preprocessing constants.

    ``pretrained`` records where the weights came from (a tag, a checkpoint path, the
    ``hf-hub:``/``local-dir:`` name itself) or None for random weights. ``fingerprint``
    identifies the exact architecture and weights so an adapter file can be matched to its
    base model (:func:`model_fingerprint`).
    """

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    pretrained: str | None
    fingerprint: str


def model_fingerprint(model: nn.Module, length: int = 16) -> str:
    """sha256 prefix over the architecture and every state-dict tensor.

    The architecture is the open_clip configuration :func:`load_model` built the model from
    (activation, widths, preprocessing; recorded on the model) and the class of every module,
    so two models with the same weights but, say, GELU and QuickGELU differ. Tensors enter as
    (key, dtype, shape, bytes), keys sorted; bytes are hashed through a uint8 view, so any
    dtype works and nothing is copied for contiguous CPU tensors (ViT-B/16: about a second).
    """
    digest = hashlib.sha256()
    modules = [f"{path}:{type(module).__module__}.{type(module).__qualname__}"
               for path, module in model.named_modules()]
    architecture = {"config": getattr(model, ARCHITECTURE_ATTRIBUTE, None), "modules": modules}
    digest.update(json.dumps(architecture, sort_keys=True).encode())
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:length]


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Exception types meaning "could not fetch from the network or the HF cache"."""
    types: list[type[BaseException]] = [OSError, urllib.error.URLError, TimeoutError]
    try:
        from huggingface_hub import errors as hf_errors

        for name in ("HfHubHTTPError", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
                     "RepositoryNotFoundError", "EntryNotFoundError", "GatedRepoError"):
            if hasattr(hf_errors, name):
                types.append(getattr(hf_errors, name))
    except ImportError:
        pass
    for module_name, attr in (("httpx", "HTTPError"), ("httpx", "TransportError"),
                              ("requests", "RequestException")):
        try:
            module = __import__(module_name)
            types.append(getattr(module, attr))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_fetch_failure(exc: BaseException) -> bool:
    """True when an exception (or one it was raised from) is a download/offline failure.

    open_clip wraps hub errors in RuntimeError("Failed ... HF Hub ..."), so its messages are
    checked as well as the chained exception types.
    """
    network = _network_error_types()
    for current in _chain(exc):
        if isinstance(current, network):
            return True
        if str(current).startswith(("Failed to download", "Failed initial config",
                                    "Required pretrained weights")):
            return True
    return False


def _is_read_failure(exc: BaseException) -> bool:
    """True when a weights file itself could not be parsed (corrupt, truncated, or holding
    Python objects a weights-only load refuses), as opposed to weights that do not fit."""
    from safetensors import SafetensorError

    for current in _chain(exc):  # torch.load's refusals are pickle.UnpicklingError
        if isinstance(current, (SafetensorError, EOFError, zipfile.BadZipFile)) \
                or type(current).__name__ == "UnpicklingError" \
                or "PytorchStreamReader" in str(current):
            return True
    return False


def _looks_like_path(value: str) -> bool:
    return "/" in value or os.sep in value or value.lower().endswith(CHECKPOINT_SUFFIXES)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@dataclass(frozen=True)
class _Request:
    """A checked model request: where the architecture and the weights come from.

    ``kind``: "random" (no weights), "tag" (an open_clip pretrained tag), "file" (a local
    checkpoint), "hf-hub" or "local-dir". ``checkpoint``/``checkpoint_format``: the local
    weights file (a 'file' request, or the one open_clip will take from a 'local-dir:' folder).
    """

    name: str
    pretrained: str | None
    kind: str
    checkpoint: Path | None = None
    checkpoint_format: str | None = None

    @property
    def remote(self) -> bool:
        return self.kind in ("tag", "hf-hub")


def _local_dir_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "open_clip_config.json"
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model folder {folder}: open_clip_config.json cannot be read as JSON "
                         f"({_first_line(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise ModelError(f"model folder {folder}: open_clip_config.json has no 'model_cfg' "
                         "object; write it as open_clip does ({\"model_cfg\": {...}, "
                         "\"preprocess_cfg\": {...}})")
    return data


def _local_dir_weights(folder: Path) -> Path:
    """The weights file open_clip will load from ``folder``, when that choice is unambiguous."""
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) \
        + sorted(folder.glob("*.pth"))
    if not found:
        raise ModelError(f"model folder {folder} has no weights file; put the weights next to "
                         "open_clip_config.json as open_clip_model.safetensors")
    preferred = [path for path in found if path.name in LOCAL_DIR_WEIGHTS]
    if preferred:
        return min(preferred, key=lambda path: LOCAL_DIR_WEIGHTS.index(path.name))
    if len(found) > 1:
        names = ", ".join(path.name for path in found)
        raise ModelError(f"model folder {folder} holds several weights files ({names}) and none "
                         "named as open_clip expects; keep one, or name the right one "
                         "open_clip_model.safetensors")
    return found[0]


def _check_request(name: str, pretrained: str | None) -> _Request:
    """Validate the name/pretrained pair before building anything, reading no weights."""
    if not name:
        raise ModelError("model name is empty; give an open_clip name such as 'ViT-B-16' or "
                         "'tiny-clip' (see open_clip.list_models())")
    if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)) and pretrained:
        raise ModelError(f"model {name!r} carries its own weights; leave pretrained empty "
                         f"(got {pretrained!r})")
    if name.startswith(HF_HUB_PREFIX):
        if not name[len(HF_HUB_PREFIX):]:
            raise ModelError("model name 'hf-hub:' names no repository; give "
                             "'hf-hub:<organisation>/<repository>'")
        return _Request(name, None, "hf-hub")
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelError(f"model folder {folder} has no open_clip_config.json; a 'local-dir:' "
                             "folder needs open_clip_config.json and the weights "
                             "(open_clip_model.safetensors)")
        _local_dir_config(folder)
        weights = _local_dir_weights(folder)
        return _Request(name, None, "local-dir", weights, checkpoint_format(weights))
    if name not in open_clip.list_models():
        known = ", ".join(EXAMPLE_MODELS)
        raise ModelError(f"unknown model name {name!r}; known names include {known} "
                         "(open_clip.list_models() lists them all)")
    if not pretrained:
        return _Request(name, None, "random")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        packaged = PACKAGED_WEIGHTS.get((name, pretrained))
        if packaged is not None and not (PRETRAINED_DIR / packaged).is_file():
            raise ModelError(f"the packaged weights of {name!r} ({pretrained}) are missing: "
                             f"{PRETRAINED_DIR / packaged}; reinstall clipsvd, or make them "
                             "with `clipsvd pretrain` (docs/miniature.md)")
        _tag_quick_gelu(name, pretrained)
        return _Request(name, pretrained, "tag")
    if _looks_like_path(pretrained) or os.path.exists(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ModelError(f"checkpoint file {path} not found; give an existing .safetensors or "
                             ".pt/.bin file as pretrained")
        found = checkpoint_format(path)
        if found == TORCHSCRIPT:  # reads the archive's structure, not its tensors
            _scripted_quick_gelu(name, read_torchscript(path, with_data=False), path)
        return _Request(name, pretrained, "file", path, found)
    valid = ", ".join(tags) if tags else "none (use a local checkpoint file)"
    raise ModelError(f"unknown pretrained tag {pretrained!r} for model {name!r}; valid tags: {valid}")


def check_model_request(name: str, pretrained: str | None) -> None:
    """Check a model name and pretrained tag or file without building the model or loading
    weights (``clipsvd validate``): names, tags, the activation a tag needs, and a checkpoint
    file's header; raises the same ModelError as :func:`load_model`."""
    _check_request(name, pretrained or None)


def _tag_quick_gelu(name: str, tag: str) -> bool:
    """Whether the model must be built with QuickGELU for weights ``tag``.

    open_clip's configs for e.g. ``ViT-B-16`` use GELU, but OpenAI's (and MetaCLIP's, DFN's)
    weights were trained with QuickGELU; open_clip builds the GELU model and only warns. Here
    the tag's activation wins; a config that wants QuickGELU for a tag that does not say it
    was trained so is refused, since which one is right cannot be known.
    """
    config = open_clip.get_model_config(name) or {}
    wanted = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    if bool(config.get("quick_gelu", False)) and not wanted:
        raise ModelError(f"model {name!r} is built with QuickGELU but its pretrained tag {tag!r} "
                         "does not say its weights were trained with QuickGELU, and open_clip "
                         "cannot tell which is right; use another tag, or the weights as a local "
                         "checkpoint file with the model name of the activation you know")
    return wanted


def _scripted_quick_gelu(name: str, scripted: ScriptedCheckpoint, path: Path) -> bool:
    """Whether a TorchScript checkpoint's model must be built with QuickGELU: the archive's own
    activation modules say (OpenAI's checkpoints: QuickGELU)."""
    activation = scripted.activation()
    if activation is None:
        raise ModelError(f"TorchScript file {path} does not show whether its model uses QuickGELU "
                         f"or GELU; {convert_hint(path)}")
    config = open_clip.get_model_config(name) or {}
    if activation == "GELU" and config.get("quick_gelu", False):
        raise ModelError(f"TorchScript file {path} holds a model built with GELU, but model "
                         f"{name!r} uses QuickGELU; name the model without '-quickgelu'")
    return activation == "QuickGELU"


def _hf_hub_config(name: str) -> dict[str, Any]:
    """The ``open_clip_config.json`` of a hub repository (offline: from the HF cache)."""
    from open_clip.pretrained import download_pretrained_from_hf

    repository = name[len(HF_HUB_PREFIX):]
    try:
        path = download_pretrained_from_hf(repository, filename="open_clip_config.json")
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"open_clip_config.json of {name!r} in the Hugging Face cache is not "
                         f"JSON ({_first_line(exc)}); delete it from the cache and download it "
                         "again") from None
    except Exception as exc:
        if _is_fetch_failure(exc):
            raise ModelError(f"the configuration of {name!r} (open_clip_config.json) is not "
                             f"available offline: {_OFFLINE_HINT}") from None
        raise
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise ModelError(f"open_clip_config.json of {name!r} has no 'model_cfg' object; it is "
                         "not an open_clip model repository")
    return data


def _architecture(request: _Request, quick_gelu: bool) -> dict[str, Any]:
    """The open_clip model config and preprocessing the model is built with, from configs
    alone: the registry for open_clip names (with the tag's preprocessing), the folder's or
    the hub repository's ``open_clip_config.json`` otherwise. Loading flags are left out and
    local folder paths shortened to their names, so the record is the same on every machine.
    """
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    if request.kind == "hf-hub":
        data = _hf_hub_config(request.name)
        model_cfg, overlay = data["model_cfg"], data.get("preprocess_cfg") or {}
    elif request.kind == "local-dir":
        data = _local_dir_config(Path(request.name[len(LOCAL_DIR_PREFIX):]).expanduser())
        model_cfg, overlay = data["model_cfg"], data.get("preprocess_cfg") or {}
    else:
        model_cfg = open_clip.get_model_config(request.name)
        overlay = (open_clip.get_pretrained_cfg(request.name, request.pretrained)
                   if request.kind == "tag" else {})
    model_cfg = json.loads(json.dumps(model_cfg))
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    model_cfg.pop("custom_text", None)  # a class choice open_clip also makes from the towers
    for tower in ("vision_cfg", "text_cfg"):
        cfg = model_cfg.get(tower) or {}
        for flag in _LOADING_FLAGS:
            cfg.pop(flag, None)
        for key in ("hf_model_name", "hf_tokenizer_name"):
            if isinstance(cfg.get(key), str) and os.path.isabs(cfg[key]):
                cfg[key] = Path(cfg[key]).name
    preprocess = merge_preprocess_dict(PreprocessCfg(), overlay)
    size = (model_cfg.get("vision_cfg") or {}).get("image_size", 224)
    size = list(size) if isinstance(size, (list, tuple)) else [size, size]
    if len(size) != 2 or size[0] != size[1]:
        raise ModelError(f"model {request.name!r} takes {size[0]}x{size[-1]} images; clipsvd "
                         "prepares square images only")
    preprocess["size"] = int(size[0])
    preprocess["mean"] = [float(v) for v in preprocess["mean"]]
    preprocess["std"] = [float(v) for v in preprocess["std"]]
    return {"model_cfg": model_cfg, "preprocess": preprocess}


def _quick_gelu(request: _Request, scripted: ScriptedCheckpoint | None) -> bool:
    if request.kind == "tag":
        return _tag_quick_gelu(request.name, str(request.pretrained))
    if scripted is not None:
        assert request.checkpoint is not None
        return _scripted_quick_gelu(request.name, scripted, request.checkpoint)
    return False


def model_architecture(name: str, pretrained: str | None = None) -> dict[str, Any]:
    """The open_clip configuration and preprocessing :func:`load_model` builds this model
    with (the record its fingerprint covers), read from configs: no weights are loaded, and
    a TorchScript checkpoint is read for its structure only."""
    request = _check_request(name, pretrained or None)
    scripted = None
    if request.checkpoint_format == TORCHSCRIPT and request.kind == "file":
        assert request.checkpoint is not None
        scripted = read_torchscript(request.checkpoint, with_data=False)
    return _architecture(request, _quick_gelu(request, scripted))


def model_preprocessing(name: str, pretrained: str | None = None) -> Preprocessing:
    """The model's input size and normalisation from its configuration, no weights loaded:
    the open_clip registry and the tag for open_clip names, ``open_clip_config.json`` of a
    ``local-dir:`` folder or (from the Hugging Face cache) of an ``hf-hub:`` repository.
    The same values :func:`load_model` gives (it checks)."""
    preprocess = model_architecture(name, pretrained)["preprocess"]
    return Preprocessing(image_size=preprocess["size"], mean=tuple(preprocess["mean"]),
                         std=tuple(preprocess["std"]),
                         interpolation=str(preprocess["interpolation"]),
                         resize_mode=str(preprocess["resize_mode"]))


def model_image_size(name: str, pretrained: str | None = None) -> int:
    """The model's input size (pixels of the square image), from its configuration alone."""
    return model_preprocessing(name, pretrained).image_size


def _from_open_clip(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_OPEN_CLIP_DIR)


_OPEN_CLIP_DIR = str(Path(open_clip.__file__).resolve().parent) + os.sep


@contextlib.contextmanager
def _collect_open_clip_warnings() -> Iterator[list[str]]:
    """What open_clip warns about while building a model (warnings and errors it logs on the
    root logger, Python warnings it raises), kept out of the log and handed to the caller,
    which fixes the cause beforehand or turns what is left into an error. Warnings from other
    packages pass through unchanged."""
    collected: list[str] = []

    class _Collect(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno >= logging.WARNING and _from_open_clip(record.pathname):
                collected.append(record.getMessage())
                return False
            return True

    capture = _Collect()
    root = logging.getLogger()
    root.addFilter(capture)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield collected
    finally:
        root.removeFilter(capture)
        for item in caught:
            if _from_open_clip(item.filename):
                collected.append(str(item.message))
            else:
                warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


def _expected_warning(message: str, request: _Request, built_without_weights: bool) -> bool:
    """open_clip warnings that say what was asked for: random weights by request, and the
    single weights file of a 'local-dir:' folder (open_clip calls it 'multiple' even alone)."""
    if built_without_weights and message.startswith("No pretrained weights loaded for model"):
        return True
    return request.kind == "local-dir" and message.startswith("Multiple checkpoints found in")


def _build_tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    try:
        with _collect_open_clip_warnings() as warned:
            tokenizer = open_clip.get_tokenizer(name)
    except ImportError as exc:
        raise ModelError(f"the tokenizer of {name!r} needs the 'transformers' package: "
                         f"pip install transformers ({_first_line(exc)})") from exc
    except Exception as exc:
        if _is_fetch_failure(exc):
            raise ModelError(f"tokenizer files for {name!r} are not available offline: "
                             f"{_OFFLINE_HINT}") from exc
        raise
    if warned:
        raise ModelError(f"open_clip warned while building the tokenizer of {name!r}: "
                         f"{warned[0].splitlines()[0][:300]}; clipsvd does not run a model with "
                         "a tokenizer open_clip doubts")
    return tokenizer


def _load_scripted_weights(model: nn.Module, scripted: ScriptedCheckpoint, path: Path,
                           name: str) -> None:
    """Copy a TorchScript checkpoint's tensors into ``model``: every state-dict entry must be
    there with its shape, and the archive may hold no other tensor than buffers the model
    does not save and the known non-weights of OpenAI's files."""
    state = model.state_dict()
    buffers = {key for key, _ in model.named_buffers()}
    missing = [key for key in state if key not in scripted.tensors]
    extra = sorted(key for key in scripted.tensors if key not in state and key not in buffers
                   and key.rsplit(".", 1)[-1] not in SCRIPTED_NON_WEIGHTS)
    wrong = [key for key in state if key in scripted.tensors
             and tuple(scripted.tensors[key].shape) != tuple(state[key].shape)]
    problem = None
    if missing:
        problem = f"it lacks {missing[0]} ({len(missing)} missing)"
    elif extra:
        problem = f"it has {extra[0]}, which the model has not ({len(extra)} such)"
    elif wrong:
        key = wrong[0]
        problem = (f"{key} has shape {tuple(scripted.tensors[key].shape)}, the model "
                   f"{tuple(state[key].shape)}")
    if problem:
        raise ModelError(f"weights in {path} do not fit model {name!r}: {problem}; name the "
                         "architecture the file holds")
    with torch.no_grad():
        model.load_state_dict({key: scripted.tensors[key] for key in state}, strict=True)


def load_model(name: str, pretrained: str | None = None, init_seed: int = 0,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Build an open_clip model (eval mode) with its tokenizer and preprocessing constants.

    ``name``: an open_clip name (``ViT-B-16``, ``tiny-clip``), ``hf-hub:org/repo`` or
    ``local-dir:/folder``. ``pretrained``: an open_clip tag (``openai``), a local checkpoint
    file (.safetensors; .pt/.bin read with ``weights_only=True``; a TorchScript archive such
    as OpenAI's ``ViT-B-16.pt`` read as data by :mod:`clipsvd.checkpoints`), or None for
    random weights. The architecture is the one the weights were trained with: QuickGELU for
    tags and TorchScript files that say so, whatever the name's config uses. Anything else
    open_clip would only warn about is a ModelError. Random initialisation draws from the CPU
    generator seeded with ``init_seed`` inside a forked RNG, so equal seeds give identical
    weights and the caller's RNG streams (CPU and CUDA) are untouched.
    """
    request = _check_request(name, pretrained or None)
    scripted = (read_torchscript(request.checkpoint)
                if request.checkpoint_format == TORCHSCRIPT and request.kind == "file" else None)
    quick_gelu = _quick_gelu(request, scripted)
    architecture = _architecture(request, quick_gelu)
    if quick_gelu and not (open_clip.get_model_config(name) or {}).get("quick_gelu", False):
        log.info("%s is built with QuickGELU, the activation its weights (%s) were trained with; "
                 "open_clip's config of that name uses GELU", name, pretrained)
    weights = None if scripted is not None else request.pretrained
    require = request.kind != "random" and scripted is None
    try:
        # Only the CPU generator is seeded (and restored by fork_rng): torch.manual_seed would
        # also reseed every CUDA generator, which fork_rng(devices=[]) leaves at init_seed, so
        # every run would draw the same CUDA stream (dropout masks) whatever its own seed.
        # The weights are initialised on the CPU before any move to ``device``.
        with _collect_open_clip_warnings() as warned:
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(init_seed)
                # pretrained_text=False: a Hugging Face text tower (BiomedCLIP's BERT) gets its
                # weights from the CLIP checkpoint or stays random, never a separate hub download.
                model = open_clip.create_model(name, pretrained=weights, device=device,
                                               require_pretrained=require, weights_only=True,
                                               pretrained_text=False, force_quick_gelu=quick_gelu)
    except ModelError:
        raise
    except ImportError as exc:
        raise ModelError(f"model {name!r} needs an optional package: {_first_line(exc)} "
                         "(for BiomedCLIP: pip install transformers)") from exc
    except Exception as exc:
        if request.remote and _is_fetch_failure(exc):
            raise ModelError(f"weights for {name!r}"
                             f"{f' ({pretrained})' if pretrained else ''} are not available "
                             f"offline: {_OFFLINE_HINT}") from exc
        if _is_read_failure(exc):
            where = (f"weights file {request.checkpoint}" if request.checkpoint is not None
                     else f"the cached weights of {name!r}"
                     f"{f' ({pretrained})' if pretrained else ''}")
            raise ModelError(f"{where} cannot be read ({_first_line(exc)}); download it again, "
                             "or save the model's state dict again with safetensors") from exc
        if request.checkpoint is not None and isinstance(exc, (RuntimeError, ValueError, OSError,
                                                               KeyError)):
            raise ModelError(f"weights in {request.checkpoint} do not fit model {name!r}: "
                             f"{_first_line(exc)}") from exc
        raise
    unexpected = [message for message in warned
                  if not _expected_warning(message, request, weights is None)]
    for message in warned:
        if message not in unexpected:  # what was asked for: kept in the log file, not the console
            log.debug("open_clip: %s", message.splitlines()[0])
    if unexpected:
        raise ModelError(f"open_clip warned while building {name!r}"
                         f"{f' ({pretrained})' if pretrained else ''}: "
                         f"{unexpected[0].splitlines()[0][:300]}; clipsvd does not run a model "
                         "open_clip doubts")
    if scripted is not None:
        assert request.checkpoint is not None
        _load_scripted_weights(model, scripted, request.checkpoint, name)
    model.eval()
    setattr(model, ARCHITECTURE_ATTRIBUTE, architecture)
    tokenizer = _build_tokenizer(name)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess.get("size", 224)
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(float(v) for v in preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    configured = architecture["preprocess"]
    if (image_size, list(mean), list(std)) != (configured["size"], configured["mean"],
                                               configured["std"]):
        raise RuntimeError(f"{name}: open_clip built the model for {image_size} px, mean {mean}, "
                           f"std {std}, but its configuration says {configured}; "
                           "model_preprocessing must follow open_clip here")
    if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        source = name
    else:
        source = str(request.checkpoint) if request.kind == "file" else pretrained
    return LoadedModel(model=model, tokenizer=tokenizer, image_size=image_size, mean=mean,
                       std=std, name=name, pretrained=source,
                       fingerprint=model_fingerprint(model))


def _device_of(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def format_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Class-major prompt list (class 0 with every template, then class 1, ...)."""
    if not templates:
        raise ModelError("no prompt templates given; use at least one, e.g. 'a photo of a {}.'")
    for template in templates:
        if "{}" not in template:
            raise ModelError(f"prompt template {template!r} has no '{{}}' for the class name")
    names = [str(name).replace("_", " ") for name in class_names]
    return [template.replace("{}", name) for name in names for template in templates]


def encode_class_prompts(loaded: LoadedModel, class_names: Sequence[str],
                         templates: Sequence[str], device: str | torch.device | None = None
                         ) -> torch.Tensor:
    """One L2-normalised text feature per class (C×D): mean over templates, renormalised.

    Not wrapped in no_grad: CLIP-SVD trains the text encoder, so gradients must flow; callers
    that only evaluate use ``torch.no_grad()`` themselves.
    """
    if not class_names:
        raise ModelError("no class names given to encode")
    prompts = format_prompts(class_names, templates)
    device = device if device is not None else _device_of(loaded.model)
    tokens = loaded.tokenizer(prompts).to(device)
    features = F.normalize(loaded.model.encode_text(tokens), dim=-1)
    features = features.reshape(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(features, dim=-1)


def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features (N×D); differentiable like the text side."""
    return F.normalize(model.encode_image(images), dim=-1)


def logits(model: nn.Module, image_features: torch.Tensor, text_features: torch.Tensor,
           logit_scale: float | None = None) -> torch.Tensor:
    """Scaled cosine similarities (N×C). ``logit_scale`` None → the model's learned scale,
    detached (so it is never trained), as CLIP-SVD does for BiomedCLIP; OpenAI CLIP uses 100.
    """
    if logit_scale is None:
        scale = model.logit_scale.detach().exp()
    else:
        scale = torch.as_tensor(float(logit_scale), device=image_features.device,
                                dtype=image_features.dtype)
    return scale * image_features @ text_features.t()

