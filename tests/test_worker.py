"""The warm worker (clipsvd.worker): a job forked from it is the job its own interpreter runs.

Unit checks run `python -m clipsvd demo-data` through a worker of this module's own; the study
checks compare the default study run through workers with the session's reference study, whose
every job ran in its own interpreter (conftest.local_default_study, CLIPSVD_WORKER=off).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipsvd.worker import jobs_served
from conftest import workflow_env

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def _env(folder: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CLIPSVD_WORKER_DIR": str(folder),
           "CLIPSVD_WORKER_IDLE": "120"}
    env.pop("CLIPSVD_WORKER", None)
    env.pop("PYTEST_CURRENT_TEST", None)  # pytest's own, which differs between fixture and test
    return {**env, **extra}


def _clipsvd(args, env, cwd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipsvd", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300, **kwargs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(condition, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _serving(folder: Path, cwd: Path, env: dict[str, str]) -> Path:
    """The socket of the worker that serves callers with env in cwd, once it serves. The first
    demo-data job starts the worker and runs itself (a light job does not wait for the
    imports); a later one is forked from the worker."""
    before = set(folder.glob("*.sock"))
    first = _clipsvd(["demo-data", "--out", "first", "--per-class", "1"], env, cwd)
    assert first.returncode == 0, first.stderr
    assert _wait_for(lambda: set(folder.glob("*.sock")) - before, 180), "no worker came up"
    assert not jobs_served(folder, cwd)
    again = _clipsvd(["demo-data", "--out", "again", "--per-class", "1"], env, cwd)
    assert again.returncode == 0, again.stderr
    assert len(jobs_served(folder, cwd)) == 1
    return (set(folder.glob("*.sock")) - before).pop()


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> Path:
    """A worker folder whose worker is serving."""
    folder = tmp_path_factory.mktemp("module-workers")
    _serving(folder, tmp_path_factory.mktemp("first-job"), _env(folder))
    return folder


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_forked_job_has_the_callers_cwd_umask_streams_and_status(workers, tmp_path):
    """Catches: a job that writes where the worker started, with the worker's umask, prints
    into the worker's log, or whose error status the caller does not return."""
    here = tmp_path / "here"
    here.mkdir()
    done = _clipsvd(["demo-data", "--out", "data", "--per-class", "2"], _env(workers), here,
                    preexec_fn=lambda: os.umask(0o077))
    assert done.returncode == 0, done.stderr
    assert jobs_served(workers, here)
    assert "demo dataset: 8 images of 4 classes written to data" in done.stderr
    files = [p for p in (here / "data").rglob("*")]
    assert files and all(p.stat().st_mode & 0o077 == 0 for p in files), \
        sorted(oct(p.stat().st_mode) for p in files)
    own = tmp_path / "own"
    own.mkdir()
    alone = _clipsvd(["demo-data", "--out", "data", "--per-class", "2"],
                     _env(workers, CLIPSVD_WORKER="off"), own)
    assert alone.returncode == 0 and not jobs_served(workers, own)
    assert _tree(here / "data") == _tree(own / "data")

    refused = _clipsvd(["demo-data", "--per-class", "2"], _env(workers), here)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "clipsvd demo-data: error: demo-data: give --out DIR (or --config and --dataset)")
    assert len(jobs_served(workers, here)) == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_job_ends_with_its_caller(workers, tmp_path, signum):
    """SIGTERM to the caller (what Snakemake sends on Ctrl-C) is passed on to the job; a caller
    killed outright takes its job with it. Catches: a job that goes on writing after Snakemake
    has counted it as failed and removed its outputs."""
    caller = subprocess.Popen([sys.executable, "-m", "clipsvd", "demo-data", "--out", "big",
                               "--per-class", "4000", "--image-size", "128"],
                              env=_env(workers), cwd=tmp_path, stderr=subprocess.PIPE)
    assert _wait_for(lambda: jobs_served(workers, tmp_path)), "the job never reached the worker"
    job = jobs_served(workers, tmp_path)[0]
    time.sleep(1.0)
    assert _alive(job) and caller.poll() is None
    caller.send_signal(signum)
    status = caller.wait(timeout=60)
    caller.stderr.close()
    assert status == (128 + signum if signum == signal.SIGTERM else -signum)
    assert _wait_for(lambda: not _alive(job), 30), f"job {job} outlived its caller"
    assert not (tmp_path / "big").exists()  # the demo data is written atomically


def test_another_environment_gets_another_worker_and_off_gets_none(workers, tmp_path):
    """Catches: a job run by a worker that imported its modules under another setting (another
    CLIPSVD_* variable, another PYTHONPATH), and CLIPSVD_WORKER=off being ignored."""
    before = set(workers.glob("*.sock"))
    assert _serving(workers, tmp_path, _env(workers, CLIPSVD_SVD_CACHE="off")) not in before
    off = tmp_path / "off"
    off.mkdir()
    done = _clipsvd(["demo-data", "--out", "d", "--per-class", "1"],
                    _env(workers, CLIPSVD_WORKER="off", CLIPSVD_SVD_CACHE="off"), off)
    assert done.returncode == 0 and not jobs_served(workers, off)


def test_an_idle_worker_exits_and_removes_its_socket(tmp_path):
    folder = tmp_path / "workers"
    folder.mkdir()
    _serving(folder, tmp_path, _env(folder, CLIPSVD_WORKER_IDLE="5"))
    pid = int(next(folder.glob("*.pid")).read_text())
    assert _wait_for(lambda: not _alive(pid), 30)
    assert not list(folder.glob("*.sock")) and not list(folder.glob("*.pid"))


# --------------------------------------------------------------------------- whole studies

RUN_FILES = ("adapter.safetensors", "predictions.csv", "train_history.csv", "metrics.json",
             "interpret/interpret.json")


def _run_files(results: Path) -> dict[str, object]:
    """Every run's results, less the seconds they took."""
    found = {}
    for path in sorted((results / "runs").rglob("*")):
        rel = path.relative_to(results).as_posix()
        if not path.is_file() or not rel.endswith(RUN_FILES):
            continue
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            found[rel] = {k: v for k, v in data.items() if "seconds" not in k}
        else:
            found[rel] = path.read_bytes()
    return found


def _study_dir(tmp_path: Path) -> Path:
    import shutil

    work = tmp_path / "study"
    shutil.copytree(ROOT / "config", work / "config")
    return work


def _snakemake(work: Path, *extra: str) -> list[str]:
    return [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(work), "--cores", "2",
            *extra]


def _k1_seed1(runs: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in runs.items()
            if "/zero_shot/" in k or ("/shots1/" in k and "/seed1/" in k)}


@pytest.mark.slow
def test_a_study_of_forked_jobs_is_bit_identical_to_one_process_per_job(
        local_default_study, own_process_study, warm_workers):
    """The default study through warm workers gives every run's adapter, predictions, training
    history, metrics and interpretation byte for byte as the study whose every job had its own
    interpreter (its K = 1, seed 1 runs and zero-shot). Catches: state that leaks from the
    worker into its jobs (RNG states, thread counts, cached models or SVD factors)."""
    served = jobs_served(warm_workers, local_default_study)
    assert len(served) >= 50, len(served)  # nearly every job of the study (73)
    ours = _k1_seed1(_run_files(local_default_study / "results"))
    reference = _run_files(own_process_study / "results")
    assert not jobs_served(warm_workers, own_process_study)
    assert len(reference) >= 15 and ours.keys() == reference.keys()
    assert [k for k in ours if ours[k] != reference[k]] == []


@pytest.mark.slow
def test_a_study_killed_mid_run_completes_on_rerun_with_the_same_files(
        local_default_study, tmp_path):
    """Snakemake and every job killed outright (a lost node or terminal) once some runs are done
    and others are in progress; the rerun completes the study with the files of an unbroken
    one. Catches: a job forked from a worker that survives its caller and writes a partial
    output after the kill, and outputs a rerun takes as complete."""
    work = _study_dir(tmp_path)
    env = {**workflow_env(), "CLIPSVD_WORKER_DIR": str(tmp_path / "workers")}
    study = subprocess.Popen(_snakemake(work, "--config", "shots=[1,2]", "seeds=[1]"), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    runs = work / "results" / "runs"

    def some_done():
        return len(list(runs.rglob("metrics.json"))) >= 3 if runs.exists() else False

    try:
        assert _wait_for(some_done, 600), "no run finished"
    finally:
        os.killpg(study.pid, signal.SIGKILL)
        study.wait()
    jobs = jobs_served(tmp_path / "workers", work)
    assert _wait_for(lambda: not any(_alive(pid) for pid in jobs), 30)
    done_before = len(list(runs.rglob("metrics.json")))
    # What a user does after a lost node: unlock the folder (a killed Snakemake leaves its lock),
    # then rerun what was incomplete.
    unlock = subprocess.run(_snakemake(work, "--unlock"), capture_output=True, text=True, env=env)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    rerun = subprocess.run(_snakemake(work, "--config", "shots=[1,2]", "seeds=[1]",
                                      "--rerun-incomplete"),
                           capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    ours = _run_files(work / "results")
    reference = {k: v for k, v in _run_files(local_default_study / "results").items()
                 if "/zero_shot/" in k or ("/seed1/" in k and "/shots4/" not in k)}
    assert len(reference) >= 30
    assert done_before < len(list(runs.rglob("metrics.json")))
    assert ours.keys() == reference.keys()
    assert [k for k in ours if ours[k] != reference[k]] == []


def test_a_worker_outlives_the_folder_it_was_started_in(tmp_path):
    """Catches: a worker whose jobs fail once the study folder it was started from is gone
    (removed after a finished study, while the worker idles)."""
    import shutil

    folder = tmp_path / "workers"
    first = tmp_path / "first"
    first.mkdir()
    env = _env(folder)
    _serving(folder, first, env)
    shutil.rmtree(first)
    later = tmp_path / "later"
    later.mkdir()
    done = _clipsvd(["demo-data", "--out", "d", "--per-class", "1"], env, later)
    assert done.returncode == 0, done.stderr
    assert jobs_served(folder, later) and (later / "d" / "manifest.csv").is_file()
