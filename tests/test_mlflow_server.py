"""The default study's MLflow store, served on 127.0.0.1 as `clipsvd ui` serves it (`mlflow
server --app-name clipsvd`): REST and UI."""
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from browser import ARTIFACTS, WebDriver, ensure_chromedriver, ensure_chromium
from clipsvd import config, tracking


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
            [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "clipsvd",
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
        "zero_shot", "linear_probe", "coop", "clip_lora", "comp_lora", "clip_svd"}
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
        if method == "coop":
            assert {"n_ctx", "ctx_init", "lr", "epochs", "optimizer"} <= set(params)
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
        if method in ("coop", "clip_lora", "comp_lora", "clip_svd"):
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


def shown(value: float) -> str:
    """How the runs table prints a metric logged as tracking.percent(value)."""
    return f"{tracking.percent(value):g}"


def on_screen(page, selector_js: str):
    """innerText of the first element the JS expression finds, if it lies inside the window."""
    return page.script(
        f"const e = {selector_js}; if (!e) return null; const r = e.getBoundingClientRect();"
        "return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth && r.top >= 0 && "
        "r.bottom <= window.innerHeight ? e.innerText.trim() : null;")


@pytest.mark.slow
def test_first_click_from_the_experiment_list_opens_the_runs_by_method_and_k(
        server, tmp_path_factory):
    """A browser that never opened this UI, at 1600 × 1000: the experiment list, a click on the
    study's experiment, and the runs page is on screen with the method column first and each
    method's mean accuracy in % per K. Screenshot: test-artifacts/mlflow_first_click.png.
    Catches: the GenAI overview (MLflow's default, whatever the experiment's tags say), a runs
    page without metric columns (MLflow's default), raw fractions, the method off-screen."""
    chromium, chromedriver = ensure_chromium(), ensure_chromedriver()
    if chromium is None or chromedriver is None:
        pytest.skip("chromium is not installed and could not be installed (apt-get install -y chromium)")
    experiment, runs = experiment_runs(server)
    with WebDriver(chromium, chromedriver, tmp_path_factory.mktemp("first-click") / "profile",
                   1600, 1000) as page:
        page.get(f"{server}/")
        link = "[...document.querySelectorAll('a')].find(a => a.innerText.trim() === 'demo')"
        assert page.wait_for(f"return Boolean({link})", 90), page.text()[-2000:]
        page.script(f"{link}.click();")
        assert page.wait_for("return location.hash.includes('/runs') && "
                             "document.querySelectorAll('[row-id]').length > 0", 90), \
            page.script("return location.href")
        page.script("const b = document.querySelector('button[data-component-id="
                    "\"mlflow.assistant.chat_panel.close\"]'); if (b) b.click();")
        header = ("[...document.querySelectorAll('[role=columnheader], .ag-header-cell')]"
                  ".find(h => h.innerText.trim() === 'method')")
        assert page.wait_for(f"return Boolean({header})", 30), page.script("return location.href")
        assert on_screen(page, header) == "method"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(ARTIFACTS / "mlflow_first_click.png")
        def at(run_id, column):  # the grid draws a row in several containers: any that has it
            return f"document.querySelector('[row-id=\"{run_id}\"] [col-id=\"{column}\"]')"

        parents = [r for r in runs if tracking.GROUP_KEY in tags_of(r)]
        checked = 0
        for parent in parents:
            run_id, method = parent["info"]["run_id"], tags_of(parent)["method"]
            assert on_screen(page, at(run_id, "params.`method`")) == method
            metrics = metrics_of(parent)
            if method == "zero_shot":
                continue
            assert on_screen(page, at(run_id, "metrics.`acc pct K1`")) == shown(
                metrics["accuracy K1 mean"]), method
            checked += 1
        assert checked == 5


def cell(page, run_id: str, column: str):
    return page.script("const c = document.querySelector(`[row-id=\"${arguments[0]}\"] "
                       "[col-id=\"${arguments[1]}\"]`); return c ? c.innerText.trim() : null;",
                       run_id, column)


@pytest.mark.slow
def test_runs_view_shows_child_accuracy_and_parent_aggregates(server, browser):
    """The experiment's runs view (a shared view clipsvd stores with it) lists the parents with
    their mean accuracy per K and, expanded, the children with their accuracy, in % to two
    decimals. Screenshots: test-artifacts/mlflow_runs.png and mlflow_run.png (one run's page).
    Catches: no metric columns (MLflow's default), parents without aggregates, fractions."""
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
    count = 0
    for run in children:
        text = cell(browser, run["info"]["run_id"], "metrics.`acc pct`")
        if text is None:  # a row outside the rendered part of the table
            continue
        assert text == shown(metrics_of(run)["accuracy"])
        count += 1
    assert count >= len(children) // 2
    parents = [r for r in runs if tracking.GROUP_KEY in tags_of(r)]
    svd = next(r for r in parents if tags_of(r)["method"] == "clip_svd")
    assert cell(browser, svd["info"]["run_id"], "metrics.`acc pct K1`") == shown(
        metrics_of(svd)["accuracy K1 mean"])
    assert cell(browser, svd["info"]["run_id"], "metrics.`sd K1`") == shown(
        metrics_of(svd)["accuracy K1 std"])
    run = next(r for r in children if tags_of(r)["method"] == "clip_svd")
    open_view(browser, f"{server}/#/experiments/{experiment['experiment_id']}/runs/"
                       f"{run['info']['run_id']}?workflowType=machine_learning",
              "return document.body.innerText.includes('support_size')")
    page = browser.text()
    assert "demo_scans" in page and "shots" in page
    browser.screenshot(ARTIFACTS / "mlflow_run.png")


@pytest.mark.slow
def test_chart_view_plots_accuracy_against_shots(server, browser, local_default_study):
    """The comparison view draws one line per method (its parent run, its own colour) through
    the report's mean accuracy (%) at each K; zero-shot flat. Screenshot:
    test-artifacts/mlflow_compare.png. Catches: a view without that chart, a line per (method,
    K), values other than the report's, no curve logged by the report."""
    experiment, runs = experiment_runs(server)
    links = tracking.ui_links(server, experiment["experiment_id"])
    ready = ("return [...document.querySelectorAll('.js-plotly-plot')].some(p => p.data && "
             "p.data.length >= 5 && p.data.every(t => t.x && t.x.length))")
    open_view(browser, links[tracking.SHOTS_VIEW], ready)
    lines = browser.script(
        "const p = [...document.querySelectorAll('.js-plotly-plot')].find(p => p.data && "
        "p.data.length >= 5);"
        "return p.data.filter(t => t.x && t.x.length).map(t => [t.name, t.x, t.y, "
        "(t.marker || {}).color]);")
    table = local_default_study / "results" / "report" / "demo" / "accuracy.csv"
    curves = tracking.report_curves(table)
    parents = {r["info"]["run_name"]: tags_of(r)["method"] for r in runs
               if tracking.GROUP_KEY in tags_of(r)}
    got, colors = {}, {}
    for name, x, y, color in lines:
        method = next(m for n, m in parents.items() if name.startswith(n[:20]))
        got[method] = dict(zip([int(v) for v in x], [round(v, 2) for v in y]))
        colors.setdefault(method, set()).add(color[:7].lower())  # its faint copy: + alpha
    # Each method its report colour (MLflow's own colours, a hash of the run id, repeat).
    assert colors == {m: {config.METHOD_COLORS[m]} for m in colors}
    want = {method: points for (_, method, _), points in curves.items()}
    assert got == want
    assert len(set(want["zero_shot"].values())) == 1 and len(want["zero_shot"]) == 3
    ARTIFACTS.mkdir(exist_ok=True)
    browser.screenshot(ARTIFACTS / "mlflow_compare.png")
