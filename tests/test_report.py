"""Aggregation over seeds from run folders, and the report files."""
import json

import pandas as pd
import pytest

from clipsvd import layout
from clipsvd.report import build_report, collect_runs, summarise


def fake_run(root, method, shots, seed, accuracy, setting="few_shot", dataset="ds"):
    run = root / layout.RUN.format(study="st", dataset=dataset, method=method, setting=setting,
                                   shots=shots, seed=seed)
    run.mkdir(parents=True)
    (run / layout.METRICS).write_text(json.dumps({"accuracy": accuracy, "n_test": 10}))
    return run


@pytest.fixture
def runs(tmp_path):
    return [
        fake_run(tmp_path, "zero_shot", 0, 0, 0.25),
        fake_run(tmp_path, "clip_svd", 1, 1, 0.40),
        fake_run(tmp_path, "clip_svd", 1, 2, 0.50),
        fake_run(tmp_path, "clip_svd", 2, 1, 0.70),
        fake_run(tmp_path, "clip_svd", 2, 2, 0.90),
    ]


def test_collect_reads_identity_from_the_layout(runs):
    table = collect_runs(runs)
    assert set(table.columns) >= {"dataset", "method", "setting", "shots", "seed", "accuracy"}
    row = table[(table.method == "clip_svd") & (table.shots == 2) & (table.seed == 2)].iloc[0]
    assert row.accuracy == 0.90 and row.dataset == "ds" and row.setting == "few_shot"


def test_summary_is_mean_and_sample_std_over_seeds(runs):
    table = summarise(collect_runs(runs)).set_index(["method", "shots"])
    assert table.loc[("clip_svd", 1), "mean"] == pytest.approx(0.45)
    assert table.loc[("clip_svd", 1), "std"] == pytest.approx(0.0707106781)  # sample std (n-1)
    assert table.loc[("clip_svd", 2), "n_seeds"] == 2
    assert table.loc[("zero_shot", 0), "std"] == 0.0


def test_report_files(runs, tmp_path):
    out = tmp_path / "report"
    build_report(runs, out)
    table = pd.read_csv(out / layout.REPORT_TABLE)
    assert len(table) == 3
    markdown = (out / layout.REPORT_TABLE_MD).read_text()
    assert "| ds | CLIP-SVD | few_shot | 2 | 80.00 ± 14.14 | 2 |" in markdown
    assert (out / layout.REPORT_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
