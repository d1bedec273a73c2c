"""What a pretrained model was trained on, by image content, and how studies keep out of it.

An image's content hash is the SHA-256 of its raw pixel array as its file stores it (a
MedMNIST npz row: its bytes in C order). Equal bytes are the same image whichever split or file
holds it, so "nothing evaluated was pretrained on" is checked on content, not on indices (the
official BloodMNIST train split holds 8 images byte-equal to val or test images).

A pretraining recipe cuts each train split it reads once, by a fixed seed, into a pretraining
part and a support pool (:func:`pretraining_part`); ``clipsvd pretrain`` writes the hash of
every image it read to ``<weights stem>.images.txt.gz`` (:func:`write_hashes`), and a study
dataset with ``exclude_pretraining: true`` drops those images from its train split.
"""
from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError

HASHES_SUFFIX = ".images.txt.gz"
PARTITION_STREAM = 7_340_001  # the partition's own random stream, apart from every other use


def image_hash(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def array_hashes(arrays: np.ndarray) -> list[str]:
    """The content hash of every image of an N×… array."""
    return [image_hash(row) for row in arrays]


def pretraining_part(n: int, share: float, seed: int) -> np.ndarray:
    """Which of ``n`` train images form the pretraining part (a boolean mask): the first
    ``round(share × n)`` of one permutation drawn from ``seed``; the rest is the support pool."""
    # clipsvd.seeding.numpy_rng(seed, PARTITION_STREAM), without importing torch (the workflow
    # reads this module while it builds its DAG)
    order = np.random.default_rng([seed, PARTITION_STREAM]).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[order[:int(round(share * n))]] = True
    return mask


def hashes_path(weights: str | Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.stem + HASHES_SUFFIX)


def write_hashes(path: str | Path, hashes: Iterable[str]) -> int:
    """Write the sorted, distinct hashes (gzip with no timestamp, so equal lists give equal
    bytes); returns how many."""
    from ..io import write_bytes

    unique = sorted(set(hashes))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as handle:
        handle.write(("\n".join(unique) + "\n").encode("ascii"))
    write_bytes(Path(path), buffer.getvalue())
    return len(unique)


def read_hashes(path: str | Path) -> frozenset[str]:
    with gzip.open(path, "rt", encoding="ascii") as handle:
        return frozenset(line.strip() for line in handle if line.strip())


PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"


def packaged_hashes(spec: str, where: str) -> Path:
    """The shipped list of a clipsvd-pretrained model ('<model>/<tag>') ; ConfigError naming
    ``where`` when it has none."""
    name, _, tag = spec.partition("/")
    path = PRETRAINED_DIR / f"{name}-{tag}{HASHES_SUFFIX}"
    if not path.is_file():
        known = sorted("/".join(p.name[:-len(HASHES_SUFFIX)].rsplit("-", 1))
                       for p in PRETRAINED_DIR.glob(f"*{HASHES_SUFFIX}"))
        raise ConfigError(f"{where}: {spec!r} ships no list of its pretraining images; use "
                          f"{' or '.join(known) or 'a clipsvd-pretrained model'}")
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def exclude_pretrained(table: pd.DataFrame, spec: str, dataset: str) -> tuple[pd.DataFrame, dict]:
    """``table`` without the train images the model ``spec`` was pretrained on (by content), and
    a summary for the store's provenance; DataError when a val or test image is among them (a
    study's figures would then measure what the model memorised)."""
    pretrained_on = read_hashes(packaged_hashes(spec, f"dataset '{dataset}': exclude_pretrained_on"))
    hashes = np.empty(len(table), dtype=object)
    for (path, key), rows in table.groupby(["source_path", "array_key"]).groups.items():
        with np.load(path) as npz:
            arrays = npz[key]
        positions = table.index.get_indexer(rows)
        hashes[positions] = array_hashes(arrays[table["array_index"].to_numpy()[positions]])
    seen = np.asarray([h in pretrained_on for h in hashes], dtype=bool)
    split = table["split"].to_numpy()
    leaked = seen & (split != "train")
    if leaked.any():
        first = table["sample_id"].to_numpy()[leaked][0]
        raise DataError(f"dataset '{dataset}': {int(leaked.sum())} val/test image(s) (e.g. "
                        f"{first}) are images {spec} was pretrained on; its zero-shot and "
                        "few-shot figures on them would measure memorisation: evaluate another "
                        "model, or pretrain it again without them (docs/miniature.md)")
    summary = {"model": spec, "list_sha256": file_sha256(packaged_hashes(spec, spec)),
               "method": "SHA-256 of each image's raw array in its file",
               "train_images_dropped": int(seen.sum()), "train_images_kept": int(
                   ((split == "train") & ~seen).sum())}
    return table[~seen].reset_index(drop=True), summary
