"""Read access to a prepared store (written by data.prepare): images memory-mapped, not loaded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ..errors import DataError
from ..io import read_json

STORE_FILES = ("images.npy", "index.csv", "classes.json", "provenance.json")
SPLITS = ("train", "val", "test")
_TEXT_COLUMNS = ("sample_id", "source_path", "class_name", "split", "group")


def split_summary(index: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Images, groups and classes of each split, and the images of every class in it.

    Every class of the index appears in every split's ``per_class``, with 0 where the split
    holds none of it, so a class missing from val or test shows. Recorded in provenance.json
    under ``splits``; the report's per-dataset table is built from it.
    """
    names = (index[["label", "class_name"]].drop_duplicates().sort_values("label")["class_name"]
             .astype(str).tolist())
    summary: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        part = index[index["split"] == split]
        counts = part["class_name"].astype(str).value_counts()
        summary[split] = {"images": int(len(part)), "groups": int(part["group"].nunique()),
                          "classes": int(part["class_name"].nunique()),
                          "per_class": {name: int(counts.get(name, 0)) for name in names}}
    return summary


def format_split_summary(summary: dict[str, dict[str, Any]]) -> str:
    """One log line: 'train 43 images / 22 groups / 4 classes; val ...'."""
    return "; ".join(f"{split} {s['images']} images / {s['groups']} groups / {s['classes']} "
                     "classes" for split, s in summary.items())


@dataclass
class PreparedStore:
    """A prepared dataset: ``images[i]`` is the (3, H, W) uint8 image of ``index.iloc[i]``."""

    path: Path
    images: np.ndarray
    index: pd.DataFrame
    classes: list[str]
    provenance: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> "PreparedStore":
        path = Path(path)
        missing = [name for name in STORE_FILES if not (path / name).is_file()]
        if missing:
            what = "does not exist" if not path.is_dir() else f"lacks {', '.join(missing)}"
            raise DataError(f"{path}: prepared dataset {what}; run `clipsvd prepare` first")
        try:
            images = np.load(path / "images.npy", mmap_mode="r")
        except ValueError as exc:
            raise DataError(f"{path / 'images.npy'}: not a readable image array ({exc}); "
                            "run `clipsvd prepare` again") from None
        index = pd.read_csv(path / "index.csv", dtype={c: str for c in _TEXT_COLUMNS},
                            keep_default_na=False, encoding="utf-8")
        index["label"] = index["label"].astype(int)
        classes = list(read_json(path / "classes.json")["classes"])
        provenance = read_json(path / "provenance.json")
        if images.ndim != 4 or images.shape[1] != 3 or len(images) != len(index):
            raise DataError(f"{path}: images.npy has shape {images.shape} but index.csv lists "
                            f"{len(index)} samples; run `clipsvd prepare` again")
        return cls(path=path, images=images, index=index, classes=classes, provenance=provenance)

    @property
    def name(self) -> str:
        return str(self.provenance.get("dataset", self.path.name))

    def rows(self, sample_ids: Iterable[str]) -> np.ndarray:
        """Positions of ``sample_ids`` in images/index (repeats kept, order kept)."""
        if not hasattr(self, "_positions"):
            self._positions = {sid: i for i, sid in enumerate(self.index["sample_id"])}
        positions = []
        for sample_id in sample_ids:
            try:
                positions.append(self._positions[str(sample_id)])
            except KeyError:
                raise DataError(f"{self.path}: sample id {sample_id!r} is not in the prepared "
                                "dataset; the split file is stale, run `clipsvd sample` "
                                "again") from None
        return np.asarray(positions, dtype=np.int64)

