"""Which dataset settings a prepared store depends on, and their fingerprint.

Kept free of heavy imports: the workflow computes the fingerprint while building its DAG.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from ..config import DatasetConfig

# What decides whether a prepared store is still valid (besides its input files): these
# DatasetConfig fields, the image size and PREPARATION_VERSION, which is raised whenever a code
# change alters the prepared images or index. Every DatasetConfig field is in one of the two
# lists (a test checks it), so a new field needs a decision.
PREPARATION_VERSION = 3  # 3: PIL modes as a viewer shows them; groups from columns, patterns, DICOM
PREPARATION_FIELDS = ("format", "root", "manifest", "medmnist", "split_file", "image_dir",
                      "columns", "groups", "preprocessing", "split", "class_names",
                      "exclude_pretrained_on")
UNRELATED_FIELDS = ("name", "templates", "demo", "sampling", "overrides", "settings",
                    "descriptions")  # BiomedCoOp's sentences: training, not the store


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def preparation_parameters(dataset: DatasetConfig, image_size: int) -> dict[str, Any]:
    """Everything besides the input files that a prepared store depends on (plain JSON)."""
    values = asdict(dataset)
    params = {name: values[name] for name in PREPARATION_FIELDS if name in values}
    params["image_size"] = int(image_size)
    params["preparation_version"] = PREPARATION_VERSION
    if dataset.exclude_pretrained_on:  # what is excluded is the list's content, not its name
        from .holdout import packaged_hashes, file_sha256

        params["excluded_images_sha256"] = file_sha256(
            packaged_hashes(dataset.exclude_pretrained_on, "exclude_pretrained_on"))
    return _plain(params)


def preparation_fingerprint(dataset: DatasetConfig, image_size: int) -> str:
    """A short hash of ``preparation_parameters``: equal hashes, interchangeable stores.

    The workflow passes it as a param of the prepare rule, so a change re-prepares the store
    and a change elsewhere (templates, sampling, training) does not.
    """
    text = json.dumps(preparation_parameters(dataset, image_size), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def store_key(dataset: DatasetConfig, image_size: int | None, model_name: str,
              pretrained: str | None) -> str:
    """The key of the prepared store a study asks for (its folder under results/prepared/).

    Everything that decides the store's content and nothing else: the preparation parameters at
    the model's input size, and for a generated demo dataset its generator settings (they decide
    the raw files). When the input size cannot be read offline (a hub model not in
    clipsvd.architectures), the model's name stands in for it, so the key stays the same from
    one run to the next.
    """
    params = preparation_parameters(dataset, image_size if image_size is not None else 0)
    if image_size is None:
        params["image_size"] = f"the input size of {model_name} ({pretrained or 'random'})"
    if dataset.demo is not None:
        params["demo"] = _plain(asdict(dataset.demo))
    return _digest(params)


def sampling_key(sampling: Any) -> str:
    """The key of a few-shot sampling policy (its folder under a store's split files)."""
    return _digest(_plain(asdict(sampling)))


def _digest(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
