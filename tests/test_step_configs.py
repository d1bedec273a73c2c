"""The config files the shared steps read (clipsvd.step_configs) load as the dataset they were
written from, whatever its format and grouping."""
from __future__ import annotations

import pytest

from clipsvd import config, step_configs
from clipsvd.config import ColumnsConfig, DatasetConfig, GroupsConfig, MedmnistConfig

DATASETS = [
    DatasetConfig(name="retina", format="medmnist", root="data",
                  medmnist=MedmnistConfig(flag="retinamnist", size=28)),
    DatasetConfig(name="scans", format="folder", root="data",
                  groups=GroupsConfig(pattern="(P[0-9]+)_")),
    DatasetConfig(name="own", format="csv", root="data", manifest="m.csv",
                  columns=ColumnsConfig(path="filepath", group="patient_id")),
    DatasetConfig(name="independent", format="csv", root="data", manifest="m.csv",
                  groups=GroupsConfig(independent=True)),
]


@pytest.mark.parametrize("dataset", DATASETS, ids=[d.name for d in DATASETS])
def test_shared_step_configs_load_as_their_dataset(dataset):
    """Catches the sections written out with their defaults: `columns` on a MedMNIST or folder
    dataset, or the default group column next to a pattern or `independent`, which the config
    check refuses (every non-csv dataset's prepare job failed in the workflow)."""
    study = config.load("config/config.yaml")
    for written in (step_configs.prepare_config(study, dataset, 64),
                    step_configs.sample_config(dataset),
                    step_configs.features_config(study, dataset)):
        loaded = config.from_dict(written).datasets[0]
        assert (loaded.format, loaded.columns, loaded.groups) == (
            dataset.format, dataset.columns, dataset.groups)
