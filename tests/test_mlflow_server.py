"""The default study's MLflow store, served by `mlflow server` on 127.0.0.1: REST and UI."""
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from browser import ARTIFACTS, ensure_chromium, run_chromium


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(base, path, **query):
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def post(base, path, body):
    request = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(local_default_study, tmp_path_factory):
    results = local_default_study / "results"
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server",
             "--backend-store-uri", f"sqlite:///{results / 'mlflow.db'}",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=handle, stderr=subprocess.STDOUT, cwd=local_default_study)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_rest_api_serves_runs_params_and_metrics(server, local_default_study):
    experiment = get(server, "/api/2.0/mlflow/experiments/get-by-name",
                     experiment_name="demo")["experiment"]
    runs = post(server, "/api/2.0/mlflow/runs/search",
                {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})["runs"]

    def tags(run):
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    svd = [r for r in runs if tags(r).get("method") == "clip_svd"
           and "mlflow.parentRunId" in tags(r)]
    assert {(tags(r)["shots"], tags(r)["seed"]) for r in svd} == {
        (k, s) for k in ("1", "2", "4") for s in ("1", "2")}
    run = svd[0]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["clip_svd.matrices"] == '["q", "k", "v", "out", "mlp"]'
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    on_disk = json.loads((local_default_study / tags(run)["run_dir"] / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(on_disk["accuracy"])
    history = get(server, "/api/2.0/mlflow/metrics/get-history", run_id=run["info"]["run_id"],
                  metric_key="train/loss")["metrics"]
    steps = sorted(int(m["step"]) for m in history)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 1


@pytest.mark.slow
def test_experiment_page_shows_the_runs_in_chromium(server, tmp_path):
    chromium = ensure_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed and could not be installed (apt-get install -y chromium)")
    experiment = get(server, "/api/2.0/mlflow/experiments/get-by-name",
                     experiment_name="demo")["experiment"]
    url = f"{server}/#/experiments/{experiment['experiment_id']}/runs"
    dom = run_chromium(chromium, tmp_path / "profile", "--virtual-time-budget=30000",
                       "--window-size=1600,1000", "--dump-dom", url, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # Parent runs are named "<dataset> · <method> · <setting>"; the UI lists them.
    assert "demo_scans · clip_svd · few_shot" in dom.stdout, dom.stdout[-3000:]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow_experiment.png"
    result = run_chromium(chromium, tmp_path / "profile2", "--virtual-time-budget=30000",
                          "--window-size=1600,1000", f"--screenshot={shot}", url, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
