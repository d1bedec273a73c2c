"""A study that adapts a subset (one encoder, some matrices, one layer) through the workflow."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_subset_of_layers_matrices_and_one_encoder(tmp_path):
    shutil.copytree(ROOT / "config", tmp_path / "config")
    cfg = yaml.safe_load((tmp_path / "config" / "config.yaml").read_text())
    cfg.update(study="knobs", methods=["clip_svd"], shots=[2], seeds=[1])
    cfg["clip_svd"].update(encoders=["vision"], matrices=["v", "mlp"], layers=[1], epochs=5,
                           execution="recompose")
    cfg["threads"] = 2
    cfg["datasets"][0]["templates"] = ["a CT scan showing {}.", "an image showing {}"]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    env_path = f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--cores", "2", "--configfile", str(tmp_path / "study.yaml")],
        capture_output=True, text=True, env={**__import__("os").environ, "PATH": env_path,
                                             "MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 0, result.stderr[-6000:]

    run = tmp_path / "results/runs/knobs/demo_scans/clip_svd/few_shot/shots2/seed1"
    with safe_open(run / "adapter.safetensors", "pt") as adapter:
        assert sorted(adapter.keys()) == ["vision.layer1.mlp_fc", "vision.layer1.mlp_proj",
                                          "vision.layer1.v"]
    summary = json.loads((run / "train.json").read_text())
    assert summary["trainable_parameters"] == 3 * 128  # rank 128 each in mini-clip
    assert summary["cpu_threads"] == 2  # the study's threads reach the job
    log = (run / "adapt.log").read_text()
    # the MLP layers would take the factored form under auto; recompose was asked for
    assert "mlp.c_fc (512x128): recompose for" in log and "factored for" not in log

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("knobs")
    (logged,) = [r for r in client.search_runs([experiment.experiment_id])
                 if r.data.tags.get("seed") == "1"]
    params = logged.data.params
    assert params["encoders"] == '["vision"]'
    assert params["matrices"] == '["v", "mlp"]'
    assert params["layers"] == "[1]"
    assert params["execution"] == "recompose"
    assert params["templates"] == '["a CT scan showing {}.", "an image showing {}"]'
    assert params["trainable_parameters"] == "384"
