"""The MLflow UI as clipsvd serves it: `clipsvd ui`, or `mlflow server --app-name clipsvd`.

MLflow 3.17's UI decides whether an experiment opens on its runs or on the GenAI overview by
the browser's workflow switch alone (``?workflowType=`` in the address, else the choice stored
in the browser, GenAI by default), never by the experiment's tags; and it opens a runs page
with no metric or parameter column. This app is MLflow's own server with one change to the page
it serves: a script that runs before MLflow's, which
  - makes *Model training* the switch's default in a browser that has not chosen (a choice the
    user makes on the switch is kept), and
  - the first time a browser opens the runs of an experiment that carries clipsvd's runs view
    (tracking.RUNS_VIEW), opens that view, so method, K and accuracy are on screen at the first
    click. Leaving the view (*Exit shared view*) is remembered; other experiments are untouched.
Everything else (REST API, artifacts, static files) is MLflow's, unchanged.
"""
from __future__ import annotations

import json
import os

from .tracking import RUNS_VIEW, VIEW_TAG

# MLflow's storage keys (mlflow/server/js: useLocalStorage → "<key>_v<version>").
WORKFLOW_KEY = "mlflow.workflowType_v1"
OPENED_KEY = "clipsvd.runsViewOpened."


def page_script(prefix: str = "") -> str:
    """The script put first in MLflow's page (``prefix``: the server's --static-prefix)."""
    settings = json.dumps({"workflowKey": WORKFLOW_KEY, "openedKey": OPENED_KEY,
                           "viewTag": VIEW_TAG + RUNS_VIEW, "view": RUNS_VIEW,
                           "api": f"{prefix}/ajax-api/2.0/mlflow/experiments/get"})
    return """<script>(function (s) {
  try {
    if (!localStorage.getItem(s.workflowKey))
      localStorage.setItem(s.workflowKey, JSON.stringify("machine_learning"));
  } catch (e) { return; }
  function route() {
    var m = location.hash.match(/^#\\/experiments\\/(\\d+)\\/runs(?:\\?(.*))?$/);
    if (!m) return;
    var id = m[1], query = new URLSearchParams(m[2] || "");
    if (query.has("viewStateShareKey") || localStorage.getItem(s.openedKey + id)) return;
    localStorage.setItem(s.openedKey + id, "1");
    fetch(s.api + "?experiment_id=" + id).then(function (r) { return r.json(); })
      .then(function (body) {
        var tags = (body.experiment && body.experiment.tags) || [];
        if (!tags.some(function (t) { return t.key === s.viewTag; })) return;
        query.set("viewStateShareKey", s.view);
        if (!query.has("workflowType")) query.set("workflowType", "machine_learning");
        history.replaceState(history.state, "", "#/experiments/" + id + "/runs?" + query);
        window.dispatchEvent(new PopStateEvent("popstate", {state: history.state}));
      }).catch(function () {});
  }
  ["pushState", "replaceState"].forEach(function (name) {
    var original = history[name];
    history[name] = function () {
      var result = original.apply(this, arguments);
      setTimeout(route, 0);
      return result;
    };
  });
  window.addEventListener("popstate", route);
  window.addEventListener("hashchange", route);
  route();
})(""" + settings + """);</script>"""


def inject(html: bytes, prefix: str = "") -> bytes:
    """MLflow's page with the script first in its <head> (unchanged if it has none)."""
    marker = b"<head>"
    at = html.find(marker)
    if at < 0:
        return html
    at += len(marker)
    return html[:at] + page_script(prefix).encode() + html[at:]


class InjectingApp:
    """ASGI app: MLflow's, with the page at the root (index.html) rewritten by ``inject``."""

    def __init__(self, app, prefix: str = ""):
        self.app = app
        self.prefix = prefix.rstrip("/")
        self.pages = {self.prefix + "/", self.prefix + "/index.html"} | (
            {self.prefix} if self.prefix else set())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] not in self.pages:
            await self.app(scope, receive, send)
            return
        start: dict = {}
        body = bytearray()

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if message.get("more_body"):
                    return
                headers = [(k, v) for k, v in start.get("headers", [])
                           if k.lower() != b"content-length"]
                html = any(k.lower() == b"content-type" and v.startswith(b"text/html")
                           for k, v in headers)
                content = inject(bytes(body), self.prefix) if html else bytes(body)
                headers.append((b"content-length", str(len(content)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": content})
                return
            await send(message)

        await self.app(scope, receive, capture)


def create_app():
    """The app factory the ``mlflow.app`` entry point names (MLflow's server calls it)."""
    from mlflow.server.fastapi_app import app

    return InjectingApp(app, os.environ.get("_MLFLOW_STATIC_PREFIX", ""))
