"""Class descriptions: the sentences per class that BiomedCoOp's extra terms read.

A description file is YAML (or JSON, which YAML reads) mapping each class name, as the prompts
give it (after a dataset's ``class_names``), to a list of sentences. BiomedCoOp pairs the i-th
sentence of every class (its pruning scores sentence i across classes), so every class needs
the same number. clipsvd ships files of its own writing for the datasets its studies bundle
(``resources/descriptions/``); any other dataset names its file in ``datasets[].descriptions``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import ConfigError

SHIPPED = Path(__file__).resolve().parent / "resources" / "descriptions"


def _get(dataset: Any, key: str) -> Any:
    """A field of a DatasetConfig or of its raw mapping (the config check reads the latter)."""
    return dataset.get(key) if isinstance(dataset, dict) else getattr(dataset, key, None)


def shipped_file(dataset: Any) -> Path | None:
    """The description file clipsvd ships for a dataset, by what the dataset is (a MedMNIST
    flag, the demo generator), not by the name a study gives it; None if there is none."""
    medmnist = _get(dataset, "medmnist")
    if medmnist:
        path = SHIPPED / f"{_get(medmnist, 'flag')}.yaml"
    elif _get(dataset, "demo"):
        path = SHIPPED / "demo.yaml"
    else:
        return None
    return path if path.is_file() else None


def description_path(dataset: Any) -> Path:
    """The file of a dataset: the one its config names, else the shipped one."""
    given = _get(dataset, "descriptions")
    if given:
        return Path(given)
    shipped = shipped_file(dataset)
    if shipped is None:
        raise ConfigError("BiomedCoOp needs class descriptions for this dataset and clipsvd "
                          "ships none for it; write a YAML file (class name -> list of "
                          "sentences, docs/studies.md) and give its path here")
    return shipped


def read_descriptions(path: str | Path) -> dict[str, list[str]]:
    """The file's {class: sentences}, checked for shape; one line naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: description file not found; give the path of a YAML file "
                          "of class name -> list of sentences")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the file") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of class name -> list of sentences")
    out = {}
    for name, sentences in data.items():
        if (not isinstance(sentences, list) or not sentences
                or not all(isinstance(s, str) and s.strip() for s in sentences)):
            raise ConfigError(f"{path}: class {str(name)!r} needs a non-empty list of "
                              "non-empty sentences")
        out[str(name)] = [s.strip() for s in sentences]
    return out


def class_descriptions(path: str | Path, classes: Sequence[str]) -> list[list[str]]:
    """The sentences of each class, in the order of ``classes``: every class present, all with
    the same number of sentences."""
    data = read_descriptions(path)
    missing = [c for c in classes if c not in data]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{path}: no descriptions for class {missing[0]!r}{more}; add every "
                          "class the prompts name (after the dataset's class_names)")
    counts = {c: len(data[c]) for c in classes}
    if len(set(counts.values())) > 1:
        (low, n_low), (high, n_high) = (min(counts.items(), key=lambda kv: kv[1]),
                                        max(counts.items(), key=lambda kv: kv[1]))
        raise ConfigError(f"{path}: class {low!r} has {n_low} sentences and {high!r} {n_high}; "
                          "BiomedCoOp pairs the i-th sentence of every class, so give every "
                          "class the same number")
    return [data[c] for c in classes]
