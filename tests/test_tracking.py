"""MLflow mirrors run folders: idempotent, superseding, and never failing a job."""
import json
from pathlib import Path

import mlflow
import pytest

from clipsvd import config, layout, tracking

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


STARTED = 1_700_000_000.0  # the run's work: training start to evaluation end


def make_run(root, accuracy=0.5, seed=1, shots=2, method="clip_svd", record=True):
    """A run folder as adapt and evaluate write it (run.json with the parameters, dataset
    inputs and timing that evaluate records)."""
    run = root / layout.RUN.format(study="st", dataset="ds", method=method,
                                   setting="few_shot", shots=shots, seed=seed)
    run.mkdir(parents=True, exist_ok=True)
    (run / layout.METRICS).write_text(json.dumps({"accuracy": accuracy, "ece": accuracy / 10,
                                                  "n_test": 8}))
    (run / layout.TRAIN_SUMMARY).write_text(json.dumps({
        "config": {"clip_svd": {"lr": 0.01, "matrices": ["q", "v"]}}, "total_steps": 3,
        "trainable_parameters": 42, "steps_per_second": 5.0}))
    (run / layout.TRAIN_HISTORY).write_text("step,loss,accuracy,lr\n1,2.0,0.25,0.01\n2,1.5,0.5,0.005\n3,1.0,0.75,0.0\n")
    if record:
        (run / layout.RUN_RECORD).write_text(json.dumps({
            "tags": tags(seed, shots, method),
            "params": {"dataset": "ds", "method": method, "setting": "few_shot",
                       "shots": str(shots), "seed": str(seed), "model": "tiny-clip",
                       "lr": "0.01", "matrices": '["q", "v"]', "support_size": str(4 * shots)},
            "inputs": [{"name": "ds", "context": "test", "source": "results/prepared/ds",
                        "digest": "0123456789abcdef", "profile": {"test_images": 8}},
                       {"name": f"ds K={shots} seed={seed}", "context": "training",
                        "source": "results/splits/ds/few_shot/x.json", "digest": "fedcba9876543210",
                        "profile": {"support_images": 4 * shots}}],
            "timing": {"started_at": STARTED + seed, "finished_at": STARTED + seed + 90.5}}))
    return run


def tags(seed=1, shots=2, method="clip_svd"):
    return {"study": "st", "dataset": "ds", "method": method, "setting": "few_shot",
            "shots": str(shots), "seed": str(seed), "model": "tiny-clip:random",
            "config_hash": "abc"}


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
    assert logged.data.params["lr"] == "0.01"  # shared names, no method prefix
    assert logged.data.params["matrices"] == '["q", "v"]'
    assert logged.data.params["shots"] == "2" and logged.data.params["dataset"] == "ds"
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


def test_run_carries_its_work_times_dataset_inputs_and_experiment_kind(in_tmp):
    """Start and end are training start and evaluation end from run.json (not the moment of
    logging); the store and the split file are dataset inputs; the experiment is tagged as
    model training. Catches: create_run/set_terminated without the recorded times, no
    log_inputs, an experiment created without the kind tag."""
    run = make_run(in_tmp)
    record = tracking.mirror_run(run, tags(), None, True)
    client = mlflow.MlflowClient(tracking.tracking_uri(None))
    logged = client.get_run(record["run_id"])
    assert logged.info.start_time == int((STARTED + 1) * 1000)
    assert logged.info.end_time == int((STARTED + 1 + 90.5) * 1000)
    inputs = {d.dataset.name: d for d in logged.inputs.dataset_inputs}
    assert set(inputs) == {"ds", "ds K=2 seed=1"}
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
                for name, d in inputs.items()}
    assert contexts == {"ds": "test", "ds K=2 seed=1": "training"}
    assert inputs["ds"].dataset.digest == "0123456789abcdef"
    assert json.loads(inputs["ds"].dataset.source) == {"uri": "results/prepared/ds"}
    experiment = client.get_experiment_by_name("st")
    assert experiment.tags[tracking.EXPERIMENT_KIND] == tracking.TRAINING_KIND
    assert logged.info.run_name == "clip_svd K=2 seed=1 · ds"


def test_parent_run_holds_mean_and_std_over_seeds_per_shot_count(in_tmp):
    """The parent of (dataset, method, setting) carries '<metric> K<k> mean' and 'std' over its
    children's seeds, updated as children arrive; a K with one seed has no std. Catches: no
    parent update, a population instead of a sample std, a std for a single seed."""
    for seed, accuracy in ((1, 0.5), (2, 0.7)):
        tracking.mirror_run(make_run(in_tmp, accuracy, seed=seed), tags(seed), None, True)
    tracking.mirror_run(make_run(in_tmp, 0.4, seed=1, shots=1), tags(1, shots=1), None, True)
    client = mlflow.MlflowClient(tracking.tracking_uri(None))
    experiment = client.get_experiment_by_name("st")
    (parent,) = [r for r in client.search_runs([experiment.experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    metrics = parent.data.metrics
    assert metrics["accuracy K2 mean"] == pytest.approx(0.6)
    assert metrics["accuracy K2 std"] == pytest.approx(0.1414213562)  # sample std (n - 1)
    assert metrics["ece K2 mean"] == pytest.approx(0.06)
    assert metrics["n_seeds K2"] == 2
    assert metrics["accuracy K1 mean"] == pytest.approx(0.4) and metrics["n_seeds K1"] == 1
    assert "accuracy K1 std" not in metrics
    assert parent.data.params == {"dataset": "ds", "method": "clip_svd", "setting": "few_shot"}
    assert parent.info.end_time == int((STARTED + 2 + 90.5) * 1000)  # the last child's end
    # In % to two decimals, under names the runs table does not cut.
    assert metrics["acc pct K2"] == 60.0 and metrics["sd K2"] == 14.14
    assert metrics["acc pct K1"] == 40.0 and "sd K1" not in metrics
    # Coloured as the report colours the method, parent and children alike.
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {r.data.tags[tracking.RUN_COLOR] for r in [parent, *children]} == {
        config.METHOD_COLORS["clip_svd"]}
    # The experiment's shared views: method first, then dataset and K, then those percentages;
    # the chart view's line chart of the report's curves against K.
    views = client.get_experiment(experiment.experiment_id).tags
    runs_view = json.loads(views[tracking.VIEW_TAG + tracking.RUNS_VIEW])
    assert runs_view["columnOrder"][:3] == ["params.`method`", "params.`dataset`",
                                            "params.`shots`"]
    assert {"metrics.`acc pct`", "metrics.`acc pct K1`", "metrics.`acc pct K2`",
            "metrics.`sd K2`"} <= set(runs_view["selectedColumns"])
    (chart,) = json.loads(views[tracking.VIEW_TAG + tracking.SHOTS_VIEW])["compareRunCharts"]
    assert chart["type"] == "LINE" and chart["xAxisKey"] == "step"
    assert chart["metricKey"] == tracking.CURVE_METRIC
    # A superseding result replaces its seed in the aggregate.
    tracking.mirror_run(make_run(in_tmp, 0.9, seed=2), tags(2), None, True)
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert metrics["accuracy K2 mean"] == pytest.approx(0.7) and metrics["n_seeds K2"] == 2


def test_child_runs_carry_accuracy_in_percent(in_tmp):
    record = tracking.mirror_run(make_run(in_tmp, accuracy=0.123456), tags(), None, True)
    metrics = mlflow.MlflowClient(tracking.tracking_uri(None)).get_run(record["run_id"]).data.metrics
    assert metrics["acc pct"] == 12.35 and metrics["accuracy"] == 0.123456


def write_table(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("dataset,method,setting,shots,mean,std,n_seeds\n" + "".join(
        f"ds,{method},few_shot,{shots},{mean},0,1\n" for method, shots, mean in rows))


def test_report_curves_put_zero_shot_flat_at_every_k(tmp_path):
    table = tmp_path / "accuracy.csv"
    write_table(table, [("zero_shot", 0, 0.3), ("clip_svd", 1, 0.5), ("clip_svd", 4, 0.61234)])
    assert tracking.report_curves(table) == {
        ("ds", "zero_shot", "few_shot"): {1: 30.0, 4: 30.0},
        ("ds", "clip_svd", "few_shot"): {1: 50.0, 4: 61.23}}


def test_report_logs_each_parents_curve_once_and_renews_a_changed_one(in_tmp):
    """The report puts the mean accuracy per K on each parent as a metric history (step = K).
    The same report again logs nothing; a changed one moves the children to a fresh parent
    with the new curve, so no K ever has two points. Catches: a curve logged twice, changed
    values appended to the old history, children left on a superseded parent."""
    for seed, shots in ((1, 1), (2, 1), (1, 2)):
        tracking.mirror_run(make_run(in_tmp, 0.5, seed=seed, shots=shots),
                            tags(seed, shots), None, True)
    client = mlflow.MlflowClient(tracking.tracking_uri(None))
    experiment = client.get_experiment_by_name("st").experiment_id
    report = in_tmp / "report"
    write_table(report / layout.REPORT_TABLE, [("clip_svd", 1, 0.5), ("clip_svd", 2, 0.5)])

    def parent_and_curve():
        (parent,) = client.search_runs([experiment],
                                       filter_string=f"tags.`{tracking.GROUP_KEY}` != ''")
        history = client.get_metric_history(parent.info.run_id, tracking.CURVE_METRIC)
        return parent.info.run_id, sorted((m.step, m.value) for m in history)

    tracking.mirror_report("st", report, None, True)
    first, curve = parent_and_curve()
    assert curve == [(1, 50.0), (2, 50.0)]
    tracking.mirror_report("st", report, None, True)
    assert parent_and_curve() == (first, curve)
    write_table(report / layout.REPORT_TABLE, [("clip_svd", 1, 0.5), ("clip_svd", 2, 0.75)])
    tracking.mirror_report("st", report, None, True)
    second, curve = parent_and_curve()
    assert second != first and curve == [(1, 50.0), (2, 75.0)]
    assert client.get_run(first).info.lifecycle_stage == "deleted"
    children = client.search_runs([experiment], filter_string=(
        f"tags.`mlflow.parentRunId` = '{second}' and tags.`{tracking.SUPERSEDED}` = 'false'"))
    assert len(children) == 3
    assert client.get_run(second).data.metrics["n_seeds K1"] == 2


def test_run_params_share_names_across_methods():
    """evaluate.run_params: the same identifying keys for every method, the adapter's settings
    without a method prefix, the probe's chosen C, zero-shot's seed 'none'. Catches: params only
    for adapter methods (as before), a per-method prefix, a placeholder seed 0 for zero-shot."""
    from dataclasses import asdict

    from clipsvd import config, evaluate

    cfg = config.load(ROOT / "config" / "config.yaml")
    split = {"setting": "few_shot", "shots": 2, "seed": 1, "train": ["a"] * 8, "val": ["b"] * 4,
             "test": ["c"] * 10, "classes": ["w", "x", "y", "z"]}
    keys = {"dataset", "method", "setting", "shots", "seed", "model", "pretrained", "templates",
            "logit_scale", "support_size", "val_size", "test_size", "classes"}
    for method in config.METHODS:
        summary = ({"config": {method: asdict(cfg.training(method, "demo_scans"))},
                    "total_steps": 80, "trainable_parameters": 10, "trainable_fraction": 0.1}
                   if method in config.ADAPTER_METHODS else {})
        chosen = {"C": 0.1, "c_grid": [0.1, 1.0], "max_iter": 100} if method == "linear_probe" else {}
        one = {**split, "shots": 0, "seed": 0} if method == "zero_shot" else split
        params = evaluate.run_params(cfg, "demo_scans", method, one, summary, chosen)
        assert keys <= set(params), method
        assert all(isinstance(v, str) for v in params.values())
        assert params["support_size"] == "8" and params["test_size"] == "10"
        if method == "zero_shot":
            assert params["seed"] == "none" and params["shots"] == "0"
        if method in config.ADAPTER_METHODS:
            settings = cfg.training(method, "demo_scans")
            assert {"lr", "epochs", "batch_size", "total_steps"} <= set(params)
            assert params["lr"] == str(settings.lr)
            assert hasattr(settings, "matrices") == ("matrices" in params)
        if method == "coop":
            assert params["n_ctx"] == "4" and params["optimizer"] == "sgd"
        if method == "tip_adapter_f":
            assert {"search_scale", "search_step", "lr", "epochs"} <= set(params)
        if method == "linear_probe":
            assert params["C"] == "0.1" and params["c_grid"] == "[0.1, 1.0]"
        assert not [k for k in params if "." in k]
