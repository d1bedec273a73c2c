"""The page clipsvd's MLflow app serves: MLflow's, with clipsvd's script first."""
import asyncio

import pytest

from clipsvd import mlflow_ui, tracking

PAGE = b"<!doctype html><html><head><title>MLflow</title></head><body></body></html>"


def serve(app, path, method="GET"):
    """One request through an ASGI app; returns (status, headers, body)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": path, "headers": []},
                    receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def mlflow_like(content_type=b"text/html; charset=utf-8", body=PAGE):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
        half = len(body) // 2  # in two parts, as a streamed response comes
        await send({"type": "http.response.body", "body": body[:half], "more_body": True})
        await send({"type": "http.response.body", "body": body[half:]})
    return app


@pytest.mark.parametrize("prefix", ["", "/mlflow"])
def test_the_page_gets_the_script_first_in_its_head(prefix):
    app = mlflow_ui.InjectingApp(mlflow_like(), prefix)
    status, headers, body = serve(app, f"{prefix}/")
    script = mlflow_ui.page_script(prefix).encode()
    assert status == 200 and body == PAGE.replace(b"<head>", b"<head>" + script)
    assert int(headers[b"content-length"]) == len(body)
    assert f'"{prefix}/ajax-api/2.0/mlflow/experiments/get"'.encode() in script


def test_everything_else_is_mlflows_unchanged():
    app = mlflow_ui.InjectingApp(mlflow_like(), "")
    assert serve(app, "/static-files/static/js/main.js")[2] == PAGE
    assert serve(app, "/", method="HEAD")[2] == PAGE
    assert serve(mlflow_ui.InjectingApp(mlflow_like(b"application/json"), ""), "/")[2] == PAGE


def test_the_script_names_mlflows_keys_and_clipsvds_view():
    """The switch's storage key and the shared-view parameter are those the installed MLflow's
    bundle reads, the view the one tracking stores. Catches: a renamed view, an MLflow whose
    UI keeps its switch under another key."""
    from pathlib import Path

    import mlflow.server

    bundle = "".join(p.read_text(errors="replace") for p in
                     (Path(mlflow.server.__file__).parent / "js/build/static/js").glob("main.*.js"))
    assert 'key:"mlflow.workflowType",version:1' in bundle
    assert "viewStateShareKey" in bundle and "mlflow.sharedViewState." in bundle
    assert mlflow_ui.WORKFLOW_KEY == "mlflow.workflowType_v1"
    script = mlflow_ui.page_script()
    assert '"mlflow.workflowType_v1"' in script and "viewStateShareKey" in script
    assert f'"{tracking.VIEW_TAG}{tracking.RUNS_VIEW}"' in script
    assert f'"view": "{tracking.RUNS_VIEW}"' in script


def test_mlflow_finds_the_app_by_its_entry_point():
    from importlib.metadata import entry_points

    (point,) = [e for e in entry_points(group="mlflow.app") if e.name == "clipsvd"]
    assert point.load() is mlflow_ui.create_app
