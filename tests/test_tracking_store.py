"""A damaged MLflow sqlite store is named as such, with what to do (issue 15, point 5)."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from clipsvd import cli, layout


def test_corrupt_mlflow_db_says_move_it_away_and_sync(tmp_path, monkeypatch, capsys):
    """results/mlflow.db overwritten with random bytes: `clipsvd sync` names the file and says
    to move it away and sync; after that, sync rebuilds the store from the run folders.
    Catches: "check that the tracking server is reachable" for a file that is no database."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / layout.RUN.format(study="st", dataset="ds", method="zero_shot",
                                       setting="few_shot", shots=0, seed=0)
    run.mkdir(parents=True)
    (run / layout.METRICS).write_text(json.dumps({"accuracy": 0.5}))
    tags = {"study": "st", "dataset": "ds", "method": "zero_shot", "setting": "few_shot",
            "shots": "0", "seed": "0", "model": "tiny-clip:random", "config_hash": "abc"}
    (run / layout.RUN_RECORD).write_text(json.dumps({"tags": tags}))
    db = tmp_path / layout.MLFLOW_DB
    db.write_bytes(os.urandom(4096))
    config = tmp_path / "st.yaml"
    config.write_text(yaml.safe_dump({"study": "st", "datasets": [
        {"name": "ds", "format": "folder", "root": "data"}]}))
    root = logging.getLogger()
    saved = list(root.handlers)

    def sync() -> tuple[int, str]:
        capsys.readouterr()
        try:
            code = cli.main(["sync", "--config", str(config)])
        finally:
            root.handlers[:] = saved
        return code, capsys.readouterr().err

    code, stderr = sync()
    assert code == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("clipsvd sync: error:")]
    assert errors == [f"clipsvd sync: error: {db.resolve()}: not a readable SQLite database "
                      "(damaged or overwritten); move it away (e.g. to mlflow.db.damaged) and "
                      "run `clipsvd sync` to rebuild the MLflow store from the run folders"]
    assert "reachable" not in stderr
    db.rename(db.with_name("mlflow.db.damaged"))
    # A new process, as the user runs it (MLflow keeps its engine on the old file in this one).
    src = str(Path(__file__).resolve().parents[1] / "src")
    result = subprocess.run([sys.executable, "-m", "clipsvd", "sync", "--config", str(config)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / layout.TRACKING_RECORD).read_text())["status"] == "logged"
