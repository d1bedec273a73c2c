"""Dataset sources (class folders, CSV manifests, MedMNIST npz, CoOp split JSON) -> one table.

Every later step sees the same columns whatever the source format, so format quirks stay here:
``source_path`` (absolute), ``label`` (int, position in the class list), ``class_name``,
``split`` (train/val/test, or "" when the source has none), ``group`` (patient, study or
volume: see data.groups; a sample without one is its own group) and ``group_source`` (where
the group came from), plus any extra manifest columns.

Sources whose samples are not one file each add the columns in ``ARRAY_COLUMNS``: a
``sample_id`` of their own and, for arrays inside a file (MedMNIST), the array's name and row.
A source whose class list is fixed by the source itself (MedMNIST INFO, a CoOp split file)
stores it in ``table.attrs["classes"]`` so a class without samples keeps its label.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import ColumnsConfig, DatasetConfig
from ..errors import DataError
from . import groups as grouping
# index_files and medmnist_file live in the light listing module (the workflow's DAG building
# uses them) and are imported here for the readers and for callers of data.sources.
from .listing import IMAGE_SUFFIXES, coop_image_base, index_files, medmnist_file  # noqa: F401
from .npz import NpzFile

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "dev": "val", "test": "test", "testing": "test"}
COLUMNS = ["source_path", "label", "class_name", "split", "group"]
# Columns of sources whose samples are not one file each; not kept as extra index columns.
ARRAY_COLUMNS = ["sample_id", "array_key", "array_index", "array_layout"]
# Columns the sources use among themselves, not kept as extra index columns either.
INTERNAL_COLUMNS = [*ARRAY_COLUMNS, "group_source"]
# Text that spreadsheet and pandas exports write for a missing value (pandas' list, less
# 'None', which can be a class name): as a label it is a missing label, not a class.
MISSING_MARKERS = frozenset({"nan", "NaN", "NAN", "-nan", "-NaN", "NA", "N/A", "n/a", "#N/A",
                             "#N/A N/A", "#NA", "<NA>", "null", "NULL", "1.#IND", "1.#QNAN",
                             "-1.#IND", "-1.#QNAN"})
DICOM_SUFFIXES = (".dcm", ".dicom")
MEDMNIST_SIZES = (28, 64, 128, 224)


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def _class_key(name: str) -> str:
    """Two class names that differ only in case or spacing would be the same prompt: clash."""
    return " ".join(name.split()).casefold()


def _check_unique(names: list[str], where: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        key = _class_key(name)
        if key in seen:
            raise DataError(f"{where}: class names {seen[key]!r} and {name!r} differ only in case "
                            "or spacing; merge or rename one of them")
        seen[key] = name


def _relative_id(path: Path, root: Path) -> str:
    """The sample's path relative to the dataset root (POSIX), its default group and id."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _series_uid(path: Path) -> str | None:
    """The DICOM file's SeriesInstanceUID, or None when the header cannot be read."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID"])
    except Exception:  # an unreadable file is reported by the reader at preparation
        return None
    uid = getattr(header, "SeriesInstanceUID", None)
    return str(uid) if uid else None


def is_dicom_series_dir(path: Path) -> bool:
    """A folder holding two or more DICOM files (by suffix) and no other image files."""
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file() and is_image_file(p)]
    return len(files) >= 2 and all(p.name.lower().endswith(DICOM_SUFFIXES) for p in files)


def _collapse_series(files: list[Path], class_dir: Path) -> list[Path]:
    """Replace the slices of each one-series sub-folder by the folder (one volume sample).

    A sub-folder counts as a series when it holds only DICOM images, at least two, that all
    share one SeriesInstanceUID; DICOM files directly in the class folder stay 2D samples.
    """
    by_parent: dict[Path, list[Path]] = {}
    for path in files:
        if path.parent != class_dir and path.name.lower().endswith(DICOM_SUFFIXES):
            by_parent.setdefault(path.parent, []).append(path)
    series = set()
    for parent, slices in by_parent.items():
        if not is_dicom_series_dir(parent):
            continue
        uids = {_series_uid(p) for p in slices}
        if len(uids) == 1 and None not in uids:
            series.add(parent)
    kept = [p for p in files if p.parent not in series]
    return sorted(kept + sorted(series))


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _class_images(class_dir: Path):
    return (p for p in class_dir.rglob("*") if p.is_file() and is_image_file(p)
            and not any(part.startswith(".") for part in p.relative_to(class_dir).parts))


def _folder_problems(root: Path) -> list[str]:
    class_dirs = _class_dirs(root)
    if not class_dirs:
        return [f"{root}: no class folders found; format 'folder' expects "
                "<root>/<class name>/<images>"]
    return [f"{class_dir}: class folder '{class_dir.name}' holds no images (looked for "
            f"{', '.join(IMAGE_SUFFIXES)}); add images or remove it"
            for class_dir in class_dirs if next(_class_images(class_dir), None) is None]


def _read_folder(root: Path) -> pd.DataFrame:
    """The class folders' images; read_source has checked the layout (check_declaration)."""
    class_dirs = _class_dirs(root)
    names = [p.name for p in class_dirs]
    _check_unique(names, str(root))
    rows = []
    for label, class_dir in enumerate(class_dirs):
        files = _collapse_series(sorted(_class_images(class_dir)), class_dir)
        for path in files:
            rows.append({"source_path": str(path), "label": label, "class_name": class_dir.name,
                         "split": "", "group": ""})
    return pd.DataFrame(rows, columns=COLUMNS)


def _labels_from_column(frame: pd.DataFrame, manifest: Path) -> tuple[list[int], list[str]]:
    """Map the manifest's label column (class names or integer ids) to ids and the class list."""
    raw = frame["label"].astype(str).str.strip()
    empty = raw == ""
    if empty.any():
        row = int(empty.idxmax()) + 2  # +2: header line and 1-based numbering
        raise DataError(f"{manifest}: line {row} has no label; give every row a class name")
    missing = raw.isin(MISSING_MARKERS)
    if missing.any():
        row = int(missing.idxmax()) + 2
        raise DataError(f"{manifest}: line {row} has label {raw[row - 2]!r}, a missing-value "
                        f"marker ({int(missing.sum())} of {len(raw)} rows); give every row its "
                        "class name, or check that columns.label names the label column")
    if raw.str.fullmatch(r"-?\d+").all():
        ids = raw.astype(int)
        if "class_name" in frame.columns:
            names = frame["class_name"].astype(str).str.strip()
            mapping: dict[int, str] = {}
            for label_id, name in zip(ids, names):
                if mapping.setdefault(label_id, name) != name:
                    raise DataError(f"{manifest}: label {label_id} is named both "
                                    f"{mapping[label_id]!r} and {name!r}; make class_name "
                                    "consistent with label")
        else:
            mapping = {label_id: str(label_id) for label_id in ids}
        wanted = list(range(len(mapping)))
        if sorted(mapping) != wanted:
            missing = sorted(set(range(max(max(mapping) + 1, 0))) - set(mapping))
            bad = missing[0] if missing else min(mapping)
            raise DataError(f"{manifest}: integer labels must be 0..{len(mapping) - 1} with no "
                            f"gaps; label {bad} is not in the class list; renumber the labels or "
                            "use class names")
        classes = [mapping[i] for i in wanted]
        _check_unique(classes, str(manifest))
        return ids.tolist(), classes
    classes = sorted(set(raw))
    _check_unique(classes, str(manifest))
    position = {name: i for i, name in enumerate(classes)}
    return [position[name] for name in raw], classes


def _column_problems(headers: list[str], columns: ColumnsConfig, manifest: Path) -> list[str]:
    """Every mismatch between a manifest's header and the dataset's ``columns``, one line each."""
    defaults = ColumnsConfig()
    has = ", ".join(headers)
    problems = []
    for field in ("path", "label", "split", "group", "class_name"):
        header = getattr(columns, field)
        declared = header != getattr(defaults, field)
        if header not in headers:
            if declared:
                problems.append(f"{manifest}: has no column {header!r} (columns.{field}; has: "
                                f"{has}); fix the dataset's columns.{field}")
            elif field in ("path", "label"):
                what = "image paths" if field == "path" else "class names or ids"
                problems.append(f"{manifest}: needs a '{field}' column (has: {has}); rename the "
                                f"header that holds the {what}, or name it in the dataset's "
                                f"columns.{field}")
        elif declared and field in headers:
            problems.append(f"{manifest}: has a column '{field}' besides {header!r} "
                            f"(columns.{field}); rename or remove one of them")
    return problems


def _map_columns(frame: pd.DataFrame, columns: ColumnsConfig, manifest: Path) -> pd.DataFrame:
    """Rename the manifest's headers to path, label, split, group, class_name as configured."""
    problems = _column_problems(list(frame.columns), columns, manifest)
    if problems:
        raise DataError("\n".join(problems))
    renames = {getattr(columns, field): field
               for field in ("path", "label", "split", "group", "class_name")
               if getattr(columns, field) in frame.columns}
    return frame.rename(columns=renames)


def _read_manifest(manifest: Path, **options) -> pd.DataFrame:
    try:
        # utf-8-sig: spreadsheet exports start with a byte-order mark, not part of the header
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            **options)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        reason = " ".join(str(exc).split())
        raise DataError(f"{manifest}: not a readable CSV file ({reason}); fix the file") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _manifest_path(root: Path, manifest_name: str | None) -> Path:
    if not manifest_name:
        raise DataError(f"{root}: format 'csv' needs a manifest file name; set the dataset's "
                        "'manifest' key")
    manifest = root / manifest_name
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest file not found; create it or fix the dataset's "
                        "'manifest' key")
    return manifest


def _root_of(dataset: DatasetConfig) -> Path:
    root = Path(dataset.root).expanduser()
    if not root.is_dir():
        hint = " (run `clipsvd demo-data` first)" if dataset.demo is not None else ""
        raise DataError(f"{root}: dataset '{dataset.name}' root folder not found{hint}; "
                        "check the dataset's 'root' key")
    return root.resolve()


def declaration_problems(dataset: DatasetConfig) -> list[str]:
    """Every problem of the dataset's declaration that shows without reading an image (its
    root, the manifest's header against ``columns``, the class folders, the MedMNIST file, the
    split file), one line each, so a user fixes them in one go rather than one per run."""
    try:
        root = _root_of(dataset)
        if dataset.format == "csv":
            manifest = _manifest_path(root, dataset.manifest)
            headers = list(_read_manifest(manifest, nrows=0).columns)
            return _column_problems(headers, dataset.columns, manifest)
        if dataset.format == "folder":
            return _folder_problems(root)
        if dataset.format == "medmnist" and dataset.medmnist is not None:
            _medmnist_path(root, dataset.medmnist.flag, dataset.medmnist.size)
        elif dataset.format == "coop_json":
            _find_split_file(root, dataset.split_file)
            if dataset.image_dir and not (root / dataset.image_dir).is_dir():
                return [f"{root / dataset.image_dir}: image folder not found; fix the dataset's "
                        f"'image_dir' key (relative to {root})"]
    except DataError as exc:
        return str(exc).splitlines()
    return []


def check_declaration(dataset: DatasetConfig) -> None:
    problems = declaration_problems(dataset)
    if problems:
        raise DataError("\n".join(problems))


def _read_csv(root: Path, manifest_name: str | None,
              columns: ColumnsConfig = ColumnsConfig()) -> pd.DataFrame:
    manifest = _manifest_path(root, manifest_name)
    frame = _read_manifest(manifest)
    frame = _map_columns(frame, columns, manifest)
    if frame.empty:
        raise DataError(f"{manifest}: the manifest lists no images; add rows path,label")
    paths = [Path(p.strip()) if Path(p.strip()).is_absolute() else root / p.strip()
             for p in frame["path"]]
    missing = [(i, p) for i, p in enumerate(paths) if not p.is_file() and not p.is_dir()]
    if missing:
        line, path = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{manifest}: line {line + 2} names a file that does not exist: "
                        f"{path}{more}; fix the path (relative to {root}) or remove the row")
    folders = [(i, p) for i, p in enumerate(paths) if p.is_dir() and not is_dicom_series_dir(p)]
    if folders:
        line, path = folders[0]
        raise DataError(f"{manifest}: line {line + 2} names a folder that is not a DICOM series "
                        f"(two or more .dcm files and no other images): {path}; name a file "
                        "or a one-series folder")
    resolved = pd.Series([str(p.resolve()) for p in paths])
    if resolved.duplicated().any():
        line = int(resolved.duplicated().idxmax()) + 2
        raise DataError(f"{manifest}: line {line} lists {resolved[line - 2]} a second time; "
                        "remove the duplicate row")
    labels, classes = _labels_from_column(frame, manifest)
    splits = [""] * len(frame)
    if "split" in frame.columns:
        raw_splits = frame["split"].str.strip().str.lower()
        if (raw_splits != "").any():
            for i, value in enumerate(raw_splits):
                if value not in _SPLIT_ALIASES:
                    raise DataError(f"{manifest}: line {i + 2} has split {value!r}; use one of "
                                    "train, val, test for every row (or leave the column out)")
            splits = [_SPLIT_ALIASES[v] for v in raw_splits]
    groups = frame["group"].str.strip() if "group" in frame.columns else [""] * len(frame)
    groups = ["" if g in MISSING_MARKERS else g for g in groups]  # an unknown patient: own group
    table = pd.DataFrame({
        "source_path": resolved.tolist(),
        "label": labels,
        "class_name": [classes[i] for i in labels],
        "split": splits,
        "group": groups,
        "group_source": [grouping.BY_COLUMN if g else grouping.BY_IMAGE for g in groups],
    })
    table.attrs["relatives"] = [_relative_id(p, root) for p in paths]
    for column in frame.columns:
        if column not in ("path", "label", "split", "group", "class_name") \
                and column not in table.columns:
            table[column] = frame[column].to_numpy()
    return table


@lru_cache(maxsize=1)
def _medmnist_info() -> dict[str, Any]:
    text = resources.files("clipsvd").joinpath("resources", "medmnist_labels.json").read_text(
        encoding="utf-8")
    return json.loads(text)["flags"]


def medmnist_labels(flag: str) -> list[str]:
    """The label names of a MedMNIST flag in index order (medmnist's INFO[flag]["label"])."""
    info = _medmnist_info()
    if flag not in info:
        raise DataError(f"medmnist.flag: unknown MedMNIST dataset {flag!r}; use one of "
                        f"{', '.join(info)}")
    return list(info[flag]["labels"])


def _medmnist_path(root: Path, flag: str, size: int) -> Path:
    """The dataset's MedMNIST file, checked to be there and usable."""
    medmnist_labels(flag)  # an unknown flag stops here
    info = _medmnist_info()[flag]
    path = medmnist_file(root, flag, size)
    if int(size) not in MEDMNIST_SIZES:
        raise DataError(f"{path}: medmnist.size {size} is not a MedMNIST size; use one of "
                        f"{', '.join(map(str, MEDMNIST_SIZES))}")
    if info["task"].startswith("multi-label"):
        raise DataError(f"{path}: {flag} is a multi-label dataset ({info['task']}); clipsvd does "
                        "single-label classification only, choose another MedMNIST flag")
    if not path.is_file():
        sizes = ", ".join(map(str, info["sizes"]))
        raise DataError(f"{path}: MedMNIST file not found; put {path.name} (from the MedMNIST "
                        f"release, sizes {sizes} for {flag}) in {root}, or fix medmnist.size")
    return path


def _read_medmnist(root: Path, flag: str, size: int) -> pd.DataFrame:
    path = _medmnist_path(root, flag, size)
    classes = medmnist_labels(flag)
    volumes = bool(_medmnist_info()[flag]["volumes"])
    frames = []
    with NpzFile(path) as npz:
        for split in SPLITS:
            shape, dtype, _ = npz.header(f"{split}_images")
            labels = npz.read(f"{split}_labels")
            if labels.ndim == 2 and labels.shape[1] > 1:
                raise DataError(f"{path}: {split}_labels has shape {labels.shape}, i.e. "
                                f"{labels.shape[1]} labels per image (multi-label); clipsvd does "
                                "single-label classification only")
            label_shape = labels.shape
            labels = labels.reshape(-1) if labels.ndim <= 2 else labels
            if labels.ndim != 1 or len(labels) != shape[0]:
                raise DataError(f"{path}: {split}_labels has shape {label_shape} but "
                                f"{split}_images holds {shape[0]} images; expected N×1 labels, "
                                "one per image")
            if not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{path}: {split}_labels are {labels.dtype}, not integer class "
                                "ids; use the file as published")
            if dtype.kind not in "uif":
                raise DataError(f"{path}: {split}_images hold {dtype} values, not numbers")
            if volumes:
                layouts = {4: "dhw", 5: "dhw1"}
            else:
                layouts = {3: "hw", 4: "hwc"}
            layout = layouts.get(len(shape))
            if layout is None or (layout == "hwc" and shape[-1] not in (1, 3)) \
                    or (layout == "dhw1" and shape[-1] != 1):
                expected = "N×D×H×W" if volumes else "N×H×W or N×H×W×3"
                raise DataError(f"{path}: {split}_images has shape {shape}; {flag} needs "
                                f"{expected}")
            bad = labels[(labels < 0) | (labels >= len(classes))]
            if len(bad):
                raise DataError(f"{path}: {split}_labels holds label {int(bad[0])}, which has no "
                                f"name in MedMNIST's INFO['{flag}'] ({len(classes)} labels: "
                                f"0..{len(classes) - 1}); check the file matches medmnist.flag")
            ids = [f"{split}/{i:06d}" for i in range(len(labels))]
            frames.append(pd.DataFrame({
                "source_path": str(path), "label": labels.astype(int),
                "class_name": [classes[int(v)] for v in labels], "split": split,
                "group": ids, "sample_id": ids, "array_key": f"{split}_images",
                "array_index": np.arange(len(labels)), "array_layout": layout}))
    table = pd.concat(frames, ignore_index=True)
    table.attrs["classes"] = classes
    return table


def _find_split_file(root: Path, split_file: str | None) -> Path:
    if split_file:
        path = root / split_file
        if not path.is_file():
            raise DataError(f"{path}: split file not found; put it in {root} or fix the "
                            "dataset's 'split_file' key")
        return path
    found = sorted(p for p in root.glob("split_*.json") if p.is_file())
    if not found:
        raise DataError(f"{root}: no split_<NAME>.json found; format 'coop_json' expects the "
                        "CoOp/BiomedCoOp split file in root (or set 'split_file')")
    if len(found) > 1:
        raise DataError(f"{root}: several split files ({', '.join(p.name for p in found)}); "
                        "choose one with the dataset's 'split_file' key")
    return found[0]


def _coop_entries(path: Path, data: Any) -> list[tuple[str, str, int, str, int]]:
    """(split, relative path, label, class name, position) of every entry, checked."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object with keys train, val, test")
    missing = [split for split in SPLITS if not isinstance(data.get(split), list)]
    if missing:
        raise DataError(f"{path}: needs a list under '{missing[0]}' (has keys: "
                        f"{', '.join(map(str, data))}); keys train, val and test are required")
    entries = []
    for split in SPLITS:
        for position, entry in enumerate(data[split]):
            where = f"{path}: entry {position} of '{split}'"
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise DataError(f"{where} is {json.dumps(entry)[:80]}; every entry must be "
                                "[relative_image_path, integer_label, \"class name\"]")
            rel, label, name = entry
            if not isinstance(rel, str) or not rel.strip():
                raise DataError(f"{where} has no image path; give a path relative to the "
                                "image folder")
            if isinstance(label, bool) or not isinstance(label, int):
                raise DataError(f"{where} has label {label!r}; labels must be integers")
            if not isinstance(name, str) or not name.strip():
                raise DataError(f"{where}: label {label} has no class name; give every entry "
                                "its class name")
            entries.append((split, rel, label, name, position))
    if not entries:
        raise DataError(f"{path}: the split file lists no images")
    return entries


def _coop_image_dir(root: Path, split_path: Path, image_dir: str | None,
                    first: str) -> Path:
    """Where the split's relative paths start (listing.coop_image_base); a configured folder
    that does not exist is an error."""
    base = coop_image_base(root, split_path, image_dir, first)
    if image_dir and not base.is_dir():
        raise DataError(f"{base}: image folder not found; fix the dataset's 'image_dir' key "
                        f"(relative to {root})")
    return base


def _read_coop(root: Path, split_file: str | None, image_dir: str | None) -> pd.DataFrame:
    path = _find_split_file(root, split_file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                        f"{exc.msg}); fix the file") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the split file as UTF-8") from None
    entries = _coop_entries(path, data)
    names: dict[int, str] = {}
    for split, _, label, name, position in entries:
        if names.setdefault(label, name) != name:
            raise DataError(f"{path}: label {label} is named both {names[label]!r} and "
                            f"{name!r} (entry {position} of '{split}'); give each label one name")
    wanted = list(range(len(names)))
    if sorted(names) != wanted:
        gap = sorted(set(range(max(names) + 1)) - set(names))
        bad = gap[0] if gap else min(names)
        raise DataError(f"{path}: labels must be 0..{len(names) - 1} with no gaps; label {bad} "
                        "has no entry and so no class name; fix the split file")
    classes = [names[i] for i in wanted]
    _check_unique(classes, str(path))
    base = _coop_image_dir(root, path, image_dir, entries[0][1])
    rows, seen, missing = [], {}, []
    for split, rel, label, name, position in entries:
        image = base / rel
        if not image.is_file() and not is_dicom_series_dir(image):
            missing.append((split, position, image))
            continue
        key = str(image.resolve())
        if key in seen:
            raise DataError(f"{path}: {rel} is listed twice ({seen[key]} and entry {position} "
                            f"of '{split}'); remove the duplicate entry")
        seen[key] = f"entry {position} of '{split}'"
        rows.append({"source_path": key, "label": label, "class_name": name, "split": split,
                     "group": "", "relative": _relative_id(image, root)})
    if missing:
        split, position, image = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{path}: entry {position} of '{split}' names a file that does not "
                        f"exist: {image}{more}; put the images under {base} or set 'image_dir'")
    table = pd.DataFrame(rows, columns=[*COLUMNS, "relative"])
    table.attrs["relatives"] = table.pop("relative").tolist()
    table.attrs["classes"] = classes
    return table


def read_source(dataset: DatasetConfig) -> pd.DataFrame:
    """Read the dataset's source into the sample table; DataError for anything a user must fix.

    Groups are resolved here (data.groups); when clipsvd is to assign the split, a dataset
    whose ids look present but are not declared stops here too.
    """
    check_declaration(dataset)
    root = _root_of(dataset)
    where = str(root)
    if dataset.format == "folder":
        table = _read_folder(root)
    elif dataset.format == "csv":
        table = _read_csv(root, dataset.manifest, dataset.columns)
        where = str(root / dataset.manifest)
    elif dataset.format == "medmnist":
        if dataset.medmnist is None:
            raise DataError(f"dataset '{dataset.name}': format 'medmnist' needs the 'medmnist' "
                            "key ({flag, size})")
        table = _read_medmnist(root, dataset.medmnist.flag, dataset.medmnist.size)
    elif dataset.format == "coop_json":
        table = _read_coop(root, dataset.split_file, dataset.image_dir)
        where = str(_find_split_file(root, dataset.split_file))
    else:
        raise DataError(f"dataset '{dataset.name}': unknown format {dataset.format!r}; "
                        "use folder, csv, medmnist or coop_json")
    if table.empty:
        raise DataError(f"{root}: dataset '{dataset.name}' has no images")
    classes = table.attrs.get("classes")
    relatives = table.attrs.pop("relatives", None) or [relative_id(p, root)
                                                       for p in table["source_path"]]
    table["label"] = table["label"].astype(int)
    table = table.reset_index(drop=True)
    if dataset.format == "medmnist":
        table["group_source"] = grouping.BY_IMAGE  # no patient ids in MedMNIST files
    else:
        table = grouping.resolve_groups(table, relatives, dataset.groups, where)
        if (table["split"] == "").all():
            extra = [c for c in table.columns if c not in COLUMNS and c not in INTERNAL_COLUMNS]
            grouping.check_declared(table, relatives, extra, dataset.groups, dataset.format,
                                    where)
            grouping.check_dicom_ids(table, dataset.groups, where)
    names = list(classes) if classes is not None else classes_of(table)
    if dataset.class_names:
        names, classes = _renamed(table, names, dataset, where), None
    if len(names) < 2:
        only = f" ({names[0]!r})" if names else ""
        raise DataError(f"{where}: dataset '{dataset.name}' has one class{only}; a classifier "
                        "needs two or more, check the labels (or columns.label)")
    if classes is not None:
        table.attrs["classes"] = list(classes)
    return table


def _renamed(table: pd.DataFrame, names: list[str], dataset: DatasetConfig,
             where: str) -> list[str]:
    """The class list with the dataset's ``class_names`` (source name → prompt name) applied,
    the table's class names with it; the source's name is kept in ``source_class_name``."""
    given = {str(k): v for k, v in dataset.class_names.items()}  # YAML may read 0: as a number
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise DataError(f"{where}: dataset '{dataset.name}': key 'class_names.{unknown[0]}': no "
                        f"class of that name; the classes are {', '.join(map(repr, names))}")
    renamed = [given.get(name, name) for name in names]
    if len(set(renamed)) != len(renamed):
        raise DataError(f"{where}: dataset '{dataset.name}': key 'class_names' gives two classes "
                        "the same name; give every class its own")
    table["source_class_name"] = table["class_name"]
    table["class_name"] = [renamed[label] for label in table["label"]]
    table.attrs["classes"] = renamed
    return renamed


def classes_of(table: pd.DataFrame) -> list[str]:
    """The class list in label order (label i is classes[i])."""
    if table.attrs.get("classes") is not None:
        return list(table.attrs["classes"])
    pairs = table[["label", "class_name"]].drop_duplicates().sort_values("label")
    return pairs["class_name"].tolist()


def relative_id(source_path: str, root: str | os.PathLike) -> str:
    """Public form of the path-derived id used for groups and sample ids."""
    return _relative_id(Path(source_path), Path(root).expanduser().resolve())
