"""MLflow mirror of the run folders under results/.

Results on disk are the source of truth: a run folder is logged to MLflow from its files, so the
same function serves a finished job and a later re-sync, and a tracking failure never fails the
job. One experiment per study; a parent run per (dataset, method, setting) groups a child run per
(shots, seed). Re-logging a run folder whose results are unchanged does nothing; a changed one
marks the older MLflow run superseded (tag ``clipsvd.superseded=true``) and moves it to MLflow's
deleted runs, so the UI lists current results only while the old ones stay restorable.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

from . import layout
from .errors import ClipsvdError
from .io import read_json, write_json

log = logging.getLogger(__name__)

RUN_KEY = "clipsvd.run_key"
CONTENT = "clipsvd.content_hash"
SUPERSEDED = "clipsvd.superseded"
GROUP_KEY = "clipsvd.group_key"
IDENTITY = ("dataset", "method", "setting", "shots", "seed", "model")
# Summarised over seeds on each parent run, per shot count (those a run has).
HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece",
                    "base_accuracy", "novel_accuracy")
# What a researcher reads in the UI: accuracies in % to 2 decimals, under names the runs table
# does not cut (MLflow allows no '%' in a name). Children: the name below; parents per K:
# 'acc pct K<k>' (mean over seeds), 'sd K<k>' (sample std), 'n_seeds K<k>'.
PERCENT_METRICS = {"accuracy": "acc pct", "base_accuracy": "base pct",
                   "novel_accuracy": "novel pct"}
# Each parent's curve, logged from the report: its metric history is the mean accuracy (%)
# over seeds with step = K (zero-shot flat at every K), a line per method in the chart view.
CURVE_METRIC = "mean acc pct"
# The run tag MLflow's UI colours a run by (else a hash of its id): the report's colour of its
# method, so a method keeps one colour across K, runs and charts.
RUN_COLOR = "mlflow.runColor"
# The experiment tag older MLflow UIs read to open an experiment on its runs rather than on the
# GenAI overview; MLflow 3.17's UI decides by its workflow switch instead (`?workflowType=`).
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# Views of the runs page stored with the experiment (MLflow's "shared view" tags).
VIEW_TAG = "mlflow.sharedViewState."
RUNS_VIEW = "clipsvd-runs"
SHOTS_VIEW = "clipsvd-accuracy-vs-shots"


def ui_links(base: str, experiment_id: str) -> dict[str, str]:
    """Addresses of the experiment's views in the MLflow UI at ``base`` (its model-training
    side; the UI opens on the GenAI side otherwise)."""
    runs = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return {RUNS_VIEW: f"{runs}&viewStateShareKey={RUNS_VIEW}",
            SHOTS_VIEW: f"{runs}&viewStateShareKey={SHOTS_VIEW}&compareRunsMode=CHART"}


def skip_reason(exc: BaseException) -> str:
    """Why MLflow was skipped, as recorded in mlflow.json: the exception's type and message on
    one line, without object addresses, so the same failure always reads the same."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text}"[:2000]


def tracking_uri(configured: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite store under results/."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str(Path(layout.MLFLOW_DB).resolve())


def damaged_store(uri: str, reasons: tuple[str, ...] = ()) -> str | None:
    """One line saying what to do when a sqlite store exists but is not a database (or a
    failure says it is malformed); None for every other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///"))
    try:
        with open(path, "rb") as handle:
            header = handle.read(16)
    except OSError:
        return None
    malformed = any("malformed" in r or "not a database" in r for r in reasons)
    if not malformed and (not header or header == b"SQLite format 3\x00"):
        return None
    return (f"{path}: not a readable SQLite database (damaged or overwritten); move it away "
            f"(e.g. to {path.name}.damaged) and run `clipsvd sync` to rebuild the MLflow store "
            "from the run folders")


@contextlib.contextmanager
def _writer_lock(uri: str) -> Iterator[None]:
    """Serialise writers on this machine: sqlite allows one writer (and its first use runs
    schema migrations that must not race), and a parent run must not be created twice."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///")).with_suffix(".lock")
    else:
        path = Path(layout.RESULTS) / ".mlflow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _experiment_id(client, study: str) -> str:
    experiment = client.get_experiment_by_name(study)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if experiment.tags.get(EXPERIMENT_KIND) != TRAINING_KIND:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
        return experiment.experiment_id
    artifacts = Path(layout.MLFLOW_ARTIFACTS).resolve() / study
    return client.create_experiment(study, artifact_location=artifacts.as_uri(),
                                    tags={EXPERIMENT_KIND: TRAINING_KIND})


def _supersede(client, run_id: str) -> None:
    client.set_tag(run_id, SUPERSEDED, "true")
    client.delete_run(run_id)


def _color(method: str) -> dict[str, str]:
    from .config import METHOD_COLORS

    return {RUN_COLOR: METHOD_COLORS[method]} if method in METHOD_COLORS else {}


def _parent_run(client, experiment_id: str, tags: dict[str, str],
                start_time: int | None, reuse: bool = True) -> str:
    from mlflow.entities import Param

    group = "/".join(tags[k] for k in ("dataset", "method", "setting"))
    found = client.search_runs([experiment_id], filter_string=f"tags.`{GROUP_KEY}` = '{group}'",
                               max_results=1) if reuse else []
    if found:
        return found[0].info.run_id
    # The method first: the runs table cuts long names.
    run = client.create_run(experiment_id, run_name=" · ".join(
                                tags[k] for k in ("method", "setting", "dataset")),
                            start_time=start_time,
                            tags={GROUP_KEY: group, **_color(tags["method"]), **{
                                k: tags[k] for k in
                                ("study", "dataset", "method", "setting", "model")}})
    # Only what never changes for the group is a parameter (MLflow parameters are immutable).
    client.log_batch(run.info.run_id, params=[
        Param(k, tags[k]) for k in ("dataset", "method", "setting")])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _update_parent(client, experiment_id: str, parent_id: str) -> None:
    """The parent's mean and sample std over seeds of the headline metrics per shot count
    (``<metric> K<k> mean``, ``<metric> K<k> std``, ``n_seeds K<k>``: names that sort next to
    the children's ``<metric>`` columns and show K when the UI cuts them), from its current
    children; no std with a single seed. Only values that changed are logged."""
    from mlflow.entities import Metric

    children = client.search_runs(
        [experiment_id], max_results=50000,
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                      f"tags.`{SUPERSEDED}` = 'false' and attributes.status = 'FINISHED'")
    by_shots: dict[int, list] = {}
    for child in children:
        by_shots.setdefault(int(child.data.tags["shots"]), []).append(child)
    values: dict[str, float] = {}
    for shots, runs in sorted(by_shots.items()):
        values[f"n_seeds K{shots}"] = float(len(runs))
        for name in HEADLINE_METRICS:
            found = [r.data.metrics[name] for r in runs if name in r.data.metrics]
            if not found:
                continue
            values[f"{name} K{shots} mean"] = statistics.fmean(found)
            if len(found) > 1:
                values[f"{name} K{shots} std"] = statistics.stdev(found)
            if name == "accuracy":
                values[f"acc pct K{shots}"] = percent(values[f"{name} K{shots} mean"])
                if len(found) > 1:
                    values[f"sd K{shots}"] = percent(values[f"{name} K{shots} std"])
    parent = client.get_run(parent_id)
    now = int(time.time() * 1000)
    changed = [Metric(k, v, now, 0) for k, v in sorted(values.items())
               if parent.data.metrics.get(k) != v]
    if changed:
        client.log_batch(parent_id, metrics=changed)
    ends = [c.info.end_time for c in children if c.info.end_time]
    client.set_terminated(parent_id, "FINISHED", end_time=max(ends) if ends else None)


def percent(fraction: float) -> float:
    return round(100 * fraction, 2)


def _shared_views(shots: list[int]) -> dict[str, dict[str, Any]]:
    """The experiment's ready-made views of MLflow's runs page (opened with
    ``?viewStateShareKey=<key>``; `clipsvd ui` opens RUNS_VIEW at the first click, README
    "MLflow"): RUNS_VIEW, a table whose first columns are the method, the dataset and K, then
    the children's accuracy in % and the parents' mean, std and seed count per K (a row per
    method and dataset, readable as method × K); SHOTS_VIEW, the chart view with one line per
    (dataset, method, setting): the report's mean accuracy (%) against K."""
    columns = ([f"params.`{k}`" for k in ("method", "dataset", "shots", "seed")]
               + [f"metrics.`{m}`" for m in PERCENT_METRICS.values()]
               + [f"metrics.`acc pct K{k}`" for k in shots]
               + [f"metrics.`sd K{k}`" for k in shots]
               + [f"metrics.`n_seeds K{k}`" for k in shots])
    table = {"selectedColumns": columns, "columnOrder": columns, "runsHiddenMode": "SHOW_ALL"}
    section = {"uuid": "clipsvd-accuracy-vs-shots", "name": "Accuracy against shots",
               "display": True, "isReordered": False, "deleted": False, "isGenerated": False}
    chart = {"uuid": "clipsvd-accuracy-vs-shots-chart", "type": "LINE",
             "metricSectionId": section["uuid"], "runsCountToCompare": 500, "deleted": False,
             "isGenerated": False, "metricKey": CURVE_METRIC, "selectedMetricKeys": [CURVE_METRIC],
             "displayName": "mean accuracy (%) against K (the x axis' step is K)",
             "xAxisKey": "step", "scaleType": "linear", "lineSmoothness": 0,
             "displayPoints": True}
    return {
        RUNS_VIEW: table,
        SHOTS_VIEW: {**table, "hideEmptyCharts": True, "compareRunSections": [section],
                     "compareRunCharts": [chart], "isAccordionReordered": True},
    }


def _update_views(client, experiment_id: str) -> None:
    """Write the shared views as experiment tags (again only when the shot counts changed)."""
    parents = client.search_runs([experiment_id], max_results=50000,
                                 filter_string=f"tags.`{GROUP_KEY}` != ''")
    shots = sorted({int(key.removeprefix("n_seeds K")) for run in parents
                    for key in run.data.metrics if key.startswith("n_seeds K")})
    tags = client.get_experiment(experiment_id).tags
    for key, view in _shared_views(shots).items():
        value = json.dumps(view, sort_keys=True)
        if tags.get(VIEW_TAG + key) != value:
            client.set_experiment_tag(experiment_id, VIEW_TAG + key, value)


def _history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _content_hash(run_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in (layout.METRICS, layout.ADAPTER):
        path = run_dir / name
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _milliseconds(seconds: float | None) -> int | None:
    return int(seconds * 1000) if seconds is not None else None


def _dataset_inputs(inputs: list[dict[str, Any]]) -> list:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [DatasetInput(Dataset(name=item["name"], digest=item["digest"], source_type="local",
                                 source=json.dumps({"uri": item["source"]}),
                                 profile=json.dumps(item.get("profile", {}))),
                         tags=[InputTag("mlflow.data.context", item["context"])])
            for item in inputs]


def log_run_folder(run_dir: Path, tags: dict[str, str], uri: str,
                   extra_artifacts: tuple[Path, ...] = ()) -> tuple[str, bool]:
    """Log one finished run folder to MLflow; returns (run id, whether it was created now).

    Parameters, dataset inputs and the run's start and end (its training start and evaluation
    end) come from run.json, so a later sync logs the same as the job did."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    metrics = read_json(run_dir / layout.METRICS)
    summary_path = run_dir / layout.TRAIN_SUMMARY
    summary = read_json(summary_path) if summary_path.exists() else {}
    record_path = run_dir / layout.RUN_RECORD
    record = read_json(record_path) if record_path.exists() else {}
    params = record.get("params") or {k: tags[k] for k in IDENTITY if k in tags}
    timing = record.get("timing", {})
    start_time = _milliseconds(timing.get("started_at"))
    end_time = _milliseconds(timing.get("finished_at"))
    run_key = "/".join(tags[k] for k in ("study", "dataset", "method", "setting", "shots", "seed"))
    content = _content_hash(run_dir)
    with _writer_lock(uri):
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, tags["study"])
        existing = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_KEY}` = '{run_key}' and tags.`{SUPERSEDED}` = 'false'")
        for run in existing:
            if run.data.tags.get(CONTENT) == content:
                log.info("MLflow already holds this run (%s): nothing to log", run.info.run_id)
                return run.info.run_id, False
        for run in existing:
            _supersede(client, run.info.run_id)
            log.info("MLflow run %s superseded by the new results (moved to deleted runs)",
                     run.info.run_id)
        parent = _parent_run(client, experiment_id, tags, start_time)
        name = f"{tags['method']} K={tags['shots']}"
        if tags["method"] != "zero_shot":
            name += f" seed={tags['seed']}"
        name += f" · {tags['dataset']}"
        run = client.create_run(experiment_id, run_name=name, start_time=start_time, tags={
            **tags, **_color(tags["method"]), RUN_KEY: run_key, CONTENT: content,
            SUPERSEDED: "false",
            "mlflow.parentRunId": parent, "run_dir": str(run_dir)})
        run_id = run.info.run_id
        try:
            started = int(run.info.start_time)
            history = [
                Metric(f"train/{name}", row[name], started, int(row["step"]))
                for row in _history(run_dir / layout.TRAIN_HISTORY)
                for name in row if name != "step"
            ]
            finished = end_time or started
            final = [Metric(k, float(v), finished, 0) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)]
            final += [Metric(short, percent(metrics[name]), finished, 0)
                      for name, short in PERCENT_METRICS.items() if name in metrics]
            for key in ("steps_per_second", "train_seconds", "loader_fraction",
                        "peak_memory_mb"):
                if key in summary:
                    final.append(Metric(f"train/{key}", float(summary[key]), finished, 0))
            param_list = [Param(k[:250], str(v)[:6000]) for k, v in sorted(params.items())]
            for start in range(0, max(len(history), 1), 900):
                client.log_batch(run_id, metrics=history[start:start + 900],
                                 params=param_list if start == 0 else [],
                                 tags=[RunTag("config_hash", tags.get("config_hash", ""))])
            client.log_batch(run_id, metrics=final)
            if record.get("inputs"):
                client.log_inputs(run_id, datasets=_dataset_inputs(record["inputs"]))
            for path in [*sorted(p for p in run_dir.iterdir() if p.is_file()
                                 and not p.name.startswith(".")), *extra_artifacts]:
                if path.name != layout.TRACKING_RECORD and path.exists():
                    client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, "FINISHED", end_time=end_time)
        except Exception:
            client.set_terminated(run_id, "FAILED")
            _supersede(client, run_id)
            raise
        _update_parent(client, experiment_id, parent)
        _update_views(client, experiment_id)
    return run_id, True


def mirror_run(run_dir: Path, tags: dict[str, str], uri: str | None, enabled: bool,
               extra_artifacts: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Log a run folder, never failing the job: the outcome goes to the run's mlflow.json."""
    record: dict[str, Any]
    # MLflow's own defaults retry a dead server for minutes per request; a job should not stall.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    if not enabled:
        record = {"status": "disabled"}
    else:
        resolved = tracking_uri(uri)
        try:
            run_id, created = log_run_folder(run_dir, tags, resolved, extra_artifacts)
            record = {"status": "logged" if created else "present", "run_id": run_id,
                      "tracking_uri": resolved}
        except Exception as exc:  # noqa: BLE001 - tracking must never lose a finished result
            reason = skip_reason(exc)
            log.warning("MLflow was skipped for %s (%s); the results on disk are complete, "
                        "`clipsvd sync` logs them later", run_dir,
                        damaged_store(resolved, (str(exc),)) or reason)
            record = {"status": "skipped", "tracking_uri": resolved, "reason": reason}
    write_json(run_dir / layout.TRACKING_RECORD, record)
    return record


def sync(study: str, uri: str | None) -> dict[str, int]:
    """Bring MLflow up to date from results/: log what it lacks, leave what it has."""
    root = Path(layout.RESULTS) / "runs" / study
    counts = {"logged": 0, "present": 0, "skipped": 0}
    reasons: list[str] = []
    for record_path in sorted(root.glob(f"*/*/*/shots*/seed*/{layout.RUN_RECORD}")):
        run_dir = record_path.parent
        if not (run_dir / layout.METRICS).exists():
            continue
        record = read_json(record_path)
        tags = record["tags"]
        # The split file's path is keyed by the store and sampling (clipsvd.layout); the run
        # records it. A record from before that has none: its split is not attached.
        split = record.get("provenance", {}).get("split_path")
        logs = sorted(run_dir.glob("*.log"))
        extra = tuple(p for p in ([Path(split)] if split else []) + logs if p.exists())
        result = mirror_run(run_dir, tags, uri, True, extra)
        counts[result["status"]] += 1
        reasons.append(result.get("reason", ""))
    log.info("MLflow sync of study '%s': %d logged, %d already present, %d skipped", study,
             counts["logged"], counts["present"], counts["skipped"])
    if counts["skipped"]:
        damaged = damaged_store(tracking_uri(uri), tuple(reasons))
        if damaged:
            raise ClipsvdError(damaged)
        raise ClipsvdError(f"{counts['skipped']} run(s) could not be logged to {tracking_uri(uri)}; "
                           "check that the tracking server is reachable and run `clipsvd sync` again")
    return counts


def attach_artifacts(run_dir: Path, folder: Path, enabled: bool) -> None:
    """Add a folder made after the run was logged (its interpretation) to the run's MLflow
    record; skipped with a warning when MLflow is off or unreachable."""
    record_path = run_dir / layout.TRACKING_RECORD
    record = read_json(record_path) if record_path.exists() else {}
    if not enabled or record.get("status") not in ("logged", "present"):
        return
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=record["tracking_uri"])
        client.log_artifacts(record["run_id"], str(folder), artifact_path=folder.name)
    except Exception as exc:  # noqa: BLE001 - the folder on disk is what matters
        log.warning("MLflow was skipped for %s (%s: %s)", folder, type(exc).__name__, exc)


REPORT_TAG = "clipsvd.report"


def report_curves(table: Path) -> dict[tuple[str, str, str], dict[int, float]]:
    """Mean accuracy (%) over seeds per K of every (dataset, method, setting) in the report's
    accuracy table (base-to-novel: the harmonic mean); zero-shot, which has no K, at each K of
    its dataset and setting."""
    curves: dict[tuple[str, str, str], dict[int, float]] = {}
    with open(table, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            key = (row["dataset"], row["method"], row["setting"])
            curves.setdefault(key, {})[int(row["shots"])] = percent(float(row["mean"]))
    for (dataset, method, setting), points in curves.items():
        if method == "zero_shot" and set(points) == {0}:
            shots = {k for (d, m, s), p in curves.items() if (d, s) == (dataset, setting)
                     and m != "zero_shot" for k in p}
            curves[dataset, method, setting] = {k: points[0] for k in sorted(shots) or [0]}
    return curves


def _renew_parent(client, experiment_id: str, old) -> str:
    """A fresh parent for the group of ``old``, its current children moved to it and ``old``
    superseded: MLflow cannot delete a metric's history, and a curve whose values changed
    would otherwise hold two points at one K."""
    tags = {k: v for k, v in old.data.tags.items() if not k.startswith("mlflow.")}
    new = _parent_run(client, experiment_id, tags, old.info.start_time, reuse=False)
    children = client.search_runs(
        [experiment_id], max_results=50000,
        filter_string=f"tags.`mlflow.parentRunId` = '{old.info.run_id}'")
    for child in children:
        client.set_tag(child.info.run_id, "mlflow.parentRunId", new)
    _supersede(client, old.info.run_id)
    _update_parent(client, experiment_id, new)
    return new


def _log_curves(client, experiment_id: str, table: Path) -> None:
    """Each parent's curve (CURVE_METRIC, step = K) from the report's accuracy table; a parent
    whose curve is already there is left alone, one whose values changed is renewed."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    parents = {run.data.tags[GROUP_KEY]: run for run in client.search_runs(
        [experiment_id], max_results=50000, filter_string=f"tags.`{GROUP_KEY}` != ''")}
    for (dataset, method, setting), points in sorted(report_curves(table).items()):
        found = parents.get(f"{dataset}/{method}/{setting}")
        if found is None:
            continue
        parent = found.info.run_id
        logged = {m.step: m.value for m in client.get_metric_history(parent, CURVE_METRIC)}
        if logged == points:
            continue
        if logged:
            parent = _renew_parent(client, experiment_id, found)
        client.log_batch(parent, metrics=[Metric(CURVE_METRIC, value, now, shots)
                                          for shots, value in sorted(points.items())])


def mirror_report(study: str, report_dir: Path, uri: str | None, enabled: bool) -> dict[str, Any]:
    """Log the report folder to a study-level MLflow run (older report runs are superseded)
    and each parent's accuracy-against-K curve from its accuracy table."""
    if not enabled:
        return {"status": "disabled"}
    resolved = tracking_uri(uri)
    try:
        import mlflow

        with _writer_lock(resolved):
            client = mlflow.MlflowClient(tracking_uri=resolved)
            experiment_id = _experiment_id(client, study)
            for old in client.search_runs(
                    [experiment_id], filter_string=f"tags.`{REPORT_TAG}` = 'true' and "
                                                   f"tags.`{SUPERSEDED}` = 'false'"):
                _supersede(client, old.info.run_id)
            run = client.create_run(experiment_id, run_name=f"{study} report", tags={
                REPORT_TAG: "true", SUPERSEDED: "false", "study": study})
            client.log_artifacts(run.info.run_id, str(report_dir), artifact_path="report")
            client.set_terminated(run.info.run_id, "FINISHED")
            if (report_dir / layout.REPORT_TABLE).exists():
                _log_curves(client, experiment_id, report_dir / layout.REPORT_TABLE)
        return {"status": "logged", "run_id": run.info.run_id, "tracking_uri": resolved}
    except Exception as exc:  # noqa: BLE001 - the report on disk is what matters
        reason = skip_reason(exc)
        log.warning("MLflow was skipped for the report (%s)", reason)
        return {"status": "skipped", "tracking_uri": resolved, "reason": reason}
