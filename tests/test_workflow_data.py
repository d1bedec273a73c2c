"""Editing a user's dataset re-prepares its store through snakemake, and nothing else does
(issue 15, point 2)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clipsvd.config import DatasetConfig, DemoConfig
from clipsvd.data.demo import generate_demo_dataset
from clipsvd.data.listing import listing_digest

from conftest import workflow_env

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
DOWNSTREAM = {"prepare", "sample", "features", "adapt", "evaluate", "interpret", "report", "all"}


def snakemake(workdir: Path, config: Path, *args: str) -> str:
    result = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "--cores", "2",
         "--configfile", str(config), *args], capture_output=True, text=True,
        env=workflow_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def scheduled(workdir: Path, config: Path) -> dict[str, int]:
    """{rule: jobs} that `snakemake -n` would run ({} when nothing is to be done)."""
    out = snakemake(workdir, config, "-n")
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.MULTILINE))
    jobs.pop("total", None)
    return {rule: int(n) for rule, n in jobs.items()}


@pytest.mark.slow
def test_editing_the_data_reprepares_and_an_unrelated_change_does_not(tmp_path):
    """A finished study on a user's CSV dataset: an unrelated config change schedules nothing,
    rewriting an image or editing the manifest schedules prepare and everything after it,
    putting the old bytes and time back schedules nothing again, and an image the manifest
    does not list is no input. Catches: the manifest and the images not being inputs of
    prepare (the issue: a fixed manifest left the leaky store in place)."""
    data = tmp_path / "my data"
    generate_demo_dataset(data, DemoConfig(per_class=12, image_size=32, seed=0))
    study = {"study": "edits",
             "datasets": [{"name": "scans", "format": "csv", "root": str(data),
                           "manifest": "manifest.csv", "templates": ["a {} scan"]}],
             "methods": ["zero_shot", "linear_probe", "clip_svd"], "shots": [1], "seeds": [1],
             "device": "cpu", "threads": 1, "clip_svd": {"epochs": 2},
             "interpret": {"max_images": 8, "k": 2}, "tracking": {"enabled": False}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    snakemake(tmp_path, config)
    assert scheduled(tmp_path, config) == {}

    study.update(device="auto", threads=2)  # decides no output
    config.write_text(yaml.safe_dump(study))
    assert scheduled(tmp_path, config) == {}

    image = next(data.glob("images/*.png"))
    before = image.read_bytes(), image.stat()
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    jobs = scheduled(tmp_path, config)
    assert set(jobs) == DOWNSTREAM and jobs["prepare"] == 1, jobs

    image.write_bytes(before[0])
    os.utime(image, ns=(before[1].st_atime_ns, before[1].st_mtime_ns))
    assert scheduled(tmp_path, config) == {}

    shutil.copy(image, data / "images" / "not_in_the_manifest.png")
    assert scheduled(tmp_path, config) == {}

    manifest = data / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n")  # one image less
    jobs = scheduled(tmp_path, config)
    assert set(jobs) == DOWNSTREAM and jobs["prepare"] == 1, jobs


def test_listing_digest_follows_the_image_files(tmp_path):
    """Folder format: a new, removed or rewritten image changes the digest, a hidden file or a
    file outside the class folders does not. Catches: a digest of the names only (a rewritten
    image), or of everything in root."""
    root = tmp_path / "d"
    for name in ("a/1.png", "a/2.png", "b/3.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    dataset = DatasetConfig(name="d", format="folder", root=str(root))
    first = listing_digest(dataset)
    (root / "a" / ".hidden.png").write_bytes(b"x")
    (root / "readme.png").write_bytes(b"x")
    assert listing_digest(dataset) == first
    (root / "b" / "4.png").write_bytes(b"x")
    second = listing_digest(dataset)
    assert second != first
    (root / "b" / "4.png").unlink()
    assert listing_digest(dataset) == first
    (root / "a" / "1.png").write_bytes(b"yy")
    assert listing_digest(dataset) != first
    missing = DatasetConfig(name="m", format="csv", root=str(tmp_path / "nowhere"),
                            manifest="m.csv")
    assert listing_digest(missing) == listing_digest(missing)  # no error at DAG time
