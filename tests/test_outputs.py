"""Outputs readable by colleagues, and writes that fail (issue 15, point 4 and point 5).

Every file and folder a study writes gets the mode the process umask gives, like a file
created in place; a full disk or a read-only results folder is one line naming the output,
exit code 2, and nothing partial.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import yaml

from clipsvd import io
from clipsvd.data import prepare as prepare_module


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    old = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def modes_under(folder: Path) -> dict[str, int]:
    found = {}
    for path in [folder, *folder.rglob("*")]:
        found[str(path.relative_to(folder.parent))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def test_atomic_writes_get_umask_modes(tmp_path, umask):
    """Catches: mkstemp's 0600 and mkdtemp's 0700 kept by the rename into place."""
    umask(0o022)
    io.write_json(tmp_path / "a.json", {"x": 1})
    io.write_safetensors(tmp_path / "w.safetensors", {})
    with io.atomic_dir(tmp_path / "store") as tmp:
        io.write_text(tmp / "inner.txt", "x")
        (tmp / "sub").mkdir()
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "store" / "inner.txt").stat().st_mode) == 0o644
    umask(0o077)  # a private umask stays private
    io.write_json(tmp_path / "b.json", {})
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600


@pytest.mark.slow
def test_every_output_of_a_study_follows_the_umask(tmp_path, run_cli, umask, monkeypatch):
    """demo data, store, split file, features, adapter, metrics, predictions, run.json,
    interpretation and report, written through the CLI under umask 027: files 0640, folders
    0750 (0644/0755 under 022). Catches: any writer that keeps a temporary name's private
    mode (adapter.safetensors, metrics.json, report.html, classes.json ... were 0600, store
    and interpret/ folders 0700)."""
    umask(0o027)
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml")
                         .read_text())
    raw.update(methods=["linear_probe", "clip_svd"], shots=[1], seeds=[1], device="cpu",
               tracking={"enabled": False})
    raw["clip_svd"]["epochs"] = 1
    raw["datasets"][0]["demo"] = {"per_class": 20, "image_size": 32, "seed": 0}
    raw["interpret"] = {"max_images": 8, "k": 2}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(raw))
    results = Path("results")
    store, split = results / "prepared/demo_scans", results / "splits/demo_scans/s.json"
    features = results / "features/demo_scans/tiny.npy"
    runs = [results / "runs/demo/demo_scans" / m / "few_shot/shots1/seed1"
            for m in ("linear_probe", "clip_svd")]
    steps = [
        ("demo-data", "--dataset", "demo_scans"),
        ("prepare", "--dataset", "demo_scans", "--out", store, "--log", results / "logs/p.log"),
        ("sample", "--dataset", "demo_scans", "--store", store, "--setting", "few_shot",
         "--shots", 1, "--seed", 1, "--out", split),
        ("features", "--store", store, "--out", features),
        ("adapt", "--dataset", "demo_scans", "--method", "clip_svd", "--split", split,
         "--store", store, "--run-dir", runs[1]),
        ("evaluate", "--dataset", "demo_scans", "--method", "clip_svd", "--split", split,
         "--store", store, "--run-dir", runs[1]),
        ("evaluate", "--dataset", "demo_scans", "--method", "linear_probe", "--split", split,
         "--store", store, "--run-dir", runs[0], "--features", features),
        ("interpret", "--split", split, "--store", store, "--run-dir", runs[1]),
        ("report", "--out-dir", results / "report/demo", "--no-mlflow", *runs),
    ]
    for command, *args in steps:
        code, stderr = run_cli(command, "--config", config, *args)
        assert code == 0, (command, stderr[-2000:])
    modes = modes_under(results)
    assert len(modes) > 40
    wrong = {p: oct(m) for p, m in modes.items()
             if m != (0o750 if (Path(p).is_dir()) else 0o640)}
    assert not wrong, wrong
    for name in ("adapter.safetensors", "metrics.json", "predictions.csv", "run.json"):
        assert modes[str(runs[1] / name)] == 0o640
    assert modes[str(store / "classes.json")] == modes[str(store / "provenance.json")] == 0o640
    assert modes[str(results / "report/demo/report.html")] == 0o640
    assert modes[str(runs[1] / "interpret")] == modes[str(store)] == 0o750


def _demo_study(tmp_path: Path) -> tuple[Path, Path]:
    from clipsvd.config import DemoConfig
    from clipsvd.data.demo import generate_demo_dataset

    root = tmp_path / "raw"
    generate_demo_dataset(root, DemoConfig(per_class=6, image_size=16, seed=0))
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "study": "w", "datasets": [{"name": "toy", "format": "csv", "root": str(root),
                                    "manifest": "manifest.csv"}]}))
    return config, tmp_path / "results" / "prepared" / "toy"


def _no_partial_store(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_full_disk_during_prepare_is_one_line(tmp_path, run_cli, monkeypatch):
    """ENOSPC while the images are written: one line naming the store, exit 2, no store and
    no temporary folder left. Catches: an OSError traceback."""
    config, out = _demo_study(tmp_path)

    def full(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(prepare_module._NpyStream, "append", full)
    code, stderr = run_cli("prepare", "--config", config, "--dataset", "toy", "--out", out,
                           "--image-size", 16)
    assert code == 2 and "Traceback" not in stderr
    lines = [l for l in stderr.splitlines() if l.startswith("clipsvd prepare: error:")]
    assert lines == [f"clipsvd prepare: error: {out}: cannot write it (No space left on "
                     "device); the disk is full; free space (or write results/ to another "
                     "disk) and run again"]
    _no_partial_store(out)


def test_read_only_results_folder_during_prepare_is_one_line(tmp_path, run_cli, monkeypatch):
    """EROFS when the store's folder is created: one line naming it, exit 2, nothing left.
    Catches: an OSError traceback from mkdtemp."""
    config, out = _demo_study(tmp_path)
    out.parent.mkdir(parents=True)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir", ""))

    monkeypatch.setattr(io.tempfile, "mkdtemp", read_only)
    code, stderr = run_cli("prepare", "--config", config, "--dataset", "toy", "--out", out,
                           "--image-size", 16)
    assert code == 2 and "Traceback" not in stderr
    assert (f"clipsvd prepare: error: {out}: cannot write it (Read-only file system); the file "
            "system is read-only; run from a writable folder") in stderr
    _no_partial_store(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_unwritable_results_folder_for_real(tmp_path, run_cli):
    config, out = _demo_study(tmp_path)
    out.parent.mkdir(parents=True)
    out.parent.chmod(0o555)
    try:
        code, stderr = run_cli("prepare", "--config", config, "--dataset", "toy", "--out", out,
                               "--image-size", 16)
    finally:
        out.parent.chmod(0o755)
    assert code == 2 and f"{out}: cannot write it (Permission denied)" in stderr


def test_unwritable_log_file_is_one_line(tmp_path, run_cli, monkeypatch):
    config, _ = _demo_study(tmp_path)
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log folder should be")
    code, stderr = run_cli("validate", "--config", config, "--log", blocker / "v.log")
    assert code == 2 and "Traceback" not in stderr
    assert f"clipsvd validate: error: {blocker / 'v.log'}: cannot write the log file" in stderr
