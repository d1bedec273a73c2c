"""The benchmark scripts parse and start: CI runs none of them, so nothing else would notice
one that no longer does."""
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_compiles(script, tmp_path):
    py_compile.compile(str(script), cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_demo_study_benchmark_states_its_options():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_study.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--without" in done.stdout and "--modes" in done.stdout
