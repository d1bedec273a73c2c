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
SPLIT_NAMES = ("train", "val", "test")
_TEXT_COLUMNS = ("sample_id", "source_path", "class_name", "split", "group")


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


def split_summary(index: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per split (train, val, test): images, distinct groups (patients, volumes), classes
    present, and images per class, for a dataset table."""
    summary = {}
    for split in SPLIT_NAMES:
        part = index[index["split"] == split]
        per_class = part.groupby(["label", "class_name"], sort=True).size()  # in label order
        summary[split] = {"images": int(len(part)), "groups": int(part["group"].nunique()),
                          "classes": int(len(per_class)),
                          "per_class": {str(name): int(n) for (_, name), n in per_class.items()}}
    return summary
