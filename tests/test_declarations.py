"""`clipsvd validate` opens every dataset's declaration (manifest header, class folders,
MedMNIST file, split file) and lists every problem at once, one a line; `prepare` runs the same
check before it reads an image (issue 33: a manifest whose columns did not match was called
valid, then its missing columns came out one per failed run)."""
from __future__ import annotations

import numpy as np
import yaml
from PIL import Image

from test_reliability import error_lines


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(path)


def _study(tmp_path, dataset: dict) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "study": "s", "model": {"name": "tiny-clip", "pretrained": None},
        "datasets": [{"name": "cells", "templates": ["a photo of {}."], **dataset}]}))
    return str(path)


def _cells(tmp_path):
    """The issue's manifest: file,cell_type,donor."""
    root = tmp_path / "cells"
    rows = ["file,cell_type,donor"]
    for i in range(6):
        _image(root / f"img{i}.png")
        rows.append(f"img{i}.png,{'neutrophil' if i % 2 else 'platelet'},d{i % 3}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_validate_lists_every_mismatched_manifest_column_in_one_run(tmp_path, run_cli):
    root = _cells(tmp_path)
    config = _study(tmp_path, {"format": "csv", "root": str(root), "manifest": "manifest.csv",
                               "columns": {"group": "patient"}})
    code, stderr = run_cli("validate", "--config", config)
    assert code == 2 and "Traceback" not in stderr, stderr
    (head,) = error_lines(stderr, "validate")
    assert "3 problems" in head
    lines = stderr.strip().splitlines()[1:]
    manifest = root / "manifest.csv"
    assert len(lines) == 3, stderr
    assert lines[0].startswith(f"{manifest}: needs a 'path' column (has: file, cell_type, donor)")
    assert lines[1].startswith(f"{manifest}: needs a 'label' column")
    assert lines[2].startswith(f"{manifest}: has no column 'patient' (columns.group")
    # fixed as the lines say, it is valid, and prepare reads it
    fixed = _study(tmp_path, {"format": "csv", "root": str(root), "manifest": "manifest.csv",
                              "columns": {"path": "file", "label": "cell_type",
                                          "group": "donor"}})
    code, stderr = run_cli("validate", "--config", fixed)
    assert code == 0, stderr


def test_prepare_reports_the_same_problems_before_writing_anything(tmp_path, run_cli):
    root = _cells(tmp_path)
    config = _study(tmp_path, {"format": "csv", "root": str(root), "manifest": "manifest.csv"})
    out = tmp_path / "prepared"
    code, stderr = run_cli("prepare", "--config", config, "--dataset", "cells", "--out", out)
    assert code == 2 and "Traceback" not in stderr, stderr
    assert "needs a 'path' column" in stderr and "needs a 'label' column" in stderr
    assert not out.exists()


def test_validate_lists_every_empty_class_folder(tmp_path, run_cli):
    root = tmp_path / "folders"
    _image(root / "benign" / "a.png")
    (root / "malignant").mkdir()
    (root / "normal" / "notes").mkdir(parents=True)
    (root / "normal" / "notes" / "read.txt").write_text("not an image")
    config = _study(tmp_path, {"format": "folder", "root": str(root)})
    code, stderr = run_cli("validate", "--config", config)
    assert code == 2, stderr
    assert "2 problems" in stderr
    assert f"{root / 'malignant'}: class folder 'malignant' holds no images" in stderr
    assert f"{root / 'normal'}: class folder 'normal' holds no images" in stderr


def test_validate_names_a_missing_medmnist_file_and_split_file(tmp_path, run_cli):
    (tmp_path / "m").mkdir()
    (tmp_path / "c").mkdir()
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "study": "s", "model": {"name": "tiny-clip", "pretrained": None}, "datasets": [
            {"name": "blood", "format": "medmnist", "root": str(tmp_path / "m"),
             "medmnist": {"flag": "bloodmnist", "size": 28}, "templates": ["a {}."]},
            {"name": "coop", "format": "coop_json", "root": str(tmp_path / "c"),
             "templates": ["a {}."]}]}))
    code, stderr = run_cli("validate", "--config", path)
    assert code == 2, stderr
    assert f"{tmp_path / 'm' / 'bloodmnist.npz'}: MedMNIST file not found" in stderr
    assert f"{tmp_path / 'c'}: no split_<NAME>.json found" in stderr
