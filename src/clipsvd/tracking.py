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


def tracking_uri(configured: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite store under results/."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str(Path(layout.MLFLOW_DB).resolve())


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


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def _experiment_id(client, study: str) -> str:
    experiment = client.get_experiment_by_name(study)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    artifacts = Path(layout.MLFLOW_ARTIFACTS).resolve() / study
    return client.create_experiment(study, artifact_location=artifacts.as_uri())


def _supersede(client, run_id: str) -> None:
    client.set_tag(run_id, SUPERSEDED, "true")
    client.delete_run(run_id)


def _parent_run(client, experiment_id: str, tags: dict[str, str]) -> str:
    group = "/".join(tags[k] for k in ("dataset", "method", "setting"))
    found = client.search_runs([experiment_id], filter_string=f"tags.`{GROUP_KEY}` = '{group}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=group.replace("/", " · "),
                            tags={GROUP_KEY: group, **{k: tags[k] for k in
                                  ("study", "dataset", "method", "setting", "model")}})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


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


def log_run_folder(run_dir: Path, tags: dict[str, str], uri: str,
                   extra_artifacts: tuple[Path, ...] = ()) -> tuple[str, bool]:
    """Log one finished run folder to MLflow; returns (run id, whether it was created now)."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    metrics = read_json(run_dir / layout.METRICS)
    summary_path = run_dir / layout.TRAIN_SUMMARY
    summary = read_json(summary_path) if summary_path.exists() else {}
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
        parent = _parent_run(client, experiment_id, tags)
        name = f"{tags['method']} K={tags['shots']} seed={tags['seed']}"
        run = client.create_run(experiment_id, run_name=name, tags={
            **tags, RUN_KEY: run_key, CONTENT: content, SUPERSEDED: "false",
            "mlflow.parentRunId": parent, "run_dir": str(run_dir)})
        run_id = run.info.run_id
        try:
            params: dict[str, str] = {}
            _flatten("", summary.get("config", {}), params)
            for key in ("trainable_parameters", "trainable_fraction", "total_steps", "device"):
                if key in summary:
                    params[key] = str(summary[key])
            timestamp = int(run.info.start_time)
            history = [
                Metric(f"train/{name}", row[name], timestamp, int(row["step"]))
                for row in _history(run_dir / layout.TRAIN_HISTORY)
                for name in row if name != "step"
            ]
            final = [Metric(k, float(v), timestamp, 0) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)]
            for key in ("steps_per_second", "train_seconds", "loader_fraction",
                        "peak_memory_mb"):
                if key in summary:
                    final.append(Metric(f"train/{key}", float(summary[key]), timestamp, 0))
            param_list = [Param(k[:250], v[:6000]) for k, v in sorted(params.items())]
            for start in range(0, max(len(history), 1), 900):
                client.log_batch(run_id, metrics=history[start:start + 900],
                                 params=param_list if start == 0 else [],
                                 tags=[RunTag("config_hash", tags.get("config_hash", ""))])
            client.log_batch(run_id, metrics=final)
            for path in [*sorted(p for p in run_dir.iterdir() if p.is_file()
                                 and not p.name.startswith(".")), *extra_artifacts]:
                if path.name != layout.TRACKING_RECORD and path.exists():
                    client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, "FINISHED")
        except Exception:
            client.set_terminated(run_id, "FAILED")
            _supersede(client, run_id)
            raise
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
            log.warning("MLflow was skipped for %s (%s: %s); the results on disk are complete, "
                        "`clipsvd sync` logs them later", run_dir, type(exc).__name__, exc)
            record = {"status": "skipped", "tracking_uri": resolved,
                      "reason": f"{type(exc).__name__}: {exc}"}
    write_json(run_dir / layout.TRACKING_RECORD, record)
    return record


def sync(study: str, uri: str | None) -> dict[str, int]:
    """Bring MLflow up to date from results/: log what it lacks, leave what it has."""
    root = Path(layout.RESULTS) / "runs" / study
    counts = {"logged": 0, "present": 0, "skipped": 0}
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
    log.info("MLflow sync of study '%s': %d logged, %d already present, %d skipped", study,
             counts["logged"], counts["present"], counts["skipped"])
    if counts["skipped"]:
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


def mirror_report(study: str, report_dir: Path, uri: str | None, enabled: bool) -> dict[str, Any]:
    """Log the report folder to a study-level MLflow run (older report runs are superseded)."""
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
        return {"status": "logged", "run_id": run.info.run_id, "tracking_uri": resolved}
    except Exception as exc:  # noqa: BLE001 - the report on disk is what matters
        log.warning("MLflow was skipped for the report (%s: %s)", type(exc).__name__, exc)
        return {"status": "skipped", "tracking_uri": resolved, "reason": f"{type(exc).__name__}: {exc}"}
