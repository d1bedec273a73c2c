"""Atomic file writes: a killed job leaves either nothing or a complete file, never half of one.

A file or folder renamed into place gets the mode the process umask gives (0644 / 0755 under
umask 022), as if it had been created in place: ``mkstemp`` and ``mkdtemp`` make their
temporary names private (0600 / 0700), and a rename keeps that mode. A write that fails for
lack of space or permission is an OutputError naming the output, not a traceback.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputError

# What a failed write's errno means to the user, and what to do about it.
_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full; free space (or write results/ to another disk) and run "
                  "again",
    errno.EDQUOT: "the disk quota is used up; free space or ask for more and run again",
    errno.EROFS: "the file system is read-only; run from a writable folder (results/ is "
                 "written under the working directory)",
    errno.EACCES: "permission denied; make the folder writable for this user or run from a "
                  "writable folder",
    errno.EPERM: "permission denied; make the folder writable for this user or run from a "
                 "writable folder",
}
# Inside a write block an EACCES may come from reading an input; only these are about writing.
_WRITE_ONLY_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere the only way to read it is to set it and set it back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode a file (0666) or folder (0777) created now gets from the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def _output_error(target: Path, exc: OSError) -> OutputError:
    if isinstance(exc, OutputError):  # from a nested write: name the outer output
        exc = OSError(exc.errno, os.strerror(exc.errno) if exc.errno else str(exc))
    advice = _WRITE_FAILURES.get(exc.errno, "check that the folder exists and is writable")
    reason = exc.strerror or type(exc).__name__
    return OutputError(f"{target}: cannot write it ({reason}); {advice}", exc.errno)


def _is_write_failure(exc: OSError) -> bool:
    return exc.errno in _WRITE_ONLY_ERRNOS


@contextmanager
def _write_failures_named(target: Path) -> Iterator[None]:
    """A full disk or read-only file system while the caller writes becomes one line naming
    ``target``; any other error passes unchanged."""
    try:
        yield
    except OSError as exc:
        if not _is_write_failure(exc):
            raise
        raise _output_error(target, exc) from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place only if the block succeeds."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise _output_error(target, exc) from None
    tmp_path = Path(tmp)
    try:
        with _write_failures_named(target):
            yield tmp_path
        try:
            os.chmod(tmp_path, umask_mode())
            os.replace(tmp_path, target)
        except OSError as exc:
            raise _output_error(target, exc) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; it replaces ``path`` only on success."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp",
                                         dir=target.parent))
    except OSError as exc:
        raise _output_error(target, exc) from None
    try:
        with _write_failures_named(target):
            yield tmp_path
        try:
            os.chmod(tmp_path, umask_mode(directory=True))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp_path, target)
        except OSError as exc:
            raise _output_error(target, exc) from None
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON deterministically (sorted keys) so equal content gives byte-identical files."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Write tensors as safetensors, atomically and byte-for-byte reproducibly.

    safetensors writes the header's metadata in hash-map order, which changes from run to run;
    the header is rewritten here with its keys sorted (a valid file for every reader).
    """
    import struct

    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    ordered = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp:
        tmp.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
