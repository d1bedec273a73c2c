"""The skips a clean machine may take, in one place; any other skip fails the test run.

A skip that no entry below allows, or one whose entry's condition does not hold on this machine
(chromium missing although the tests run as root with apt-get, so installing it was possible
and failed), is turned into a failure by the hooks at the end of this file, which
tests/conftest.py installs. So `python3 dev.py test` and `.ci/run` cannot pass while a test
silently did not run. A new skip needs an entry here: its exact reason (a regular expression
matched against the whole reason) and the condition under which a clean machine takes it.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEDMNIST_DIR = ROOT.parent / "shared" / "data" / "medmnist"
MEDMNIST_MISSING = "shared MedMNIST data not found"  # the reason a test needing it skips with


def _root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _cannot_install() -> bool:
    """Debian packages can be installed by the tests only as root with apt-get."""
    return not (_root() and shutil.which("apt-get"))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


PREFIX_FINGERPRINTS = ROOT / "tests" / "data" / "pretrain_prefix_fingerprints.json"


def expected_prefix_fingerprint() -> str | None:
    """The step-2 fingerprint the shipped recipe gives on this machine: measured here at the
    weights' commit (tests/data/pretrain_prefix_fingerprints.json), or the shipped weights' own
    when they were made with this torch build on this CPU kind; None when neither is known."""
    import json
    from importlib import metadata

    import torch
    from safetensors import safe_open

    from clipsvd.models import PACKAGED_WEIGHTS, PRETRAINED_DIR
    from clipsvd.pretrain import cpu_identity

    torch_version, cpu = metadata.version("torch"), cpu_identity()
    for known in json.loads(PREFIX_FINGERPRINTS.read_text())["by_platform"]:
        if (known["torch"], known["cpu"]) == (torch_version, cpu):
            return known["fingerprint_step_2"]
    with safe_open(str(PRETRAINED_DIR / PACKAGED_WEIGHTS[("mini-clip", "medmnist")]), "pt") as f:
        shipped = f.metadata()
    same = (shipped["cpu_capability"], json.loads(shipped["versions"])["torch"]) == (
        torch.backends.cpu.get_cpu_capability(), torch_version)  # as pretrain records
    if same and shipped.get("cpu", cpu) == cpu:
        return json.loads(shipped["check_fingerprints"])["2"]
    return None


def other_platform_than_shipped_weights() -> bool:
    """The packaged mini-clip weights were made with another torch build or CPU kind, and the
    recipe's prefix was not measured on this one."""
    return expected_prefix_fingerprint() is None


def _has_jpeg_ls_decoder() -> bool:
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    return get_decoder(JPEGLSLossless).is_available


@dataclass(frozen=True)
class AllowedSkip:
    reason: str  # a regular expression for the whole reason
    when: Callable[[], bool]  # true where a clean machine may take this skip
    condition: str  # the condition in words, for the failure message

    def matches(self, reason: str) -> bool:
        return re.fullmatch(self.reason, reason, re.S) is not None


ALLOWED_SKIPS: tuple[AllowedSkip, ...] = (
    AllowedSkip(re.escape(MEDMNIST_MISSING), lambda: not MEDMNIST_DIR.is_dir(),
                f"{MEDMNIST_DIR} does not exist (a clone without shared/ next to it)"),
    AllowedSkip(re.escape("this host has a GPU"), _has_gpu,
                "torch sees a CUDA GPU (the test checks the CPU fallback)"),
    AllowedSkip(r"chromium is not installed and could not be installed \(.*\)", _cannot_install,
                "the tests do not run as root with apt-get, so chromium cannot be installed"),
    AllowedSkip(r"no SLURM cluster for this test: slurm-wlm and munge are not installed and "
                r"(apt-get needs root|there is no apt-get on this host)", _cannot_install,
                "the tests do not run as root with apt-get, so slurm-wlm cannot be installed"),
    AllowedSkip(re.escape("starting slurmctld and slurmd and writing /etc/slurm/slurm.conf "
                          "needs root"), lambda: not _root(), "the tests do not run as root"),
    AllowedSkip(re.escape("/etc/slurm/slurm.conf exists and was not written by this test: not "
                          "touching a real SLURM configuration"),
                lambda: Path("/etc/slurm/slurm.conf").exists(),
                "the host has a SLURM configuration of its own"),
    AllowedSkip(re.escape("root writes to read-only folders"), _root,
                "the tests run as root (a permission test; the EROFS case is simulated anyway)"),
    AllowedSkip(re.escape("a JPEG-LS decoder is installed here"), _has_jpeg_ls_decoder,
                "a JPEG-LS plugin for pydicom is installed (the test needs one missing)"),
    AllowedSkip(r"the shipped fingerprints were recorded with torch \S+ on \S+ and none was "
                r"measured on this CPU",
                other_platform_than_shipped_weights,
                "mini-clip's packaged weights were made with another torch build or CPU kind, "
                "and tests/data/pretrain_prefix_fingerprints.json has no entry for this one"),
)


def skip_reason(report) -> str:
    """The reason given to pytest.skip / skipif, from a skipped report."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def unexpected(reason: str) -> str | None:
    """Why a skip with this reason is not allowed here, or None when it is."""
    for entry in ALLOWED_SKIPS:
        if entry.matches(reason):
            if entry.when():
                return None
            return (f"skip not allowed on this machine: {reason!r}; tests/allowed_skips.py "
                    f"allows it only where {entry.condition}")
    return (f"unexpected skip: {reason!r}; the skips a clean machine may take are listed in "
            "tests/allowed_skips.py (add an entry with its condition if this one is expected)")


def _enforce(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        problem = unexpected(skip_reason(report))
        if problem:
            report.outcome = "failed"
            report.longrepr = problem


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _enforce(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _enforce(outcome.get_result())
