"""Benchmark 4: wall time of the default study from an empty results/, then of the no-op rerun.

    .venv/bin/python benchmarks/demo_study.py [--cores 2]

Copies config/ into a new temporary directory (as tests/test_workflow.py does), runs
``snakemake --cores N`` there with this checkout's Snakefile, then runs it again (nothing to do).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary study folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipsvd-demo-study-"))
    shutil.copytree(ROOT / "config", work / "config")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("CLIPSVD_SVD_CACHE", None)  # the study's own results/cache/svd
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(work), "--cores", str(args.cores)]
    figures = {}
    for label in ("from empty results/", "no-op rerun"):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
        figures[label] = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"snakemake failed:\n{done.stderr[-4000:]}")
        print(f"{label}: {figures[label]:.1f} s", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"targets: full study < 300 s ({figures['from empty results/']:.0f} s), "
          f"no-op rerun < 15 s ({figures['no-op rerun']:.1f} s)")


if __name__ == "__main__":
    main()
