"""MLflow mirrors run folders: idempotent, superseding, and never failing a job."""
import json

import mlflow
import pytest

from clipsvd import layout, tracking


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def make_run(root, accuracy=0.5, seed=1):
    run = root / layout.RUN.format(study="st", dataset="ds", method="clip_svd",
                                   setting="few_shot", shots=2, seed=seed)
    run.mkdir(parents=True, exist_ok=True)
    (run / layout.METRICS).write_text(json.dumps({"accuracy": accuracy, "n_test": 8}))
    (run / layout.TRAIN_SUMMARY).write_text(json.dumps({
        "config": {"clip_svd": {"lr": 0.01, "matrices": ["q", "v"]}}, "total_steps": 3,
        "trainable_parameters": 42, "steps_per_second": 5.0}))
    (run / layout.TRAIN_HISTORY).write_text("step,loss,accuracy,lr\n1,2.0,0.25,0.01\n2,1.5,0.5,0.005\n3,1.0,0.75,0.0\n")
    return run


def tags(seed=1):
    return {"study": "st", "dataset": "ds", "method": "clip_svd", "setting": "few_shot",
            "shots": "2", "seed": str(seed), "model": "tiny-clip:random", "config_hash": "abc"}


def test_default_uri_is_sqlite_under_results(in_tmp):
    assert tracking.tracking_uri(None) == f"sqlite:///{in_tmp / 'results' / 'mlflow.db'}"
    assert tracking.tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_logs_params_history_metrics_artifacts_once(in_tmp):
    run = make_run(in_tmp)
    uri = tracking.tracking_uri(None)
    record = tracking.mirror_run(run, tags(), None, True)
    assert record["status"] == "logged"
    client = mlflow.MlflowClient(uri)
    logged = client.get_run(record["run_id"])
    assert logged.data.params["clip_svd.lr"] == "0.01"
    assert logged.data.params["clip_svd.matrices"] == '["q", "v"]'
    assert logged.data.metrics["accuracy"] == 0.5
    assert [m.step for m in client.get_metric_history(record["run_id"], "train/loss")] == [1, 2, 3]
    assert logged.data.tags["mlflow.parentRunId"]
    names = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {layout.METRICS, layout.TRAIN_HISTORY} <= names
    # Logging the same folder again changes nothing.
    again = tracking.mirror_run(run, tags(), None, True)
    assert again["run_id"] == record["run_id"] and again["status"] == "present"
    experiment = client.get_experiment_by_name("st")
    assert len(client.search_runs([experiment.experiment_id])) == 2  # parent + child
    assert json.loads((run / layout.TRACKING_RECORD).read_text())["run_id"] == record["run_id"]


def test_changed_results_supersede_the_older_run(in_tmp):
    run = make_run(in_tmp, accuracy=0.5)
    first = tracking.mirror_run(run, tags(), None, True)["run_id"]
    make_run(in_tmp, accuracy=0.75)
    second = tracking.mirror_run(run, tags(), None, True)["run_id"]
    client = mlflow.MlflowClient(tracking.tracking_uri(None))
    assert first != second
    assert client.get_run(first).data.tags[tracking.SUPERSEDED] == "true"
    assert client.get_run(first).info.lifecycle_stage == "deleted"
    assert client.get_run(second).data.tags[tracking.SUPERSEDED] == "false"


def test_unreachable_backend_never_fails_the_job(in_tmp, monkeypatch):
    """Catches a bug in logging passing as a skip (a KeyError on a tag before the first request
    was recorded as "skipped" and passed the old status-only check)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = make_run(in_tmp)
    record = tracking.mirror_run(run, tags(), "http://127.0.0.1:9", True)
    assert record["status"] == "skipped"
    assert json.loads((run / layout.TRACKING_RECORD).read_text()) == record
    # Skipped because nothing listens there, not for any other reason (mirror_run turns every
    # exception into a skip; a bug in logging would pass a status-only check).
    assert_unreachable(record["reason"], "http://127.0.0.1:9")


def assert_unreachable(reason: str, uri: str) -> None:
    assert reason.startswith("MlflowException: API request to " + uri + "/api/"), reason
    assert "Connection refused" in reason and "\n" not in reason, reason


def test_a_skip_records_its_cause_on_one_stable_line(in_tmp, monkeypatch):
    """Any exception while logging becomes a skip (the job never fails for MLflow); the record
    names the exception and its message, without object addresses or line breaks. Catches a
    reason that is dropped, or that varies from run to run."""
    run = make_run(in_tmp)

    def broken(*args, **kwargs):
        raise ConnectionError("<urllib3.connection.HTTPConnection object at 0x7f3a2b1c9d90>:\n"
                              "  Failed to establish a new connection")

    monkeypatch.setattr(tracking, "log_run_folder", broken)
    record = tracking.mirror_run(run, tags(), "http://127.0.0.1:9", True)
    assert record == {"status": "skipped", "tracking_uri": "http://127.0.0.1:9",
                      "reason": "ConnectionError: <urllib3.connection.HTTPConnection object>: "
                                "Failed to establish a new connection"}
    monkeypatch.setattr(tracking, "log_run_folder", lambda *a, **k: {}["study"])
    assert tracking.mirror_run(run, tags(), None, True)["reason"] == "KeyError: 'study'"


def test_sync_logs_what_mlflow_lacks_once(in_tmp, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    runs = []
    for seed in (1, 2, 3):
        run = make_run(in_tmp, accuracy=seed / 10, seed=seed)
        (run / layout.RUN_RECORD).write_text(json.dumps({"tags": tags(seed)}))
        # The job ran while the tracking server was down: results complete, MLflow skipped.
        record = tracking.mirror_run(run, tags(seed), "http://127.0.0.1:9", True)
        assert record["status"] == "skipped"
        assert_unreachable(record["reason"], "http://127.0.0.1:9")
        runs.append(run)
    first = tracking.sync("st", None)
    assert first == {"logged": 3, "present": 0, "skipped": 0}
    assert tracking.sync("st", None) == {"logged": 0, "present": 3, "skipped": 0}
    client = mlflow.MlflowClient(tracking.tracking_uri(None))
    experiment = client.get_experiment_by_name("st")
    children = [r for r in client.search_runs([experiment.experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.metrics["accuracy"] for r in children) == [0.1, 0.2, 0.3]
    assert all(json.loads((r / layout.TRACKING_RECORD).read_text())["status"] == "present"
               for r in runs)


def test_sync_with_a_dead_server_says_what_to_do(in_tmp, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = make_run(in_tmp)
    (run / layout.RUN_RECORD).write_text(json.dumps({"tags": tags()}))
    with pytest.raises(tracking.ClipsvdError, match="could not be logged to http://127.0.0.1:9"):
        tracking.sync("st", "http://127.0.0.1:9")
