"""Choosing the device a job computes on, and claiming a GPU of its own on a shared machine.

On a workstation, `snakemake --cores N --resources gpu=G` lets at most G jobs that declare
`gpu=1` run at once, but does not say *which* GPU each one takes. `acquire_device` closes that
gap: a job claims a free GPU slot by taking an exclusive, non-blocking `flock` on one lock file
per GPU (in `results/.gpu-slots/` or `$CLIPSVD_GPU_LOCK_DIR`), computes on that GPU, and
releases the lock on exit. The kernel releases a lock when its process dies, however it dies,
so a killed job never leaves a GPU taken. When every slot is taken the job waits, saying so in
its log. Under SLURM (`SLURM_JOB_ID` set) the scheduler already chose the GPUs
(`CUDA_VISIBLE_DEVICES`), so the job uses what it was given and claims nothing.

Environment switches:

- `CLIPSVD_GPU_LOCK_DIR`: where the lock files live (default `results/.gpu-slots`, relative to
  the working directory). Point several workflows on one machine at the same folder (e.g.
  `/tmp/clipsvd-gpu-slots`) so they share the GPUs without collisions. Use a local disk:
  `flock` on network file systems is not reliable.
- `CLIPSVD_GPU_SLOTS`: `0` turns the slot logic off (the job uses the first visible GPU, as
  `resolve_device` does); `1` forces it on, also inside a SLURM allocation (for a local
  snakemake run inside one multi-GPU `salloc`).
- `CLIPSVD_FAKE_GPUS=N` (tests): the slot logic believes there are N GPUs; the job claims slot
  i and logs it as usual, but computes on the CPU.
- `CLIPSVD_GPU_POLL_SECONDS`: how often a waiting job retries (default 5).

Every claim and release is one log line with the slot, the process id and an epoch
timestamp (`claimed GPU slot 1 of 2 (pid 4242, t=1718000000.123456)`), so that overlaps can be
checked from the jobs' logs; `claimed_gpu_slot()` returns the slot this process holds.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, GpuMemoryError

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "CLIPSVD_GPU_LOCK_DIR"
FAKE_GPUS_ENV = "CLIPSVD_FAKE_GPUS"
SLOTS_ENV = "CLIPSVD_GPU_SLOTS"
POLL_ENV = "CLIPSVD_GPU_POLL_SECONDS"
DEFAULT_LOCK_DIR = Path("results") / ".gpu-slots"

# Parses the log lines written on claim and release (used by tests and by anyone auditing logs).
SLOT_EVENT = re.compile(
    r"(?P<event>claimed|released) GPU slot (?P<slot>\d+) of (?P<count>\d+) "
    r"\(pid (?P<pid>\d+), t=(?P<t>[0-9.]+)\)")


def resolve_device(requested: str) -> torch.device:
    """auto → the job's first visible GPU if there is one, else the CPU (and say so)."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("key 'device': 'cuda' was asked for but no CUDA GPU is visible to this "
                              "job; set device: auto or cpu, or run where a GPU is available")
        return torch.device("cuda")
    if torch.cuda.is_available():
        return torch.device("cuda")
    log.info("no GPU visible: running on the CPU")
    return torch.device("cpu")


# How a failed GPU allocation shows itself besides torch.OutOfMemoryError: cuBLAS and cuDNN
# report theirs through their status codes, as plain RuntimeErrors; the caching allocator's own
# failures outside a tensor allocation read "CUDA error: out of memory".
_OOM_MARKERS = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "CUDA error: out of memory")


def out_of_memory_kind(error: BaseException) -> str | None:
    """None unless ``error`` is a failed GPU allocation; else "" (torch's own out-of-memory
    error) or the status code that cuBLAS, cuDNN or CUDA reported."""
    if isinstance(error, torch.OutOfMemoryError):
        return ""
    if isinstance(error, RuntimeError):
        text = str(error)
        for marker in _OOM_MARKERS:
            if marker in text:
                return marker
    return None


@contextlib.contextmanager
def gpu_memory_guard(device: torch.device | str, doing: str, advice: str) -> Iterator[None]:
    """Turn a failed GPU allocation inside the block into one line: what was being done and
    which key to change (``advice``). Other errors pass unchanged."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as error:
        kind = out_of_memory_kind(error)
        if kind is None:
            raise
        detail = f" ({kind})" if kind else ""
        raise GpuMemoryError(f"out of GPU memory on {device}{detail} {doing}; {advice}") from None


def batch_size_on_oom(key: str, value: int,
                      device: torch.device | str) -> contextlib.AbstractContextManager:
    """A failed GPU allocation inside the block names the batch-size key to lower."""
    smaller = max(1, int(value) // 2)
    return gpu_memory_guard(device, f"with {key} = {value}",
                            f"lower {key} (e.g. to {smaller}) in the study config, or free the "
                            "GPU of other processes")


def model_to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model.to(device)``; a model that does not fit says so and names the key to change."""
    with gpu_memory_guard(device, "while moving the model to it",
                          "use a GPU with more free memory (free it of other processes), or set "
                          "device: cpu in the study config"):
        return model.to(device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; from pinned memory and asynchronous when it is a GPU, so the
    copy overlaps the work already queued."""
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype to use, or None for fp32; mixed precision is GPU only."""
    if precision == "fp32":
        return None
    if device.type != "cuda":
        log.info("precision %s is GPU only: training in fp32 on the CPU", precision)
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


@dataclass
class GpuSlot:
    """A claimed GPU slot: index among the visible GPUs, its lock file and open descriptor."""

    index: int
    count: int
    path: Path
    fd: int
    fake: bool = False


_claimed: GpuSlot | None = None


def claimed_gpu_slot() -> int | None:
    """The GPU slot this process holds inside `acquire_device`, or None."""
    return _claimed.index if _claimed is not None else None


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)


def _fake_gpu_count() -> int | None:
    value = os.environ.get(FAKE_GPUS_ENV)
    if value in (None, ""):
        return None
    try:
        count = int(value)
    except ValueError:
        raise ConfigError(f"environment variable {FAKE_GPUS_ENV}={value!r}: expected a whole "
                          "number of fake GPUs (tests only); unset it for real GPUs") from None
    if count < 0:
        raise ConfigError(f"environment variable {FAKE_GPUS_ENV}={value!r}: must be 0 or more")
    return count


def _slot_names(count: int) -> list[str]:
    """A name per visible GPU for its lock file: the physical id where CUDA_VISIBLE_DEVICES says.

    Two runs that see different subsets of the GPUs (CUDA_VISIBLE_DEVICES=0,1 and =2,3) then
    lock different files, and two that see the same GPU lock the same file.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible else []
    if len(entries) >= count:
        return [re.sub(r"[^A-Za-z0-9_.-]", "_", e) for e in entries[:count]]
    return [str(i) for i in range(count)]


def _lock_folder_error(directory: Path, what: str) -> ConfigError:
    return ConfigError(
        f"GPU lock folder {directory}: {what}; a folder that several users share needs "
        f"`chmod 1777 {directory}` (everyone may create lock files, as in /tmp), or point "
        f"{LOCK_DIR_ENV} at a folder of your own (it then does not coordinate with theirs)")


def _open_lock(path: Path) -> tuple[int, bool]:
    """An open descriptor of the lock file and whether it is writable.

    A lock file another user created (mode 0644 under umask 022) cannot be opened for writing,
    but flock works on a read-only descriptor just as well: only the pid note is skipped.
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError:
        pass
    try:
        return os.open(path, os.O_RDONLY), False
    except FileNotFoundError:
        raise _lock_folder_error(path.parent, "this user may not create lock files in it") from None
    except PermissionError:
        raise _lock_folder_error(path.parent, f"this user may not open {path.name}") from None


def _try_lock(path: Path) -> tuple[int, bool] | None:
    fd, writable = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd, writable


def claim_gpu_slot(count: int, directory: Path | None = None, poll_seconds: float | None = None,
                   fake: bool = False) -> GpuSlot:
    """Claim a free slot among `count` GPUs, waiting (and logging) while all are taken."""
    directory = Path(directory or lock_dir())
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise _lock_folder_error(directory, "this user may not create it") from None
    if poll_seconds is None:
        poll_seconds = float(os.environ.get(POLL_ENV) or 5.0)
    names = _slot_names(count)
    started = time.monotonic()
    last_report = None
    while True:
        for index, name in enumerate(names):
            path = directory / f"gpu-{name}.lock"
            locked = _try_lock(path)
            if locked is None:
                continue
            fd, writable = locked
            if writable:  # who holds it, for a person looking at the folder
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} since {time.time():.6f}\n".encode())
            waited = time.monotonic() - started
            log.info("claimed GPU slot %d of %d (pid %d, t=%.6f)%s; lock %s%s", index, count,
                     os.getpid(), time.time(), " [fake GPUs]" if fake else "", path,
                     f" after waiting {waited:.0f} s" if waited >= 1 else "")
            return GpuSlot(index, count, path, fd, fake)
        now = time.monotonic()
        if last_report is None or now - last_report >= 60:
            log.info("all %d GPU slots in %s are taken by other jobs: waiting for one to be "
                     "free (waited %.0f s so far)", count, directory, now - started)
            last_report = now
        time.sleep(poll_seconds)


def release_gpu_slot(slot: GpuSlot) -> None:
    log.info("released GPU slot %d of %d (pid %d, t=%.6f)", slot.index, slot.count, os.getpid(),
             time.time())
    try:
        fcntl.flock(slot.fd, fcntl.LOCK_UN)
    finally:
        os.close(slot.fd)


def _slots_enabled() -> bool:
    value = os.environ.get(SLOTS_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    # Under SLURM the scheduler chose this job's GPUs (CUDA_VISIBLE_DEVICES): use them.
    return "SLURM_JOB_ID" not in os.environ


@contextlib.contextmanager
def acquire_device(requested: str, directory: Path | None = None,
                   poll_seconds: float | None = None) -> Iterator[torch.device]:
    """The device to compute on for the duration of the block; claims a GPU slot when needed.

    `requested` is the study's `device`: cpu, auto or cuda.
    """
    global _claimed
    if requested not in ("cpu", "auto", "cuda"):
        raise ConfigError(f"key 'device': {requested!r} is not one of cpu, auto, cuda")
    if requested == "cpu":
        log.info("device: cpu (as configured)")
        yield torch.device("cpu")
        return
    if not _slots_enabled():
        device = resolve_device(requested)
        if device.type == "cuda" and "SLURM_JOB_ID" in os.environ:
            log.info("device: the GPU SLURM gave job %s (CUDA_VISIBLE_DEVICES=%s)",
                     os.environ["SLURM_JOB_ID"], os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        elif device.type == "cuda":
            log.info("device: %s (GPU slots off, %s=0)", device, SLOTS_ENV)
        if device.type == "cuda" and torch.cuda.device_count() > 1:
            log.warning("%d GPUs are visible but a job computes on one (%s); ask for one GPU "
                        "per job (CLIPSVD_SLURM_GPUS=1 under SLURM)", torch.cuda.device_count(),
                        device)
        yield device
        return
    fake = _fake_gpu_count()
    count = fake if fake is not None else (torch.cuda.device_count()
                                           if torch.cuda.is_available() else 0)
    if count == 0:
        if requested == "cuda" and fake is None:
            resolve_device("cuda")  # raises the one-line error
        log.info("no GPU visible: running on the CPU")
        yield torch.device("cpu")
        return
    slot = claim_gpu_slot(count, directory, poll_seconds, fake=fake is not None)
    _claimed = slot
    try:
        if slot.fake:
            log.info("fake GPUs (%s=%d): computing on the CPU", FAKE_GPUS_ENV, count)
            yield torch.device("cpu")
        else:
            torch.cuda.set_device(slot.index)
            device = torch.device(f"cuda:{slot.index}")
            log.info("device: %s (%s)", device, torch.cuda.get_device_name(slot.index))
            yield device
    finally:
        _claimed = None
        release_gpu_slot(slot)
