"""Turn a dataset source into the prepared store: model-ready uint8 images plus their index.

The image chain is a declared list of MONAI dictionary transforms (reader per file type, channel
first, intensity scaling, resize with aspect handling); everything it did is written to
provenance.json so a prepared store can be traced back to its inputs and parameters.
The output directory appears only when complete (io.atomic_dir).
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from .. import timing
from ..config import DatasetConfig, PreprocessingConfig, SplitConfig
from ..errors import DataError
from ..io import atomic_dir, read_json, write_json
from ..seeding import numpy_rng
from .fingerprint import preparation_fingerprint, preparation_parameters
from .groups import grouping_summary, groups_in_several_splits
from .npz import NpzFile
from .readers import VIEWER_RULES, check_nifti_dimensions, explain_read_error, viewer_image
from .sources import INTERNAL_COLUMNS, SPLITS, classes_of, read_source, relative_id
from .store import format_split_summary, split_summary
from .views import TrainingViewWriter, resize_view, view_step

log = logging.getLogger(__name__)

# Named CT windows as (lowest, highest) Hounsfield unit shown; level ± width/2.
CT_WINDOWS = {"lung": (-1350.0, 150.0), "abdomen": (-160.0, 240.0), "brain": (0.0, 80.0),
              "bone": (-450.0, 1050.0)}
ZSCORE_RANGE = (-3.0, 3.0)  # z-scores shown: ±3 standard deviations map to 0..255
IMAGE_KEY = "image"
ARRAY_CHUNK = 256  # array sources: rows decompressed and handed to the threads at a time

PREPARATION_RECORD = "preparation.json"  # kept next to the store's outputs, read on rebuild


# ----------------------------------------------------------------------------- transforms


def resolve_window(window: Any) -> tuple[float, float]:
    """A named CT window or an explicit [low, high] in HU, as two floats."""
    if isinstance(window, str):
        if window.lower() not in CT_WINDOWS:
            raise DataError(f"preprocessing.window: unknown window {window!r}; use one of "
                            f"{', '.join(CT_WINDOWS)} or [low, high] in HU")
        return CT_WINDOWS[window.lower()]
    try:
        low, high = (float(v) for v in window)
    except (TypeError, ValueError):
        raise DataError(f"preprocessing.window: expected a window name or [low, high], got "
                        f"{window!r}; set it, or choose another preprocessing.intensity") from None
    if not low < high:
        raise DataError(f"preprocessing.window: need low < high, got [{low}, {high}]")
    return low, high


def reader_kind(path: str) -> str:
    """Which MONAI reader a file needs: by suffix, else by the DICOM magic bytes."""
    if os.path.isdir(path):
        return "dicom"  # a one-series folder of DICOM slices, read as one volume
    name = path.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".dcm", ".dicom")):
        return "dicom"
    if name.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
        return "pil"
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            if handle.read(4) == b"DICM":
                return "dicom"
    except OSError:
        pass
    return "pil"


class _CenterSquareCropd:
    """Centre crop to the shorter side, so a following square resize keeps the aspect ratio."""

    def __call__(self, data: dict) -> dict:
        from monai.transforms import CenterSpatialCrop

        image = data[IMAGE_KEY]
        side = min(image.shape[1:])
        return {**data, IMAGE_KEY: CenterSpatialCrop(roi_size=(side, side))(image)}


@dataclass
class Pipeline:
    """The MONAI chain for one preprocessing config, and its description for provenance."""

    loaders: dict[str, Callable]
    transform: Callable
    steps: list[dict[str, Any]] = field(default_factory=list)
    slices: str = "center"
    slice_step: int = 1
    intensity: Callable | None = None  # the intensity steps of ``transform`` alone

    def load(self, path: str) -> np.ndarray:
        """Read one file as a float32 array (C, X, Y) or (C, X, Y, Z)."""
        from monai.utils import convert_to_numpy

        kind = reader_kind(path)
        if kind == "nifti":
            check_nifti_dimensions(path)
        data = self.loaders[kind]({IMAGE_KEY: path})
        array = convert_to_numpy(data[IMAGE_KEY]).astype(np.float32, copy=False)
        if array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (3, 4):
            raise ValueError(f"expected a 2D image or 3D volume, got array shape {array.shape}")
        return array

    def load_array(self, array: np.ndarray, layout: str) -> np.ndarray:
        """An array source's row as the readers give files: float32 (C, x, y) or (1, x, y, z).

        ``layout`` names the row's axes: hw (grey), hwc (channels last) or dhw / dhw1 (volume);
        rows are image rows first, MONAI readers index (x, y) = (column, row).
        """
        from monai.transforms import EnsureChannelFirst
        from monai.utils import convert_to_numpy

        array = np.array(array, dtype=np.float32)
        if layout == "hw":
            image = EnsureChannelFirst(channel_dim="no_channel")(array.T)
        elif layout == "hwc":
            image = EnsureChannelFirst(channel_dim=-1)(array.transpose(1, 0, 2))
        elif layout in ("dhw", "dhw1"):
            volume = array[..., 0] if layout == "dhw1" else array
            image = EnsureChannelFirst(channel_dim="no_channel")(volume.transpose(2, 1, 0))
        else:
            raise ValueError(f"unknown array layout {layout!r}")
        return convert_to_numpy(image).astype(np.float32, copy=False)

    def slice_indices(self, depth: int) -> list[int]:
        if self.slices == "center":
            return [depth // 2]
        if self.slices == "every_k":
            return list(range(0, depth, max(1, self.slice_step)))
        return list(range(depth))

    def finish(self, image: np.ndarray) -> np.ndarray:
        """Scale and resize one 2D (C, X, Y) image, then 3 channels, uint8, (3, rows, cols)."""
        return self._to_uint8_rgb(self.transform({IMAGE_KEY: image})[IMAGE_KEY])

    def training_view(self, image: np.ndarray, longest: int) -> np.ndarray:
        """One 2D (C, X, Y) image with the intensity scaling of ``finish``, its aspect ratio
        kept and its longer side at most ``longest`` (data.views), as uint8 (3, rows, cols)."""
        return self._to_uint8_rgb(resize_view(self.intensity({IMAGE_KEY: image})[IMAGE_KEY],
                                              longest))

    @staticmethod
    def _to_uint8_rgb(out: Any) -> np.ndarray:
        from monai.utils import convert_to_numpy

        out = convert_to_numpy(out)
        if out.shape[0] == 1:
            out = np.repeat(out, 3, axis=0)
        elif out.shape[0] == 2:  # grey + alpha
            out = np.repeat(out[:1], 3, axis=0)
        elif out.shape[0] > 3:  # RGBA and the like: drop the extra channels
            out = out[:3]
        out = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
        # MONAI readers index (x, y); store (row, column) so images look as in a viewer.
        return np.ascontiguousarray(out.transpose(0, 2, 1))


def build_pipeline(pre: PreprocessingConfig, image_size: int) -> Pipeline:
    """Compose the MONAI transforms for ``pre``; each step is recorded with its parameters."""
    from monai.data import NibabelReader, PILReader, PydicomReader
    from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd,
                                  Resized, ResizeWithPadOrCropd, ScaleIntensityRanged,
                                  ScaleIntensityRangePercentilesd)

    steps: list[dict[str, Any]] = []

    def step(transform, name: str, **params):
        steps.append({"transform": name, "params": params})
        return transform

    # PIL images reach MONAI as a viewer shows them (palettes, CMYK, 1-bit, alpha: readers.py)
    readers = {"pil": (PILReader, {"reverse_indexing": True, "converter": viewer_image}),
               # applies RescaleSlope/Intercept; a folder is one series (DICOM files only)
               "dicom": (PydicomReader, {"swap_ij": True, "fname_regex": None}),
               "nifti": (NibabelReader, {})}
    loaders = {}
    for kind, (reader_cls, kwargs) in readers.items():
        loaders[kind] = Compose([
            LoadImaged(IMAGE_KEY, reader=reader_cls(**kwargs), image_only=True, dtype=np.float32),
            EnsureChannelFirstd(IMAGE_KEY),
        ])
    steps.append({"transform": "LoadImaged", "params": {
        "readers": {kind: {"reader": cls.__name__,
                           **{k: (VIEWER_RULES if k == "converter" else v)
                              for k, v in kwargs.items()}}
                    for kind, (cls, kwargs) in readers.items()},
        "dtype": "float32"}})
    steps.append({"transform": "EnsureChannelFirstd", "params": {}})
    steps.append({"transform": "EnsureChannelFirst", "params": {
        "applies_to": "array sources (MedMNIST npz), instead of LoadImaged",
        "channel_dim": "no_channel (grey, volumes) or -1 (RGB)",
        "axes": "rows (H, W[, C]) -> (C, x, y); volumes (D, H, W) -> (1, x, y, z)"}})
    steps.append({"transform": "slice", "params": {
        "policy": pre.slices, "slice_step": pre.slice_step, "axis": "last spatial axis",
        "applies_to": "3D volumes"}})

    chain: list[Callable] = []
    if pre.intensity == "percentile":
        low, high = (float(p) for p in pre.percentiles)
        chain.append(step(ScaleIntensityRangePercentilesd(IMAGE_KEY, lower=low, upper=high,
                                                          b_min=0.0, b_max=1.0, clip=True),
                          "ScaleIntensityRangePercentilesd", lower=low, upper=high,
                          b_min=0.0, b_max=1.0, clip=True))
    elif pre.intensity == "window":
        low, high = resolve_window(pre.window)
        chain.append(step(ScaleIntensityRanged(IMAGE_KEY, a_min=low, a_max=high, b_min=0.0,
                                               b_max=1.0, clip=True),
                          "ScaleIntensityRanged", a_min=low, a_max=high, b_min=0.0, b_max=1.0,
                          clip=True, window=pre.window))
    elif pre.intensity == "zscore":
        chain.append(step(NormalizeIntensityd(IMAGE_KEY), "NormalizeIntensityd"))
        low, high = ZSCORE_RANGE
        chain.append(step(ScaleIntensityRanged(IMAGE_KEY, a_min=low, a_max=high, b_min=0.0,
                                               b_max=1.0, clip=True),
                          "ScaleIntensityRanged", a_min=low, a_max=high, b_min=0.0, b_max=1.0,
                          clip=True))
    elif pre.intensity == "none":
        chain.append(step(ScaleIntensityRanged(IMAGE_KEY, a_min=0.0, a_max=255.0, b_min=0.0,
                                               b_max=1.0, clip=True),
                          "ScaleIntensityRanged", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0,
                          clip=True, note="raw values, expected 8-bit"))
    else:
        raise DataError(f"preprocessing.intensity: unknown value {pre.intensity!r}; use "
                        "percentile, window, zscore or none")

    intensity = Compose(list(chain))
    size = int(image_size)
    resize_args = {"mode": "bilinear", "anti_aliasing": True}
    if pre.resize == "pad":
        chain.append(step(Resized(IMAGE_KEY, spatial_size=size, size_mode="longest", **resize_args),
                          "Resized", spatial_size=size, size_mode="longest", **resize_args))
        chain.append(step(ResizeWithPadOrCropd(IMAGE_KEY, spatial_size=(size, size)),
                          "ResizeWithPadOrCropd", spatial_size=[size, size], mode="constant",
                          value=0))
    elif pre.resize == "crop":
        chain.append(step(_CenterSquareCropd(), "CenterSpatialCropd",
                          roi_size="shorter side, square"))
        chain.append(step(Resized(IMAGE_KEY, spatial_size=(size, size), **resize_args),
                          "Resized", spatial_size=[size, size], **resize_args))
    elif pre.resize == "stretch":
        chain.append(step(Resized(IMAGE_KEY, spatial_size=(size, size), **resize_args),
                          "Resized", spatial_size=[size, size], **resize_args))
    else:
        raise DataError(f"preprocessing.resize: unknown value {pre.resize!r}; use pad, crop or "
                        "stretch")
    if pre.slices not in ("center", "every_k", "all"):
        raise DataError(f"preprocessing.slices: unknown value {pre.slices!r}; use center, "
                        "every_k or all")
    steps.append({"transform": "to_uint8_rgb", "params": {
        "channels": "grey repeated to 3; alpha dropped", "scale": 255, "rounding": "nearest",
        "layout": "(3, rows, columns)"}})
    if pre.train_view:
        steps.append(view_step(pre.train_view, resize_args))
    return Pipeline(loaders=loaders, transform=Compose(chain), steps=steps,
                    slices=pre.slices, slice_step=pre.slice_step, intensity=intensity)


@contextmanager
def quiet_monai() -> Iterator[None]:
    """Silence MONAI notices that are noise here; entered once, from the calling thread.

    LoadImaged registers MONAI's optional readers too, and the GPU DICOM decoder announces it
    is not installed; a constant image warns about a zero intensity range (it maps to 0).
    """
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            warnings.filterwarnings("ignore", message=".*[Dd]ivide by zero.*")
            yield
    finally:
        plugin_log.setLevel(level)


# ----------------------------------------------------------------------------- splits


def assign_splits(table: pd.DataFrame, split: SplitConfig) -> pd.Series:
    """A stratified, grouped train/val/test split: every group lies in exactly one split.

    Groups are stratified by their most frequent label; within a class they are visited in a
    seeded random order and each goes to the split furthest below its target image count,
    relative to that target (so with three groups or more every split gets one).
    """
    fractions = np.asarray(split.fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise DataError(f"split.fractions: need three non-negative numbers (train, val, test), "
                        f"got {list(split.fractions)}")
    fractions = fractions / fractions.sum()
    rng = numpy_rng(split.seed)
    sizes = table.groupby("group", sort=True).size()
    majority = (table.groupby(["group", "label"], sort=True).size().reset_index(name="n")
                .sort_values(["group", "n", "label"], ascending=[True, False, True])
                .drop_duplicates("group").set_index("group")["label"])
    assignment: dict[str, str] = {}
    for label in sorted(majority.unique()):
        groups = sorted(majority.index[majority == label])
        order = rng.permutation(len(groups))
        total = float(sizes[groups].sum())
        filled = np.zeros(3)
        for position in order:
            group = groups[position]
            target = fractions * total
            deficit = np.where(fractions > 0, (target - filled) / np.maximum(target, 1e-9),
                               -np.inf)
            choice = int(np.argmax(deficit))
            assignment[group] = SPLITS[choice]
            filled[choice] += sizes[group]
    return table["group"].map(assignment)


# ----------------------------------------------------------------------------- output


class _NpyStream:
    """Write an .npy array row by row, so N need not be known (or held in memory) in advance.

    The header is reserved at a fixed 128 bytes and filled in on close (format version 1.0).
    """

    HEADER_BYTES = 128

    def __init__(self, path: Path, row_shape: tuple[int, ...]):
        self.path = path
        self.row_shape = row_shape
        self.count = 0
        self.handle = open(path, "wb")
        self.handle.write(b"\0" * self.HEADER_BYTES)

    def append(self, row: np.ndarray) -> None:
        assert row.shape == self.row_shape and row.dtype == np.uint8
        self.handle.write(np.ascontiguousarray(row).tobytes())
        self.count += 1

    def close(self) -> None:
        shape = (self.count, *self.row_shape)
        text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
        body_len = self.HEADER_BYTES - 10
        header = text.ljust(body_len - 1).encode("latin1") + b"\n"
        if len(header) != body_len:
            raise AssertionError("npy header too long")
        self.handle.seek(0)
        self.handle.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", body_len) + header)
        self.handle.close()


def _fingerprint(path: str) -> dict[str, Any]:
    """Size and modification time of a file; of a series folder, over its files."""
    if not os.path.isdir(path):
        stat = os.stat(path)
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    entries = sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                     for entry in os.scandir(path) if entry.is_file())
    return {"files": len(entries), "size": sum(e[1] for e in entries),
            "mtime_ns": max((e[2] for e in entries), default=0),
            "digest": hashlib.sha256(repr(entries).encode()).hexdigest()[:16]}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def _rebuild_record(out_dir: Path, fingerprint: str, params: dict[str, Any],
                    inputs_digest: str, n_files: int) -> dict[str, Any]:
    """Why this store is (re)built, compared with the record a previous store left behind."""
    previous = None
    for name in (PREPARATION_RECORD, "provenance.json"):
        try:
            previous = read_json(out_dir / name)
            break
        except (OSError, ValueError):
            continue
    record = {"fingerprint": fingerprint, "previous_fingerprint": None,
              "changed_parameters": [], "inputs_changed": None}
    if not isinstance(previous, dict) or "fingerprint" not in previous:
        record["reason"] = ("no previous store" if previous is None else
                            "the previous store has no preparation record")
        return record
    old_params = _flatten(previous.get("parameters", {}))
    new_params = _flatten(params)
    changed = sorted(k for k in set(old_params) | set(new_params)
                     if old_params.get(k, "<unset>") != new_params.get(k, "<unset>"))
    old_inputs = previous.get("inputs_fingerprint")
    inputs_changed = old_inputs != inputs_digest
    record.update(previous_fingerprint=previous["fingerprint"], changed_parameters=changed,
                  inputs_changed=inputs_changed)
    reasons = []
    if changed:
        reasons.append(f"preparation parameters changed: {', '.join(changed)}")
    if inputs_changed:
        reasons.append(f"input files changed ({previous.get('n_files', '?')} -> {n_files} "
                       "files, or sizes / modification times differ)")
    record["reason"] = "; ".join(reasons) or "same parameters and inputs: rebuilt on request"
    return record


class _ArrayRows:
    """Rows of the arrays of array sources, decompressed in order, one reader per array."""

    def __init__(self) -> None:
        self.files: dict[str, NpzFile] = {}
        self.readers: dict[tuple[str, str], tuple[Iterator[np.ndarray], int]] = {}

    def get(self, path: str, key: str, index: int) -> np.ndarray:
        reader, position = self.readers.get((path, key), (None, 0))
        if reader is None or position > index:
            if path not in self.files:
                self.files[path] = NpzFile(path)
            reader, position = self.files[path].rows(key, index), index
        while position < index:
            next(reader)
            position += 1
        try:
            row = next(reader)
        except StopIteration:
            raise DataError(f"{path}: array '{key}' has no row {index}; the file changed "
                            "while preparing, prepare again") from None
        self.readers[(path, key)] = (reader, index + 1)
        return row

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for package in ("monai", "numpy", "torch", "pandas", "pydicom", "nibabel", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _classes_missing_from_splits(table: pd.DataFrame, dataset: DatasetConfig,
                                 assigned: bool) -> list[str]:
    """A split without some class, said in one line each: the class then has no validation
    support set, or its test accuracy is never measured."""
    wanted = [s for s, f in zip(SPLITS, dataset.split.fractions) if f > 0] if assigned \
        else list(SPLITS)
    found = []
    for name, part in table.groupby("class_name", sort=True):
        empty = [s for s in wanted if not (part["split"] == s).any()]
        if not empty:
            continue
        zero = "0 " + " and 0 ".join(empty)
        if assigned:
            found.append(f"dataset '{dataset.name}': class {name!r} has {len(part)} image(s) in "
                         f"{part['group'].nunique()} group(s), too few for the split: it gets "
                         f"{zero} images; add images of it (3 groups or more) or remove the "
                         "class")
        else:
            found.append(f"dataset '{dataset.name}': the source's split gives class {name!r} "
                         f"{zero} images; add some to the split file (or split column) or "
                         "remove the class")
    return found


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def prepare_dataset(dataset: DatasetConfig, out_dir: Path, image_size: int,
                    threads: int = 1) -> None:
    """Read, preprocess and store every image of ``dataset`` under ``out_dir`` (atomically)."""
    with quiet_monai():
        _prepare(dataset, Path(out_dir), image_size, threads)


def _prepare(dataset: DatasetConfig, out_dir: Path, image_size: int, threads: int) -> None:
    pre = dataset.preprocessing
    if pre.on_error not in ("stop", "skip"):
        raise DataError(f"preprocessing.on_error: unknown value {pre.on_error!r}; use stop or skip")
    table = read_source(dataset)
    excluded = None
    if dataset.exclude_pretrained_on:
        from .holdout import exclude_pretrained

        table, excluded = exclude_pretrained(table, dataset.exclude_pretrained_on, dataset.name)
        log.info("dataset '%s': %d train images %s was pretrained on left out (by content)",
                 dataset.name, excluded["train_images_dropped"], dataset.exclude_pretrained_on)
    classes = classes_of(table)
    root = Path(dataset.root).expanduser().resolve()
    warnings_: list[str] = []
    if (table["split"] == "").all():
        table["split"] = assign_splits(table, dataset.split).to_numpy()
        split_origin = {"assigned": True, "fractions": list(dataset.split.fractions),
                        "seed": dataset.split.seed, "method": "stratified by label, grouped"}
        warnings_ += _classes_missing_from_splits(table, dataset, assigned=True)
    else:
        crossing = groups_in_several_splits(table)
        split_origin = {"assigned": False, "from": "source", "groups_in_several_splits": crossing}
        if crossing["count"]:
            example = crossing["examples"][0]
            warnings_.append(
                f"dataset '{dataset.name}': {crossing['count']} group(s) lie in more than one "
                f"split of the source (e.g. {example['group']!r} in "
                f"{' and '.join(example['splits'])}), so those splits are not independent; fix "
                "the split file (or split column), or leave the split out for clipsvd to assign "
                "a grouped one")
        warnings_ += _classes_missing_from_splits(table, dataset, assigned=False)
    for warning in warnings_:
        log.warning("%s", warning)
    grouping = grouping_summary(table, dataset.groups)
    pipeline = build_pipeline(pre, image_size)  # also validates the settings up front
    per_thread = threading.local()  # MONAI readers keep per-read state: one chain per thread
    records = table.to_dict("records")
    extra_columns = [c for c in table.columns
                     if c not in ("source_path", "label", "class_name", "split", "group")
                     and c not in INTERNAL_COLUMNS]
    arrays = _ArrayRows()

    def load(record: dict) -> dict:
        """An array source's row goes along with its record; a file is read by the worker."""
        if not isinstance(record.get("array_key"), str):
            return record
        row = arrays.get(record["source_path"], record["array_key"], int(record["array_index"]))
        return {**record, "array": row}

    def work(record: dict) -> tuple[list[tuple[int | None, np.ndarray, np.ndarray | None]],
                                    str | None]:
        if not hasattr(per_thread, "pipeline"):
            per_thread.pipeline = build_pipeline(pre, image_size)
        chain = per_thread.pipeline
        try:
            if "array" in record:
                volume = chain.load_array(record["array"], record["array_layout"])
            else:
                volume = chain.load(record["source_path"])
        except Exception as exc:  # any reader failure means the file is unusable as given
            kind = "array" if "array" in record else reader_kind(record["source_path"])
            return [], explain_read_error(record["source_path"], kind, exc)
        view = pre.train_view if record["split"] == "train" else 0  # training crops' source

        def outputs(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            return chain.finish(image), chain.training_view(image, view) if view else None

        if volume.ndim == 3:
            return [(None, *outputs(volume))], None
        indices = chain.slice_indices(volume.shape[-1])
        return [(z, *outputs(volume[..., z])) for z in indices], None

    def sample_id(record: dict) -> str:
        given = record.get("sample_id")
        if isinstance(given, str) and given:
            return given
        return relative_id(record["source_path"], root)

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    total = len(records)
    start = time.monotonic()
    last_log = start
    with atomic_dir(out_dir) as tmp:
        stream = _NpyStream(tmp / "images.npy", (3, int(image_size), int(image_size)))
        views = TrainingViewWriter(tmp, pre.train_view) if pre.train_view else None
        try:
            with ThreadPool(max(1, int(threads))) as pool:
                done = 0
                for first in range(0, total, ARRAY_CHUNK):
                    chunk = records[first:first + ARRAY_CHUNK]
                    results = pool.imap(work, [load(record) for record in chunk])
                    for record, (images, error) in zip(chunk, results):
                        done += 1
                        base_id = sample_id(record)
                        if error is not None:
                            where = record["source_path"]
                            if isinstance(record.get("array_key"), str):
                                where = f"{where} ({base_id})"
                            if pre.on_error == "stop":
                                raise DataError(f"{where}: cannot read the image ({error}); fix "
                                                "or remove the file, or set "
                                                "preprocessing.on_error: skip")
                            log.warning("skipping unreadable %s (%s)", where, error)
                            skipped.append({"source_path": record["source_path"],
                                            "sample_id": base_id, "error": error})
                        for z, image, view in images:
                            if view is not None:
                                views.append(len(rows), view)
                            stream.append(image)
                            rows.append({
                                "sample_id": base_id if z is None else f"{base_id}#z{z:03d}",
                                "source_path": record["source_path"], "label": record["label"],
                                "class_name": record["class_name"], "split": record["split"],
                                "group": record["group"], "slice": "" if z is None else z,
                                **{c: record[c] for c in extra_columns}})
                        now = time.monotonic()
                        if now - last_log >= 10 or done == total:
                            rate = done / max(now - start, 1e-9)
                            log.info("prepared %d/%d samples (%.1f samples/s, ETA %s)", done,
                                     total, rate, _format_eta((total - done) / max(rate, 1e-9)))
                            last_log = now
        finally:
            stream.close()
            arrays.close()
            if views is not None:
                views.close()
        if not rows:
            raise DataError(f"{root}: none of the {total} images of dataset '{dataset.name}' "
                            "could be read; check the files and preprocessing settings")
        elapsed = time.monotonic() - start
        timing.record("preparation", elapsed)
        index = pd.DataFrame(rows)
        duplicated = index["sample_id"][index["sample_id"].duplicated()]
        if len(duplicated):
            raise DataError(f"{root}: sample {duplicated.iloc[0]!r} is listed twice; remove "
                            "duplicate rows from the manifest")
        index.to_csv(tmp / "index.csv", index=False, encoding="utf-8", lineterminator="\n")
        splits = split_summary(index)
        log.info("dataset '%s' per split: %s", dataset.name, format_split_summary(splits))
        write_json(tmp / "classes.json", {"classes": classes})
        sources = sorted({r["source_path"] for r in records})
        fingerprints = {relative_id(path, root): _fingerprint(path) for path in sources}
        digest = hashlib.sha256(repr(sorted(fingerprints.items())).encode()).hexdigest()
        params = preparation_parameters(dataset, image_size)
        fingerprint = preparation_fingerprint(dataset, image_size)
        rebuild = _rebuild_record(out_dir, fingerprint, params, digest, len(fingerprints))
        # Timing lives here, not in provenance.json, which equal inputs make byte-identical.
        write_json(tmp / PREPARATION_RECORD, {
            "fingerprint": fingerprint, "parameters": params, "inputs_fingerprint": digest,
            "n_files": len(fingerprints), "threads": int(threads), "seconds": round(elapsed, 3),
            "images_per_second": round(len(rows) / max(elapsed, 1e-9), 2)})
        write_json(tmp / "provenance.json", {
            "dataset": dataset.name,
            "source": {"format": dataset.format, "root": str(root), "manifest": dataset.manifest,
                       "medmnist": asdict(dataset.medmnist) if dataset.medmnist else None,
                       "split_file": dataset.split_file, "image_dir": dataset.image_dir},
            "image_size": int(image_size),
            "preprocessing": {k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in vars(pre).items()},
            "transforms": pipeline.steps,
            "train_views": views.summary() if views is not None else None,
            "split": split_origin,
            "excluded_pretraining_images": excluded,
            "n_files": len(fingerprints),
            "n_samples": total,
            "n_images": len(rows),
            "n_classes": len(classes),
            "splits": splits,
            "groups": grouping,
            "warnings": warnings_,
            "skipped": skipped,
            "fingerprint": fingerprint,
            "parameters": params,
            "inputs_fingerprint": digest,
            "rebuild": rebuild,
            "inputs": {"fingerprint": digest, "method": "size and mtime_ns per file",
                       "files": fingerprints},
            "versions": _versions(),
        })
    if rebuild["previous_fingerprint"] is not None:
        log.info("rebuilt %s: %s", out_dir, rebuild["reason"])
    log.info("prepared %d images of %d classes from %d samples in %.1f s (%.1f images/s)%s -> %s",
             len(rows), len(classes), total, elapsed, len(rows) / max(elapsed, 1e-9),
             f", {len(skipped)} skipped" if skipped else "", out_dir)
