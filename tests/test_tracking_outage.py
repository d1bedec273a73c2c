"""A study run while the tracking server is down completes; `clipsvd sync` catches MLflow up."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_study_with_dead_tracking_server_then_sync(tmp_path):
    shutil.copytree(ROOT / "config", tmp_path / "config")
    cfg = yaml.safe_load((tmp_path / "config" / "config.yaml").read_text())
    cfg.update(study="outage", methods=["zero_shot", "clip_svd"], shots=[1], seeds=[1])
    cfg["clip_svd"]["epochs"] = 3
    cfg["interpret"] = {"enabled": False}
    cfg["tracking"] = {"uri": "http://127.0.0.1:9"}  # nothing listens there
    (tmp_path / "down.yaml").write_text(yaml.safe_dump(cfg))
    cfg["tracking"] = {"uri": None}  # the default sqlite store, reachable again
    (tmp_path / "up.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = subprocess.run([str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "--directory",
                          str(tmp_path), "--cores", "2", "--configfile", str(tmp_path / "down.yaml")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-5000:]
    runs = sorted((tmp_path / "results" / "runs" / "outage").glob("*/*/*/shots*/seed*"))
    assert len(runs) == 2
    for folder in runs:
        assert json.loads((folder / "metrics.json").read_text())["accuracy"] >= 0
        record = json.loads((folder / "mlflow.json").read_text())
        assert record["status"] == "skipped"
        # skipped because the server was down, not because of an error of the job's own
        assert record["reason"].startswith("MlflowException: API request to "
                                           "http://127.0.0.1:9/api/"), record
        assert "Connection refused" in record["reason"], record
    assert (tmp_path / "results" / "report" / "outage" / "accuracy.csv").exists()

    def sync():
        done = subprocess.run([str(BIN / "python"), "-m", "clipsvd", "sync", "--config",
                               str(tmp_path / "up.yaml")], cwd=tmp_path, capture_output=True,
                              text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    assert "2 logged, 0 already present" in sync()
    assert "0 logged, 2 already present" in sync()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("outage")
    children = [r for r in client.search_runs([experiment.experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["method"] for r in children) == ["clip_svd", "zero_shot"]
