"""The default study through `snakemake --profile workflow/profiles/slurm` on a real SLURM cluster.

The fixture starts a single-node SLURM cluster with accounting on this host (Debian packages
slurm-wlm, slurmdbd, munge and mariadb-server, installed with apt-get when missing and when we
are root): munged, a MariaDB server on a private data folder and port, slurmdbd on it,
slurmctld and slurmd, with /etc/slurm/{slurm,slurmdbd,gres}.conf written for this host's name,
CPUs and memory. Two partitions share the node: `cpu` (the default) and `gpu`, and the node has
two GPUs as a GRES on /dev/null and /dev/zero (there is no GPU here; jobs that get one compute
on the CPU). Process tracking goes without cgroups (containers have none). Everything it started is
stopped at the end and the files it wrote are removed.

The tests are skipped, with the reason, only where the packages cannot be installed. Nothing
about SLURM is mocked: jobs are submitted with sbatch, run by slurmd and recorded by slurmdbd,
and the executor plugin asks sacct for their states as on a real cluster.
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
SLURM_DIR = Path("/etc/slurm")
SLURM_CONF = SLURM_DIR / "slurm.conf"
CONF_FILES = [SLURM_CONF, SLURM_DIR / "slurmdbd.conf", SLURM_DIR / "gres.conf"]
MARKER = "# written by clipsvd tests/test_slurm.py"
PACKAGES = ["slurm-wlm", "slurmdbd", "munge", "mariadb-server"]
COMMANDS = ["munged", "slurmctld", "slurmd", "slurmdbd", "sbatch", "squeue", "sinfo", "scontrol",
            "sacct", "sacctmgr", "scancel", "mariadbd", "mariadb-install-db", "mariadb"]
DB_USER, DB_PASSWORD = "slurm", "clipsvd-test"  # a throwaway server on 127.0.0.1 only
ACCOUNT = "clipsvd"

pytestmark = pytest.mark.slow


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def _install_packages() -> str | None:
    """Install the SLURM and MariaDB packages with apt-get where missing; the reason when
    impossible."""
    if all(_which(name) for name in COMMANDS):
        return None
    if os.geteuid() != 0:
        return f"{', '.join(PACKAGES)} are not installed and apt-get needs root"
    if not shutil.which("apt-get"):
        return f"{', '.join(PACKAGES)} are not installed and there is no apt-get on this host"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(result.stdout + result.stderr)[-800:]}"
    missing = [name for name in COMMANDS if not _which(name)]
    if missing:
        return f"apt-get installed {PACKAGES} but these commands are still missing: {missing}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    return " ".join(f"{k}={fields[k]}" for k in keep if k in fields) + " Gres=gpu:2 State=UNKNOWN"


def _slurm_conf(hostname: str, state: Path, dbd_port: int) -> str:
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
# Accounting in slurmdbd (MariaDB): sacct answers from the database, as on most clusters.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={hostname}
AccountingStoragePort={dbd_port}
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue too (the plugin may use either).
MinJobAge=3600
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
GresTypes=gpu
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
{_node_line(hostname)}
PartitionName=cpu Nodes={hostname} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={hostname} Default=NO MaxTime=INFINITE State=UP
"""


def _slurmdbd_conf(hostname: str, state: Path, dbd_port: int, db_port: int) -> str:
    return f"""{MARKER}
AuthType=auth/munge
DbdHost={hostname}
DbdPort={dbd_port}
SlurmUser=root
LogFile={state}/slurmdbd.log
PidFile={state}/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser={DB_USER}
StoragePass={DB_PASSWORD}
StorageLoc=slurm_acct_db
"""


def _gres_conf(hostname: str) -> str:
    # Two GPUs on /dev/null and /dev/zero: slurmd needs a device file per gpu GRES it counts,
    # and there is no GPU on the test machine. Two, so that two GPU jobs run at once.
    return f"{MARKER}\nNodeName={hostname} Name=gpu File=/dev/null,/dev/zero Count=2\n"


class Cluster:
    def __init__(self, state: Path):
        self.state = state
        self.procs: list[subprocess.Popen] = []
        self.wrote: list[Path] = []
        self.hostname = socket.gethostname().split(".")[0]
        self.db_port, self.dbd_port = _free_port(), _free_port()
        self.db_socket = state / "mysql.sock"

    def _spawn(self, *cmd: str) -> subprocess.Popen:
        log = open(self.state / f"{Path(cmd[0]).name}.out", "w")
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def _write(self, path: Path, text: str, mode: int = 0o644) -> None:
        if path.exists() and MARKER not in path.read_text():
            pytest.skip(f"{path} exists and was not written by this test: not touching a "
                        "real SLURM configuration")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        self.wrote.append(path)

    def start(self) -> None:
        for sub in ("ctld", "d", "mysql"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self._write(SLURM_CONF, _slurm_conf(self.hostname, self.state, self.dbd_port))
        self._write(SLURM_DIR / "slurmdbd.conf", _slurmdbd_conf(
            self.hostname, self.state, self.dbd_port, self.db_port), mode=0o600)
        self._write(SLURM_DIR / "gres.conf", _gres_conf(self.hostname))
        self._start_munge()
        self._start_database()
        # -D: stay in the foreground so that we own the processes.
        self._spawn(_which("slurmdbd"), "-D")
        self._wait(lambda: self._run("sacctmgr", "-n", "show", "cluster").returncode == 0,
                   "slurmdbd to answer", 60)
        for args in (["add", "cluster", "clipsvdtest"],
                     ["add", "account", ACCOUNT, "cluster=clipsvdtest"],
                     ["add", "user", "root", f"account={ACCOUNT}", "cluster=clipsvdtest"]):
            self._run("sacctmgr", "-i", *args)
        self._spawn(_which("slurmctld"), "-D", "-i")  # -i: ignore old state
        self._wait(lambda: "UP" in self._run("scontrol", "ping").stdout, "slurmctld to answer",
                   60)
        self._spawn(_which("slurmd"), "-D")
        self._wait(self._node_idle, "the node to be idle in sinfo", 90)

    def _start_munge(self) -> None:
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

    def _start_database(self) -> None:
        """A MariaDB server of our own: its data in the state folder, TCP on 127.0.0.1 only."""
        data = self.state / "mysql"
        init = subprocess.run(
            [_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
             "--auth-root-authentication-method=socket", "--skip-test-db"],
            capture_output=True, text=True)
        assert init.returncode == 0, init.stdout + init.stderr
        self._spawn(_which("mariadbd"), "--no-defaults", f"--datadir={data}", "--user=root",
                    f"--socket={self.db_socket}", f"--port={self.db_port}",
                    "--bind-address=127.0.0.1", f"--pid-file={self.state}/mysql.pid",
                    "--innodb-buffer-pool-size=32M", "--skip-log-bin")
        self._wait(lambda: self._sql("SELECT 1").returncode == 0, "MariaDB to answer", 60)
        grant = self._sql(f"CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}'; "
                          f"GRANT ALL ON slurm_acct_db.* TO '{DB_USER}'@'127.0.0.1';")
        assert grant.returncode == 0, grant.stderr

    def _sql(self, statement: str) -> subprocess.CompletedProcess:
        return self._run(_which("mariadb"), "--no-defaults", f"--socket={self.db_socket}",
                         "-u", "root", "-e", statement)

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
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
        for proc in reversed(self.procs):  # slurmd, slurmctld, slurmdbd, mariadbd, munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        for path in self.wrote:  # they name this run's temporary state folders
            if path.exists() and MARKER in path.read_text():
                path.unlink()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = _install_packages()
    if reason:
        pytest.skip(f"no SLURM cluster for this test: {reason}")
    if os.geteuid() != 0:
        pytest.skip("starting the SLURM daemons and writing /etc/slurm needs root")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _sacct_state(job_id: str) -> str:
    return subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
                          capture_output=True, text=True).stdout.strip()


def test_cluster_has_accounting_partitions_and_a_gpu(slurm_cluster, tmp_path):
    """A job on the gpu partition with one GPU runs, and slurmdbd records it for sacct."""
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P %G"], capture_output=True,
                                text=True, check=True).stdout.split("\n")
    assert {line.split()[0] for line in partitions if line} == {"cpu*", "gpu"}, partitions
    assert all("gpu:2" in line for line in partitions if line), partitions
    out = tmp_path / "hello.out"
    result = subprocess.run(["sbatch", "--parsable", "--wait", "-o", str(out), "--mem", "100",
                             "-p", "gpu", "--gpus=1", "--wrap", "echo hello from $SLURM_JOB_ID"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr + slurm_cluster.logs()
    job_id = result.stdout.strip().split(";")[0]
    assert out.read_text().strip() == f"hello from {job_id}"
    deadline = time.monotonic() + 30  # slurmctld hands the record to slurmdbd asynchronously
    while _sacct_state(job_id) != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _sacct_state(job_id) == "COMPLETED", slurm_cluster.logs()


# --- the default study through the SLURM profile ----------------------------------------------

def _submitted_job_ids(output: str) -> list[str]:
    return re.findall(r"has been submitted with SLURM jobid (\d+)", output)


def _comparable_metrics(path: Path) -> dict:
    """metrics.json without wall-clock timings, which differ from run to run."""
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.endswith("_seconds")}


def _states(job_ids) -> dict[str, str]:
    """SLURM job id -> state as sacct (the accounting database) says it."""
    if not job_ids:
        return {}
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobIDRaw,State", "-j",
                          ",".join(job_ids)], capture_output=True, text=True, check=True).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def _profile_run(workdir: Path, env: dict, *args: str) -> list[str]:
    return [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--profile", str(ROOT / "workflow" / "profiles" / "slurm"),
            "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs",
            # The profile asks for 4 threads per adapt job; the local run of the same study
            # gives each job the demo config's `threads: 1`, and equal thread counts give
            # bit-equal metrics (CPU reductions split differently with more threads).
            "--max-threads", "1", *args]


def _failed(what: str, output: str, cluster) -> AssertionError:
    errors = [output[max(0, m.start() - 300):m.start() + 2500]
              for m in re.finditer(r"Error in rule|Error executing rule", output)]
    return AssertionError(f"{what}:\n" + "\n...\n".join(errors[:3]) + "\n--- tail\n"
                          + output[-3000:] + cluster.logs())


def _cancel_first_running(rule: str, proc: subprocess.Popen, timeout: float = 600) -> str:
    """scancel the first job of `rule` once SLURM runs it; its job id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            job_id, _, comment = line.partition("|")
            if comment.startswith(f"rule_{rule}_"):
                subprocess.run(["scancel", job_id], check=True)
                return job_id
        time.sleep(0.2)
    raise AssertionError(f"no {rule} job ran before snakemake ended")


def test_default_study_through_the_slurm_profile(slurm_cluster, local_default_study,
                                                 tmp_path):
    """A slice of the default study through the profile, on partitions `cpu` and `gpu`, with
    the running adapt job cancelled by scancel: Snakemake reports it (state and cause) and
    ends instead of waiting; a second run completes the study, equal to the local one.

    Breaks it catches: without clipsvd.slurm's state handling, sacct's `CANCELLED by 0`
    matches nothing in the plugin and the first run never ends (its timeout fails the test);
    without the cause, the report lacks slurmstepd's line."""
    workdir = tmp_path / "study"
    shutil.copytree(ROOT / "config", workdir / "config")
    # A slice of the default study (every rule, fewer runs): SLURM runs the jobs on this 2-CPU
    # node, and CI time is limited. Its runs must equal the local ones.
    study_file = workdir / "config" / "config.yaml"
    study = yaml.safe_load(study_file.read_text())
    study.update(methods=["zero_shot", "linear_probe", "clip_svd"], shots=[2], seeds=[1])
    study_file.write_text(yaml.safe_dump(study))
    env = workflow_env()
    env.update({"CLIPSVD_SLURM_PARTITION": "cpu", "CLIPSVD_SLURM_GPU_PARTITION": "gpu",
                "CLIPSVD_SLURM_GPUS": "1"})
    for name in ("CLIPSVD_SLURM_ACCOUNT", "CLIPSVD_SLURM_MAX_THREADS",
                 "CLIPSVD_SLURM_MAX_MEM_MB", "CLIPSVD_SLURM_MAX_RUNTIME"):
        env.pop(name, None)
    started = time.monotonic()

    # 1. The adapt job is cancelled while it runs; no retry, so Snakemake has to report it.
    #    The plugin finds sacct on this cluster and asks it for the states.
    log_path = tmp_path / "first-run.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(_profile_run(workdir, env, "--retries", "0"), cwd=workdir,
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            cancelled = _cancel_first_running("adapt", first)
            first.wait(timeout=600)
        finally:
            if first.poll() is None:
                first.kill()
    output = log_path.read_text()
    assert first.returncode != 0, output[-3000:]
    assert _sacct_state(cancelled).startswith("CANCELLED by "), _sacct_state(cancelled)
    report = output[output.index("Error in rule adapt"):][:3000]
    assert f"SLURM job {cancelled} ended CANCELLED by " in report, report
    assert re.search(rf"cause: slurmstepd(-\S+)?: error: \*\*\* JOB {cancelled} ON \S+ "
                     r"CANCELLED.*\(from \S+/slurm_logs/rule_adapt/\S+\.log\)", report), report
    first_ids = _submitted_job_ids(output)

    # 2. The rerun completes the study (with squeue as the status command this time).
    result = subprocess.run(_profile_run(workdir, env, "--slurm-status-command", "squeue"),
                            cwd=workdir, capture_output=True, text=True, env=env, timeout=1800)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise _failed("the rerun through the SLURM profile failed", output, slurm_cluster)
    second_ids = _submitted_job_ids(output)

    # Every job of the study (all but the target rule `all`) was an sbatch job that completed:
    # in the first run all but the cancelled one, the rest in the second.
    states = _states(first_ids + second_ids)
    done = [i for i in first_ids + second_ids if states.get(i) == "COMPLETED"]
    assert sorted(i for i in states if i not in done) == [cancelled], states
    dry = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "-n",
         "--forceall", "--cores", "1"], capture_output=True, text=True, env=env)
    total = int(re.search(r"^total\s+(\d+)$", dry.stdout + dry.stderr, re.M).group(1))
    assert len(done) == total - 1, (done, total)
    # An adapt job as SLURM saw it: the gpu partition and one GPU (from the environment), one
    # CPU (--max-threads) and the memory the workflow computed for the study's model at batch
    # 32.
    adapt_id = next(i for i in second_ids if "rule_adapt" in subprocess.run(
        ["scontrol", "show", "job", "-o", i], capture_output=True, text=True).stdout)
    job = subprocess.run(["scontrol", "show", "job", "-o", adapt_id], capture_output=True,
                         text=True, check=True).stdout
    from clipsvd import architectures, job_resources

    memory = job_resources.memory_request_mb(
        "adapt", job_resources.MemoryInputs(architectures.describe(study["model"]["name"]), 32,
                                            4))
    assert "Partition=gpu" in job and "JobState=COMPLETED" in job, job
    assert "NumCPUs=1" in job and f"mem={memory}M" in job and "gpu:1" in job, job

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
    print(f"SLURM runs of the default study: {len(first_ids)} + {len(second_ids)} sbatch "
          f"jobs, {time.monotonic() - started:.0f} s")


def test_a_request_above_the_cap_is_refused_before_sbatch(slurm_cluster, tmp_path):
    """A memory request above CLIPSVD_SLURM_MAX_MEM_MB (a --set-resources override, as a user
    would type it) is refused with one line naming both, and nothing reaches sbatch.

    Break it catches: without the check the job is submitted (an sbatch job id appears)."""
    workdir = tmp_path / "capped"
    shutil.copytree(ROOT / "config", workdir / "config")
    env = {**workflow_env(), "CLIPSVD_SLURM_PARTITION": "cpu", "CLIPSVD_SLURM_GPUS": "0",
           "CLIPSVD_SLURM_MAX_MEM_MB": "20000"}
    before = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True,
                            text=True, check=True).stdout.split()
    result = subprocess.run(
        _profile_run(workdir, env, "--retries", "0", "--set-resources", "demo_data:mem_mb=64000"),
        cwd=workdir, capture_output=True, text=True, env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    expected = ("refused before submission: rule demo_data asks for 64000 MB of memory, more "
                "than CLIPSVD_SLURM_MAX_MEM_MB=20000: lower the request or raise the cap.")
    lines = [line.strip() for line in output.splitlines() if "refused before submission" in line]
    assert lines and all(line.startswith(f"message: {expected}") for line in lines), lines
    assert len(lines[0]) < 400 and not _submitted_job_ids(output), output[-3000:]
    after = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert after == before


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
