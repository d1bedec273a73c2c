"""Eight jobs logging at once to the default sqlite backend lose nothing."""
import json
import subprocess
import sys

import mlflow

from clipsvd import layout, tracking

N_JOBS = 8
N_STEPS = 50

WORKER = """
import json, sys
from pathlib import Path
from clipsvd import tracking
run_dir = Path(sys.argv[1]); seed = sys.argv[2]
tags = {"study": "conc", "dataset": "ds", "method": "clip_svd", "setting": "few_shot",
        "shots": "1", "seed": seed, "model": "tiny-clip:random", "config_hash": "h"}
record = tracking.mirror_run(run_dir, tags, None, True)
print(json.dumps(record))
"""


def test_eight_concurrent_writers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dirs = []
    for seed in range(N_JOBS):
        run = tmp_path / layout.RUN.format(study="conc", dataset="ds", method="clip_svd",
                                           setting="few_shot", shots=1, seed=seed)
        run.mkdir(parents=True)
        (run / layout.METRICS).write_text(json.dumps({"accuracy": seed / 10}))
        rows = "\n".join(f"{s},{1 / s},{seed / 10},0.01" for s in range(1, N_STEPS + 1))
        (run / layout.TRAIN_HISTORY).write_text("step,loss,accuracy,lr\n" + rows + "\n")
        run_dirs.append(run)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(run), str(seed)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed, run in enumerate(run_dirs)]
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        records.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["status"] == "logged" for r in records), records

    client = mlflow.MlflowClient(tracking.tracking_uri(None))
    experiment = client.get_experiment_by_name("conc")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == N_JOBS
    assert len(runs) == N_JOBS + 1, "exactly one parent run for the group"
    for run in children:
        seed = int(run.data.tags["seed"])
        assert run.data.metrics["accuracy"] == seed / 10
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, N_STEPS + 1))
        assert all(m.value == 1 / m.step for m in history)
