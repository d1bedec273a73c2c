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

import hashlib
import json
import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

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

__all__ = ["LoadedModel", "load_model", "encode_class_prompts", "encode_images", "logits",
           "format_prompts", "state_dict_fingerprint", "MODEL_CONFIG_DIR"]

_OFFLINE_HINT = ("put the weights in the Hugging Face cache and set HF_HUB_OFFLINE=1, "
                 "or pass a local checkpoint file as pretrained, or a 'local-dir:' folder")


@dataclass
class LoadedModel:
    """A model with what is needed to feed it: tokenizer and image preprocessing constants.

    ``pretrained`` records where the weights came from (a tag, a checkpoint path, the
    ``hf-hub:``/``local-dir:`` name itself) or None for random weights. ``fingerprint``
    identifies the exact weights so an adapter file can be matched to its base model.
    """

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    pretrained: str | None
    fingerprint: str


def state_dict_fingerprint(model: nn.Module, length: int = 16) -> str:
    """sha256 prefix over (key, dtype, shape, bytes) of every state-dict tensor, keys sorted.

    Bytes are hashed through a uint8 view, so any dtype works and nothing is copied for
    contiguous CPU tensors (ViT-B/16: about a second).
    """
    digest = hashlib.sha256()
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


def _is_fetch_failure(exc: BaseException) -> bool:
    """True when an exception (or one it was raised from) is a download/offline failure.

    open_clip wraps hub errors in RuntimeError("Failed ... HF Hub ..."), so its messages are
    checked as well as the chained exception types.
    """
    network = _network_error_types()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, network):
            return True
        message = str(current)
        if message.startswith(("Failed to download", "Failed initial config",
                               "Required pretrained weights")):
            return True
        current = current.__cause__ or current.__context__
    return False


def _looks_like_path(value: str) -> bool:
    return "/" in value or os.sep in value or value.lower().endswith(CHECKPOINT_SUFFIXES)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _check_request(name: str, pretrained: str | None) -> str | None:
    """Validate the name/pretrained pair before building anything; return the checkpoint path."""
    if not name:
        raise ModelError("model name is empty; give an open_clip name such as 'ViT-B-16' or "
                         "'tiny-clip' (see open_clip.list_models())")
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelError(f"model folder {folder} has no open_clip_config.json; a 'local-dir:' "
                             "folder needs open_clip_config.json and the weights "
                             "(open_clip_model.safetensors)")
    if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        if pretrained:
            raise ModelError(f"model {name!r} carries its own weights; leave pretrained empty "
                             f"(got {pretrained!r})")
        return None
    if name not in open_clip.list_models():
        known = ", ".join(EXAMPLE_MODELS)
        raise ModelError(f"unknown model name {name!r}; known names include {known} "
                         "(open_clip.list_models() lists them all)")
    if not pretrained:
        return None
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        packaged = PACKAGED_WEIGHTS.get((name, pretrained))
        if packaged is not None and not (PRETRAINED_DIR / packaged).is_file():
            raise ModelError(f"the packaged weights of {name!r} ({pretrained}) are missing: "
                             f"{PRETRAINED_DIR / packaged}; reinstall clipsvd, or make them "
                             "with `clipsvd pretrain` (docs/miniature.md)")
        return None
    if _looks_like_path(pretrained) or os.path.exists(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ModelError(f"checkpoint file {path} not found; give an existing .safetensors or "
                             ".pt/.bin file as pretrained")
        return str(path)
    valid = ", ".join(tags) if tags else "none (use a local checkpoint file)"
    raise ModelError(f"unknown pretrained tag {pretrained!r} for model {name!r}; valid tags: {valid}")


def check_model_request(name: str, pretrained: str | None) -> None:
    """Check a model name and pretrained tag or file without building the model or loading
    weights (``clipsvd validate``); raises the same ModelError as :func:`load_model`."""
    _check_request(name, pretrained or None)


def _build_tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    try:
        return open_clip.get_tokenizer(name)
    except ImportError as exc:
        raise ModelError(f"the tokenizer of {name!r} needs the 'transformers' package: "
                         f"pip install transformers ({_first_line(exc)})") from exc
    except Exception as exc:
        if _is_fetch_failure(exc):
            raise ModelError(f"tokenizer files for {name!r} are not available offline: "
                             f"{_OFFLINE_HINT}") from exc
        raise


def load_model(name: str, pretrained: str | None = None, init_seed: int = 0,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Build an open_clip model (eval mode) with its tokenizer and preprocessing constants.

    ``name``: an open_clip name (``ViT-B-16``, ``tiny-clip``), ``hf-hub:org/repo`` or
    ``local-dir:/folder``. ``pretrained``: an open_clip tag (``openai``), a local checkpoint
    file (.safetensors, or .pt/.bin read with ``weights_only=True``), or None for random
    weights. Random initialisation runs under ``torch.manual_seed(init_seed)`` inside a forked
    RNG, so equal seeds give identical weights and the caller's RNG stream is untouched.
    """
    pretrained = pretrained or None
    checkpoint = _check_request(name, pretrained)
    remote = name.startswith(HF_HUB_PREFIX) or (pretrained is not None and checkpoint is None)
    require = name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)) or pretrained is not None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            # pretrained_text=False: a Hugging Face text tower (BiomedCLIP's BERT) gets its
            # weights from the CLIP checkpoint or stays random, never a separate hub download.
            model = open_clip.create_model(name, pretrained=pretrained, device=device,
                                           require_pretrained=require, weights_only=True,
                                           pretrained_text=False)
    except ModelError:
        raise
    except ImportError as exc:
        raise ModelError(f"model {name!r} needs an optional package: {_first_line(exc)} "
                         "(for BiomedCLIP: pip install transformers)") from exc
    except Exception as exc:
        if remote and _is_fetch_failure(exc):
            raise ModelError(f"weights for {name!r}"
                             f"{f' ({pretrained})' if pretrained else ''} are not available "
                             f"offline: {_OFFLINE_HINT}") from exc
        source = checkpoint or (name[len(LOCAL_DIR_PREFIX):] if name.startswith(LOCAL_DIR_PREFIX)
                                else None)
        if source is not None and isinstance(exc, (RuntimeError, ValueError, OSError, KeyError)):
            raise ModelError(f"weights in {source} do not fit model {name!r}: "
                             f"{_first_line(exc)}") from exc
        raise
    model.eval()
    tokenizer = _build_tokenizer(name)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess.get("size", 224)
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(float(v) for v in preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        source = name
    else:
        source = checkpoint or pretrained
    return LoadedModel(model=model, tokenizer=tokenizer, image_size=image_size, mean=mean,
                       std=std, name=name, pretrained=source,
                       fingerprint=state_dict_fingerprint(model))


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


def model_image_size(name: str, pretrained: str | None = None) -> int:
    """The model's input size, from its open_clip config when it has one (no weights loaded)."""
    config = open_clip.get_model_config(name) if not name.startswith(
        (HF_HUB_PREFIX, LOCAL_DIR_PREFIX)) else None
    if config is not None:
        size = config["vision_cfg"].get("image_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)
    return load_model(name, pretrained).image_size
