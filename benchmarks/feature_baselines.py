"""Benchmark 9: seconds per run of the feature-side baselines against the linear probe.

    .venv/bin/python benchmarks/feature_baselines.py --results results      # after the miniature's
        # features and splits exist: snakemake --cores 2 --configfile config/studies/miniature.yaml \
        #     --until features sample

One run is one `clipsvd.evaluate.evaluate` call, what the workflow's evaluate job does for the
method (the model loaded, the method fitted on the store's frozen features, the test split
scored, the run folder written), on the miniature's few-shot split at K = 16, seed 1, of each
dataset. The methods run one after the other in this process, ``--repeat`` times each, and the
median is printed with its ratio to the linear probe's on the same dataset. Single-threaded
torch, as a study job with ``threads: 1``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from clipsvd import config  # noqa: E402
from clipsvd.evaluate import evaluate  # noqa: E402

METHODS = ("linear_probe", "tip_adapter", "tip_adapter_f", "lp_pp", "clip_adapter")


def one(results: Path, pattern: str, what: str) -> Path:
    found = sorted(results.glob(pattern))
    if len(found) != 1:
        sys.exit(f"{results / pattern}: expected exactly one {what}, found {len(found)}; run "
                 "the miniature's features and sample steps into --results first")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--study", type=Path, default=ROOT / "config/studies/miniature.yaml")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config.load(args.study)
    results = args.results.resolve()
    print(f"{'dataset':<12} {'method':<14} {'s/run (median)':>15} {'× linear probe':>15}")
    for dataset in cfg.datasets:
        name = dataset.name
        store = one(results, f"prepared/{name}/*/images.npy", "prepared store").parent
        features = one(results, f"features/{name}/{store.name}/*.npy", "feature file")
        split = one(results, f"splits/{name}/{store.name}/*/few_shot/shots16_seed1.json",
                    "K = 16 seed 1 split")
        medians = {}
        with tempfile.TemporaryDirectory() as tmp:
            for method in METHODS:
                times = []
                for i in range(args.repeat):
                    started = time.perf_counter()
                    evaluate(cfg, name, method, split, store, Path(tmp) / f"{method}{i}",
                             features_path=features, device=torch.device("cpu"))
                    times.append(time.perf_counter() - started)
                medians[method] = statistics.median(times)
                print(f"{name:<12} {method:<14} {medians[method]:>15.2f} "
                      f"{medians[method] / medians['linear_probe']:>15.2f}", flush=True)


if __name__ == "__main__":
    main()
