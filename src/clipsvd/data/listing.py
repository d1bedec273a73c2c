"""The files a dataset's preparation reads, for the workflow to decide when to prepare again.

The file that lists the samples (manifest, MedMNIST npz, CoOp split file) is an input of the
prepare rule; the image files themselves are summed up in ``listing_digest`` (path, size and
modification time of each), a param of the rule, so adding, removing or rewriting an image
re-prepares the store while nothing else does. Computed while Snakemake builds its DAG:
standard library only, one ``stat`` per image (100k files: see benchmarks/listing.py), and it
never raises; a source it cannot list gets a digest of that fact and preparation names the
problem.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
from pathlib import Path

from ..config import DatasetConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom",
                  ".nii", ".nii.gz")


def is_image_name(name: str) -> bool:
    lower = name.lower()
    return not lower.startswith(".") and lower.endswith(IMAGE_SUFFIXES)


def medmnist_file(root: Path, flag: str, size: int) -> Path:
    """``<flag>.npz`` for 28 px, ``<flag>_<size>.npz`` for the larger sizes."""
    return root / (f"{flag}.npz" if int(size) == 28 else f"{flag}_{int(size)}.npz")


def coop_image_base(root: Path, split_path: Path, image_dir: str | None, first: str) -> Path:
    """Where a CoOp split file's relative paths start: the configured folder, else
    root/<NAME> (the CoOp layout) when the first image is there, else root."""
    if image_dir:
        return root / image_dir
    name = split_path.stem[len("split_"):]
    for base in (root / name, root):
        if name and (base / first).exists():
            return base
    return root


def _coop_split_file(dataset: DatasetConfig, root: Path) -> Path | None:
    if dataset.split_file:
        return root / dataset.split_file
    found = sorted(root.glob("split_*.json")) if root.is_dir() else []
    return found[0] if len(found) == 1 else None


def index_files(dataset: DatasetConfig) -> list[str]:
    """The file that lists the dataset's samples (manifest, MedMNIST npz, CoOp split file),
    for the workflow to declare as an input; [] for class folders or when it is not there yet
    (preparation then names what is missing)."""
    root = Path(dataset.root).expanduser()
    if dataset.format == "csv" and dataset.manifest:
        path = root / dataset.manifest
    elif dataset.format == "medmnist" and dataset.medmnist is not None:
        path = medmnist_file(root, dataset.medmnist.flag, dataset.medmnist.size)
    elif dataset.format == "coop_json":
        path = _coop_split_file(dataset, root)
    else:
        path = None
    return [str(path)] if path is not None and path.is_file() else []


def _walk(folder: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every image file below ``folder``, hidden entries skipped."""
    found = []
    stack = [folder]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append(entry.path)
                elif is_image_name(entry.name) and entry.is_file():
                    info = entry.stat()
                    found.append((entry.path, info.st_size, info.st_mtime_ns))
    return found


def _entry(path: str) -> list[tuple[str, int, int]]:
    """One listed sample: a file, or a DICOM series folder (its files); one stat for a file."""
    try:
        info = os.stat(path)
    except OSError:
        return [(path, -1, -1)]  # missing: preparation says so
    if stat.S_ISDIR(info.st_mode):
        return _walk(path) or [(path, -1, -1)]
    return [(path, info.st_size, info.st_mtime_ns)]


def _manifest_paths(dataset: DatasetConfig, root: Path) -> list[str]:
    with open(root / dataset.manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        column = header.index(dataset.columns.path) if dataset.columns.path in header else None
        if column is None:
            return []
        return [row[column].strip() for row in reader if len(row) > column]


def _coop_paths(dataset: DatasetConfig, root: Path) -> list[str]:
    split_path = _coop_split_file(dataset, root)
    if split_path is None:
        return []
    data = json.loads(split_path.read_text(encoding="utf-8"))
    relatives = [entry[0] for split in ("train", "val", "test")
                 for entry in (data.get(split) or []) if isinstance(entry, list) and entry
                 and isinstance(entry[0], str)]
    if not relatives:
        return []
    base = coop_image_base(root, split_path, dataset.image_dir, relatives[0])
    return [str(base / rel) for rel in relatives]


def source_listing(dataset: DatasetConfig) -> list[tuple[str, int, int]]:
    """(path relative to root, size, mtime_ns) of every image the source names, sorted."""
    root = Path(dataset.root).expanduser()
    if dataset.format == "folder":  # the class folders' images; files in root are not read
        entries = [e for d in sorted(os.scandir(root), key=lambda d: d.name)
                   if d.is_dir() and not d.name.startswith(".") for e in _walk(d.path)]
    elif dataset.format == "csv" and dataset.manifest:
        base = str(root)
        entries = [e for path in _manifest_paths(dataset, root)
                   for e in _entry(os.path.join(base, path))]  # an absolute path stays
    elif dataset.format == "coop_json":
        entries = [e for path in _coop_paths(dataset, root) for e in _entry(path)]
    else:
        entries = []  # MedMNIST: the npz is the input itself
    prefix = str(root).rstrip(os.sep) + os.sep
    return sorted((p[len(prefix):] if p.startswith(prefix) else p, size, mtime)
                  for p, size, mtime in entries)


def listing_digest(dataset: DatasetConfig) -> str:
    """A short hash of ``source_listing``: it changes when an image is added, removed,
    renamed or rewritten. Never raises (the workflow calls it while building its DAG)."""
    try:
        listing = source_listing(dataset)
        text = "\n".join(f"{p}\t{size}\t{mtime}" for p, size, mtime in listing)
        text = f"{len(listing)} files\n{text}"
    except Exception as exc:  # noqa: BLE001 - preparation reports what is wrong
        text = f"not listable: {type(exc).__name__}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]
