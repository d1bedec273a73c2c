"""Benchmark 3: the data path of adaptation: loader time per step as a fraction of step time.

    .venv/bin/python benchmarks/data_path.py [--steps 3] [--batch 32]

Generates the demo dataset (4 classes, 256 px PNG/DICOM/NIfTI files), prepares it for each
model, samples a K-shot split and runs ``clipsvd.train.adapt`` (CLIP-SVD) on it, for:

- ``ViT-B-16``: the open_clip ViT-B/16 architecture with random weights, batch ``--batch``;
- ``tiny-clip``: the default study's model and settings (batch 32, 64 px).

The training loop times the part of each step that builds the batch from the prepared store
(index, random resized crop, flip, normalise, move to the device) and reports it in the run's
``train.json`` as ``data_seconds`` and ``loader_fraction`` (= data_seconds / train_seconds).
Image decoders (PIL, pydicom, nibabel) are replaced by counters during training: the loop must
never call them.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def counter(calls: list[str], name: str):
    """A stand-in for an image decoder that records that it was called."""
    def decode(*args, **kwargs):
        calls.append(name)
        raise AssertionError(f"{name} called during training")
    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps of the ViT-B/16 run")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    import nibabel
    import PIL.Image
    import pydicom

    from clipsvd import config
    from clipsvd.config import DemoConfig
    from clipsvd.data.demo import generate_demo_dataset
    from clipsvd.data.prepare import prepare_dataset
    from clipsvd.data.sampling import sample_split, write_split
    from clipsvd.data.store import PreparedStore
    from clipsvd.models import model_image_size
    from clipsvd.train import adapt

    work = Path(tempfile.mkdtemp(prefix="clipsvd-data-path-"))
    try:
        generate_demo_dataset(work / "raw", DemoConfig(per_class=24, image_size=256, seed=0))
        demo = config.load(ROOT / "config" / "config.yaml").clip_svd
        runs = {  # model: (shots, CLIP-SVD settings)
            "ViT-B-16": (args.batch // 4, {"batch_size": args.batch, "epochs": args.steps}),
            "tiny-clip": (4, {"lr": demo.lr, "epochs": demo.epochs, "batch_size": demo.batch_size}),
        }
        for model, (shots, settings) in runs.items():
            raw = {"study": "data-path", "device": "auto",
                   "datasets": [{"name": "scans", "format": "csv", "root": str(work / "raw"),
                                 "manifest": "manifest.csv", "templates": ["a {} scan"]}],
                   "model": {"name": model, "pretrained": None}, "clip_svd": settings,
                   "tracking": {"enabled": False}}
            cfg = config.from_dict(raw)
            store = work / f"store-{model}"
            prepare_dataset(cfg.dataset("scans"), store, model_image_size(model, None))
            split = sample_split(PreparedStore.open(store), "few_shot", shots, 1,
                                 cfg.dataset("scans").sampling)
            split_path = work / f"split-{model}.json"
            write_split(split_path, split)

            decoded: list[str] = []
            decoders = {(PIL.Image, "open"): PIL.Image.open, (pydicom, "dcmread"): pydicom.dcmread,
                        (nibabel, "load"): nibabel.load}
            for module, name in decoders:
                setattr(module, name, counter(decoded, f"{module.__name__}.{name}"))
            try:
                summary = adapt(cfg, "scans", "clip_svd", split_path, store, work / f"run-{model}")
            finally:
                for (module, name), function in decoders.items():
                    setattr(module, name, function)
            steps = summary["total_steps"]
            batch = min(cfg.clip_svd.batch_size, shots * 4)
            print(f"{model}: {steps} steps of batch {batch} at {model_image_size(model, None)} px "
                  f"on {summary['device']}: {summary['train_seconds'] / steps * 1e3:.1f} ms/step, "
                  f"loader {summary['data_seconds'] / steps * 1e3:.2f} ms/step = "
                  f"{100 * summary['loader_fraction']:.2f} % of the step (target < 5 %); image "
                  f"files decoded during training: {len(decoded)}", flush=True)
            assert not decoded and math.isfinite(summary["loader_fraction"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
