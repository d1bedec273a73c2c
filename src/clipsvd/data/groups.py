"""Which images belong together (a patient, a study), so that no group spans two splits.

A sample's group comes from, in order: the manifest's group column, ``groups.pattern`` on its
path, the DICOM PatientID (or StudyInstanceUID) of a DICOM image, else the image itself (a
volume for all of its slices). When clipsvd assigns the split and no grouping was declared,
ids that look like patients in the manifest's columns or the file names stop preparation with
a message saying how to declare them, or how to say that the images are independent: a split
made image by image would put one patient's images in train and test without a word.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import GroupsConfig
from ..errors import DataError

# Where each sample's group came from (the table's ``group_source`` column).
BY_COLUMN, BY_PATTERN, BY_DICOM, BY_IMAGE = "column", "pattern", "dicom", "image"
DICOM_TAGS = {"patient": "PatientID", "study": "StudyInstanceUID"}
# Column names that usually hold patient or study ids.
_ID_COLUMN = re.compile(r"patient|subject|participant|person|individual|donor|case|study|"
                        r"series|exam|visit|mrn|pid|specimen|slide|animal|volume", re.IGNORECASE)
# File or folder name tokens that usually are patient ids: patient07, sub-01, case_3, P017_...
_ID_TOKEN = re.compile(r"(?<![a-z])(patient|pat|pt|subject|subj|sub|case|participant|person|"
                       r"pid|id)[-_ ]?\d+|(?<![a-z0-9])p\d{2,}(?=[-_. /])", re.IGNORECASE)


def match_group(compiled: re.Pattern, relative: str) -> str | None:
    """The group a pattern takes from one relative path (its group named 'group', else its
    capture group, else the whole match), or None when it does not match."""
    found = compiled.search(relative)
    if found is None:
        return None
    if "group" in compiled.groupindex:
        value = found.group("group")
    elif compiled.groups:
        value = found.group(1)
    else:
        value = found.group(0)
    return value or None


def pattern_groups(relatives: list[str], pattern: str, where: str) -> list[str]:
    """Apply ``groups.pattern`` to every relative path; an image it misses is an error."""
    compiled = re.compile(pattern)  # the config check refused invalid patterns
    groups = [match_group(compiled, rel) for rel in relatives]
    missed = [rel for rel, group in zip(relatives, groups) if group is None]
    if missed:
        more = f" (and {len(missed) - 1} more)" if len(missed) > 1 else ""
        raise DataError(f"{where}: groups.pattern {pattern!r} finds no group in "
                        f"{missed[0]!r}{more}; fix the pattern (it is searched in the path "
                        "relative to root) or the file names")
    return [str(g) for g in groups]


def is_dicom(path: str) -> bool:
    """A DICOM file (by suffix or the DICM marker) or a folder of DICOM slices."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii", ".nii.gz")):
        return False
    if name.endswith((".dcm", ".dicom")) or p.is_dir():
        return True
    try:
        with open(p, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_group(path: str, by: str) -> str | None:
    """PatientID or StudyInstanceUID of a DICOM file (the first slice of a series folder);
    None when the header has none or cannot be read (the reader reports that file later)."""
    import pydicom

    p = Path(path)
    if p.is_dir():
        slices = sorted(q for q in p.iterdir() if q.is_file())
        if not slices:
            return None
        p = slices[0]
    tag = DICOM_TAGS[by]
    try:
        header = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=[tag])
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader
        return None
    value = str(getattr(header, tag, "") or "").strip()
    return value or None


def resolve_groups(table: pd.DataFrame, relatives: list[str], groups: GroupsConfig,
                   where: str) -> pd.DataFrame:
    """Fill ``group`` and ``group_source`` where the source gave no group (column) itself."""
    table = table.copy()
    if "group_source" not in table.columns:
        table["group_source"] = BY_IMAGE
    given = table["group_source"] == BY_COLUMN
    if groups.independent:
        if given.any():
            raise DataError(f"{where}: groups.independent is true, but the manifest's group "
                            f"column gives {int(given.sum())} images a group; remove the key or "
                            "the column")
        table["group"] = list(relatives)
        return table
    open_rows = [i for i, g in enumerate(given) if not g]
    if groups.pattern is not None and open_rows:
        found = pattern_groups([relatives[i] for i in open_rows], groups.pattern, where)
        table.loc[table.index[open_rows], "group"] = found
        table.loc[table.index[open_rows], "group_source"] = BY_PATTERN
        return table
    for i in open_rows:
        path = table.at[table.index[i], "source_path"]
        value = dicom_group(path, groups.dicom) if is_dicom(path) else None
        if value is not None:
            table.at[table.index[i], "group"] = value
            table.at[table.index[i], "group_source"] = BY_DICOM
        else:
            table.at[table.index[i], "group"] = relatives[i]
    return table


def grouping_summary(table: pd.DataFrame, groups: GroupsConfig) -> dict[str, Any]:
    """How the groups were found, for provenance.json."""
    by = table["group_source"].value_counts().sort_index() if "group_source" in table else {}
    return {"images_by_source": {str(k): int(v) for k, v in dict(by).items()},
            "groups": int(table["group"].nunique()),
            "pattern": groups.pattern, "dicom": DICOM_TAGS[groups.dicom],
            "independent": bool(groups.independent)}


def _id_columns(table: pd.DataFrame, extra_columns: list[str]) -> str | None:
    for column in extra_columns:
        if not _ID_COLUMN.search(column):
            continue
        values = table[column].astype(str).str.strip()
        values = values[values != ""]
        if len(values) and values.duplicated().any():
            return (f"column {column!r} looks like patient or study ids ({values.nunique()} "
                    f"values over {len(values)} rows) but is not the group; set the dataset's "
                    f"columns.group: {column}")
    return None


def _id_tokens(relatives: list[str]) -> str | None:
    tokens = [m.group(0) if (m := _ID_TOKEN.search(rel)) else None for rel in relatives]
    found = [t.lower() for t in tokens if t is not None]
    if len(found) * 2 < len(relatives) or len(set(found)) == len(found):
        return None  # most names hold no id, or each id names one image: nothing can leak
    example = next(rel for rel, t in zip(relatives, tokens) if t is not None)
    token = next(t for t in tokens if t is not None)
    word = re.match(r"[A-Za-z]+", token).group(0)
    return (f"file names look like they hold patient ids (e.g. {token!r} in {example!r}; "
            f"{len(set(found))} ids over {len(relatives)} images) but no group is declared; set "
            f"the dataset's groups.pattern, e.g. '({word}[-_ ]?[0-9]+)'")


def _sub_folders(relatives: list[str]) -> str | None:
    """folder format: images in sub-folders of the class folders, several sub-folders per
    class and several images per sub-folder (one 'images' folder per class is no grouping)."""
    parents = ["/".join(rel.split("/")[:2]) for rel in relatives if rel.count("/") >= 2]
    classes = {rel.split("/")[0] for rel in relatives if rel.count("/") >= 2}
    if len(parents) * 2 < len(relatives) or len(set(parents)) == len(parents) \
            or len(set(parents)) < 2 * len(classes):
        return None
    example = next(rel for rel in relatives if rel.count("/") >= 2)
    return (f"images sit in sub-folders of the class folders (e.g. {example!r}; "
            f"{len(set(parents))} sub-folders over {len(relatives)} images), which usually are "
            "patients or studies, but no group is declared; set the dataset's groups.pattern: "
            "'^[^/]+/([^/]+)/' to group by sub-folder")


def check_declared(table: pd.DataFrame, relatives: list[str], extra_columns: list[str],
                   groups: GroupsConfig, fmt: str, where: str) -> None:
    """Stop before an image-by-image split of data whose names or columns hold patient ids."""
    if groups.independent:
        return
    open_rows = (table["group_source"] == BY_IMAGE).to_numpy()
    if not open_rows.any():
        return
    rest = table[open_rows]
    rel = [r for r, keep in zip(relatives, open_rows) if keep]
    finding = (_id_columns(rest, extra_columns)
               or (_sub_folders(rel) if fmt == "folder" else None) or _id_tokens(rel))
    if finding:
        raise DataError(f"{where}: {finding}, or groups.independent: true if every image is "
                        "independent (otherwise one patient's images could land in train and "
                        "test)")


def check_dicom_ids(table: pd.DataFrame, groups: GroupsConfig, where: str) -> None:
    """All DICOM images with one PatientID (anonymised exports) would form a single group."""
    dicom = table.loc[table["group_source"] == BY_DICOM, "group"]
    if len(dicom) > 2 and dicom.nunique() == 1 and table["label"].nunique() > 1:
        tag = DICOM_TAGS[groups.dicom]
        other = "groups.dicom: study (StudyInstanceUID)" if groups.dicom == "patient" else \
            "groups.pattern"
        raise DataError(f"{where}: all {len(dicom)} DICOM images have {tag} {dicom.iloc[0]!r} "
                        "(anonymised?), so they would form one group and one split; set "
                        f"{other}, or groups.independent: true if the images are independent")


def groups_in_several_splits(table: pd.DataFrame, limit: int = 5) -> dict[str, Any]:
    """Groups that a given split (split file, manifest column) puts in more than one split."""
    per_group = table.groupby("group", sort=True)["split"].agg(lambda s: sorted(set(s)))
    crossing = per_group[per_group.map(len) > 1]
    return {"count": int(len(crossing)),
            "examples": [{"group": str(g), "splits": list(s)}
                         for g, s in crossing.head(limit).items()]}
