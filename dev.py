#!/usr/bin/env python3
"""Set up the project's virtual environment when needed, then run the study or the tests.

    python3 dev.py study [snakemake options]   # the default study (config/config.yaml)
    python3 dev.py test  [pytest options]      # the whole test suite

Only the standard library is used here, so this works on a machine with nothing but Python.
The environment (.venv) is rebuilt when pyproject.toml or constraints.txt change.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".clipsvd-installed"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def _requirements_digest() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_environment() -> None:
    wanted = _requirements_digest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    if not (BIN / "python").exists():
        print(f"[dev] creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    log_path = VENV / "pip-install.log"
    print(f"[dev] installing clipsvd and its dependencies (a few minutes the first time; "
          f"log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        result = subprocess.run(
            [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check",
             "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[test]"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    if result.returncode != 0:
        print(log_path.read_text()[-5000:], file=sys.stderr)
        sys.exit(f"[dev] pip install failed (exit {result.returncode}); full log: {log_path}")
    STAMP.write_text(wanted + "\n")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV)
    return env


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"study", "test"}:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_environment()
    if command == "study":
        cores = str(os.cpu_count() or 1)
        cmd = [str(BIN / "snakemake"), "--cores", cores, *rest]
    else:
        cmd = [str(BIN / "python"), "-m", "pytest", *rest]
    return subprocess.run(cmd, cwd=ROOT, env=_env()).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
