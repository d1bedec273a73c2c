"""Few-shot support sets (CoOp protocol), drawn once per (setting, shots, seed) and written to disk.

Per class, the validation support set takes min(K, max_val_shots) images of the ``val`` split
and the training support set K images of the ``train`` split, uniformly without replacement.
Each (class, split) has its own random stream spawned from the run's seed, so a class's draw
does not depend on which other classes the setting uses (base classes get the same support set
in ``few_shot`` and ``base_to_novel``), and ``nested`` sets are prefixes of one permutation.
"""
from __future__ import annotations

import os

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SamplingConfig
from ..errors import DataError
from ..io import write_json
from ..seeding import numpy_rng
from .store import PreparedStore

SETTINGS = ("few_shot", "base_to_novel")
INSUFFICIENT = ("error", "replace", "all")


def base_novel_labels(n_classes: int) -> tuple[list[int], list[int]]:
    """Sorted label ids: the first ceil(n/2) are base classes, the rest novel."""
    n_base = math.ceil(n_classes / 2)
    return list(range(n_base)), list(range(n_base, n_classes))


def _draw(pool: np.ndarray, k: int, rng: np.random.Generator, sampling: SamplingConfig,
          class_name: str, split: str, shots: int) -> tuple[np.ndarray, str]:
    """Pick k of ``pool`` (positions in store order); returns the picks and what was done."""
    n = len(pool)
    if k == 0:
        return pool[:0], "none"
    if n >= k:
        if sampling.nested:
            return pool[rng.permutation(n)[:k]], "sampled"
        return pool[rng.choice(n, size=k, replace=False)], "sampled"
    if n == 0:  # nothing to draw from: no policy helps, so none is suggested
        raise DataError(f"class '{class_name}' has no images in the {split} split, so its "
                        f"support set for shots={shots} cannot be drawn (sampling.insufficient "
                        "cannot help); add images of the class (an assigned split needs 3 groups "
                        "of it or more: see the store's provenance.json, 'splits') or remove it")
    if sampling.insufficient == "error":
        raise DataError(f"class '{class_name}' has {n} image(s) in the {split} split, fewer than "
                        f"the {k} needed for shots={shots}; use fewer shots or set the "
                        "dataset's sampling.insufficient: replace|all")
    if sampling.insufficient == "all":
        return pool[rng.permutation(n)], "all"
    # replace: every available image once, then the shortfall drawn with replacement,
    # so the set keeps as much variety as the class has. Nesting holds (same stream).
    extra = rng.integers(0, n, size=k - n)
    return np.concatenate([pool[rng.permutation(n)], pool[extra]]), "replace"


def sample_split(store: PreparedStore, setting: str, shots: int, seed: int,
                 sampling: SamplingConfig) -> dict[str, Any]:
    """The support/validation/test sample ids of one (setting, shots, seed), as a dict."""
    if setting not in SETTINGS:
        raise DataError(f"unknown setting {setting!r}; use one of {', '.join(SETTINGS)}")
    if shots < 0:
        raise DataError(f"shots must be >= 0, got {shots}")
    if sampling.insufficient not in INSUFFICIENT:
        raise DataError(f"sampling.insufficient: unknown value {sampling.insufficient!r}; use "
                        f"{', '.join(INSUFFICIENT)}")
    index = store.index
    n_classes = len(store.classes)
    if setting == "base_to_novel":
        if n_classes < 2:
            raise DataError(f"{store.path}: base_to_novel needs at least 2 classes, the dataset "
                            f"has {n_classes}")
        train_labels, novel_labels = base_novel_labels(n_classes)
    else:
        train_labels, novel_labels = list(range(n_classes)), []

    # Two streams per class of the whole dataset (val, then train), fixed by label and seed.
    streams = numpy_rng(seed).spawn(2 * n_classes)
    labels = index["label"].to_numpy()
    splits = index["split"].to_numpy()
    ids = index["sample_id"].to_numpy()
    val_k = min(shots, sampling.max_val_shots)
    train_pos: list[np.ndarray] = []
    val_pos: list[np.ndarray] = []
    counts: dict[str, Any] = {}
    for label in train_labels:
        name = store.classes[label]
        entry = {}
        for split, k, stream, out in (("val", val_k, streams[2 * label], val_pos),
                                      ("train", shots, streams[2 * label + 1], train_pos)):
            pool = np.flatnonzero((labels == label) & (splits == split))
            picked, what = _draw(pool, k, stream, sampling, name, split, shots)
            out.append(picked)
            entry[split] = {"available": int(len(pool)), "wanted": int(k),
                            "drawn": int(len(picked)), "unique": int(len(np.unique(picked))),
                            "policy": what}
        entry["test"] = int(((labels == label) & (splits == "test")).sum())
        counts[name] = entry

    def test_ids(wanted: list[int]) -> list[str]:
        return [str(i) for i in ids[np.isin(labels, wanted) & (splits == "test")]]

    for key, wanted in (("test", train_labels), ("test_novel", novel_labels)):
        if wanted and not test_ids(wanted):
            what = "novel classes" if key == "test_novel" else "classes"
            raise DataError(f"{store.path}: the test split holds no image of the {what} "
                            f"{setting} uses, so nothing could be evaluated; add images (an "
                            "assigned split needs 3 groups of a class or more) or change "
                            "split.fractions (provenance.json 'splits' has the counts)")
    train_idx = np.concatenate(train_pos) if train_pos else np.zeros(0, dtype=np.int64)
    val_idx = np.concatenate(val_pos) if val_pos else np.zeros(0, dtype=np.int64)
    result: dict[str, Any] = {
        "dataset": store.name,
        "setting": setting,
        "shots": int(shots),
        "seed": int(seed),
        "classes": [store.classes[i] for i in train_labels],
        "labels": [int(i) for i in train_labels],
        "train": [str(i) for i in ids[train_idx]],
        "val": [str(i) for i in ids[val_idx]],
        "test": test_ids(train_labels),
        # Relative to the dataset root, so the file is the same on every machine.
        "train_paths": _relative_paths(index["source_path"].to_numpy()[train_idx],
                                       store.provenance.get("source", {}).get("root")),
        "counts": counts,
        "policy": {
            "protocol": "CoOp: per class, val support min(K, max_val_shots) from the val split, "
                        "train support K from the train split, uniform without replacement",
            "insufficient": sampling.insufficient,
            "nested": bool(sampling.nested),
            "max_val_shots": int(sampling.max_val_shots),
            "random_streams": "numpy default_rng(seed).spawn(2 * n_classes): "
                              "stream 2*label for val, 2*label+1 for train",
        },
    }
    if setting == "base_to_novel":
        result["base_classes"] = [store.classes[i] for i in train_labels]
        result["novel_classes"] = [store.classes[i] for i in novel_labels]
        result["novel_labels"] = [int(i) for i in novel_labels]
        result["test_novel"] = test_ids(novel_labels)
        result["policy"]["base_novel"] = ("sorted label ids: first ceil(n/2) base, rest novel; "
                                          "relabel from 0 within each group")
    return result


def write_split(path: str | Path, split: dict[str, Any]) -> None:
    """Write a split file atomically; sorted keys make equal splits byte-identical."""
    write_json(path, split)


def _relative_paths(paths, root: str | None) -> list[str]:
    if not root:
        return [os.path.basename(str(p)) for p in paths]
    return [os.path.relpath(str(p), root) for p in paths]
