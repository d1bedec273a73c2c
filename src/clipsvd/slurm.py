"""Workarounds for snakemake-executor-plugin-slurm (written against 2.8.0), installed by the
workflow into the Snakemake process that submits the jobs (workflow/rules/common.smk).

What they work around, and when they can go (docs/slurm.md, "What the workflow works around"):

1. The plugin matches job states exactly. ``sacct`` reports a job cancelled with ``scancel`` as
   ``CANCELLED by <uid>``, which matches nothing, so the plugin takes it for running and waits
   for ever. A ``PREEMPTED`` job is left to SLURM to requeue even when it will not be requeued.
   A job that neither ``sacct`` nor ``squeue`` lists any more (no accounting database and
   ``MinJobAge`` passed) is waited on for ever. Here states are reduced to their first word,
   a preempted job that will not come back and a job SLURM no longer knows are reported as
   failed, and the plugin's own handling does the rest (Snakemake's retries included).
2. A failed job's message says ``Reason: Unknown``; the one useful line is in the rule's log.
   Here the message carries that line (``clipsvd <step>: error: ...``, the last exception of a
   traceback, or slurmstepd's line about a cancellation, time limit or memory kill).
3. Requests that no node can meet pend for ever (``PENDING (PartitionConfig)``) or make
   ``sbatch`` fail with kilobytes of base64 in the message. Here every job is checked before
   ``sbatch``: against the caps (clipsvd.job_resources) and against the largest node and time
   limit of its partition (``sinfo``); a request above one is refused with one line saying
   which request exceeds which limit, and an ``sbatch`` failure keeps its first line only.

Only what the plugin exposes is touched (``query_job_status``, ``Executor.check_active_jobs``,
``report_job_error``, ``run_job``, ``run_array_jobs``); when one is missing (another plugin
version) nothing is installed and one warning says so.
"""
from __future__ import annotations

import logging
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .job_resources import CAP_VARIABLES, caps

log = logging.getLogger(__name__)

# States in which a job has ended without completing. COMPLETED is the plugin's to report.
FAILED_STATES = {"BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL",
                 "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT"}
MISSES_BEFORE_GONE = 3  # status checks a job may be missing from the listing before we ask
TAIL_BYTES = 64 * 1024
INSTALLED = "_clipsvd_workarounds"


def base_state(state: str) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``; ``CANCELLED+`` (sacct's truncation mark) too."""
    words = state.split()
    return words[0].rstrip("+") if words else ""


# --- the failure's cause, for the message --------------------------------------------------

_CLIPSVD_ERROR = re.compile(r"clipsvd [\w-]+: error: .+")
_SLURMSTEPD = re.compile(r"slurmstepd(?:-\S+)?: error: .*(CANCELLED|TIME LIMIT|oom|Out Of Memory"
                         r"|memory|PREEMPTION|NODE FAIL).*", re.IGNORECASE)
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Exit)"
                        r"(?::.*)?$")


def _tail(path: str | Path) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def failure_cause(rule_logs: Iterable[str | Path],
                  slurm_log: str | Path | None) -> tuple[str, str] | None:
    """The one line that says why a job failed, and the file it is from: the rule's log and
    its SLURM log, most telling line first."""
    rule = [(line, str(path)) for path in rule_logs for line in _tail(path)]
    slurm = [(line, str(slurm_log)) for line in _tail(slurm_log)] if slurm_log else []
    for lines, pattern in ((rule, _CLIPSVD_ERROR), (slurm, _CLIPSVD_ERROR), (slurm, _SLURMSTEPD),
                           (slurm, _EXCEPTION), (rule, _EXCEPTION)):
        for line, path in reversed(lines):
            match = pattern.search(line)
            if match:
                return match.group(0)[:300], path
    for line, path in reversed(rule):
        if " ERROR " in line:
            return line[:300], path
    return None


# --- limits: caps and partitions -----------------------------------------------------------

@dataclass(frozen=True)
class PartitionLimits:
    name: str
    max_cpus: int  # of its largest node
    max_mem_mb: int
    max_runtime: int | None  # minutes; None: no limit
    max_gpus: int  # the most gpu GRES one node has


def parse_time_minutes(text: str) -> int | None:
    """SLURM's time format ([days-]hours:minutes:seconds, minutes, ...) in minutes; None for
    infinite."""
    text = text.strip()
    if not text or text.lower() in ("infinite", "unlimited", "n/a"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        parts += [0] * (3 - len(parts))  # d-h, d-h:m, d-h:m:s
        hours, minutes, seconds = parts
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = 0, parts[0], 0
    return int(days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def _gpus_in(gres: str) -> int:
    """The gpu count of a node's GRES field (``gpu:2``, ``gpu:a100:4(S:0-1)``, ``(null)``)."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu":
            count = fields[-1] if len(fields) > 1 else "1"
            total += int(count) if count.isdigit() else 1
    return total


def parse_sinfo(name: str, text: str) -> PartitionLimits | None:
    """Limits from ``sinfo -h -N -p NAME -o '%c|%m|%l|%G'`` (one line per node)."""
    rows = [line.split("|") for line in text.splitlines() if line.count("|") == 3]
    if not rows:
        return None
    runtimes = [parse_time_minutes(row[2]) for row in rows]
    return PartitionLimits(
        name=name,
        max_cpus=max(int(row[0]) for row in rows),
        max_mem_mb=max(int(re.sub(r"\D", "", row[1]) or 0) for row in rows),
        max_runtime=None if any(r is None for r in runtimes) else max(runtimes),
        max_gpus=max(_gpus_in(row[3]) for row in rows))


_PARTITIONS: dict[str, PartitionLimits | None] = {}


def _sinfo(*args: str) -> str | None:
    try:
        result = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def partition_limits(name: str) -> PartitionLimits | None:
    """The partition's limits from sinfo (the default partition for ''), cached; None when
    sinfo cannot tell."""
    if not name:  # the plugin submits to the cluster's default partition, marked with '*'
        listing = _sinfo("-o", "%P") or ""
        name = next((p.rstrip("*") for p in listing.split() if p.endswith("*")), "")
        if not name:
            return None
    if name not in _PARTITIONS:
        text = _sinfo("-N", "-p", name, "-o", "%c|%m|%l|%G")
        _PARTITIONS[name] = parse_sinfo(name, text) if text is not None else None
    return _PARTITIONS[name]


@dataclass(frozen=True)
class Request:
    rule: str
    cpus: int
    mem_mb: int | None
    runtime: int | None  # minutes
    gpus: int
    partition: str


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def job_request(job) -> Request:
    """What the plugin will ask sbatch for, from a Snakemake job's threads and resources."""
    resources = job.resources
    gpus = _int(resources.get("gpu"))
    gres = str(resources.get("gres") or "")
    if not gpus and gres:
        gpus = _gpus_in(gres)
    if resources.get("cpus_per_task"):
        cpus = _int(resources.get("cpus_per_task"), 1)
    elif gpus and resources.get("cpus_per_gpu"):
        cpus = _int(resources.get("cpus_per_gpu"), 1) * gpus
    else:
        cpus = _int(job.threads, 1)
    mem = resources.get("mem_mb")
    if mem is None and resources.get("mem_mb_per_cpu"):
        mem = _int(resources.get("mem_mb_per_cpu")) * cpus
    runtime = resources.get("runtime")
    return Request(rule=job.name, cpus=max(1, cpus), mem_mb=None if mem is None else _int(mem),
                   runtime=None if runtime in (None, "") else _int(runtime), gpus=gpus,
                   partition=str(resources.get("slurm_partition") or ""))


def check_request(request: Request, limits: Mapping[str, int],
                  partition: PartitionLimits | None) -> str | None:
    """One line naming the request above a cap or a partition's limit, or None when it fits."""
    rule = f"rule {request.rule}"
    checks = [("threads", request.cpus, "CPUs"), ("mem_mb", request.mem_mb, "MB of memory"),
              ("runtime", request.runtime, "minutes")]
    for key, asked, unit in checks:
        cap = limits.get(key)
        if asked is not None and cap and asked > cap:
            return (f"{rule} asks for {asked} {unit}, more than {CAP_VARIABLES[key]}={cap}: "
                    "lower the request or raise the cap")
    if partition is None:
        return None
    where = f"partition '{partition.name}'"
    if request.cpus > partition.max_cpus:
        return (f"{rule} asks for {request.cpus} CPUs, but the largest node of {where} has "
                f"{partition.max_cpus} (sinfo): set {CAP_VARIABLES['threads']}="
                f"{partition.max_cpus} or choose another partition")
    if request.mem_mb is not None and request.mem_mb > partition.max_mem_mb:
        return (f"{rule} asks for {request.mem_mb} MB of memory, but the largest node of {where}"
                f" has {partition.max_mem_mb} MB (sinfo): set {CAP_VARIABLES['mem_mb']}="
                f"{partition.max_mem_mb} or choose another partition")
    if request.runtime is not None and partition.max_runtime is not None \
            and request.runtime > partition.max_runtime:
        return (f"{rule} asks for {request.runtime} minutes, more than the time limit of {where}"
                f" ({partition.max_runtime} minutes, sinfo): set {CAP_VARIABLES['runtime']}="
                f"{partition.max_runtime}")
    if request.gpus > partition.max_gpus:
        have = f"{partition.max_gpus} GPUs per node" if partition.max_gpus else "no GPUs"
        return (f"{rule} asks for {request.gpus} GPU(s), but {where} has {have} (sinfo): set "
                "CLIPSVD_SLURM_GPU_PARTITION to a partition with GPUs, or CLIPSVD_SLURM_GPUS=0")
    return None


# --- installing the workarounds into the plugin --------------------------------------------

def install(plugin) -> bool:
    """Wrap the plugin's state query, job check, error report and submission; True when done.

    ``plugin`` is the imported ``snakemake_executor_plugin_slurm`` module, or None when it is
    not loaded (no SLURM executor in this Snakemake: nothing to do).
    """
    if plugin is None:
        return False
    executor = getattr(plugin, "Executor", None)
    needed = [(plugin, "query_job_status")] + [
        (executor, name) for name in ("check_active_jobs", "report_job_error", "run_job",
                                      "run_array_jobs")]
    if any(getattr(owner, name, None) is None for owner, name in needed):
        log.warning("clipsvd: this snakemake-executor-plugin-slurm lacks what its workarounds "
                    "wrap (docs/slurm.md); cancelled jobs and request checks are the plugin's own")
        return False
    if getattr(plugin, INSTALLED, False):
        return True
    raw_states: dict[str, str] = {}
    misses: dict[str, int] = {}
    last_query_failed = [False]
    query = plugin.query_job_status

    async def query_job_status(command, logger):
        states, duration = await query(command, logger)
        last_query_failed[0] = states is None
        if states is not None:
            raw_states.clear()
            raw_states.update(states)
            states = {job: base_state(state) or state for job, state in states.items()}
        return states, duration

    check = executor.check_active_jobs

    async def check_active_jobs(self, active_jobs):
        requeue = bool(getattr(self.workflow.executor_settings, "requeue", False))
        yielded = set()
        async for job_info in check(self, active_jobs):
            job_id = str(job_info.external_jobid)
            state = raw_states.get(job_id) or raw_states.get(job_id.split("_")[0])
            if state is None:
                misses[job_id] = misses.get(job_id, 0) + 1
                if misses[job_id] >= MISSES_BEFORE_GONE and _unknown_to_slurm(job_id):
                    self.report_job_error(job_info, msg=(
                        f"SLURM job {job_id} has ended, but its state cannot be read (no "
                        "accounting record, and squeue no longer lists it: raise MinJobAge "
                        "or use sacct)"))
                    continue
            else:
                misses.pop(job_id, None)
                ended = base_state(state)
                if ended in FAILED_STATES and (ended != "PREEMPTED" or not requeue):
                    self.report_job_error(job_info, msg=f"SLURM job {job_id} ended {state}")
                    continue
            yielded.add(id(job_info))
            yield job_info
        if last_query_failed[0]:
            # The plugin drops every job when its status query fails (it neither yields nor
            # reports them, so Snakemake would wait for them for ever): keep them all.
            for job_info in active_jobs:
                if id(job_info) not in yielded:
                    yield job_info

    report = executor.report_job_error

    def report_job_error(self, job_info, msg=None, **kwargs):
        report(self, job_info, msg=_with_cause(job_info, msg, raw_states), **kwargs)

    run_job = executor.run_job

    def checked_run_job(self, job):
        if _refused(self, job):
            return None
        return run_job(self, job)

    run_array_jobs = executor.run_array_jobs

    def checked_run_array_jobs(self, jobs):
        jobs = [job for job in jobs if not _refused(self, job)]
        if jobs:
            return run_array_jobs(self, jobs)
        return None

    plugin.query_job_status = query_job_status
    executor.check_active_jobs = check_active_jobs
    executor.report_job_error = report_job_error
    executor.run_job = checked_run_job
    executor.run_array_jobs = checked_run_array_jobs
    setattr(plugin, INSTALLED, True)
    return True


def _unknown_to_slurm(job_id: str) -> bool:
    try:
        result = subprocess.run(["scontrol", "show", "job", job_id.split("_")[0]],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode != 0 and "invalid job id" in result.stderr.lower()


STEPD_STATES = ("CANCELLED", "TIMEOUT", "OUT_OF_MEMORY")  # states slurmstepd writes a line for
STEPD_LINE_WAIT_S = 10.0


def _with_cause(job_info, msg: str | None, raw_states: Mapping[str, str]) -> str:
    """The plugin's message, its state as SLURM said it, and the cause from the logs."""
    msg = (msg or "").strip()
    if msg.startswith("SLURM sbatch failed"):  # the call and its base64 payload follow
        return msg.splitlines()[0]
    job_id = str(getattr(job_info, "external_jobid", "") or "")
    state = raw_states.get(job_id)
    if job_id and state and "failed, SLURM status is" in msg:
        msg = f"SLURM job {job_id} ended {state}"
    job = job_info.job
    rule_logs = [str(path) for path in (getattr(job, "log", None) or [])]
    slurm_log = (getattr(job_info, "aux", None) or {}).get("slurm_logfile")
    if not job_id:
        return msg
    cause = failure_cause(rule_logs, slurm_log)
    if cause is None and state and state.split()[0] in STEPD_STATES:
        # slurmstepd writes its line into the log as it ends the job; sacct may report the
        # state before that line has reached the (shared) file system.
        deadline = time.monotonic() + STEPD_LINE_WAIT_S
        while cause is None and time.monotonic() < deadline:
            time.sleep(0.25)
            cause = failure_cause(rule_logs, slurm_log)
    if cause:
        return f"{msg}; cause: {cause[0]} (from {cause[1]}). "
    return f"{msg}; no error line in {', '.join(rule_logs + [str(slurm_log)])}. "


def _refused(executor, job) -> bool:
    """Check a job before sbatch; report it as failed with one line when it cannot fit."""
    try:
        request = job_request(job)
        line = check_request(request, caps(), partition_limits(request.partition))
    except Exception as exc:  # noqa: BLE001 - a check that cannot run must not stop submission
        log.debug("clipsvd: request check skipped for %s: %s", job, exc)
        return False
    if line is None:
        return False
    from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo

    message = f"refused before submission: {line}. "
    reporter = getattr(executor, "_report_job_error_threadsafe", None)
    if reporter is not None:
        reporter(SubmittedJobInfo(job), message)
    else:
        executor.report_job_error(SubmittedJobInfo(job), msg=message)
    return True
