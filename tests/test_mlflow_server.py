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

from browser import ARTIFACTS, WebDriver, ensure_chromedriver, ensure_chromium, run_chromium
from clipsvd import tracking


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


def experiment_runs(server):
    experiment = get(server, "/api/2.0/mlflow/experiments/get-by-name",
                     experiment_name="demo")["experiment"]
    runs = post(server, "/api/2.0/mlflow/runs/search",
                {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})["runs"]
    return experiment, runs


def tags_of(run):
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params_of(run):
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics_of(run):
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


IDENTITY = {"dataset", "method", "setting", "shots", "seed", "model", "pretrained", "templates",
            "logit_scale", "support_size", "val_size", "test_size", "classes"}
SHARED = {"lr", "weight_decay", "batch_size", "epochs", "iterations_per_shot", "encoders",
          "layers", "matrices", "total_steps", "trainable_parameters"}


@pytest.mark.slow
def test_rest_api_serves_runs_params_and_metrics(server, local_default_study):
    experiment, runs = experiment_runs(server)
    svd = [r for r in runs if tags_of(r).get("method") == "clip_svd"
           and "mlflow.parentRunId" in tags_of(r)]
    assert {(tags_of(r)["shots"], tags_of(r)["seed"]) for r in svd} == {
        (k, s) for k in ("1", "2", "4") for s in ("1", "2")}
    run = svd[0]
    params = params_of(run)
    assert params["matrices"] == '["q", "k", "v", "out", "mlp"]'  # no "clip_svd." prefix
    metrics = metrics_of(run)
    on_disk = json.loads((local_default_study / tags_of(run)["run_dir"] / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(on_disk["accuracy"])
    history = get(server, "/api/2.0/mlflow/metrics/get-history", run_id=run["info"]["run_id"],
                  metric_key="train/loss")["metrics"]
    steps = sorted(int(m["step"]) for m in history)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 1


@pytest.mark.slow
def test_every_method_logs_the_parameters_that_compare_it(server, local_default_study):
    """Every child run, whatever its method, has the identifying parameters under one name;
    adapter runs their training settings without a method prefix; the probe its chosen C;
    each has the store (and its split, when it learns) as dataset inputs; start and end are
    its training start and evaluation end. Catches: parameters only for adapter methods,
    per-method prefixes, no dataset inputs, logging-time start/end."""
    _, runs = experiment_runs(server)
    children = [r for r in runs if "mlflow.parentRunId" in tags_of(r)]
    assert {tags_of(r)["method"] for r in children} == {
        "zero_shot", "linear_probe", "clip_lora", "comp_lora", "clip_svd"}
    for run in children:
        tags, params = tags_of(run), params_of(run)
        method = tags["method"]
        assert IDENTITY <= set(params), (method, IDENTITY - set(params))
        assert params["shots"] == tags["shots"] and params["method"] == method
        assert params["seed"] == ("none" if method == "zero_shot" else tags["seed"])
        assert not [k for k in params if k.startswith(f"{method}.")]
        if method in ("clip_lora", "comp_lora", "clip_svd"):
            assert SHARED <= set(params), (method, SHARED - set(params))
        if method in ("clip_lora", "comp_lora"):
            assert {"rank", "alpha", "dropout"} <= set(params)
        if method == "linear_probe":
            assert float(params["C"]) in json.loads(params["c_grid"])
        inputs = {d["dataset"]["name"]: {t["key"]: t["value"] for t in d.get("tags", [])}
                  for d in run.get("inputs", {}).get("dataset_inputs", [])}
        assert inputs.get("demo_scans", {}).get("mlflow.data.context") == "test"
        if method != "zero_shot":
            name = f"demo_scans K={tags['shots']} seed={tags['seed']}"
            assert inputs[name]["mlflow.data.context"] == "training"
        record = json.loads((local_default_study / tags["run_dir"] / "run.json").read_text())
        assert int(run["info"]["start_time"]) == int(record["timing"]["started_at"] * 1000)
        assert int(run["info"]["end_time"]) == int(record["timing"]["finished_at"] * 1000)
        if method in ("clip_lora", "comp_lora", "clip_svd"):
            train = json.loads((local_default_study / tags["run_dir"] / "train.json").read_text())
            assert record["timing"]["started_at"] == train["started_at"]


@pytest.mark.slow
def test_parent_runs_carry_mean_and_std_over_seeds(server):
    """Each (dataset, method, setting) parent holds '<metric> K<k> mean' and 'std' over its
    children's seeds (no std for zero-shot's single run). Catches: parents without metrics."""
    _, runs = experiment_runs(server)
    children = [r for r in runs if "mlflow.parentRunId" in tags_of(r)]
    for parent in [r for r in runs if tracking.GROUP_KEY in tags_of(r)]:
        metrics = metrics_of(parent)
        mine = [c for c in children
                if tags_of(c)["mlflow.parentRunId"] == parent["info"]["run_id"]]
        for shots in {tags_of(c)["shots"] for c in mine}:
            accuracies = [metrics_of(c)["accuracy"] for c in mine if tags_of(c)["shots"] == shots]
            assert metrics[f"n_seeds K{shots}"] == len(accuracies)
            mean = sum(accuracies) / len(accuracies)
            assert metrics[f"accuracy K{shots} mean"] == pytest.approx(mean)
            if len(accuracies) > 1:
                std = (sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1)) ** 0.5
                assert metrics[f"accuracy K{shots} std"] == pytest.approx(std)
            else:
                assert f"accuracy K{shots} std" not in metrics


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    chromium = ensure_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed and could not be installed (apt-get install -y chromium)")
    chromedriver = ensure_chromedriver()
    if chromedriver is None:
        pytest.skip("chromedriver is not installed (apt-get install -y chromium-driver)")
    with WebDriver(chromium, chromedriver, tmp_path_factory.mktemp("webdriver") / "profile",
                   1800, 1100) as page:
        yield page


def open_view(page, url: str, ready: str) -> None:
    """Load a page of the MLflow UI, wait for ``ready`` (JS), close the assistant panel."""
    page.get(url)
    assert page.wait_for(ready, 90), page.text()[-2000:]
    page.script("const b = document.querySelector("
                "'button[data-component-id=\"mlflow.assistant.chat_panel.close\"]');"
                "if (b) b.click();")


def cell(page, run_id: str, column: str):
    return page.script("const c = document.querySelector(`[row-id=\"${arguments[0]}\"] "
                       "[col-id=\"${arguments[1]}\"]`); return c ? c.innerText.trim() : null;",
                       run_id, column)


@pytest.mark.slow
def test_runs_view_shows_child_accuracy_and_parent_aggregates(server, browser):
    """The experiment's runs view (a shared view clipsvd stores with it) lists the parents with
    their mean accuracy per K and, expanded, the children with their accuracy. Screenshots:
    test-artifacts/mlflow_runs.png and mlflow_run.png (one run's page). Catches: no metric
    columns (MLflow's default), parents without aggregates, the GenAI overview."""
    experiment, runs = experiment_runs(server)
    links = tracking.ui_links(server, experiment["experiment_id"])
    # A plain link with the model-training switch opens on the runs, not the GenAI overview.
    open_view(browser, f"{server}/#/experiments/{experiment['experiment_id']}"
                       "?workflowType=machine_learning", "return location.hash.includes('/runs')")
    open_view(browser, links[tracking.RUNS_VIEW],
              "return document.querySelectorAll('[row-id]').length > 0")
    browser.script("document.querySelectorAll('button[data-component-id$=\"runnamecellrenderer"
                   ".tsx_46\"]').forEach(b => b.click());")
    children = [r for r in runs if "mlflow.parentRunId" in tags_of(r)]
    assert browser.wait_for("return document.querySelectorAll('[row-id]').length >= arguments[0]",
                            60, len(children))
    ARTIFACTS.mkdir(exist_ok=True)
    browser.screenshot(ARTIFACTS / "mlflow_runs.png")
    shown = 0
    for run in children:
        text = cell(browser, run["info"]["run_id"], "metrics.`accuracy`")
        if text is None:  # a row outside the rendered part of the table
            continue
        assert float(text) == pytest.approx(metrics_of(run)["accuracy"], abs=1e-6)
        shown += 1
    assert shown >= len(children) // 2
    parents = [r for r in runs if tracking.GROUP_KEY in tags_of(r)]
    svd = next(r for r in parents if tags_of(r)["method"] == "clip_svd")
    text = cell(browser, svd["info"]["run_id"], "metrics.`accuracy K1 mean`")
    assert float(text) == pytest.approx(metrics_of(svd)["accuracy K1 mean"], abs=1e-6)
    run = next(r for r in children if tags_of(r)["method"] == "clip_svd")
    open_view(browser, f"{server}/#/experiments/{experiment['experiment_id']}/runs/"
                       f"{run['info']['run_id']}?workflowType=machine_learning",
              "return document.body.innerText.includes('support_size')")
    page = browser.text()
    assert "demo_scans" in page and "shots" in page
    browser.screenshot(ARTIFACTS / "mlflow_run.png")


@pytest.mark.slow
def test_chart_view_plots_accuracy_against_shots(server, browser):
    """The comparison view (runs grouped by method and shots, averaged over seeds) plots
    accuracy against shots: one point per (method, K) at the mean accuracy of its seeds.
    Screenshot: test-artifacts/mlflow_compare.png. Catches: a view without that chart, the
    chart on another axis, averages that are not over the seeds."""
    experiment, runs = experiment_runs(server)
    links = tracking.ui_links(server, experiment["experiment_id"])
    ready = ("return [...document.querySelectorAll('.js-plotly-plot')].some(p => p.layout && "
             "p.layout.xaxis && JSON.stringify(p.layout.xaxis.title || '').includes('shots'))")
    open_view(browser, links[tracking.SHOTS_VIEW], ready)
    points = browser.script(
        "const p = [...document.querySelectorAll('.js-plotly-plot')].find(p => "
        "JSON.stringify(p.layout.xaxis.title || '').includes('shots'));"
        "return p.data.flatMap(t => t.x.map((x, i) => [x, t.y[i]]));")
    expected = {}
    for run in runs:
        tags = tags_of(run)
        if "mlflow.parentRunId" in tags:
            expected.setdefault((tags["method"], int(tags["shots"])), []).append(
                metrics_of(run)["accuracy"])
    want = sorted((k, round(sum(v) / len(v), 6)) for (_, k), v in expected.items())
    got = sorted((int(x), round(y, 6)) for x, y in points if x is not None)
    assert got == want
    ARTIFACTS.mkdir(exist_ok=True)
    browser.screenshot(ARTIFACTS / "mlflow_compare.png")
