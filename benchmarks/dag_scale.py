#!/usr/bin/env python3
"""How long `snakemake -n` takes to build the DAG of a paper-scale study.

11 datasets × 5 methods × 5 shot counts × 3 seeds × 2 settings (the datasets need not exist for
a dry run). Target: under 10 seconds. Run: .venv/bin/python benchmarks/dag_scale.py
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ["BTMRI", "BUSI", "CHMNIST", "COVID_19", "CTKidney", "DermaMNIST", "KneeXray", "Kvasir",
            "LungColon", "RETINA", "OCTMNIST"]


def main() -> None:
    study = {
        "study": "dag_scale",
        "model": {"name": "ViT-B-16", "pretrained": None},
        "methods": ["zero_shot", "linear_probe", "clip_lora", "comp_lora", "clip_svd"],
        "settings": ["few_shot", "base_to_novel"],
        "shots": [1, 2, 4, 8, 16],
        "seeds": [1, 2, 3],
        "datasets": [{"name": name, "format": "coop_json", "root": f"data/{name}"}
                     for name in DATASETS],
    }
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "study.yaml"
        config.write_text(yaml.safe_dump(study))
        command = [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
                   "--directory", tmp, "--configfile", str(config), "-n", "--quiet", "rules"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    total = re.search(r"^total\s+(\d+)", done.stdout + done.stderr, re.M)
    jobs = int(total.group(1)) if total else -1
    print(f"snakemake -n of 11 datasets × 5 methods × 5 shots × 3 seeds × 2 settings: "
          f"{jobs} jobs, DAG built in {seconds:.1f} s (target < 10 s, ratio {seconds / 10:.2f})")


if __name__ == "__main__":
    main()
