"""Benchmark 4: the default study's wall time against the compute it does, from an empty results/.

    .venv/bin/python benchmarks/demo_study.py [--cores 2] [--modes worker own-process]
    .venv/bin/python benchmarks/demo_study.py --modes worker --without coop

For each mode, copies config/ into a new temporary directory (as tests/test_workflow.py does),
runs ``snakemake --cores N`` there with this checkout's Snakefile, then runs it again (nothing
to do). ``worker``: the jobs are forked from a warm worker (clipsvd.worker), started cold for
the run in a folder of its own so no earlier worker helps; ``own-process``: CLIPSVD_WORKER=off,
every job its own interpreter, as before issue 18. ``--without M ...``: the worker mode also
run with those methods left out of the study (``--config methods=[...]``), right after, and the
ratio of the two wall times printed: what adding the methods costs the whole study.

Compute is what the jobs' work measured itself (clipsvd.timing: training loops, evaluation
loops, interpretation, preparation, features, report, demo data), read from the last line of
every job's log; job time is each job's own wall time from its start to that line. Their
difference, per step, is the fixed cost a job pays: start-up, imports, model construction,
tracking, plotting.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
LINE = re.compile(r"clipsvd (?P<command>[\w-]+): job time (?P<job>[\d.]+) s; "
                  r"compute (?P<compute>[\d.]+) s")


def job_times(results: Path) -> dict[str, list[tuple[float, float]]]:
    """(job seconds, compute seconds) of every job, by subcommand, from the jobs' logs."""
    found: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for log in results.rglob("*.log"):
        if "mlartifacts" in log.parts:  # MLflow's copies of the same logs
            continue
        for match in LINE.finditer(log.read_text(errors="replace")):
            found[match["command"]].append((float(match["job"]), float(match["compute"])))
    return found


def run_mode(mode: str, cores: int, keep: bool, methods: list[str] | None = None
             ) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"clipsvd-demo-study-{mode}-"))
    shutil.copytree(ROOT / "config", work / "config")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("CLIPSVD_SVD_CACHE", "MLFLOW_TRACKING_URI", "CLIPSVD_WORKER"):
        env.pop(name, None)  # the study's own results/cache/svd and results/mlflow.db
    if mode == "own-process":
        env["CLIPSVD_WORKER"] = "off"
    else:
        env["CLIPSVD_WORKER_DIR"] = str(work / "workers")  # a cold worker of its own
    title = mode if methods is None else f"{mode}, methods {','.join(methods)}"
    command = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(work), "--cores", str(cores)]
    if methods is not None:
        command += ["--config", f"methods=[{','.join(methods)}]"]
    figures = {}
    for label in ("study", "no-op rerun"):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
        figures[label] = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"snakemake failed ({mode}):\n{done.stderr[-4000:]}")
    jobs = job_times(work / "results")
    figures["compute"] = sum(c for rows in jobs.values() for _, c in rows)
    figures["job time"] = sum(j for rows in jobs.values() for j, _ in rows)
    figures["jobs"] = sum(len(rows) for rows in jobs.values())
    print(f"\n{title}: {figures['jobs']} jobs, study {figures['study']:.1f} s wall, compute "
          f"{figures['compute']:.1f} s, wall / compute {figures['study'] / figures['compute']:.2f}"
          f"; no-op rerun {figures['no-op rerun']:.1f} s")
    print(f"  {'step':<10} {'jobs':>4} {'job s':>8} {'compute s':>10} {'fixed s/job':>12}")
    for command, rows in sorted(jobs.items()):
        job, compute = sum(j for j, _ in rows), sum(c for _, c in rows)
        print(f"  {command:<10} {len(rows):>4} {job:>8.1f} {compute:>10.1f} "
              f"{(job - compute) / len(rows):>12.2f}")
    if keep:
        print(f"  kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["worker", "own-process"],
                        choices=["worker", "own-process"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary study folders")
    parser.add_argument("--without", nargs="+", metavar="METHOD",
                        help="also run the worker mode without these methods; print the ratio")
    args = parser.parse_args()
    figures = {mode: run_mode(mode, args.cores, args.keep) for mode in args.modes}
    if args.without:
        sys.path.insert(0, str(ROOT / "src"))
        from clipsvd import config

        listed = config.load(ROOT / "config" / "config.yaml").methods
        unknown = sorted(set(args.without) - set(listed))
        if unknown:
            raise SystemExit(f"--without: {', '.join(unknown)} not in config/config.yaml's methods")
        fewer = run_mode("worker", args.cores, args.keep,
                         [m for m in listed if m not in args.without])
        full = figures.get("worker") or run_mode("worker", args.cores, args.keep)
        print(f"\nwith / without {', '.join(args.without)}: study wall "
              f"{full['study'] / fewer['study']:.2f} x ({full['study']:.1f} s / "
              f"{fewer['study']:.1f} s), compute {full['compute'] / fewer['compute']:.2f} x")
    if "worker" in figures:
        w = figures["worker"]
        print(f"\ntargets (worker): study <= 3 x compute ({w['study'] / w['compute']:.2f} x), "
              f"study < 90 s ({w['study']:.0f} s), no-op rerun < 5 s ({w['no-op rerun']:.1f} s)")
    if len(figures) == 2:
        print(f"own-process / worker wall time: "
              f"{figures['own-process']['study'] / figures['worker']['study']:.2f}")


if __name__ == "__main__":
    main()
