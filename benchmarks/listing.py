#!/usr/bin/env python3
"""What the prepare step's image listing costs while Snakemake builds its DAG.

``clipsvd.data.listing.listing_digest`` stats every image a dataset's source names (the param
that re-prepares a store when an image is added, removed or rewritten). This creates N empty
image files in 100 class folders (and a manifest listing them) in a temporary folder and times
the digest for the folder and csv formats, cold (first call) and warm (page cache filled).
Target: well under a second for 100,000 files on a local disk.
Run: .venv/bin/python benchmarks/listing.py [--files 100000]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipsvd.config import DatasetConfig  # noqa: E402
from clipsvd.data.listing import listing_digest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = ["path,label"]
        started = time.perf_counter()
        for i in range(args.files):
            folder = root / f"class{i % 100:03d}"
            if i < 100:
                folder.mkdir()
            (folder / f"img{i:06d}.png").touch()
            rows.append(f"class{i % 100:03d}/img{i:06d}.png,class{i % 100:03d}")
        (root / "manifest.csv").write_text("\n".join(rows) + "\n")
        print(f"created {args.files} files in {time.perf_counter() - started:.1f} s")
        for fmt, extra in (("folder", {}), ("csv", {"manifest": "manifest.csv"})):
            dataset = DatasetConfig(name="b", format=fmt, root=str(root), **extra)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                listing_digest(dataset)
                times.append(time.perf_counter() - started)
            print(f"{fmt:>6}: listing_digest of {args.files} files: first {times[0]:.2f} s, "
                  f"then {min(times[1:]):.2f} s")


if __name__ == "__main__":
    main()
