"""Benchmark 6: size and preparation time of the prepared store, with and without training views.

    .venv/bin/python benchmarks/store_size.py [--image-size 64] [--medmnist ../shared/data/medmnist]

Prepares, one after the other in this process, each dataset twice: with ``train_view: 0``
(the store as it was before the training views: images.npy only) and with the default
``train_view`` (512: the train split also kept with its aspect ratio, longer side at most
512 px, never enlarged). Datasets: the default study's demo scans (generated here, 96 px PNG,
DICOM and NIfTI) and every MedMNIST file found in ``--medmnist`` (28 px). Prints, per dataset
and setting: wall time, images per second, and the bytes of images.npy and of the views.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def folder_bytes(folder: Path, names: tuple[str, ...]) -> int:
    return sum((folder / name).stat().st_size for name in names if (folder / name).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64,
                        help="the model's input size (64: tiny-clip; 224: ViT-B/16, BiomedCLIP)")
    parser.add_argument("--medmnist", type=Path, default=ROOT.parent / "shared" / "data" / "medmnist")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from clipsvd import config
    from clipsvd.config import DatasetConfig, DemoConfig, MedmnistConfig
    from clipsvd.data.demo import generate_demo_dataset
    from clipsvd.data.prepare import prepare_dataset
    from clipsvd.data.store import PreparedStore
    from clipsvd.data.views import INDEX_FILE, VIEWS_FILE

    work = Path(tempfile.mkdtemp(prefix="clipsvd-store-size-"))
    try:
        demo = config.load(ROOT / "config" / "config.yaml").dataset("demo_scans")
        generate_demo_dataset(work / "raw", demo.demo or DemoConfig())
        datasets = [dataclasses.replace(demo, root=str(work / "raw"))]
        for path in sorted(args.medmnist.glob("*.npz")):
            datasets.append(DatasetConfig(name=path.stem, format="medmnist",
                                          root=str(args.medmnist),
                                          medmnist=MedmnistConfig(flag=path.stem, size=28)))
        print(f"image size {args.image_size} px, {args.threads} thread(s)")
        print("| dataset | train_view | images | train views | seconds | images/s | images.npy "
              "(MB) | views (MB) | store (MB) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for dataset in datasets:
            for view in (0, dataset.preprocessing.train_view or 512):
                prepared = dataclasses.replace(
                    dataset, preprocessing=dataclasses.replace(dataset.preprocessing,
                                                               train_view=view))
                out = work / f"store-{dataset.name}-{view}"
                started = time.perf_counter()
                prepare_dataset(prepared, out, args.image_size, threads=args.threads)
                seconds = time.perf_counter() - started
                store = PreparedStore.open(out)
                n = len(store.images)
                views = (store.provenance.get("train_views") or {}).get("n_views", 0)
                images_mb = folder_bytes(out, ("images.npy",)) / 1e6
                views_mb = folder_bytes(out, (VIEWS_FILE, INDEX_FILE)) / 1e6
                total = sum(p.stat().st_size for p in out.iterdir()) / 1e6
                print(f"| {dataset.name} | {view} | {n} | {views} | {seconds:.1f} | "
                      f"{n / seconds:.0f} | {images_mb:.1f} | {views_mb:.1f} | {total:.1f} |",
                      flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
