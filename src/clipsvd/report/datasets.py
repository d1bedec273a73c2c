"""The report's dataset table: images, groups (patients, volumes) and classes per split of each
dataset's prepared store, and how many test images each setting evaluated.

The store is found through the runs' run.json (the dataset input MLflow also gets); its
provenance.json holds the split summary, and stores prepared before it did are summarised from
their index.csv.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .. import layout
from ..data.store import PreparedStore, split_summary
from ..errors import DataError
from ..io import read_json

log = logging.getLogger(__name__)
COLUMNS = ["dataset", "split", "class_name", "images", "groups", "classes"]
ALL_CLASSES = "(all)"


def store_of(run_dirs) -> Path:
    """The prepared store the runs were evaluated on (their run.json), else the layout's."""
    for run_dir in run_dirs:
        path = Path(run_dir) / layout.RUN_RECORD
        if not path.exists():
            continue
        for item in read_json(path).get("inputs", []):
            if item.get("context") == "test" and item.get("source"):
                return Path(item["source"])
    dataset = Path(next(iter(run_dirs))).parents[3].name
    return Path(layout.STORE.format(dataset=dataset))


def splits_of(store: Path) -> dict | None:
    """provenance.json's split summary, or one computed from index.csv; None without a store."""
    provenance_path = store / "provenance.json"
    if provenance_path.is_file():
        splits = read_json(provenance_path).get("splits")
        if splits:
            return splits
    try:
        return split_summary(PreparedStore.open(store).index)
    except DataError as error:
        log.warning("dataset table: %s", error)
        return None


def dataset_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table: per dataset and split a row over all classes (class_name '(all)') and one per
    class, then per setting the evaluated test images (split 'evaluated: <setting>[ base|
    novel]'), from the runs' n_test."""
    rows = []
    for dataset, part in runs.groupby("dataset", sort=True):
        splits = splits_of(store_of(list(part.run_dir)))
        for split, facts in (splits or {}).items():
            rows.append({"dataset": dataset, "split": split, "class_name": ALL_CLASSES,
                         "images": facts["images"], "groups": facts["groups"],
                         "classes": facts["classes"]})
            rows += [{"dataset": dataset, "split": split, "class_name": name, "images": n,
                      "groups": pd.NA, "classes": 1} for name, n in facts["per_class"].items()]
        for setting, runs_of in part.groupby("setting", sort=True):
            groups = [("base", "base_n_test"), ("novel", "novel_n_test")] if (
                setting == "base_to_novel") else [("", "n_test")]
            for group, column in groups:
                if column not in runs_of or runs_of[column].isna().all():
                    continue
                label = f"evaluated: {setting}" + (f" {group}" if group else "")
                rows.append({"dataset": dataset, "split": label, "class_name": ALL_CLASSES,
                             "images": int(runs_of[column].max()), "groups": pd.NA,
                             "classes": pd.NA})
    return pd.DataFrame(rows, columns=COLUMNS)
