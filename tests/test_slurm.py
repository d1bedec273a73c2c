"""The default study through `snakemake --profile workflow/profiles/slurm` on a real SLURM cluster.

The fixture starts a single-node SLURM cluster on this host (Debian packages slurm-wlm and
munge, installed with apt-get when missing and when we are root): munged, slurmctld and slurmd,
with /etc/slurm/slurm.conf written for this host's name, CPUs and memory, no accounting
database (so MinJobAge is high and the plugin queries job states with squeue), process
tracking without cgroups (containers have none). It stops the daemons it started at the end.

The test is skipped, with the reason, only where the packages cannot be installed. Nothing
about SLURM is mocked: jobs are submitted with sbatch and run by slurmd.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import workflow_env

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# written by clipsvd tests/test_slurm.py"
PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol"]

pytestmark = pytest.mark.slow


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def _install_packages() -> str | None:
    """Install slurm-wlm and munge with apt-get where missing; the reason when impossible."""
    if all(_which(name) for name in DAEMONS):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm and munge are not installed and apt-get needs root"
    if not shutil.which("apt-get"):
        return "slurm-wlm and munge are not installed and there is no apt-get on this host"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(result.stdout + result.stderr)[-800:]}"
    missing = [name for name in DAEMONS if not _which(name)]
    if missing:
        return f"apt-get installed {PACKAGES} but these commands are still missing: {missing}"
    return None


def _node_line(hostname: str) -> str:
    """This host's NodeName line as slurmd detects it (CPUs, sockets, cores, real memory)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True,
                         check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("NodeName="))
    fields = dict(item.split("=", 1) for item in line.split())
    fields["NodeName"] = hostname
    # Leave some memory to the operating system so the node is never marked as short of it.
    fields["RealMemory"] = str(int(int(fields["RealMemory"]) * 0.9))
    keep = ["NodeName", "CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
            "ThreadsPerCore", "RealMemory"]
    return " ".join(f"{k}={fields[k]}" for k in keep if k in fields) + " State=UNKNOWN"


def _slurm_conf(hostname: str, state: Path) -> str:
    return f"""{MARKER}
ClusterName=clipsvdtest
SlurmctldHost={hostname}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track processes through /proc, bind no CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No accounting database: job states come from slurmctld, kept long after jobs end.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
{_node_line(hostname)}
PartitionName=debug Nodes={hostname} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, state: Path):
        self.state = state
        self.procs: list[subprocess.Popen] = []
        self.wrote_conf = False
        self.hostname = socket.gethostname().split(".")[0]

    def _spawn(self, *cmd: str) -> subprocess.Popen:
        log = open(self.state / f"{Path(cmd[0]).name}.out", "w")
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
            pytest.skip(f"{SLURM_CONF} exists and was not written by this test: "
                        "not touching a real SLURM configuration")
        self.wrote_conf = True
        for sub in ("ctld", "d"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(_slurm_conf(self.hostname, self.state))
        # munged: its key comes with the package; its socket directory does not survive reboots.
        munge_run = Path("/run/munge")
        munge_run.mkdir(parents=True, exist_ok=True)
        shutil.chown(munge_run, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--force"], check=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o600)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            self._spawn("runuser", "-u", "munge", "--", _which("munged"), "--foreground",
                        "--force")
            self._wait(lambda: subprocess.run(["munge", "-n"], capture_output=True)
                       .returncode == 0, "munged to answer", 30)
        # -D: stay in the foreground so that we own the processes; -i: ignore old state.
        self._spawn(_which("slurmctld"), "-D", "-i")
        self._wait(lambda: self._run("scontrol", "ping").returncode == 0
                   and "UP" in self._run("scontrol", "ping").stdout, "slurmctld to answer", 60)
        self._spawn(_which("slurmd"), "-D")
        self._wait(self._node_idle, "the node to be idle in sinfo", 90)

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True)

    def _node_idle(self) -> bool:
        out = self._run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
        if len(out) >= 2 and out[1] in ("drain", "drng", "down", "down*"):
            self._run("scontrol", "update", f"NodeName={self.hostname}", "State=RESUME")
        return len(out) >= 2 and out[1] == "idle"

    def _wait(self, ready, what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) while "
                                       f"waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted(self.state.glob("*.log")) + sorted(self.state.glob("*.out")):
            parts.append(f"--- {path.name}\n{path.read_text()[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if self.wrote_conf and SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text():
            SLURM_CONF.unlink()  # it names this run's temporary state folders


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = _install_packages()
    if reason:
        pytest.skip(f"no SLURM cluster for this test: {reason}")
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld and slurmd and writing /etc/slurm/slurm.conf needs root")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_cluster_runs_a_job(slurm_cluster, tmp_path):
    out = tmp_path / "hello.out"
    result = subprocess.run(["sbatch", "--parsable", "--wait", "-o", str(out), "--mem", "100",
                             "--wrap", "echo hello from $SLURM_JOB_ID"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr + slurm_cluster.logs()
    job_id = result.stdout.strip().split(";")[0]
    assert out.read_text().strip() == f"hello from {job_id}"


# --- the default study through the SLURM profile ----------------------------------------------

def _submitted_job_ids(output: str) -> list[str]:
    return re.findall(r"has been submitted with SLURM jobid (\d+)", output)


def _comparable_metrics(path: Path) -> dict:
    """metrics.json without wall-clock timings, which differ from run to run."""
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.endswith("_seconds")}


def test_default_study_through_the_slurm_profile(slurm_cluster, local_default_study,
                                                 tmp_path):
    workdir = tmp_path / "study"
    shutil.copytree(ROOT / "config", workdir / "config")
    # A slice of the default study (every rule, fewer runs): SLURM runs the jobs one after the
    # other on this 2-CPU node, and CI time is limited. Its runs must equal the local ones.
    study_file = workdir / "config" / "config.yaml"
    study = yaml.safe_load(study_file.read_text())
    study.update(methods=["zero_shot", "linear_probe", "clip_svd"], shots=[2], seeds=[1])
    study_file.write_text(yaml.safe_dump(study))
    env = workflow_env()
    env.update({
        "CLIPSVD_SLURM_GPUS": "0",  # this cluster has no GPUs: request none
        "CLIPSVD_SLURM_PARTITION": "debug",
    })
    for name in ("CLIPSVD_SLURM_ACCOUNT", "CLIPSVD_SLURM_GPU_PARTITION"):
        env.pop(name, None)
    started = time.monotonic()
    result = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
         "--profile", str(ROOT / "workflow" / "profiles" / "slurm"),
         # No accounting database here: job states come from squeue (MinJobAge is high).
         "--slurm-status-command", "squeue",
         "--slurm-init-seconds-before-status-checks", "2",
         "--slurm-keep-successful-logs",
         # The profile asks for 4 threads per adapt job; the local run of the same study
         # gives each job the demo config's `threads: 1`, and equal thread counts give
         # bit-equal metrics (CPU reductions split differently with more threads).
         "--max-threads", "1"],
        cwd=workdir, capture_output=True, text=True, env=env, timeout=1800)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        errors = [output[max(0, m.start() - 300):m.start() + 2500]
                  for m in re.finditer(r"Error in rule|Error executing rule", output)]
        raise AssertionError("snakemake --profile workflow/profiles/slurm failed:\n"
                             + "\n...\n".join(errors[:3]) + "\n--- tail\n" + output[-3000:]
                             + slurm_cluster.logs())

    # Every job of the study (all but the target rule `all`) was an sbatch job that completed.
    job_ids = _submitted_job_ids(output)
    dry = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "-n",
         "--forceall", "--cores", "1"], capture_output=True, text=True, env=env)
    total = int(re.search(r"^total\s+(\d+)$", dry.stdout + dry.stderr, re.M).group(1))
    assert len(set(job_ids)) == total - 1, output[-4000:]
    states = dict(line.split() for line in subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%i %T"], capture_output=True, text=True,
        check=True).stdout.splitlines())
    assert all(states.get(i) == "COMPLETED" for i in job_ids), (job_ids, states)
    slurm_logs = list((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert {p.stem for p in slurm_logs} >= set(job_ids)
    # An adapt job as SLURM saw it: the profile's memory and partition (from the environment),
    # one CPU (--max-threads) and no GPU (CLIPSVD_SLURM_GPUS=0).
    adapt_id = next((workdir / ".snakemake" / "slurm_logs" / "rule_adapt").rglob("*.log")).stem
    job = subprocess.run(["scontrol", "show", "job", "-o", adapt_id], capture_output=True,
                         text=True, check=True).stdout
    assert "Partition=debug" in job and "JobState=COMPLETED" in job, job
    assert "NumCPUs=1" in job and "mem=16000M" in job and "gpu" not in job, job

    # The outputs equal those of a local `snakemake --cores 2` run.
    local, remote = local_default_study / "results", workdir / "results"
    splits = sorted(p.relative_to(remote) for p in (remote / "splits").rglob("*.json"))
    assert len(splits) == 2  # K=0 for zero-shot, K=2 seed 1
    for rel in splits:  # split files name the source images by absolute path
        assert ((local / rel).read_text().replace(str(local_default_study), "<workdir>")
                == (remote / rel).read_text().replace(str(workdir), "<workdir>")), rel
    metrics = sorted(p.relative_to(remote) for p in (remote / "runs").rglob("metrics.json"))
    assert len(metrics) == 3
    for rel in metrics:
        assert _comparable_metrics(local / rel) == _comparable_metrics(remote / rel), rel
    print(f"SLURM run of the default study: {len(job_ids)} sbatch jobs, "
          f"{time.monotonic() - started:.0f} s")


def test_profile_sets_the_gpu_request_of_every_gpu_rule():
    """A rule that declares `gpu=1` must get its GPU count from the profile (CLIPSVD_SLURM_GPUS),
    or a cluster without GPUs (or with another GPU setup) rejects its sbatch call."""
    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    gpu_rules = set()
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for name, body in re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)+)", smk.read_text(), re.M):
            if re.search(r"^\s+gpu=1,", body, re.M):
                gpu_rules.add(name)
    assert gpu_rules >= {"features", "adapt", "evaluate"}
    for rule in gpu_rules:
        resources = profile["set-resources"].get(rule, {})
        assert "CLIPSVD_SLURM_GPUS" in str(resources.get("gpu")), rule
