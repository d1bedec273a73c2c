"""Contrastive pretraining of the miniature CLIP (``mini-clip``) on real medical images.

Real CLIP or BiomedCLIP weights cannot be downloaded where this project is built and tested,
and a randomly initialised model shows nothing about adaptation. This module makes a small
pretrained model instead, from files a user can check: the train splits of MedMNIST's
OrganAMNIST (abdominal CT) and BloodMNIST (blood cell microscopy), verified by MD5, plus
images of the demo generator's four findings (:mod:`clipsvd.data.demo`, from a seed the
default study does not use). Each image is paired with a caption drawn, at every step, from
its class's concept in ``resources/pretraining_captions.yaml`` (modality phrase × class name ×
description × template), so the text tower learns several strings per class.

Images go through the project's own preparation chain (:func:`clipsvd.data.prepare.build_pipeline`)
with the preprocessing the studies use, so pretraining sees exactly the pixels a prepared store
holds. They are prepared on first use and kept in memory, so a short prefix of the recipe
(``--stop-after``) prepares only the images it draws.

Loss: CLIP's symmetric contrastive loss over the batch, where an image and a caption of the
same concept count as a positive pair (targets spread uniformly over the positives, as in
UniCL): many images of a batch share a class, and plain CLIP would push them apart.

Determinism: one seed drives the batch order, the captions and the crops; the thread count is
part of the recipe. The same command on the same files at the same commit writes a
byte-identical file (safetensors; the header's metadata holds the recipe, the input MD5s, the
commit and the fingerprints of the model after the recipe's check steps).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .config import LinearProbeConfig, PreprocessingConfig, check_crop_scale
from .errors import ConfigError, DataError
from .io import write_json, write_safetensors

log = logging.getLogger(__name__)

CAPTIONS_RESOURCE = "pretraining_captions.yaml"
FORMAT = "clipsvd-pretrained-open_clip-state-dict-v1"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_CONFIG = {
    "tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
    "strip_accents": None, "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
    "cls_token": "[CLS]", "mask_token": "[MASK]"}
MEDMNIST_LAYOUTS = {3: "hw", 4: "hwc"}  # N×H×W grey, N×H×W×3 colour
HELD_OUT_SEED_OFFSET = 1000  # demo images for evaluation: another seed than training's
CAPTION_KINDS = ("named", "described", "modality")
CAPTION_MIX = {"named": 1.0, "described": 0.0, "modality": 0.0, "wrong_class": 0.0}


# ----------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class SourceRecipe:
    """One pretraining image source: a MedMNIST file's split, or the demo generator."""

    name: str
    preprocessing: dict = field(default_factory=dict)
    medmnist: str | None = None  # the flag: <flag>.npz under --data
    split: str = "train"
    md5: str | None = None
    demo: dict | None = None  # {per_class, image_size, seed}
    caption_source: str | None = None  # the concept group in the captions file (default: name)
    share: float = 1.0  # MedMNIST: the pretraining part of the train split; the rest is the pool
    partition_seed: int = 0  # the seed of that partition (clipsvd.data.holdout.pretraining_part)
    classes: tuple[str, ...] | None = None  # only these classes' images (None: every class)
    repeat: int = 1  # each image this many times per pass over the corpus (a small source's say)


@dataclass(frozen=True)
class Recipe:
    model: str
    tag: str
    sources: tuple[SourceRecipe, ...]
    steps: int
    batch_size: int
    lr: float
    logit_scale_lr: float | None = None  # None: lr; higher lets a short run learn its temperature
    seed: int = 0
    threads: int = 2
    min_lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    check_steps: tuple[int, ...] = (2,)
    init_seed: int = 0
    init_scale: float = 1.0  # the transformer blocks' matrices start at this share of open_clip's init
    evaluation: dict = field(default_factory=dict)  # {source name: {split, per_class, template}}
    # How each image's caption is drawn: the shares of named / described / modality-only
    # captions (they sum to 1), and the chance it is another class's caption (label noise).
    captions: dict = field(default_factory=lambda: dict(CAPTION_MIX))
    probe_shots: int = 16  # the linear probe of the validation record: K per class from the pool
    probe_seeds: tuple[int, ...] = (1, 2, 3)

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def _fields(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file; every problem is one ConfigError line naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found; the packaged one is "
                          f"src/clipsvd/pretrained/mini-clip-medmnist.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML: fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys to values")
    unknown = sorted(set(raw) - _fields(Recipe))
    if unknown:
        raise ConfigError(f"{path}: key '{unknown[0]}': unknown recipe key; known keys are "
                          f"{', '.join(sorted(_fields(Recipe)))}")
    missing = sorted(k for k in ("model", "tag", "sources", "steps", "batch_size", "lr")
                     if k not in raw)
    if missing:
        raise ConfigError(f"{path}: key '{missing[0]}': required by a recipe")
    if not isinstance(raw["sources"], list) or not raw["sources"]:
        raise ConfigError(f"{path}: key 'sources': give a list of image sources")
    sources = []
    for i, item in enumerate(raw["sources"]):
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{path}: key 'sources.{i}': a source is a mapping with a 'name'")
        bad = sorted(set(item) - _fields(SourceRecipe))
        if bad:
            raise ConfigError(f"{path}: key 'sources.{i}.{bad[0]}': unknown source key")
        if (item.get("medmnist") is None) == (item.get("demo") is None):
            raise ConfigError(f"{path}: key 'sources.{i}': give exactly one of 'medmnist' (a "
                              "flag) or 'demo' (generator settings)")
        if item.get("medmnist") is not None and not item.get("md5"):
            raise ConfigError(f"{path}: key 'sources.{i}.md5': a MedMNIST source needs the MD5 "
                              "of its file, so the recipe names exactly what it was made from")
        if item.get("split", "train") != "train":
            # Studies test on val and test splits: pretraining on them would leak into every
            # zero-shot and few-shot figure of the model.
            raise ConfigError(f"{path}: key 'sources.{i}.split': pretraining reads only a "
                              f"MedMNIST file's train split, got {item['split']!r}; remove the "
                              "key or set it to train")
        if not isinstance(item.get("repeat", 1), int) or item.get("repeat", 1) < 1:
            raise ConfigError(f"{path}: key 'sources.{i}.repeat': give a whole number ≥ 1")
        share = item.get("share", 1.0)
        if not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"{path}: key 'sources.{i}.share': give the pretraining part of the "
                              f"train split as a number in (0, 1], got {share!r}")
        if item.get("classes") is not None:
            if not isinstance(item["classes"], list) or not item["classes"]:
                raise ConfigError(f"{path}: key 'sources.{i}.classes': give a list of class "
                                  "names, or remove the key for every class")
            item = {**item, "classes": tuple(str(c) for c in item["classes"])}
        source = SourceRecipe(**{**item, "preprocessing": item.get("preprocessing") or {}})
        try:
            _preprocessing(source)
        except TypeError:
            raise ConfigError(f"{path}: key 'sources.{i}.preprocessing': unknown preprocessing "
                              "key; use those of a study dataset (config/schema.yaml)") from None
        sources.append(source)
    values = {k: v for k, v in raw.items() if k != "sources"}
    for key in ("steps", "batch_size", "threads"):
        if not isinstance(values.get(key, 1), int) or values.get(key, 1) < 1:
            raise ConfigError(f"{path}: key '{key}': give a whole number ≥ 1")
    for key in ("betas", "crop_scale", "crop_ratio", "check_steps", "probe_seeds"):
        if key in values:
            values[key] = tuple(values[key])
    by_name = {s.name: s for s in sources}
    for name, settings in (values.get("evaluation") or {}).items():
        if name not in by_name:
            raise ConfigError(f"{path}: key 'evaluation.{name}': no source is named {name!r}; "
                              f"use one of {', '.join(by_name)}")
        if by_name[name].medmnist is not None and (settings or {}).get("split") not in (
                "val", "test"):
            raise ConfigError(f"{path}: key 'evaluation.{name}.split': give val or test, the "
                              "images of the MedMNIST file that pretraining never sees")
    mix = values.get("captions", CAPTION_MIX)
    if not isinstance(mix, dict) or set(mix) - set(CAPTION_MIX):
        raise ConfigError(f"{path}: key 'captions': a mapping of {', '.join(CAPTION_MIX)} to "
                          "shares")
    mix = {**{k: 0.0 for k in CAPTION_MIX}, **mix}
    if any(not isinstance(v, (int, float)) or v < 0 for v in mix.values()) \
            or not math.isclose(sum(mix[k] for k in CAPTION_KINDS), 1.0, abs_tol=1e-9) \
            or mix["wrong_class"] >= 1:
        raise ConfigError(f"{path}: key 'captions': named + described + modality must be "
                          f"non-negative shares summing to 1 and wrong_class in [0, 1), got {mix}")
    values["captions"] = mix
    recipe = Recipe(sources=tuple(sources), **values)
    check_crop_scale(recipe.crop_scale, f"{path}: key 'crop_scale'")
    if any(not 1 <= s <= recipe.steps for s in recipe.check_steps):
        raise ConfigError(f"{path}: key 'check_steps': every step must lie in 1..{recipe.steps}")
    return recipe


# ----------------------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def load_caption_spec() -> dict[str, Any]:
    text = resources.files("clipsvd").joinpath("resources", CAPTIONS_RESOURCE).read_text(
        encoding="utf-8")
    return yaml.safe_load(text)


def captions_sha256() -> str:
    data = resources.files("clipsvd").joinpath("resources", CAPTIONS_RESOURCE).read_bytes()
    return hashlib.sha256(data).hexdigest()


def concept_captions(spec: dict[str, Any], source: str, class_name: str | None,
                     kind: str = "named") -> list[str]:
    """Every caption of one kind (named, described; modality: ``class_name`` None) of a class:
    templates × modalities × names × descriptions, deduplicated in first-seen order (so the
    list, and the caption a seed draws, never depends on hashing)."""
    group = spec["sources"][source]
    concept = group["classes"][class_name] if kind != "modality" else {}
    captions: dict[str, None] = {}
    for template in spec[f"{kind}_templates"]:
        for modality in group["modalities"]:
            for name in concept.get("names", [""]):
                for description in concept.get("descriptions", [""]):
                    text = template.format(modality=modality, a_modality=_article(modality),
                                           name=name, a_name=_article(name),
                                           description=description)
                    captions[text] = None
    return list(captions)


def all_caption_texts(spec: dict[str, Any] | None = None) -> list[str]:
    spec = spec or load_caption_spec()
    texts = []
    for source, group in spec["sources"].items():
        for name in group["classes"]:
            texts += concept_captions(spec, source, name, "named")
            texts += concept_captions(spec, source, name, "described")
        texts += concept_captions(spec, source, None, "modality")
    return texts


def prompt_name(spec: dict[str, Any], source: str, class_name: str) -> str:
    """The name a study's prompt gives the class: the first of its concept's names."""
    return spec["sources"][source]["classes"][class_name]["names"][0]


# ----------------------------------------------------------------------------- vocabulary


def _words(text: str) -> list[str]:
    """``text`` split into words as the BERT tokenizer does before WordPiece (lower case,
    punctuation apart), with the same normaliser and pre-tokeniser it uses."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normal = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                            lowercase=True).normalize_str(text)
    return [word for word, _ in BertPreTokenizer().pre_tokenize_str(normal)]


def vocabulary_texts() -> list[str]:
    """What the vocabulary must spell as whole words: the pretraining captions, the shipped
    interpretation corpus and the label names of every MedMNIST dataset."""
    texts = all_caption_texts()
    corpus = resources.files("clipsvd").joinpath("resources", "medical_descriptions.txt")
    texts += [line for line in corpus.read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#")]
    labels = json.loads(resources.files("clipsvd").joinpath(
        "resources", "medmnist_labels.json").read_text(encoding="utf-8"))
    texts += [label for flag in labels["flags"].values() for label in flag["labels"]]
    return texts


def build_vocabulary(texts: Sequence[str]) -> list[str]:
    """A WordPiece vocabulary: the special tokens, every character alone and as a ``##``
    continuation (so no word is ever [UNK], an unknown word is spelled out), then every word of
    ``texts`` as one token; sorted, so equal texts give the same file."""
    words = sorted({word for text in texts for word in _words(text)})
    characters = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789") | {c for w in words for c in w})
    pieces = [*characters, *(f"##{c}" for c in characters)]
    vocabulary = list(SPECIAL_TOKENS) + pieces
    vocabulary += [w for w in words if w not in set(pieces)]
    return vocabulary


def write_tokenizer(folder: str | Path) -> int:
    """Write ``vocab.txt`` and ``tokenizer_config.json`` of the miniature's tokenizer."""
    folder = Path(folder)
    vocabulary = build_vocabulary(vocabulary_texts())
    from .io import write_text

    write_text(folder / "vocab.txt", "\n".join(vocabulary) + "\n")
    write_json(folder / "tokenizer_config.json", TOKENIZER_CONFIG)
    log.info("tokenizer of %d tokens written to %s", len(vocabulary), folder)
    return len(vocabulary)


# ----------------------------------------------------------------------------- images


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _preprocessing(source: SourceRecipe) -> PreprocessingConfig:
    return PreprocessingConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in source.preprocessing.items()})


class ImageSource:
    """Images of one source, prepared on first use by the project's preparation chain."""

    def __init__(self, name: str, labels: np.ndarray, class_names: list[str],
                 preprocessing: PreprocessingConfig, image_size: int):
        from .data.prepare import build_pipeline

        self.name = name
        self.labels = labels.astype(np.int64)
        self.class_names = class_names
        self.pipeline = build_pipeline(preprocessing, image_size)
        self.images = np.zeros((len(labels), 3, image_size, image_size), dtype=np.uint8)
        self.ready = np.zeros(len(labels), dtype=bool)

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, index: int) -> tuple[np.ndarray, str]:
        raise NotImplementedError

    def get(self, indices: np.ndarray) -> np.ndarray:
        for index in indices[~self.ready[indices]]:
            array, layout = self.raw(int(index))
            self.images[index] = self.pipeline.finish(self.pipeline.load_array(array, layout))
            self.ready[index] = True
        return self.images[indices]


class MedmnistSource(ImageSource):
    """One split of a MedMNIST npz file (its label names from the package's copy of INFO)."""

    def __init__(self, arrays: np.ndarray, labels: np.ndarray, rows: np.ndarray, flag: str,
                 preprocessing: PreprocessingConfig, image_size: int, name: str):
        from .data.sources import medmnist_labels

        self.arrays, self.rows = arrays, rows  # rows: which images of the split this source has
        self.layout = MEDMNIST_LAYOUTS[self.arrays.ndim]
        super().__init__(name, labels[rows], medmnist_labels(flag), preprocessing, image_size)

    def raw(self, index: int) -> tuple[np.ndarray, str]:
        return self.arrays[self.rows[index]], self.layout

    def hashes(self) -> list[str]:
        from .data.holdout import array_hashes

        return array_hashes(self.arrays[self.rows])


class DemoSource(ImageSource):
    """Images of the demo generator's findings, each from its own random stream, quantised to
    8 bits as the generator's PNG files are."""

    def __init__(self, per_class: int, render_size: int, seed: int,
                 preprocessing: PreprocessingConfig, image_size: int, name: str):
        from .data.demo import CLASSES

        labels = np.repeat(np.arange(len(CLASSES)), per_class)
        self.per_class, self.render_size, self.seed = per_class, render_size, seed
        super().__init__(name, labels, list(CLASSES), preprocessing, image_size)

    def raw(self, index: int) -> tuple[np.ndarray, str]:
        return demo_array(self.class_names, self.per_class, self.render_size, self.seed,
                          index), "hw"

    def hashes(self) -> list[str]:
        from .data.holdout import image_hash

        return [image_hash(self.raw(i)[0]) for i in range(len(self))]


def demo_array(class_names: Sequence[str], per_class: int, render_size: int, seed: int,
               index: int) -> np.ndarray:
    """Image ``index`` of a demo stream (class-major), as the generator's 8-bit array."""
    from .data.demo import render_image
    from .seeding import numpy_rng

    label, number = divmod(index, per_class)
    rng = numpy_rng(seed, label, number)
    image = render_image(class_names[label], render_size, rng)
    return np.rint(image * 255).astype(np.uint8)


def _medmnist_path(source: SourceRecipe, data_dir: Path | None, check_md5: bool) -> Path:
    if data_dir is None:
        raise DataError(f"source '{source.name}' reads {source.medmnist}.npz; give the "
                        "folder that holds it with --data")
    path = Path(data_dir) / f"{source.medmnist}.npz"
    if not path.is_file():
        raise DataError(f"{path}: MedMNIST file not found; --data must name the folder "
                        f"with {source.medmnist}.npz (e.g. ../shared/data/medmnist)")
    if check_md5:
        digest = file_md5(path)
        if digest != source.md5:
            raise DataError(f"{path}: MD5 {digest} differs from the recipe's {source.md5}; "
                            "use the official MedMNIST v3 file")
    return path


def evaluated_hashes(recipe: Recipe, data_dir: Path | None,
                     check_md5: bool = True) -> frozenset[str]:
    """The content hash of every val and test image of every MedMNIST file the recipe reads:
    images pretraining must not hold, whichever split of which file they sit in."""
    from .data.holdout import array_hashes

    hashes: set[str] = set()
    for source in recipe.sources:
        if source.medmnist is not None:
            with np.load(_medmnist_path(source, data_dir, check_md5)) as npz:
                for split in ("val", "test"):
                    hashes.update(array_hashes(npz[f"{split}_images"]))
    return frozenset(hashes)


def train_partition(source: SourceRecipe, labels: np.ndarray) -> np.ndarray:
    """The train rows of the source's pretraining part and of its kept classes (a mask)."""
    from .data.holdout import pretraining_part
    from .data.sources import medmnist_labels

    part = pretraining_part(len(labels), source.share, source.partition_seed)
    if source.classes is not None:
        names = medmnist_labels(source.medmnist)
        unknown = sorted(set(source.classes) - set(names))
        if unknown:
            raise ConfigError(f"recipe source '{source.name}': key 'classes': {unknown[0]!r} is "
                              f"not a class of {source.medmnist}; use {', '.join(names)}")
        part &= np.isin(labels, [names.index(c) for c in source.classes])
    return part


def open_source(source: SourceRecipe, data_dir: Path | None, image_size: int,
                held_out: dict | None = None, check_md5: bool = True,
                excluded: frozenset[str] = frozenset()) -> ImageSource:
    """The source's training images (its pretraining part, less any image whose content hash
    is in ``excluded``), or with ``held_out`` ({split} for MedMNIST, {per_class} for the demo,
    whose held-out images come from the seed + 1000) images never trained on. A MedMNIST file
    must be present and carry the recipe's MD5."""
    from .data.holdout import array_hashes

    preprocessing = _preprocessing(source)
    if source.medmnist is not None:
        path = _medmnist_path(source, data_dir, check_md5)
        split = held_out["split"] if held_out else source.split
        if held_out and split == source.split:
            raise ConfigError(f"recipe key 'evaluation.{source.name}.split': {split} is the "
                              "split pretraining trains on; name another (val)")
        with np.load(path) as npz:
            arrays = npz[f"{split}_images"]
            labels = npz[f"{split}_labels"].reshape(-1)
        if held_out:
            rows = np.arange(len(labels))
        else:
            keep = train_partition(source, labels)
            if excluded:
                keep &= np.asarray([h not in excluded for h in array_hashes(arrays)], dtype=bool)
            rows = np.flatnonzero(keep)
        return MedmnistSource(arrays, labels, rows, source.medmnist, preprocessing, image_size,
                              source.name)
    demo = dict(source.demo or {})
    seed = int(demo.get("seed", 0)) + (HELD_OUT_SEED_OFFSET if held_out else 0)
    per_class = int((held_out or demo).get("per_class", 1000))
    return DemoSource(per_class, int(demo.get("image_size", 96)), seed, preprocessing,
                      image_size, source.name)


# ----------------------------------------------------------------------------- training


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up over ``warmup_steps``, then one cosine down to ``min_lr`` at the end."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps - 1)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * progress))


def random_resized_crops(images: torch.Tensor, generator: torch.Generator,
                         scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """A random resized crop of every image at once (bilinear, through one affine grid).

    No flips: OrganAMNIST has left and right organs as separate classes.
    """
    n = images.shape[0]
    area = torch.empty(n, dtype=torch.float64).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    shift = torch.rand(n, 2, dtype=torch.float64, generator=generator) * 2 - 1
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 1, 1] = width, height
    theta[:, 0, 2], theta[:, 1, 2] = shift[:, 0] * (1 - width), shift[:, 1] * (1 - height)
    grid = F.affine_grid(theta.float(), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     image_concepts: torch.Tensor, text_concepts: torch.Tensor,
                     scale: torch.Tensor, image_sources: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric cross-entropy where every (image, caption) pair of one concept is a positive,
    and a modality-only caption (concept in ``image_sources``) for every image of its source;
    returns the loss and the fraction of images whose best caption is a positive."""
    logits = scale * image_features @ text_features.t()
    positive = image_concepts[:, None] == text_concepts[None, :]
    if image_sources is not None:
        positive |= image_sources[:, None] == text_concepts[None, :]
    positive = positive.float()
    image_loss = -(positive / positive.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1)
    text_loss = -(positive.t() / positive.t().sum(1, keepdim=True)
                  * logits.t().log_softmax(1)).sum(1)
    loss = 0.5 * (image_loss.mean() + text_loss.mean())
    hits = positive.gather(1, logits.argmax(1, keepdim=True)).mean()
    return loss, hits


def scale_block_matrices(model: torch.nn.Module, factor: float) -> int:
    """Multiply the weight matrices of every transformer block (attention in/out, MLP) by
    ``factor``; returns how many. A short run from open_clip's full-scale random init leaves
    those matrices mostly random (after 300 steps, 8-26 % of their norm had moved), with the
    flat spectrum of a random matrix; from a tenth of it, what training wrote dominates, and
    their spectra decay as a long-trained model's do."""
    scaled = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and ".resblocks." in name:
                parameter.mul_(factor)
                scaled += 1
    return scaled


def _parameter_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on gains, biases, or the logit scale), as open_clip;
    the logit scale in a group of its own, with its own learning rate (``lr_scale`` relative
    to the schedule's)."""
    decay, plain, scale = [], [], []
    for name, parameter in model.named_parameters():
        if name == "logit_scale":
            scale.append(parameter)
        else:
            (plain if parameter.ndim < 2 else decay).append(parameter)
    ratio = (recipe.logit_scale_lr or recipe.lr) / recipe.lr
    return [{"params": decay, "weight_decay": recipe.weight_decay, "lr_scale": 1.0},
            {"params": plain, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": scale, "weight_decay": 0.0, "lr_scale": ratio}]


@dataclass
class Corpus:
    """Every training item (source, row, class concept) and every caption, tokenised.

    Concepts: one per class of each source, then one per source (its modality captions).
    ``caption_first[c, kind]`` and ``caption_count[c, kind]`` locate the named and described
    captions of class concept ``c``; a source's modality captions are those of its concept.
    """

    sources: list[ImageSource]
    item_source: np.ndarray
    item_row: np.ndarray
    item_concept: np.ndarray
    concept_names: list[str]
    concept_source: np.ndarray  # the source of each class concept
    source_concept: np.ndarray  # the modality concept of each source
    caption_tokens: torch.Tensor  # all captions
    caption_concept: torch.Tensor
    caption_first: np.ndarray  # concept × (named, described, modality): first caption
    caption_count: np.ndarray  # and how many

    def hashes(self) -> list[str]:
        """The content hash of every image the corpus holds (clipsvd.data.holdout)."""
        return [h for source in self.sources for h in source.hashes()]


def build_corpus(recipe: Recipe, data_dir: Path | None, image_size: int, tokenizer,
                 check_md5: bool = True) -> Corpus:
    spec = load_caption_spec()
    excluded = evaluated_hashes(recipe, data_dir, check_md5)
    sources, class_concepts, concept_source, groups = [], [], [], []
    item_source, item_row, item_concept = [], [], []
    for source_index, source in enumerate(recipe.sources):
        images = open_source(source, data_dir, image_size, check_md5=check_md5,
                             excluded=excluded)
        group = source.caption_source or source.name
        if group not in spec["sources"]:
            raise ConfigError(f"recipe source '{source.name}': the captions file has no source "
                              f"'{group}'; set caption_source to one of "
                              f"{', '.join(spec['sources'])}")
        concept_of_label = []
        for class_name in images.class_names:
            if class_name not in spec["sources"][group]["classes"]:
                raise ConfigError(f"{CAPTIONS_RESOURCE}: source '{group}' has no concept for "
                                  f"class {class_name!r}; add it")
            concept_of_label.append(len(class_concepts))
            class_concepts.append((group, class_name))
            concept_source.append(source_index)
        groups.append(group)
        sources.append(images)
        rows = np.tile(np.arange(len(images)), source.repeat)
        item_source.append(np.full(len(rows), source_index))
        item_row.append(rows)
        item_concept.append(np.asarray(concept_of_label, dtype=np.int64)[images.labels[rows]])
    n_classes, n_concepts = len(class_concepts), len(class_concepts) + len(sources)
    first = np.zeros((n_concepts, len(CAPTION_KINDS)), dtype=np.int64)
    count = np.zeros_like(first)
    captions: list[str] = []
    caption_concept: list[int] = []

    def add(concept: int, kind: int, texts: list[str]) -> None:
        first[concept, kind], count[concept, kind] = len(captions), len(texts)
        captions.extend(texts)
        caption_concept.extend([concept] * len(texts))

    for concept, (group, class_name) in enumerate(class_concepts):
        for kind in (0, 1):
            add(concept, kind, concept_captions(spec, group, class_name, CAPTION_KINDS[kind]))
    for source_index, group in enumerate(groups):
        add(n_classes + source_index, 2, concept_captions(spec, group, None, "modality"))
    check_tokens(tokenizer, captions)
    return Corpus(sources, np.concatenate(item_source), np.concatenate(item_row),
                  np.concatenate(item_concept),
                  [f"{g}/{c}" for g, c in class_concepts] + [f"{g}/*" for g in groups],
                  np.asarray(concept_source), n_classes + np.arange(len(sources)),
                  tokenizer(captions), torch.tensor(caption_concept), first, count)


def draw_captions(corpus: Corpus, items: np.ndarray, mix: dict[str, float],
                  generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One caption per item from the recipe's mixture; returns the caption ids and each item's
    label concept (the class its caption speaks of, which label noise may have changed, or the
    source's modality concept for a modality-only caption)."""
    n = len(items)
    u = torch.rand(n, 3, dtype=torch.float64, generator=generator).numpy()
    draws = torch.randint(0, 1 << 30, (n, 2), generator=generator).numpy()
    concept = corpus.item_concept[items].copy()
    source = corpus.item_source[items]
    noisy = np.flatnonzero(u[:, 0] < mix["wrong_class"])
    for i in noisy:  # another class of the same source, uniformly
        others = np.flatnonzero((corpus.concept_source == source[i])
                                & (np.arange(len(corpus.concept_source)) != concept[i]))
        if len(others):
            concept[i] = others[draws[i, 1] % len(others)]
    kind = np.where(u[:, 1] < mix["named"], 0,
                    np.where(u[:, 1] < mix["named"] + mix["described"], 1, 2))
    concept = np.where(kind == 2, corpus.source_concept[source], concept)
    ids = corpus.caption_first[concept, kind] + draws[:, 0] % corpus.caption_count[concept, kind]
    return ids, concept


def check_tokens(tokenizer, captions: list[str]) -> None:
    """Every caption fits the context whole and has no unknown token: a caption cut short or
    spelled with [UNK] would train the text tower on something other than the recipe says."""
    inner = tokenizer.tokenizer  # open_clip's HFTokenizer wraps the transformers tokenizer
    context = tokenizer.context_length
    for caption, ids in zip(captions, inner(captions)["input_ids"]):
        if inner.unk_token_id in ids:
            raise ConfigError(f"{CAPTIONS_RESOURCE}: caption {caption!r} has a word the "
                              "tokenizer does not know; rebuild it with `clipsvd vocabulary`")
        if len(ids) > context:
            raise ConfigError(f"{CAPTIONS_RESOURCE}: caption {caption!r} is {len(ids)} tokens, "
                              f"longer than the model's context of {context}; shorten it")


def _batch_images(corpus: Corpus, items: np.ndarray) -> torch.Tensor:
    out = None
    for source_index, source in enumerate(corpus.sources):
        chosen = np.nonzero(corpus.item_source[items] == source_index)[0]
        if not len(chosen):
            continue
        images = source.get(corpus.item_row[items[chosen]])
        if out is None:
            out = np.empty((len(items), *images.shape[1:]), dtype=np.uint8)
        out[chosen] = images
    return torch.from_numpy(out)


def _git_state() -> dict[str, Any]:
    from .provenance import git_state

    state = git_state()
    return {"git_commit": str(state.get("git_commit", "unknown")),
            "git_dirty": str(state.get("git_dirty", "unknown")).lower()}


def cpu_identity() -> str:
    """The CPU's model, family, stepping and cache size, and a digest of its instruction-set
    flags (the kernels' choice of code path and blocking depends on them).

    torch's capability name is too coarse for bit-identical runs: two machines it both calls
    AVX512 gave different weights from the second step of the same recipe and code.
    """
    import hashlib
    import platform

    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                found.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = found.get("model name") or platform.processor() or platform.machine()
    flags = " ".join(sorted((found.get("flags") or found.get("Features") or "").split()))
    kind = ", ".join(f"{key} {found[key]}" for key in ("cpu family", "model", "stepping",
                                                         "cache size") if key in found)
    return (f"{model}{f' ({kind})' if kind else ''}; "
            f"flags {hashlib.sha256(flags.encode()).hexdigest()[:12]}")


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("torch", "open_clip_torch", "numpy", "monai", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def pretrain(recipe_path: str | Path, data_dir: str | Path | None, out_path: str | Path,
             stop_after: int | None = None) -> dict[str, Any]:
    """Run the recipe (or its first ``stop_after`` steps) and write the weights to ``out_path``
    (safetensors) and a record of the run (timings, loss, zero-shot accuracy on validation
    images) next to it as ``<name>.json``."""
    from .data.prepare import quiet_monai

    threads = torch.get_num_threads()
    try:
        with quiet_monai():
            return _pretrain(recipe_path, data_dir, out_path, stop_after)
    finally:  # the recipe's thread count is its own; a caller's stays as it was
        torch.set_num_threads(threads)


def _pretrain(recipe_path: str | Path, data_dir: str | Path | None, out_path: str | Path,
              stop_after: int | None) -> dict[str, Any]:
    from .models import load_model, model_fingerprint
    from .seeding import seed_everything, torch_generator

    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    if stop_after is not None and not 1 <= stop_after <= recipe.steps:
        raise ConfigError(f"--stop-after {stop_after}: give a step in 1..{recipe.steps}")
    steps = stop_after or recipe.steps
    torch.set_num_threads(recipe.threads)
    seed_everything(recipe.seed)
    data_dir = Path(data_dir) if data_dir is not None else None
    inputs = {}
    for source in recipe.sources:
        if source.medmnist is not None:
            inputs[f"{source.medmnist}.npz"] = source.md5
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    code = _git_state()  # the code as it was when the run began

    loaded = load_model(recipe.model, None, recipe.init_seed)
    model = loaded.model
    scale_block_matrices(model, recipe.init_scale)
    corpus = build_corpus(recipe, data_dir, loaded.image_size, loaded.tokenizer)
    log.info("pretraining %s: %d images (%d items a pass) of %d concepts from %s, %d captions; "
             "%d of %d steps of %d, %d threads", recipe.model,
             sum(len(s) for s in corpus.sources), len(corpus.item_row), len(corpus.concept_names),
             ", ".join(s.name for s in corpus.sources), len(corpus.caption_tokens), steps,
             recipe.steps, recipe.batch_size, recipe.threads)
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(_parameter_groups(model, recipe), lr=recipe.lr,
                                  betas=recipe.betas, eps=recipe.eps)
    generator = torch_generator(recipe.seed)
    max_scale = math.log(100.0)
    order = torch.empty(0, dtype=torch.long)
    check_fingerprints: dict[str, str] = {}
    history: list[dict[str, float]] = []
    model.train()
    loop_started = last_report = time.perf_counter()
    for step in range(steps):
        while len(order) < recipe.batch_size:
            order = torch.cat([order, torch.randperm(len(corpus.item_row), generator=generator)])
        batch, order = order[:recipe.batch_size].numpy(), order[recipe.batch_size:]
        caption_ids, concepts = draw_captions(corpus, batch, recipe.captions, generator)
        unique_ids = np.unique(caption_ids)
        images = _batch_images(corpus, batch).float().div_(255)
        images = random_resized_crops(images, generator, recipe.crop_scale, recipe.crop_ratio)
        images = (images - mean) / std
        step_lr = lr_at(step, recipe)
        for group in optimizer.param_groups:
            group["lr"] = step_lr * group["lr_scale"]
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(corpus.caption_tokens[unique_ids]), dim=-1)
        loss, hits = contrastive_loss(image_features, text_features,
                                      torch.from_numpy(concepts),
                                      corpus.caption_concept[unique_ids],
                                      model.logit_scale.exp(), torch.from_numpy(
                                          corpus.source_concept[corpus.item_source[batch]]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_scale)
        if step + 1 in recipe.check_steps:
            check_fingerprints[str(step + 1)] = model_fingerprint(model)
        history.append({"step": step + 1, "loss": round(loss.item(), 5),
                        "batch_accuracy": round(hits.item(), 4), "lr": step_lr,
                        "logit_scale": round(model.logit_scale.exp().item(), 3)})
        now = time.perf_counter()
        if step == 0 or now - last_report > 10 or step + 1 == steps:
            rate = (step + 1) / (now - loop_started)
            prepared = sum(int(s.ready.sum()) for s in corpus.sources)
            log.info("step %d/%d loss %.4f batch accuracy %.3f lr %.2e scale %.1f; %d images "
                     "prepared (%.2f steps/s, ETA %s)", step + 1, steps, loss.item(), hits.item(),
                     step_lr, model.logit_scale.exp().item(), prepared, rate,
                     _format_eta((steps - step - 1) / rate))
            last_report = now
    train_seconds = time.perf_counter() - loop_started
    model.eval()

    fingerprint = model_fingerprint(model)
    metadata = {
        "format": FORMAT, "model": recipe.model, "tag": recipe.tag,
        "recipe": json.dumps(recipe.as_dict(), sort_keys=True),
        "recipe_file": recipe_path.name, "captions_sha256": captions_sha256(),
        "inputs_md5": json.dumps(inputs, sort_keys=True),
        "steps_done": str(steps), "steps_total": str(recipe.steps),
        "threads": str(recipe.threads),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu_identity(),
        "versions": json.dumps(_versions(), sort_keys=True),
        "check_fingerprints": json.dumps(check_fingerprints, sort_keys=True),
        "fingerprint": fingerprint, **code}
    tensors = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    out_path = Path(out_path)
    from .data.holdout import hashes_path, write_hashes

    n_hashed = write_hashes(hashes_path(out_path), corpus.hashes())
    write_safetensors(out_path, tensors, metadata)
    record = {"weights": out_path.name, "fingerprint": fingerprint, "steps": steps,
              "check_fingerprints": check_fingerprints,
              "seconds_total": None, "seconds_training": round(train_seconds, 1),
              "load_average_at_start": [round(v, 2) for v in load_at_start],
              "cpu_count": os.cpu_count(), "threads": recipe.threads,
              "images": {"read": sum(len(s) for s in corpus.sources),
                         "items_per_pass": int(len(corpus.item_row)), "distinct_hashes": n_hashed,
                         "by_source": {s.name: len(s) for s in corpus.sources},
                         "hashes_file": hashes_path(out_path).name},
              "history_every_10_steps": history[::10] + (
                  history[-1:] if (len(history) - 1) % 10 else [])}
    if stop_after is None:
        record["zero_shot_validation"] = zero_shot_validation(recipe, data_dir, loaded)
        record["probe_validation"] = probe_validation(recipe, data_dir, loaded,
                                                      frozenset(corpus.hashes()))
        record["regime"] = regime(record)
    record["seconds_total"] = round(time.perf_counter() - started, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)  # of the whole process
    record["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    write_json(out_path.with_suffix(".json"), record)
    log.info("pretrained %d steps in %.0f s (%.0f s in all); weights %s (fingerprint %s)",
             steps, train_seconds, record["seconds_total"], out_path, fingerprint)
    return record


def _normalised(loaded, images: np.ndarray) -> torch.Tensor:
    batch = torch.from_numpy(images).float().div_(255)
    return (batch - torch.tensor(loaded.mean).view(1, 3, 1, 1)) / torch.tensor(
        loaded.std).view(1, 3, 1, 1)


@torch.no_grad()
def _features(loaded, images: ImageSource, rows: np.ndarray | None = None) -> torch.Tensor:
    from .models import encode_images

    rows = np.arange(len(images)) if rows is None else rows
    out = [encode_images(loaded.model, _normalised(loaded, images.get(rows[i:i + 256])))
           for i in range(0, len(rows), 256)]
    return torch.cat(out) if out else torch.empty(0)


def _template(spec: dict[str, Any], source: SourceRecipe, settings: dict) -> str:
    modality = spec["sources"][source.caption_source or source.name]["modalities"][0]
    return settings.get("template") or f"{_article(modality)} showing {{}}."


@torch.no_grad()
def zero_shot_validation(recipe: Recipe, data_dir: Path | None, loaded) -> dict[str, Any]:
    """Zero-shot accuracy on images not trained on (each source's evaluation split, or demo
    images from another seed), every class of the file, with the evaluation's template
    (default '<a modality> showing {}.') and each class's prompt name."""
    from .models import encode_class_prompts

    spec = load_caption_spec()
    results = {}
    for source in recipe.sources:
        settings = recipe.evaluation.get(source.name)
        if not settings:
            continue
        images = open_source(source, data_dir, loaded.image_size, held_out=settings,
                             check_md5=False)
        group = source.caption_source or source.name
        template = _template(spec, source, settings)
        names = [prompt_name(spec, group, c) for c in images.class_names]
        text = encode_class_prompts(loaded, names, [template])
        predicted = (_features(loaded, images) @ text.t()).argmax(1).numpy()
        accuracy = float((predicted == images.labels).mean())
        results[source.name] = {"split": settings.get("split", "demo, seed + 1000"),
                                "images": len(images), "classes": len(images.class_names),
                                "template": template, "accuracy": round(accuracy, 4),
                                "chance": round(1 / len(images.class_names), 4)}
        log.info("zero-shot on %s (%s, %d images): %.1f %% (chance %.1f %%)", source.name,
                 results[source.name]["split"], len(images), 100 * accuracy,
                 100 / len(images.class_names))
    return results


def probe_validation(recipe: Recipe, data_dir: Path | None, loaded,
                     pretrained_on: frozenset[str]) -> dict[str, Any]:
    """The linear probe of the studies at K = ``probe_shots`` on the same model, for each
    MedMNIST evaluation source: support sets from the support pool (the train images outside
    the pretraining part whose content pretraining did not read), C chosen on a validation
    support set of min(K, 4) images per class, accuracy on the whole evaluation split."""
    from .data.holdout import array_hashes, pretraining_part
    from .probe import fit_linear_probe, probe_probabilities
    from .seeding import numpy_rng

    probe = LinearProbeConfig()  # the studies' default grid and iterations
    results = {}
    for source in recipe.sources:
        settings = recipe.evaluation.get(source.name)
        if not settings or source.medmnist is None:
            continue
        evaluation = open_source(source, data_dir, loaded.image_size, held_out=settings,
                                 check_md5=False)
        with np.load(_medmnist_path(source, data_dir, check_md5=False)) as npz:
            arrays, labels = npz["train_images"], npz["train_labels"].reshape(-1)
        pool = ~pretraining_part(len(labels), source.share, source.partition_seed)
        pool &= np.asarray([h not in pretrained_on for h in array_hashes(arrays)], dtype=bool)
        train = MedmnistSource(arrays, labels, np.flatnonzero(pool), source.medmnist,
                               _preprocessing(source), loaded.image_size, source.name)
        n_classes = len(evaluation.class_names)
        eval_x = F.normalize(_features(loaded, evaluation), dim=-1).numpy()
        accuracies = []
        for seed in recipe.probe_seeds:
            rng = numpy_rng(seed)
            support = np.concatenate([rng.choice(np.flatnonzero(train.labels == c),
                                                 recipe.probe_shots, replace=False)
                                      for c in range(n_classes)])
            val = np.concatenate([rng.choice(np.flatnonzero(evaluation.labels == c),
                                             min(recipe.probe_shots, 4), replace=False)
                                  for c in range(n_classes)])
            x = F.normalize(_features(loaded, train, support), dim=-1).numpy()
            model, _, _ = fit_linear_probe(x, train.labels[support], eval_x[val],
                                           evaluation.labels[val], n_classes, probe.c_grid,
                                           probe.max_iter, seed)
            predicted = probe_probabilities(model, eval_x, n_classes).argmax(1)
            accuracies.append(float((predicted == evaluation.labels).mean()))
        results[source.name] = {"split": settings["split"], "shots": recipe.probe_shots,
                                "seeds": list(recipe.probe_seeds), "pool": int(pool.sum()),
                                "accuracy": round(float(np.mean(accuracies)), 4),
                                "by_seed": [round(a, 4) for a in accuracies]}
        log.info("linear probe K=%d on %s (%s): %.1f %%", recipe.probe_shots, source.name,
                 settings["split"], 100 * results[source.name]["accuracy"])
    return results


REGIME = {"above_chance": 0.10, "below_probe": 0.15}  # docs/miniature.md, protocol 2


def regime(record: dict[str, Any]) -> dict[str, Any]:
    """Protocol 2's regime on the validation figures: zero-shot at least 10 points above
    chance and at least 15 below the probe at K = 16, per evaluated MedMNIST source."""
    out = {}
    for name, probe in record["probe_validation"].items():
        zero = record["zero_shot_validation"][name]
        above = zero["accuracy"] - zero["chance"]
        below = probe["accuracy"] - zero["accuracy"]
        out[name] = {"zero_shot_minus_chance": round(above, 4),
                     "probe_minus_zero_shot": round(below, 4),
                     "holds": bool(above >= REGIME["above_chance"]
                                   and below >= REGIME["below_probe"])}
    return out
