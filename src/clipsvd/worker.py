"""A warm process that forks each workflow job from a ready, fully imported interpreter.

Most of a small study's wall time was process start-up: every job paid seconds of imports
(torch, open_clip, MONAI, MLflow, matplotlib) for milliseconds to seconds of work (issue 18).
``python -m clipsvd SUBCOMMAND …`` therefore asks a warm worker, when one answers, to run the
subcommand: the worker forks a child that takes over the caller's standard streams, working
directory, environment and umask, runs ``clipsvd.cli.main`` exactly as the caller would, and
reports its exit status, which the caller returns. Each job still is its own process (a fork
holds nothing of an earlier job), so its results are those of a fresh process; the caller
forwards SIGINT/SIGTERM/SIGHUP to it, and a job whose caller is killed is killed with it.

When no worker answers, the caller starts one and waits until it serves (its imports are the
ones the job would make itself), running the job itself only if the worker cannot start or the
job is a light one (``LIGHT``: it runs while the worker imports); the worker exits after ``CLIPSVD_WORKER_IDLE`` seconds (default 60) without jobs. A worker serves
only callers with the same interpreter, import path, package files and environment (its socket
is named by a digest of them), so an edited source file or another ``CLIPSVD_*`` setting gets a
fresh one. ``CLIPSVD_WORKER=off`` runs every job in its own interpreter, as does any job of a
SLURM allocation (its memory and CPU must be accounted to the job's own cgroup).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import struct
import sys
import time
from pathlib import Path

MODE_ENV = "CLIPSVD_WORKER"
DIR_ENV = "CLIPSVD_WORKER_DIR"
IDLE_ENV = "CLIPSVD_WORKER_IDLE"
# Subcommands worth a warm interpreter: every one a rule runs (validate and --help are cheap).
SUBCOMMANDS = {"demo-data", "prepare", "sample", "features", "adapt", "evaluate", "interpret",
               "report", "sync"}
# Jobs whose own imports take about a second: while a worker starts, they run in the caller
# rather than wait for it.
LIGHT = {"demo-data", "sample"}
# What the worker imports before it serves: everything a rule's job imports that takes time.
PRELOAD = ("open_clip", "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.db.utils", "mlflow.store.artifact.local_artifact_repo", "alembic.command",
           "alembic.runtime.migration", "alembic.autogenerate", "sklearn.linear_model",
           "matplotlib.pyplot", "clipsvd.cli", "clipsvd.train", "clipsvd.evaluate",
           "clipsvd.features", "clipsvd.interpret", "clipsvd.tracking", "clipsvd.report",
           "clipsvd.data.prepare", "clipsvd.data.sampling", "clipsvd.data.demo")
# Imports whose libraries start threads that survive a fork (OpenBLAS and jemalloc stop and
# restart theirs around it); any other thread after the preload is a reason not to serve.
FORK_SAFE_THREADS = ("numpy", "pandas", "sklearn.linear_model", "torch")
# Variables that differ between the jobs of one Snakemake run without changing what a job does.
_ENV_IGNORED = {"PWD", "OLDPWD", "SHLVL", "_"}
_HEADER = struct.Struct("!I")
_STARTED_IN = ""  # the worker's working directory when it started


def _package_files() -> list[tuple[str, int, int]]:
    package = Path(__file__).resolve().parent
    files = []
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".json", ".yaml", ".txt") and "__pycache__" not in path.parts:
            stat = path.stat()
            files.append((path.relative_to(package).as_posix(), stat.st_size, stat.st_mtime_ns))
    return files


def worker_key(environ: dict[str, str] | None = None) -> str:
    """A digest of everything a warm interpreter was made from: a caller whose digest differs
    (another venv, an edited source file, another setting in the environment) gets another
    worker."""
    environ = dict(os.environ if environ is None else environ)
    env = sorted((k, v) for k, v in environ.items() if k not in _ENV_IGNORED)
    text = json.dumps([sys.executable, sys.version, _import_path(os.getcwd()),
                       str(Path(__file__).resolve()), _package_files(), env])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _import_path(cwd: str, placeholder: str = "<cwd>") -> list[str]:
    """sys.path with the working directory (first with ``python -m``) as a placeholder: a
    job's import path is the worker's with its own working directory in that place."""
    return [placeholder if entry in ("", cwd) else entry for entry in sys.path]


def socket_dir() -> Path:
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV]).absolute()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and os.access(runtime, os.W_OK) else Path("/tmp")
    return base / f"clipsvd-workers-{os.getuid()}"


def enabled(argv: list[str]) -> bool:
    mode = os.environ.get(MODE_ENV, "on").strip().lower()
    if mode in ("off", "0", "false", "no"):
        return False
    if "SLURM_JOB_ID" in os.environ:  # a cluster job's usage belongs to its own cgroup
        return False
    if not argv or argv[0] not in SUBCOMMANDS or "-h" in argv or "--help" in argv:
        return False
    return hasattr(socket, "send_fds") and hasattr(os, "fork")


def _send(conn: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    conn.sendall(_HEADER.pack(len(data)) + data)


def _receive(conn: socket.socket) -> dict | None:
    def exactly(n: int) -> bytes | None:
        chunks, left = [], n
        while left:
            chunk = conn.recv(left)
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    header = exactly(_HEADER.size)
    if header is None:
        return None
    body = exactly(_HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


def jobs_served(folder: Path, cwd: Path) -> list[int]:
    """The pids of the jobs that the workers of a socket folder forked for callers in cwd, as
    their logs list them (tests and benchmarks/gpu_first_run.py check that jobs were forked)."""
    pids = []
    for log in Path(folder).glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            found = re.fullmatch(r".* job (\d+): \S+ in (.+)", line)
            if found and found[2] == str(cwd):
                pids.append(int(found[1]))
    return pids


# ----------------------------------------------------------------------------- the caller


def run_in_worker(argv: list[str]) -> int | None:
    """The job's exit status when a warm worker ran it; None when the caller must run it
    itself (workers are off, or none could start)."""
    if not enabled(argv):
        return None
    folder = socket_dir()
    path = folder / f"{worker_key()}.sock"
    conn = _connect(path)
    if conn is None:
        alive = _worker_pid(path) is not None  # another caller's worker, still importing
        started = None if alive else _start_worker(folder, path)
        if argv[0] in LIGHT or (started is None and not alive):
            return None
        conn = _wait_for_worker(path, started)
    if conn is None:
        return None
    streams = _standard_streams()
    try:
        socket.send_fds(conn, [b"j"], streams)
        _send(conn, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                     "umask": _current_umask()})
        reply = _receive(conn)
    except OSError:
        reply = None
    finally:
        for given, fd in zip((0, 1, 2), streams):
            if fd != given:
                os.close(fd)
    if not reply:  # the worker went away before the job started: run it here
        conn.close()
        return None
    pid = reply["pid"]

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        ended = _receive(conn)
    except OSError:
        ended = None
    conn.close()
    if ended is None:
        print(f"clipsvd: the worker process that ran this job (pid {pid}) ended without its "
              "exit status; rerun the job (CLIPSVD_WORKER=off runs it in its own process)",
              file=sys.stderr)
        return 1
    status = ended["status"]
    return status if status >= 0 else 128 - status


def _standard_streams() -> list[int]:
    """The caller's stdin, stdout and stderr; /dev/null for any it does not have open."""
    streams = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            streams.append(fd)
        except OSError:
            streams.append(os.open(os.devnull, os.O_RDWR))
    return streams


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        return conn
    except OSError:
        conn.close()
        return None


def _start_worker(folder: Path, path: Path):
    """The worker process this caller started, or None when it could not start one."""
    import subprocess

    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = open(path.with_suffix(".log"), "ab")
    except OSError:
        return None  # no place for a socket: every job runs in its own process
    with log:
        return subprocess.Popen([sys.executable, "-m", "clipsvd.worker", str(path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True)


def _worker_pid(path: Path) -> int | None:
    try:
        pid = int(path.with_suffix(".pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _wait_for_worker(path: Path, started, timeout: float = 180.0) -> socket.socket | None:
    """Connect once the worker serves: the one this caller started, or one another caller
    started (still importing). The wait ends when neither is alive (an import failed, or no
    worker could start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = _connect(path)
        if conn is not None:
            return conn
        ours_alive = started is not None and started.poll() is None
        if not ours_alive and _worker_pid(path) is None:
            return None
        time.sleep(0.05)
    return None


# ----------------------------------------------------------------------------- the worker


def _os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def serve(path: Path) -> None:
    import fcntl

    lock = open(path.with_suffix(".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another worker for these callers is starting or serving
    pid_file = path.with_suffix(".pid")
    pid_file.write_text(str(os.getpid()))
    # The folder it was started in may be removed while it serves (a finished study's); its
    # jobs' import path names the folder each caller is in instead (_fork_job).
    global _STARTED_IN
    _STARTED_IN = os.getcwd()
    os.chdir("/")
    try:
        listener = _preload_and_listen(path)
        if listener is not None:
            _serve_jobs(listener, path, lock)
    finally:
        if _worker_pid(path) == os.getpid():
            pid_file.unlink()


def _preload_and_listen(path: Path) -> socket.socket | None:
    import importlib
    import threading

    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    # Should an import ask whether CUDA is available, NVML answers instead of the CUDA driver,
    # whose state a forked child could not use.
    nvml = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    started = time.perf_counter()
    for name in FORK_SAFE_THREADS:
        importlib.import_module(name)
    known = _os_threads()
    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    if nvml is None:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
    else:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml

    from clipsvd import config, timing

    config._load_schema()  # every job validates its config against it
    timing.begin_job()  # the worker's own start: each forked job's clock starts at cli.main

    # A fork is only sound with no Python thread, no OpenMP pool and no CUDA context (none of
    # them survives a fork); if an import started one, serve nothing.
    if threading.active_count() != 1 or _os_threads() != known or torch.cuda.is_initialized():
        print(f"clipsvd worker: {_os_threads()} threads after imports ({known} expected) or "
              "CUDA initialised; not serving", flush=True)
        return None
    print(f"clipsvd worker {os.getpid()}: imports took {time.perf_counter() - started:.1f} s",
          flush=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


def _serve_jobs(listener: socket.socket, path: Path, lock) -> None:
    import select

    idle = float(os.environ.get(IDLE_ENV) or 60)
    # SIGCHLD wakes the loop below at once, so a job's status reaches its caller at once.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    inode = path.stat().st_ino
    jobs: dict[int, socket.socket] = {}
    last = time.monotonic()
    try:
        while True:
            readable, _, _ = select.select([listener, wake_r], [], [], 1.0)
            if wake_r in readable:
                os.read(wake_r, 4096)
            if listener in readable:
                conn, _ = listener.accept()
                pid = _fork_job(conn, [listener, lock, *jobs.values()], (wake_r, wake_w))
                if pid:
                    jobs[pid] = conn
                else:
                    conn.close()
            while jobs:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if not pid:
                    break
                conn = jobs.pop(pid, None)
                if conn is not None:
                    try:
                        _send(conn, {"status": os.waitstatus_to_exitcode(status)})
                    except OSError:
                        pass
                    conn.close()
            if jobs or listener in readable:
                last = time.monotonic()
            elif time.monotonic() - last > idle:
                break
            try:  # replaced or removed: a newer worker serves these callers
                if path.stat().st_ino != inode:
                    break
            except FileNotFoundError:
                break
    finally:
        try:
            if path.stat().st_ino == inode:
                path.unlink()
        except FileNotFoundError:
            pass


def _fork_job(conn: socket.socket, inherited: list, wake: tuple[int, int]) -> int | None:
    try:
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        request = _receive(conn)
    except OSError:
        return None
    if request is None or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} job {pid}: {request['argv'][0]} "
              f"in {request['cwd']}", flush=True)
        return pid
    # The child: become the caller's job.
    code = 1
    try:
        # Nothing of the worker stays open in a job: its socket, lock, other jobs' callers.
        for handle in inherited:
            handle.close()
        signal.set_wakeup_fd(-1)
        for fd in wake:
            os.close(fd)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.path[:] = _import_path(_STARTED_IN, request["cwd"])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.umask(request["umask"])
        sys.argv = [str(Path(__file__).with_name("__main__.py")), *request["argv"]]
        _send(conn, {"pid": os.getpid()})
        _die_with_caller(conn)
        from clipsvd import cli

        code = cli.main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _die_with_caller(conn: socket.socket) -> None:
    """The caller never writes after its request: end of file means it is gone (killed), and
    its job must not go on writing outputs Snakemake already counts as incomplete."""
    import threading

    def watch():
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
