"""`clipsvd select`: each method's learning rate chosen by validation accuracy, one rule."""
from __future__ import annotations

import json

import pytest

from clipsvd.errors import DataError
from clipsvd.selection import choose, read_grid, select


def _run(root, study, dataset, method, lr, seed, val_accuracy):
    folder = root / study / dataset / method / "few_shot" / "shots16" / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps(
        {"dataset": dataset, "method": method, "lr": lr, "seed": seed,
         "val_accuracy": val_accuracy}))


def test_the_rate_with_the_best_mean_validation_accuracy_is_chosen_ties_to_the_smaller(
        tmp_path, capsys):
    for lr, study in ((0.002, "grid-a"), (0.02, "grid-b")):
        _run(tmp_path, study, "blood", "clip_svd", lr, 1, 0.50 if lr == 0.002 else 0.75)
        _run(tmp_path, study, "blood", "clip_svd", lr, 2, 0.70 if lr == 0.002 else 0.55)
        _run(tmp_path, study, "blood", "clip_lora", lr, 1, 0.625)  # a tie
    chosen = select([tmp_path / "grid-a", tmp_path / "grid-b"], tmp_path / "table.md")
    # clip_svd: means 0.60 and 0.65 (the best single run, 0.75, does not decide)
    assert chosen == {"blood/clip_svd": 0.02, "blood/clip_lora": 0.002}
    table = (tmp_path / "table.md").read_text()
    assert "| blood | clip_svd | 60.00 (n = 2) | **65.00 (n = 2)** | 0.02 |" in table
    assert table == capsys.readouterr().out


def test_choose_breaks_ties_by_the_smallest_rate():
    assert choose({0.02: [0.5], 0.005: [0.5], 0.01: [0.25]}) == 0.005


def test_a_run_without_validation_accuracy_is_named(tmp_path):
    _run(tmp_path, "grid", "blood", "clip_svd", 0.01, 1, None)
    with pytest.raises(DataError, match=r"train.json: no val_accuracy"):
        read_grid([tmp_path / "grid"])
    with pytest.raises(DataError, match="no train.json below it"):
        read_grid([tmp_path / "empty"])
