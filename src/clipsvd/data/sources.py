"""Dataset sources (class folders, CSV manifests) read into one sample table.

Every later step sees the same columns whatever the source format, so format quirks stay here:
``source_path`` (absolute), ``label`` (int, position in the sorted class list), ``class_name``,
``split`` (train/val/test, or "" when the source has none), ``group`` (patient or volume; a
sample without one is its own group), plus any extra manifest columns.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..config import DatasetConfig
from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom",
                  ".nii", ".nii.gz")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "dev": "val", "test": "test", "testing": "test"}
COLUMNS = ["source_path", "label", "class_name", "split", "group"]


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


def _read_folder(root: Path) -> pd.DataFrame:
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name)
    if not class_dirs:
        raise DataError(f"{root}: no class folders found; format 'folder' expects "
                        "<root>/<class name>/<images>")
    names = [p.name for p in class_dirs]
    _check_unique(names, str(root))
    rows = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*")
                       if p.is_file() and is_image_file(p)
                       and not any(part.startswith(".") for part in p.relative_to(class_dir).parts))
        if not files:
            raise DataError(f"{class_dir}: class folder '{class_dir.name}' holds no images "
                            f"(looked for {', '.join(IMAGE_SUFFIXES)}); add images or remove it")
        for path in files:
            rows.append({"source_path": str(path), "label": label, "class_name": class_dir.name,
                         "split": "", "group": _relative_id(path, root)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _labels_from_column(frame: pd.DataFrame, manifest: Path) -> tuple[list[int], list[str]]:
    """Map the manifest's label column (class names or integer ids) to ids and the class list."""
    raw = frame["label"].astype(str).str.strip()
    empty = raw == ""
    if empty.any():
        row = int(empty.idxmax()) + 2  # +2: header line and 1-based numbering
        raise DataError(f"{manifest}: line {row} has no label; give every row a class name")
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


def _read_csv(root: Path, manifest_name: str | None) -> pd.DataFrame:
    if not manifest_name:
        raise DataError(f"{root}: format 'csv' needs a manifest file name; set the dataset's "
                        "'manifest' key")
    manifest = root / manifest_name
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest file not found; create it or fix the dataset's "
                        "'manifest' key")
    try:
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        reason = " ".join(str(exc).split())
        raise DataError(f"{manifest}: not a readable CSV file ({reason}); fix the file") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    for column in ("path", "label"):
        if column not in frame.columns:
            raise DataError(f"{manifest}: needs a '{column}' column (has: "
                            f"{', '.join(frame.columns)}); add it to the header line")
    if frame.empty:
        raise DataError(f"{manifest}: the manifest lists no images; add rows path,label")
    paths = [Path(p.strip()) if Path(p.strip()).is_absolute() else root / p.strip()
             for p in frame["path"]]
    missing = [(i, p) for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        line, path = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{manifest}: line {line + 2} names a file that does not exist: "
                        f"{path}{more}; fix the path (relative to {root}) or remove the row")
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
    table = pd.DataFrame({
        "source_path": resolved.tolist(),
        "label": labels,
        "class_name": [classes[i] for i in labels],
        "split": splits,
        "group": [g if g else _relative_id(p, root) for g, p in zip(groups, paths)],
    })
    for column in frame.columns:
        if column not in ("path", "label", "split", "group", "class_name") \
                and column not in table.columns:
            table[column] = frame[column].to_numpy()
    return table


def read_source(dataset: DatasetConfig) -> pd.DataFrame:
    """Read the dataset's source into the sample table; DataError for anything a user must fix."""
    root = Path(dataset.root).expanduser()
    if not root.is_dir():
        hint = " (run `clipsvd demo-data` first)" if dataset.demo is not None else ""
        raise DataError(f"{root}: dataset '{dataset.name}' root folder not found{hint}; "
                        "check the dataset's 'root' key")
    root = root.resolve()
    if dataset.format == "folder":
        table = _read_folder(root)
    elif dataset.format == "csv":
        table = _read_csv(root, dataset.manifest)
    else:
        raise DataError(f"dataset '{dataset.name}': unknown format {dataset.format!r}; "
                        "use 'folder' or 'csv'")
    if table.empty:
        raise DataError(f"{root}: dataset '{dataset.name}' has no images")
    table["label"] = table["label"].astype(int)
    return table.reset_index(drop=True)


def classes_of(table: pd.DataFrame) -> list[str]:
    """The class list in label order (label i is classes[i])."""
    pairs = table[["label", "class_name"]].drop_duplicates().sort_values("label")
    return pairs["class_name"].tolist()


def relative_id(source_path: str, root: str | os.PathLike) -> str:
    """Public form of the path-derived id used for groups and sample ids."""
    return _relative_id(Path(source_path), Path(root).expanduser().resolve())
