"""Benchmark 6: size and preparation time of the prepared store, with and without training views.

    .venv/bin/python benchmarks/store_size.py [--image-size 64] [--medmnist ../shared/data/medmnist]

Prepares, one after the other in this process, each dataset in two settings: ``train_view: 0``
(the store as it was before the training views: images.npy only) and the default
``train_view`` (512: the train split also kept with its aspect ratio, longer side at most
512 px, never enlarged). Datasets: the default study's demo scans (generated here, 96 px PNG,
DICOM and NIfTI) and every MedMNIST file found in ``--medmnist`` (28 px), cut to its first
``--per-file`` images (in proportion to its splits, so that the run fits in a few minutes on
a loaded machine; a store's bytes grow linearly with its images). Prints one row per
dataset: the store's bytes and the preparation's wall time for both settings side by side,
their ratios (with views / without), and the store's size for the whole MedMNIST file. Each
setting is prepared ``--repeats`` times, alternating, and the shortest time is kept.
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


def store_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def measure(dataset, view: int, out: Path, image_size: int, threads: int) -> dict:
    """Prepares ``dataset`` with ``train_view: view`` into ``out``; its figures, then removes it."""
    from clipsvd.data.prepare import prepare_dataset
    from clipsvd.data.store import PreparedStore
    from clipsvd.data.views import INDEX_FILE, VIEWS_FILE

    prepared = dataclasses.replace(
        dataset, preprocessing=dataclasses.replace(dataset.preprocessing, train_view=view))
    started = time.perf_counter()
    prepare_dataset(prepared, out, image_size, threads=threads)
    seconds = time.perf_counter() - started
    store = PreparedStore.open(out)
    record = store.provenance.get("train_views") or {}
    figures = {"images": len(store.images), "views": record.get("n_views", 0),
               "largest_view": record.get("largest"), "seconds": seconds,
               "bytes": store_bytes(out),
               "view_bytes": sum((out / n).stat().st_size for n in (VIEWS_FILE, INDEX_FILE)
                                 if (out / n).is_file())}
    shutil.rmtree(out)
    return figures


def cut_medmnist(source: Path, target: Path, per_file: int) -> tuple[int, int]:
    """``source`` with each split cut to its first rows, ``per_file`` in all, kept in
    proportion, written to ``target``; (images kept, images in the source)."""
    import numpy as np

    with np.load(source, allow_pickle=False) as arrays:
        data = {key: arrays[key] for key in arrays.files}
    counts = {key[:-len("_images")]: len(value) for key, value in data.items()
              if key.endswith("_images")}
    total = sum(counts.values())
    keep = {split: max(1, round(per_file * n / total)) for split, n in counts.items()}
    cut = {key: value[:keep[key.split("_")[0]]] if key.split("_")[0] in keep else value
           for key, value in data.items()}
    np.savez(target, **cut)
    return sum(min(keep[s], n) for s, n in counts.items()), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64,
                        help="the model's input size (64: tiny-clip; 224: ViT-B/16, BiomedCLIP)")
    parser.add_argument("--medmnist", type=Path, default=ROOT.parent / "shared" / "data" / "medmnist")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2,
                        help="preparations per setting, alternating; the shortest time is kept")
    parser.add_argument("--per-file", type=int, default=500,
                        help="images taken from each MedMNIST file (0: all of them)")
    args = parser.parse_args()

    from clipsvd import config
    from clipsvd.config import DatasetConfig, DemoConfig, MedmnistConfig, PreprocessingConfig
    from clipsvd.data.demo import generate_demo_dataset

    default_view = PreprocessingConfig().train_view
    work = Path(tempfile.mkdtemp(prefix="clipsvd-store-size-"))
    try:
        demo = config.load(ROOT / "config" / "config.yaml").dataset("demo_scans")
        generate_demo_dataset(work / "raw", demo.demo or DemoConfig())
        datasets = [dataclasses.replace(demo, root=str(work / "raw"))]
        files = sorted(args.medmnist.glob("*.npz"))
        if not files:
            sys.exit(f"{args.medmnist}: no MedMNIST .npz file here; pass --medmnist FOLDER")
        whole = {}  # dataset name: images of the whole MedMNIST file
        (work / "medmnist").mkdir()
        for path in files:
            if args.per_file:
                _, whole[path.stem] = cut_medmnist(path, work / "medmnist" / path.name,
                                                      args.per_file)
            else:
                shutil.copy(path, work / "medmnist" / path.name)
            datasets.append(DatasetConfig(name=path.stem, format="medmnist",
                                          root=str(work / "medmnist"),
                                          medmnist=MedmnistConfig(flag=path.stem, size=28)))
        # a throw-away preparation first, so that imports and MONAI's first calls (~20 s under
        # load) are not counted against the first dataset's train_view 0
        measure(datasets[0], 0, work / "store-warm-up", args.image_size, args.threads)
        print(f"image size {args.image_size} px, {args.threads} thread(s); "
              f"train_view 0 against {default_view}")
        print(f"| dataset | images | train views (largest) | store MB, 0 | store MB, "
              f"{default_view} | size ratio | seconds, 0 | seconds, {default_view} | "
              f"time ratio | whole file: images, store MB 0 / {default_view} |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for dataset in datasets:
            runs: dict[int, list[dict]] = {0: [], default_view: []}
            for _ in range(max(1, args.repeats)):  # alternating, so load changes hit both
                for view in runs:
                    runs[view].append(measure(dataset, view, work / f"store-{view}",
                                              args.image_size, args.threads))
            without, with_views = (min(runs[view], key=lambda r: r["seconds"]) for view in runs)
            if without["images"] != with_views["images"] or without["views"]:
                raise AssertionError(f"{dataset.name}: the two stores differ in their images")
            scaled = "–"
            if dataset.name in whole:
                factor = whole[dataset.name] / without["images"]
                scaled = (f"{whole[dataset.name]}, {without['bytes'] * factor / 1e6:.0f} / "
                          f"{with_views['bytes'] * factor / 1e6:.0f}")
            largest = "×".join(map(str, with_views["largest_view"] or [0, 0]))
            print(f"| {dataset.name} | {without['images']} | {with_views['views']} ({largest}) "
                  f"| {without['bytes'] / 1e6:.2f} | {with_views['bytes'] / 1e6:.2f} | "
                  f"{with_views['bytes'] / without['bytes']:.2f} | {without['seconds']:.1f} | "
                  f"{with_views['seconds']:.1f} | "
                  f"{with_views['seconds'] / without['seconds']:.2f} | {scaled} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
