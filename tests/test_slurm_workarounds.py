"""The workarounds of clipsvd.slurm, run inside the real snakemake-executor-plugin-slurm 2.8.0
code (its Executor's status check, error report and submission), with SLURM's answers given.

tests/test_slurm.py shows the same on a real cluster with accounting for a cancelled job and a
refused request; here are the states a test cluster cannot easily produce (preempted, timed
out, a job SLURM forgot, a failed status query) and a cluster without accounting.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

plugin = pytest.importorskip("snakemake_executor_plugin_slurm")
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo  # noqa: E402

from clipsvd import slurm  # noqa: E402

WRAPPED = ("check_active_jobs", "report_job_error", "run_job", "run_array_jobs")


class Job:
    """The part of a Snakemake job the plugin and the workarounds read."""

    def __init__(self, name="adapt", log=(), threads=1, **resources):
        self.name, self.log, self.threads = name, list(log), threads
        self.resources = SimpleNamespace(**resources)
        self.resources.get = lambda key, default=None: getattr(self.resources, key, default)


@pytest.fixture
def executor(monkeypatch):
    """The plugin's Executor, not started (no SLURM here), with the workarounds installed on
    a status query that answers ``executor.states``; reports are recorded."""
    answers = {"states": {}}

    async def query_job_status(command, logger):
        states = answers["states"]
        return (None, None) if states is None else (dict(states), 0.01)

    monkeypatch.setattr(plugin, "query_job_status", query_job_status)
    for name in WRAPPED:  # restored after the test, whatever install() does to them
        monkeypatch.setattr(plugin.Executor, name, getattr(plugin.Executor, name))
    monkeypatch.setattr(plugin, slurm.INSTALLED, False, raising=False)
    monkeypatch.setattr(slurm, "_unknown_to_slurm", lambda job_id: True)
    ex = plugin.Executor.__new__(plugin.Executor)
    settings = SimpleNamespace(status_attempts=1, init_seconds_before_status_checks=1,
                               keep_successful_logs=True, requeue=False, status_command="squeue")
    ex.workflow = SimpleNamespace(executor_settings=settings)
    ex.logger = logging.getLogger("test-slurm-plugin")
    ex.run_uuid = "run"
    ex.status_rate_limiter = asyncio.Lock()
    ex.next_seconds_between_status_checks = 1
    ex._status_query_calls = ex._status_query_failures = 0
    ex._status_query_total_seconds, ex._status_query_min_seconds = 0.0, None
    ex._status_query_max_seconds, ex._status_query_cycle_rows = 0.0, []
    ex._preemption_warning, ex._failed_nodes = False, set()
    ex.errors, ex.successes, ex.submitted = {}, [], []
    # What the interface's report methods do, recorded instead of told to a scheduler.
    monkeypatch.setattr(plugin.Executor, "report_job_success",
                        lambda self, info: self.successes.append(info.external_jobid))
    monkeypatch.setattr(plugin.Executor, "report_job_error",
                        lambda self, info, msg=None, **kw: self.errors.__setitem__(
                            info.external_jobid, msg))
    monkeypatch.setattr(plugin.Executor, "run_job", lambda self, job: self.submitted.append(job))
    monkeypatch.setattr(plugin.Executor, "run_array_jobs",
                        lambda self, jobs: self.submitted.extend(jobs))
    ex.answers = answers
    return ex


def check(ex, jobs) -> list[str]:
    async def run():
        return [info.external_jobid async for info in ex.check_active_jobs(jobs)]
    return asyncio.run(run())


def infos(tmp_path: Path, *ids: str) -> list[SubmittedJobInfo]:
    out = []
    for job_id in ids:
        log = tmp_path / f"rule-{job_id}.log"
        log.write_text("INFO clipsvd.train: step 1/40\n"
                       "clipsvd adapt: error: loss became nan at step 2 of 40\n")
        slurm_log = tmp_path / f"{job_id}.log"
        slurm_log.write_text(f"slurmstepd: error: *** JOB {job_id} ON vm CANCELLED AT "
                             "2026-01-01T00:00:00 ***\n")
        out.append(SubmittedJobInfo(Job(log=[log]), external_jobid=job_id,
                                    aux={"slurm_logfile": slurm_log}))
    return out


def test_ended_jobs_are_reported_and_running_ones_kept(executor, tmp_path):
    """sacct's ``CANCELLED by 0`` and a preempted job are failures, with the cause from the
    rule's log; running and pending jobs stay. Breaks it catches: without the workarounds
    (the plugin alone) jobs 1 and 3 are yielded as running, for ever; without the cause,
    the message lacks the rule log's error line."""
    executor.answers["states"] = {"1": "CANCELLED by 0", "2": "RUNNING", "3": "PREEMPTED",
                                  "4": "TIMEOUT", "5": "COMPLETED", "7": "PENDING"}
    assert slurm.install(plugin)
    still = check(executor, infos(tmp_path, "1", "2", "3", "4", "5", "7"))
    assert still == ["2", "7"]
    assert executor.successes == ["5"]
    assert set(executor.errors) == {"1", "3", "4"}
    rule_log = tmp_path / "rule-1.log"
    assert executor.errors["1"] == ("SLURM job 1 ended CANCELLED by 0; cause: clipsvd adapt: "
                                    "error: loss became nan at step 2 of 40 "
                                    f"(from {rule_log}). ")
    assert "ended PREEMPTED" in executor.errors["3"] and "ended TIMEOUT" in executor.errors["4"]
    assert all("\n" not in msg for msg in executor.errors.values())


def test_preempted_jobs_are_left_to_slurm_when_requeue_is_on(executor, tmp_path):
    executor.workflow.executor_settings.requeue = True
    executor.answers["states"] = {"3": "PREEMPTED"}
    slurm.install(plugin)
    assert check(executor, infos(tmp_path, "3")) == ["3"] and not executor.errors


def test_a_job_slurm_forgot_is_reported_after_some_checks(executor, tmp_path):
    """No accounting and MinJobAge passed: squeue lists the job no more. The plugin waits for
    it for ever; here it is a failure once scontrol does not know it either."""
    executor.answers["states"] = {"2": "RUNNING"}
    slurm.install(plugin)
    jobs = infos(tmp_path, "2", "6")
    for _ in range(slurm.MISSES_BEFORE_GONE - 1):
        assert check(executor, jobs) == ["2", "6"]
    assert check(executor, jobs) == ["2"]
    assert "has ended, but its state cannot be read" in executor.errors["6"]


def test_a_failed_status_query_keeps_every_job(executor, tmp_path):
    """The plugin drops every job when its query fails (it neither yields nor reports them,
    so Snakemake would wait for them for ever); they stay active here."""
    executor.answers["states"] = None
    slurm.install(plugin)
    assert check(executor, infos(tmp_path, "1", "2")) == ["1", "2"]
    assert not executor.errors and not executor.successes


def test_requests_above_a_cap_or_the_partition_are_refused_before_sbatch(executor,
                                                                       monkeypatch):
    """One line naming the request and the limit, and no sbatch call. Break it catches: the
    check removed, the job is submitted (and on a real cluster pends or fails in sbatch)."""
    slurm.install(plugin)
    partition = slurm.PartitionLimits("cpu", max_cpus=2, max_mem_mb=20000, max_runtime=60,
                                      max_gpus=0)
    monkeypatch.setattr(slurm, "partition_limits", lambda name: partition)
    monkeypatch.setattr(executor, "_report_job_error_threadsafe",
                        lambda info, msg: executor.errors.__setitem__(info.job.name, msg),
                        raising=False)
    monkeypatch.setenv("CLIPSVD_SLURM_MAX_MEM_MB", "16000")
    cases = {
        "big_memory": (dict(mem_mb=64000, runtime=30), "asks for 64000 MB of memory, more "
                       "than CLIPSVD_SLURM_MAX_MEM_MB=16000"),
        "many_cpus": (dict(mem_mb=1000, runtime=30, _threads=8), "asks for 8 CPUs, but the "
                      "largest node of partition 'cpu' has 2 (sinfo)"),
        "long": (dict(mem_mb=1000, runtime=240), "asks for 240 minutes, more than the time "
                 "limit of partition 'cpu' (60 minutes, sinfo)"),
        "gpu": (dict(mem_mb=1000, runtime=30, gpu=1, cpus_per_gpu=1), "asks for 1 GPU(s), but "
                "partition 'cpu' has no GPUs (sinfo)"),
        "fits": (dict(mem_mb=1000, runtime=30), None),
    }
    for name, (resources, expected) in cases.items():
        threads = resources.pop("_threads", 1)
        executor.run_job(Job(name=name, threads=threads, slurm_partition="cpu", **resources))
        if expected is None:
            assert [job.name for job in executor.submitted] == ["fits"]
            assert name not in executor.errors
        else:
            assert expected in executor.errors[name], executor.errors[name]
            assert executor.errors[name].startswith(f"refused before submission: rule {name} ")
            assert "\n" not in executor.errors[name]
    executor.run_array_jobs([Job(name="in_array", mem_mb=64000, slurm_partition="cpu"),
                             Job(name="array_fits", mem_mb=1000, slurm_partition="cpu")])
    assert [job.name for job in executor.submitted] == ["fits", "array_fits"]


def test_an_sbatch_failure_keeps_its_first_line(executor, tmp_path):
    slurm.install(plugin)
    info = SubmittedJobInfo(Job())
    executor.report_job_error(info, "SLURM sbatch failed. The error message was 'sbatch: error: "
                              "invalid account'.\n    sbatch call:\n        sbatch " + "x" * 5000)
    assert executor.errors[None] == ("SLURM sbatch failed. The error message was 'sbatch: "
                                     "error: invalid account'.")


@pytest.mark.parametrize("text, minutes", [("infinite", None), ("UNLIMITED", None),
                                           ("30", 30), ("1:30:00", 90), ("45:30", 46),
                                           ("2-00:00:00", 2880), ("1-12", 2160)])
def test_slurm_time_limits(text, minutes):
    assert slurm.parse_time_minutes(text) == minutes


def test_partition_limits_from_sinfo():
    limits = slurm.parse_sinfo("gpu", "2|20000|1-00:00:00|gpu:1(S:0)\n"
                                      "8|64000+|infinite|gpu:a100:4,tmp:1\n")
    assert limits == slurm.PartitionLimits("gpu", 8, 64000, None, 4)


def test_failure_cause_prefers_the_clipsvd_error_line(tmp_path):
    rule_log = tmp_path / "rule.log"
    slurm_log = tmp_path / "slurm.log"
    rule_log.write_text("INFO start\n")
    slurm_log.write_text("Traceback (most recent call last):\n  File x\n"
                         "RuntimeError: CUDA error: out of memory\n")
    assert slurm.failure_cause([rule_log], slurm_log) == (
        "RuntimeError: CUDA error: out of memory", str(slurm_log))
    slurm_log.write_text("slurmstepd-node7: error: Detected 1 oom_kill event in StepId=5.batch."
                         " Some of the step tasks have been OOM Killed.\n")
    assert "oom_kill" in slurm.failure_cause([rule_log], slurm_log)[0]
    rule_log.write_text("clipsvd prepare: error: data/x: manifest not found\n")
    assert slurm.failure_cause([rule_log], slurm_log) == (
        "clipsvd prepare: error: data/x: manifest not found", str(rule_log))
    assert slurm.failure_cause([tmp_path / "missing.log"], None) is None
