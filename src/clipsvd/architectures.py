"""What a model name's architecture is (input size, encoder depths and widths), read from
config files without building the model or importing torch.

The workflow needs these while it builds its DAG: the input size decides which prepared store
a study shares with others (clipsvd.data.fingerprint.store_key), and the encoders' sizes decide
the memory its jobs ask for (clipsvd.resources). ``None`` means "not known without fetching or
building the model"; callers then key by the model's name instead.
"""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
TINY_CONFIG_DIR = PACKAGE_DIR / "model_configs"
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"

# timm ViT names open_clip configs use for their image tower: (layers, width) by size word.
_TIMM_VIT_SIZES = {"tiny": (12, 192), "small": (12, 384), "base": (12, 768),
                   "large": (24, 1024), "huge": (32, 1280)}
_TIMM_VIT = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(\d+)_(?:[a-z0-9]+_)*?(\d+)")


@dataclass(frozen=True)
class Architecture:
    image_size: int
    vision_layers: int
    vision_width: int
    vision_tokens: int  # patches + class token
    text_layers: int
    text_width: int
    text_context: int

    @property
    def parameters_m(self) -> float:
        """Millions of parameters of both encoders' blocks (12·width² per block), roughly."""
        return 12e-6 * (self.vision_layers * self.vision_width ** 2
                        + self.text_layers * self.text_width ** 2)


# Hub models whose configs cannot be read offline before the first download.
KNOWN_HUB = {
    # BiomedCLIP: timm vit_base_patch16_224 + PubMedBERT (BERT-base), context 256.
    "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224":
        Architecture(224, 12, 768, 197, 12, 768, 256),
}


def _open_clip_config(name: str) -> dict | None:
    """An open_clip config by name: the repository's tiny ones, open_clip's shipped ones, or a
    local-dir: folder's open_clip_config.json; None for anything else."""
    if name.startswith(LOCAL_DIR_PREFIX):
        path = Path(name[len(LOCAL_DIR_PREFIX):]) / "open_clip_config.json"
    elif name.startswith(HF_HUB_PREFIX):
        return None
    elif (TINY_CONFIG_DIR / f"{name}.json").is_file():
        path = TINY_CONFIG_DIR / f"{name}.json"
    else:
        spec = importlib.util.find_spec("open_clip")  # locates the package, imports nothing
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / "model_configs" / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("model_cfg", data) if isinstance(data, dict) else None


def _hf_text_config(text_cfg: dict, base: Path) -> dict | None:
    folder = text_cfg.get("hf_model_name")
    if not isinstance(folder, str):
        return None
    path = (base / folder) if folder.startswith(("./", "../")) else Path(folder)
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe(name: str) -> Architecture | None:
    """The architecture behind an open_clip model name, or None when it is not known offline."""
    if name in KNOWN_HUB:
        return KNOWN_HUB[name]
    config = _open_clip_config(name)
    if config is None:
        return None
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    size = vision.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    timm_name = vision.get("timm_model_name")
    if timm_name:
        match = _TIMM_VIT.match(timm_name)
        if match is None:  # a ConvNeXt or a custom timm trunk: size known, depth not
            layers, width, patch = 12, 768, 16
        else:
            (layers, width), patch = _TIMM_VIT_SIZES[match.group(1)], int(match.group(2))
        if timm_name == "clipsvd_vit_micro_patch8_64":  # the tiny trunk of models.py
            layers, width, patch = 2, 64, 8
    else:
        layers = vision.get("layers", 12)
        if isinstance(layers, (list, tuple)):  # a ResNet tower lists its blocks per stage
            layers = sum(layers)
        width, patch = int(vision.get("width", 768)), int(vision.get("patch_size", 16) or 16)
    tokens = (size // patch) ** 2 + 1
    base = TINY_CONFIG_DIR if (TINY_CONFIG_DIR / f"{name}.json").is_file() else (
        Path(name[len(LOCAL_DIR_PREFIX):]) if name.startswith(LOCAL_DIR_PREFIX) else PACKAGE_DIR)
    hf = _hf_text_config(text, base)
    if hf is not None:
        text_layers, text_width = int(hf.get("num_hidden_layers", 12)), int(hf.get("hidden_size", 768))
    else:
        text_layers, text_width = int(text.get("layers", 12)), int(text.get("width", 512))
    return Architecture(size, int(layers), int(width), tokens, text_layers, text_width,
                        int(text.get("context_length", 77)))


def image_size(name: str) -> int | None:
    """The model's input size when its config can be read offline, else None."""
    architecture = describe(name)
    return architecture.image_size if architecture else None
