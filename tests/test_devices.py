"""GPU slots without a GPU: CLIPSVD_FAKE_GPUS makes the slot logic believe there are N GPUs."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from clipsvd import devices
from clipsvd.devices import SLOT_EVENT, acquire_device, autocast_dtype, claimed_gpu_slot
from clipsvd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

# A process that claims a slot, prints it, and holds it until its stdin closes or a file exists.
HOLDER = textwrap.dedent("""
    import logging, os, sys, time
    from clipsvd.devices import acquire_device, claimed_gpu_slot
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    with acquire_device("auto") as device:
        print(claimed_gpu_slot(), device, flush=True)
        release = sys.argv[1]
        while not os.path.exists(release):
            time.sleep(0.05)
""")


@pytest.fixture
def slot_env(tmp_path, monkeypatch):
    """A fresh lock dir, no SLURM job, fast polling; returns the env for subprocesses."""
    lock = tmp_path / "slots"
    for name in ("SLURM_JOB_ID", devices.SLOTS_ENV, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(lock))
    monkeypatch.setenv(devices.POLL_ENV, "0.05")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return env


def _holder(env, release: Path, fake: int) -> subprocess.Popen:
    """A process holding a slot until `release` exists; its log goes to `release`.log."""
    log = open(release.with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(release)],
                            env={**env, devices.FAKE_GPUS_ENV: str(fake)},
                            stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    return proc


def _slot_of(proc: subprocess.Popen) -> int:
    line = proc.stdout.readline()
    assert line, f"the holder exited ({proc.wait()}) without a slot"
    slot, device = line.split()
    assert device == "cpu"
    return int(slot)


def test_cpu_is_cpu_and_claims_nothing(slot_env, monkeypatch):
    monkeypatch.setenv(devices.FAKE_GPUS_ENV, "2")
    with acquire_device("cpu") as device:
        assert device == torch.device("cpu")
        assert claimed_gpu_slot() is None
    assert not Path(os.environ[devices.LOCK_DIR_ENV]).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_no_gpu_runs_on_cpu_and_says_so(slot_env, caplog):
    with caplog.at_level(logging.INFO, logger="clipsvd"):
        with acquire_device("auto") as device:
            assert device.type == "cpu"
            assert claimed_gpu_slot() is None
    assert "no GPU visible: running on the CPU" in caplog.text
    with pytest.raises(ConfigError, match="key 'device': 'cuda'"):
        with acquire_device("cuda"):
            pass


def test_fake_gpus_claim_a_slot_and_release_it(slot_env, caplog, monkeypatch):
    monkeypatch.setenv(devices.FAKE_GPUS_ENV, "2")
    with caplog.at_level(logging.INFO, logger="clipsvd"):
        with acquire_device("auto") as first:
            assert first.type == "cpu"  # fake GPUs compute on the CPU
            assert claimed_gpu_slot() == 0
        assert claimed_gpu_slot() is None
        with acquire_device("cuda"):
            assert claimed_gpu_slot() == 0  # released above, so free again
    events = [m.groupdict() for m in SLOT_EVENT.finditer(caplog.text)]
    assert [(e["event"], e["slot"], e["count"]) for e in events] == [
        ("claimed", "0", "2"), ("released", "0", "2"), ("claimed", "0", "2"),
        ("released", "0", "2")]
    assert autocast_dtype("bf16", torch.device("cpu")) is None


def test_under_slurm_the_scheduler_decides(slot_env, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv(devices.FAKE_GPUS_ENV, "2")
    with acquire_device("auto") as device:
        assert claimed_gpu_slot() is None
        assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not Path(os.environ[devices.LOCK_DIR_ENV]).exists()


def test_a_job_given_several_gpus_says_it_uses_one(slot_env, monkeypatch, caplog):
    """Under SLURM with two GPUs in the allocation the job computes on the first and warns
    that the other stays idle (CUDA itself is not touched: device count and availability are
    stand-ins). Break caught: the silent use of one GPU of several."""
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with caplog.at_level(logging.INFO, logger="clipsvd"):
        with acquire_device("auto") as device:
            assert device == torch.device("cuda")
    assert "2 GPUs are visible but a job computes on one (cuda)" in caplog.text
    assert "CLIPSVD_SLURM_GPUS=1" in caplog.text


def test_bad_device_and_fake_count_are_one_line_errors(slot_env, monkeypatch):
    with pytest.raises(ConfigError, match="key 'device'"):
        with acquire_device("gpu"):
            pass
    monkeypatch.setenv(devices.FAKE_GPUS_ENV, "two")
    with pytest.raises(ConfigError, match=devices.FAKE_GPUS_ENV):
        with acquire_device("auto"):
            pass


@pytest.mark.slow
def test_competing_processes_get_distinct_slots_and_wait(slot_env, tmp_path):
    release = tmp_path / "release"
    first, second = _holder(slot_env, release, 2), _holder(slot_env, release, 2)
    try:
        assert {_slot_of(first), _slot_of(second)} == {0, 1}
        third = _holder(slot_env, tmp_path / "release-third", 2)
        waiting_log = tmp_path / "release-third.log"
        deadline = time.monotonic() + 60
        while "all 2 GPU slots" not in waiting_log.read_text():  # both taken: it waits ...
            assert third.poll() is None and time.monotonic() < deadline, waiting_log.read_text()
            time.sleep(0.1)
        release.touch()
        assert first.wait(10) == 0 and second.wait(10) == 0
        assert _slot_of(third) in (0, 1)  # ... and gets one once they are free
        (tmp_path / "release-third").touch()
        assert third.wait(10) == 0
    finally:
        release.touch()
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow
def test_a_killed_process_frees_its_slot(slot_env, tmp_path):
    release = tmp_path / "never"
    holder = _holder(slot_env, release, 1)
    assert _slot_of(holder) == 0
    holder.send_signal(signal.SIGKILL)  # no `finally`, no atexit: only the kernel cleans up
    holder.wait(10)
    successor = _holder(slot_env, tmp_path / "release", 1)
    try:
        assert _slot_of(successor) == 0
    finally:
        (tmp_path / "release").touch()
        successor.wait(10)


# --- no two concurrent snakemake jobs on one slot ---------------------------------------------

def slot_intervals(logs: list[Path]) -> dict[int, list[tuple[float, float, str]]]:
    """(claim time, release time, log) of every slot use recorded in the jobs' logs."""
    uses: dict[int, list[tuple[float, float, str]]] = {}
    for path in logs:
        claims = {}
        for match in SLOT_EVENT.finditer(path.read_text()):
            slot, t = int(match["slot"]), float(match["t"])
            if match["event"] == "claimed":
                claims[slot] = t
            else:
                uses.setdefault(slot, []).append((claims.pop(slot), t, str(path)))
        assert not claims, f"{path}: a slot was claimed and never released"
    return uses


def assert_no_shared_slot(uses: dict[int, list[tuple[float, float, str]]]) -> None:
    for slot, intervals in uses.items():
        intervals = sorted(intervals)
        for (_, end, log_a), (start, _, log_b) in zip(intervals, intervals[1:]):
            assert end <= start, f"GPU slot {slot} held at once by {log_a} and {log_b}"


TINY_SNAKEFILE = """
rule all:
    input: expand("done/{i}.txt", i=range(6))

rule gpu_job:
    output: "done/{i}.txt"
    log: "logs/{i}.log"
    threads: 1
    resources: gpu=1
    shell: "{python} {script} {output} > {log} 2>&1"
"""

TINY_JOB = """
import logging, sys, time
from pathlib import Path
from clipsvd.devices import acquire_device, claimed_gpu_slot
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
with acquire_device("auto") as device:
    time.sleep(1.5)
    Path(sys.argv[1]).write_text(f"{claimed_gpu_slot()}\\n")
"""


@pytest.mark.slow
def test_snakemake_jobs_never_share_a_slot(slot_env, tmp_path):
    """Six gpu=1 jobs, --cores 4 --resources gpu=2, two fake GPUs: both slots used, never shared."""
    script = tmp_path / "job.py"
    script.write_text(TINY_JOB)
    (tmp_path / "Snakefile").write_text(
        TINY_SNAKEFILE.replace("{python}", sys.executable).replace("{script}", str(script)))
    env = {**slot_env, devices.FAKE_GPUS_ENV: "2",
           devices.LOCK_DIR_ENV: str(tmp_path / ".gpu-slots")}
    result = subprocess.run([SNAKEMAKE, "--cores", "4", "--resources", "gpu=2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    uses = slot_intervals(sorted((tmp_path / "logs").glob("*.log")))
    assert sum(len(v) for v in uses.values()) == 6
    assert set(uses) == {0, 1}
    assert_no_shared_slot(uses)


@pytest.mark.slow
def test_study_with_two_fake_gpus_never_shares_a_slot(local_default_study):
    """The default study ran with --cores 4 --resources gpu=2 on a fake two-GPU machine
    (tests/conftest.py): every adapt job claimed a slot, both slots were used, none shared."""
    results = local_default_study / "results"
    assert (results / ".gpu-slots").is_dir()  # the default lock dir, in the working directory
    logs = sorted((results / "runs").rglob("*.log"))
    adapt_logs = [p for p in logs if p.name == "adapt.log"]
    assert adapt_logs and all(SLOT_EVENT.search(p.read_text()) for p in adapt_logs)
    uses = slot_intervals(logs)
    assert set(uses) == {0, 1}
    assert_no_shared_slot(uses)


# --- every rule that computes on a device is GPU-scheduled ------------------------------------

DEVICE_LINE = "clipsvd.devices:"  # a line the device module logs (resolved, claimed, fake, ...)


def dry_run_jobs(workdir: Path) -> list[dict[str, str]]:
    """Every job of the study (rule, log, resources) as `snakemake -n --forceall` lists it."""
    from conftest import workflow_env

    result = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "-n",
         "--forceall", "--cores", "4", "--resources", "gpu=2"],
        capture_output=True, text=True, env=workflow_env())
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = []
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", result.stdout, re.M):
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, re.M))
        jobs.append({"rule": rule, "log": fields.get("log", ""),
                     "resources": fields.get("resources", "")})
    return jobs


def gpu_scheduling_violations(workdir: Path) -> tuple[set[str], list[str]]:
    """(rules whose jobs resolved a device, what is wrong): a job whose log shows the device
    module at work must belong to a rule that declares `gpu=1`, and must have claimed a slot;
    a job of a rule that declares `gpu=1` must have claimed one."""
    resolving, wrong = set(), []
    for job in dry_run_jobs(workdir):
        log = workdir / job["log"] if job["log"] else None
        if log is None or not log.is_file():
            continue
        text = log.read_text()
        declares = re.search(r"\bgpu=1\b", job["resources"]) is not None
        claimed = SLOT_EVENT.search(text) is not None
        if DEVICE_LINE in text:
            resolving.add(job["rule"])
            if not declares:
                wrong.append(f"{job['rule']} resolves a device but declares no gpu resource "
                             f"({job['log']})")
        if (DEVICE_LINE in text or declares) and not claimed:
            wrong.append(f"{job['rule']} claimed no GPU slot ({job['log']})")
    return resolving, wrong


@pytest.mark.slow
def test_every_rule_that_resolves_a_device_is_gpu_scheduled(local_default_study):
    """In the two-fake-GPU run of the default study, every job that resolved a device
    (features, adapt, evaluate and interpret) belongs to a rule declaring `gpu=1` and claimed
    a GPU slot. Break caught (shown on a one-interpret-job run of the study): `clipsvd
    interpret` resolving the device itself (no slot: its log says "no GPU visible"), and the
    interpret rule without `gpu=1`."""
    resolving, wrong = gpu_scheduling_violations(local_default_study)
    assert resolving == {"features", "adapt", "evaluate", "interpret"}
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_interpret_jobs_hold_slots_of_their_own(local_default_study):
    """Every interpret job of the fake two-GPU run claimed and released a slot, and no slot was
    held by two jobs at once, interpret jobs included (no job lands on a GPU another holds).
    Break caught: interpret outside the slot logic (no claim in its log)."""
    logs = sorted(local_default_study.glob("results/runs/**/interpret.log"))
    assert len(logs) == 6
    uses = slot_intervals(logs)
    assert sum(len(v) for v in uses.values()) == 6 and set(uses) <= {0, 1}
    results = local_default_study / "results"  # not mlartifacts/, which holds copies
    everything = sorted((results / "runs").rglob("*.log")) + sorted(
        (results / "logs").rglob("*.log"))
    assert_no_shared_slot(slot_intervals(everything))


# --- the SLURM profile (static: its YAML, no cluster) ------------------------------------------

SLURM_PROFILE = ROOT / "workflow" / "profiles" / "slurm" / "config.yaml"


def slurm_resources(rule: str, env: dict[str, str]) -> dict[str, object]:
    """The profile's resources of ``rule`` as Snakemake evaluates them on attempt 1 (each
    value is a Python expression of ``attempt`` and ``threads``) under the environment ``env``."""
    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    values = {**profile.get("default-resources", {}),
              **profile.get("set-resources", {}).get(rule, {})}
    threads = profile.get("set-threads", {}).get(rule, 1)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        if isinstance(threads, str):  # capped: an expression of the environment
            threads = eval(threads, {"__builtins__": __builtins__})  # noqa: S307 (profile)
        return {key: eval(str(value), {"__builtins__": __builtins__},  # noqa: S307 (profile)
                          {"attempt": 1, "threads": threads})
                for key, value in values.items()}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_slurm_profile_gives_interpret_a_gpu_where_the_study_asks_for_one():
    """Both BiomedCLIP studies ask for `device: cuda`; under the SLURM profile their interpret
    jobs then get a GPU on the GPU partition, exactly as adapt does (one per job by default,
    none with CLIPSVD_SLURM_GPUS=0 on a cluster without GPUs). Break caught: the profile's
    interpret entry without `gpu` (every interpret job stopped with "'cuda' was asked for
    but no CUDA GPU is visible"), or on the CPU partition."""
    studies = {path.name: yaml.safe_load(path.read_text()).get("device", "auto")
               for path in sorted((ROOT / "config" / "studies").glob("*.yaml"))}
    assert studies["biomedclip_base_to_novel.yaml"] == studies["biomedclip_few_shot.yaml"] == "cuda"
    cluster = {"CLIPSVD_SLURM_PARTITION": "cpu", "CLIPSVD_SLURM_GPU_PARTITION": "gpu"}
    for env, gpus in ((cluster, 1), ({**cluster, "CLIPSVD_SLURM_GPUS": "2"}, 2),
                      ({**cluster, "CLIPSVD_SLURM_GPUS": "0"}, 0)):
        interpret, adapt = slurm_resources("interpret", env), slurm_resources("adapt", env)
        assert interpret["gpu"] == adapt["gpu"] == gpus, env
        assert interpret["slurm_partition"] == adapt["slurm_partition"] == "gpu"
        assert interpret["cpus_per_gpu"] == 4
    alone = slurm_resources("interpret", {"CLIPSVD_SLURM_PARTITION": "shared"})
    assert alone["gpu"] == 1 and alone["slurm_partition"] == "shared"
