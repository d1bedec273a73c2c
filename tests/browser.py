"""Headless Debian Chromium for the tests that look at pages (the HTML report, the MLflow UI).

``run_chromium`` loads one page (DOM dump, screenshot); ``WebDriver`` drives a page through
chromedriver's W3C WebDriver HTTP API (plain JSON over HTTP, no client package), for pages that
must be clicked or waited on, such as MLflow's runs table and compare view.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _apt_install(*packages: str) -> None:
    """apt-get install, when running as root on Debian; a failure leaves the caller's skip."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", *packages], capture_output=True, env=env,
                   timeout=900)


def ensure_chromium() -> str | None:
    """Debian's chromium; installed with apt-get when missing and running as root, with its
    driver in the same apt run (the WebDriver tests need it next)."""
    if find_chromium() is None:
        _apt_install("chromium", "chromium-driver")
    return find_chromium()


def find_chromedriver() -> str | None:
    for candidate in (shutil.which("chromedriver"), "/usr/lib/chromium/chromedriver"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def ensure_chromedriver() -> str | None:
    """Debian's chromium-driver, a package of its own: a machine may have chromium without it."""
    if find_chromedriver() is None:
        _apt_install("chromium-driver")
    return find_chromedriver()


def run_chromium(chromium: str, profile: Path, *args: str, timeout: int = 120):
    """Chromium headless with no background networking (this machine has no internet)."""
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebDriver:
    """One headless Chromium session through chromedriver; use as a context manager."""

    def __init__(self, chromium: str, chromedriver: str, profile: Path,
                 width: int = 1600, height: int = 1000):
        self.port = _free_port()
        self._log = open(Path(profile).with_suffix(".chromedriver.log"), "w")
        self._process = subprocess.Popen([chromedriver, f"--port={self.port}"],
                                         stdout=self._log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", "/status")
                break
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.close()
                    raise RuntimeError("chromedriver did not start")
                time.sleep(0.2)
        capabilities = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                     f"--window-size={width},{height}"]}}
        session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = session["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"WebDriver {method} {path}: {error.read()[:2000]!r}") from None

    def _session_call(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self._session_call("POST", "/url", {"url": url})

    def script(self, source: str, *args):
        """Run JavaScript in the page (the body of a function; ``arguments`` holds args)."""
        return self._session_call("POST", "/execute/sync", {"script": source, "args": list(args)})

    def wait_for(self, source: str, timeout: float = 60, *args):
        """Poll a JavaScript expression (function body returning a value) until it is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.script(source, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                return value
            time.sleep(0.5)

    def text(self) -> str:
        return self.script("return document.body ? document.body.innerText : '';")

    def screenshot(self, path: Path) -> None:
        png = base64.b64decode(self._session_call("GET", "/screenshot"))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(png)

    def close(self) -> None:
        try:
            if getattr(self, "session", None):
                self._call("DELETE", f"/session/{self.session}")
        except (OSError, RuntimeError):
            pass
        finally:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._log.close()

    def __enter__(self) -> "WebDriver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
