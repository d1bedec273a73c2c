"""The config file a shared step's job reads: the part of a study that decides its output.

demo_data, prepare, sample and features make files that every study asking for the same thing
shares (their paths are keyed by it, clipsvd.layout). Their jobs do not read the study's own
config file: its path names the study, and Snakemake reruns a job whose params changed, so a
study of another name would rerun them all. Each gets instead a small study config of its own,
written under results/studies/shared/ at a path keyed like its output, holding only what its
key is computed from. Every study that asks for the same output hands the job the same file
with the same content; `clipsvd <step> --config <that file>` runs it by hand as well.

The features step, shared by every study with the same store, model and batch size, computes
on a GPU when its job sees one (``device: auto``) whatever the device setting of the study
that asked first: where to compute is not part of what the file says.
Kept free of heavy imports: the workflow builds these while it builds its DAG.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from .config import ColumnsConfig, DatasetConfig, GroupsConfig, StudyConfig
from .data.fingerprint import PREPARATION_FIELDS

STUDY_NAME = "shared"  # the `study` of every shared step's config


def _plain(value: Any) -> Any:
    """JSON values without the None entries (each one is its key's default)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Sections written only with what differs from their defaults: the config check reads a
# section (or its key) that is present as given by the user (`columns` outside format csv, a
# group column next to a pattern), so writing the defaults out would refuse a valid dataset.
_DEFAULT_SECTIONS = {"columns": asdict(ColumnsConfig()), "groups": asdict(GroupsConfig())}


def _dataset(dataset: DatasetConfig, *extra: str) -> dict[str, Any]:
    values = asdict(dataset)
    for section, defaults in _DEFAULT_SECTIONS.items():
        given = {k: v for k, v in (values.get(section) or {}).items() if v != defaults.get(k)}
        values[section] = given or None
    fields = ("name", *PREPARATION_FIELDS, *extra)
    return _plain({name: values[name] for name in fields if name in values})


def _study(dataset: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"study": STUDY_NAME, "datasets": [dataset], **more}


def demo_config(dataset: DatasetConfig) -> dict[str, Any]:
    """What `clipsvd demo-data` reads: the dataset's place and its generator settings."""
    return _study(_dataset(dataset, "demo"))


def prepare_config(study: StudyConfig, dataset: DatasetConfig,
                   image_size: int | None) -> dict[str, Any]:
    """What `clipsvd prepare` reads: the preparation settings, and the model when its input
    size is not known before the job (it is then the model's to say)."""
    more = {}
    if image_size is None:
        more["model"] = {"name": study.model.name, "pretrained": study.model.pretrained}
    return _study(_dataset(dataset, "demo"), **_plain(more))


def sample_config(dataset: DatasetConfig) -> dict[str, Any]:
    """What `clipsvd sample` reads: the dataset (its store is an input) and its sampling."""
    return _study(_dataset(dataset, "sampling"))


def features_config(study: StudyConfig, dataset: DatasetConfig) -> dict[str, Any]:
    """What `clipsvd features` reads: the model and the batch size."""
    model = {"name": study.model.name, "pretrained": study.model.pretrained,
             "init_seed": study.model.init_seed}
    return _study(_dataset(dataset), model=_plain(model), eval_batch_size=study.eval_batch_size)


def key(config: dict[str, Any]) -> str:
    """A short hash of a step config (the key of the demo dataset's config file)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
