"""An unexpected skip fails the test run; the allowed ones are listed in tests/allowed_skips.py."""
import subprocess
import sys
import textwrap
from pathlib import Path

import allowed_skips
import conftest

TESTS = Path(__file__).resolve().parent

INNER_CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import allowed_skips
from allowed_skips import AllowedSkip, pytest_make_collect_report, pytest_runtest_makereport

allowed_skips.ALLOWED_SKIPS = (
    AllowedSkip("expected here", lambda: True, "always"),
    AllowedSkip("expected elsewhere", lambda: False, "the moon is full"),
)
"""

INNER_TESTS = """
import pytest

def test_passes():
    pass

def test_expected_skip():
    pytest.skip("expected here")

@pytest.mark.skipif(True, reason="expected elsewhere")
def test_skip_whose_condition_does_not_hold():
    pass

def test_unlisted_skip():
    pytest.skip("a Debian package failed to install")

def test_importorskip():
    pytest.importorskip("clipsvd_no_such_module")

@pytest.mark.xfail(reason="xfail is not a skip", strict=True)
def test_xfail():
    assert False
"""


def run_inner(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess:
    for name, text in {"conftest.py": INNER_CONFTEST, **files}.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True)


def test_unexpected_skips_fail_and_listed_ones_pass(tmp_path):
    """Catches the hooks doing nothing (every skip passes silently, as before issue 21), a
    listed skip allowed whatever its condition, and an importorskip slipping through."""
    result = run_inner(tmp_path, {"test_inner.py": INNER_TESTS})
    out = result.stdout
    assert result.returncode == 1, out
    assert "PASSED test_inner.py::test_passes" in out
    assert "SKIPPED [1] test_inner.py:8: expected here" in out
    assert "XFAIL test_inner.py::test_xfail" in out
    assert ("skip not allowed on this machine: 'expected elsewhere'; tests/allowed_skips.py "
            "allows it only where the moon is full") in out
    assert "unexpected skip: 'a Debian package failed to install'" in out
    assert "unexpected skip: \"could not import 'clipsvd_no_such_module'" in out
    assert out.strip().splitlines()[-1].startswith(
        "2 failed, 1 passed, 1 skipped, 1 xfailed, 1 error")


def test_a_module_skipped_unexpectedly_is_an_error(tmp_path):
    """A skip at collection (a whole module) is checked too; catches a policy that looks only
    at test calls."""
    result = run_inner(tmp_path, {"test_module.py": """
        import pytest
        pytest.skip("whole module off", allow_module_level=True)
        """})
    assert result.returncode != 0
    assert "ERROR test_module.py - unexpected skip: 'whole module off'" in result.stdout


def test_the_suite_installs_the_policy():
    """tests/conftest.py registers the hooks; catches removing them from it."""
    assert conftest.pytest_runtest_makereport is allowed_skips.pytest_runtest_makereport
    assert conftest.pytest_make_collect_report is allowed_skips.pytest_make_collect_report


def test_listed_reasons_match_the_suites_skips():
    """Each entry matches a reason that a test of this suite gives (copied here), so no entry
    allows a skip that no test takes; a failed `apt-get install` as root matches none. Catches
    an entry's pattern no longer matching its test's reason."""
    examples = [
        allowed_skips.MEDMNIST_MISSING,
        "this host has a GPU",  # test_devices.py
        "chromium is not installed and could not be installed (apt-get install -y chromium)",
        "chromium is not installed and could not be installed (needs root and apt-get: "
        "`apt-get install -y chromium`)",  # test_mlflow_server.py, test_report.py
        "no SLURM cluster for this test: slurm-wlm and munge are not installed and apt-get "
        "needs root",  # test_slurm.py, the next three too
        "no SLURM cluster for this test: slurm-wlm and munge are not installed and there is no "
        "apt-get on this host",
        "starting slurmctld and slurmd and writing /etc/slurm/slurm.conf needs root",
        "/etc/slurm/slurm.conf exists and was not written by this test: not touching a real "
        "SLURM configuration",
        "root writes to read-only folders",  # test_outputs.py
        "a JPEG-LS decoder is installed here",  # test_data_images.py
        "the shipped fingerprints were recorded with torch 2.14.1 on AVX2 and none was "
        "measured on this CPU",  # test_pretrain.py
    ]
    for entry in allowed_skips.ALLOWED_SKIPS:
        assert any(entry.matches(example) for example in examples), entry.reason
    for example in examples:
        assert sum(entry.matches(example) for entry in allowed_skips.ALLOWED_SKIPS) == 1, example
    assert not any(entry.matches("no SLURM cluster for this test: `apt-get update` failed: E")
                   for entry in allowed_skips.ALLOWED_SKIPS)
