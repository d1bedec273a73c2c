"""Seconds a job spends in its work, as the work itself measures them.

A job's log ends with them and with the job's own wall time, so a study's wall time can be
set against the compute it did (benchmarks/demo_study.py, issue 18): what lies between the two
is start-up, imports, model construction, tracking and plotting.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

_started = time.perf_counter()
_spent: dict[str, float] = {}
_jobs = 0


def begin_job() -> None:
    """A process's first job started with the process (its start-up and imports are part of
    it); a later job of the same process, or one forked from a warm worker (which counts its
    own start as the first), starts now."""
    global _started, _jobs
    if _jobs:
        _started = time.perf_counter()
    _jobs += 1
    _spent.clear()


def record(part: str, seconds: float) -> None:
    _spent[part] = _spent.get(part, 0.0) + float(seconds)


@contextmanager
def measure(part: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        record(part, time.perf_counter() - started)


def summary() -> str:
    parts = ", ".join(f"{k} {v:.3f} s" for k, v in sorted(_spent.items()))
    return (f"job time {time.perf_counter() - _started:.3f} s; compute "
            f"{sum(_spent.values()):.3f} s" + (f" ({parts})" if parts else ""))
