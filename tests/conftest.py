"""Shared fixtures."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Any skip not listed in tests/allowed_skips.py fails the run (issue 21: no silent skips in CI).
from allowed_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def workflow_env() -> dict[str, str]:
    """The environment the workflow's rules need: this venv's python first on PATH, no
    MLflow server from the caller's shell, no GPU-slot switches from the caller's shell."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("MLFLOW_TRACKING_URI", "CLIPSVD_FAKE_GPUS", "CLIPSVD_GPU_LOCK_DIR", "CLIPSVD_WORKER",
                 "CLIPSVD_GPU_SLOTS"):
        env.pop(name, None)
    return env


FAKE_GPUS = 2


@pytest.fixture(scope="session", autouse=True)
def warm_workers(tmp_path_factory):
    """The suite's warm workers (clipsvd.worker) live in a folder of its own and are stopped at
    its end, so no test meets a worker of the developer's shell and none outlives the run."""
    import signal

    folder = tmp_path_factory.mktemp("workers")
    saved = os.environ.get("CLIPSVD_WORKER_DIR")
    os.environ["CLIPSVD_WORKER_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("CLIPSVD_WORKER_DIR", None)
    else:
        os.environ["CLIPSVD_WORKER_DIR"] = saved
    for pid_file in Path(folder).glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def _run_default_study(workdir: Path, env: dict[str, str], *options: str) -> Path:
    shutil.copytree(ROOT / "config", workdir / "config")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
         "--directory", str(workdir), *options], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise AssertionError(f"local run of the default study failed:\n{result.stdout[-3000:]}"
                             f"\n{result.stderr[-6000:]}")
    return workdir


@pytest.fixture(scope="session")
def local_default_study(tmp_path_factory) -> Path:
    """The default study (config/) run once locally; read-only for the tests that use it.

    One run serves three checks, to keep the suite's time down: the study's own outputs
    (tests/test_workflow.py), GPU slots on a fake two-GPU machine (`--cores 4 --resources
    gpu=2` with CLIPSVD_FAKE_GPUS=2, tests/test_devices.py) and the reference that the SLURM
    run must reproduce (tests/test_slurm.py). Every rule job gets the same threads as under
    `--cores 2` (no rule asks for more than 2), so the results are those of a `--cores 2` run;
    fake GPUs compute on the CPU. Its jobs are forked from warm workers (clipsvd.worker) in the
    session's worker folder.
    """
    env = {**workflow_env(), "CLIPSVD_FAKE_GPUS": str(FAKE_GPUS)}
    return _run_default_study(tmp_path_factory.mktemp("local-default-study"), env,
                              "--cores", "4", "--resources", f"gpu={FAKE_GPUS}")


@pytest.fixture(scope="session")
def own_process_study(tmp_path_factory) -> Path:
    """The default study's K = 1, seed 1 runs (and zero-shot) with every job in its own
    interpreter (CLIPSVD_WORKER=off), at `--cores 2`: the reference the forked jobs of
    local_default_study must reproduce byte for byte (tests/test_worker.py), and jobs whose
    memory Snakemake's benchmark files measure (tests/test_job_resources.py)."""
    env = {**workflow_env(), "CLIPSVD_WORKER": "off"}
    return _run_default_study(tmp_path_factory.mktemp("own-process-study"), env,
                              "--cores", "2", "--config", "shots=[1]", "seeds=[1]")


@pytest.fixture
def run_cli(capsys):
    """Run `clipsvd ...` in this process; returns (exit code, stderr). The root logger's
    handlers (which the CLI replaces) are put back afterwards."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            from clipsvd import cli

            code = cli.main([str(a) for a in argv])
        finally:
            for handler in root.handlers:
                if handler not in saved:
                    handler.close()
            root.handlers[:] = saved
            root.setLevel(level)
        return code, capsys.readouterr().err

    return run
