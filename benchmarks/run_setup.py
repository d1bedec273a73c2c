"""Benchmark 2: a run's fixed cost, from process start to the end of its first training step,
plus its tracking and plotting, for a ViT-B/16-size and a BiomedCLIP-size model.

    .venv/bin/python benchmarks/run_setup.py [--models ViT-B-16 biomedclip-size] [--batch 10]

Runs a fresh Python process twice with the same new, empty SVD cache directory: the first
(cold) computes and stores every SVD, the second (warm) reads them, as every later run of a
study does. Phases: imports, model construction (open_clip ViT-B-16, random weights), CLIP-SVD
attach (SVD or cache read, plus the weight fingerprint), data (a K = 1, 10-class support set of
uint8 224 px images, augmented and normalised like clipsvd.train), first step; then the run's
tracking (``clipsvd.tracking.log_run_folder`` of a 10-class run folder into an MLflow store
that already holds a run, as every run but a study's first finds it) and plotting (its
confusion-matrix PNG). The share of a K = 1 run is fixed cost / (fixed cost + steps × the
measured step time), with ``--steps-per-run`` the run's step count (default: what clipsvd's
default CLIP-SVD recipe trains for a 10-image support set, ``clipsvd.train.total_steps``) and
the batch the whole 10-image support set. Evaluation loops are not part of the fixed cost (nor
of the run here). "own process" counts everything; "worker" leaves out process start and
imports, which a warm worker (clipsvd.worker) pays once for all the jobs it forks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(started: float, batch: int, model: str, work: Path) -> dict:
    marks = {"process_start_to_main": time.time() - started}
    t = time.perf_counter()
    import torch
    import torch.nn.functional as F
    from torchvision.transforms import v2

    from clipsvd.adapters.svd import SVDAdapter
    from clipsvd.models import load_model
    from clipsvd.report.figures import run_confusion_matrix
    from clipsvd.tracking import log_run_folder
    marks["imports"] = time.perf_counter() - t
    name = model
    if model == "biomedclip-size":
        from job_memory import _register_biomedclip_size

        _register_biomedclip_size(work / "models")
    t = time.perf_counter()
    loaded = load_model(name, None, init_seed=0)
    marks["model"] = time.perf_counter() - t
    t = time.perf_counter()
    adapter = SVDAdapter.attach(loaded.model, {})
    marks["attach"] = time.perf_counter() - t
    marks["attach_svd_part"] = adapter.svd_seconds
    t = time.perf_counter()
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
    labels = torch.arange(batch) % 10
    augment = v2.Compose([v2.RandomResizedCrop(224, scale=(0.5, 1.0), antialias=True,
                                               interpolation=v2.InterpolationMode.BICUBIC),
                          v2.RandomHorizontalFlip()])
    normalize = v2.Normalize(mean=list(loaded.mean), std=list(loaded.std))
    tokens = loaded.tokenizer([f"a photo of a class{i}." for i in range(10)])
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    marks["data"] = time.perf_counter() - t

    def step() -> float:
        begin = time.perf_counter()
        batch_images = normalize(torch.stack([augment(i) for i in images]).float().div_(255))
        with adapter.cached():
            text = F.normalize(loaded.model.encode_text(tokens), dim=-1)
            feats = F.normalize(loaded.model.encode_image(batch_images), dim=-1)
            loss = F.cross_entropy(100 * feats @ text.t(), labels)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        return time.perf_counter() - begin

    loaded.model.train()
    marks["first_step"] = step()
    marks["to_first_step_end"] = time.time() - started
    marks["steady_step"] = min(step() for _ in range(2))
    loaded.model.eval()
    with torch.no_grad(), adapter.cached():  # an evaluation batch, for benchmarks/paper_scale.py
        test = normalize(torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8).float() / 255)
        t = time.perf_counter()
        loaded.model.encode_image(test)
        marks["eval_per_image"] = (time.perf_counter() - t) / len(test)
    metrics, tags = _run_folder(work / "run", batch)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    log_run_folder(work / "run", {**tags, "seed": "0"}, uri)  # the study's first run
    t = time.perf_counter()
    log_run_folder(work / "run", tags, uri)
    marks["tracking"] = time.perf_counter() - t
    t = time.perf_counter()
    run_confusion_matrix(metrics, "bench clip_svd K=1 seed=1", work / "run" / "confusion.png")
    marks["plotting"] = time.perf_counter() - t
    return marks


def _run_folder(run_dir: Path, n_classes: int) -> tuple[dict, dict]:
    """A finished 10-class run's files, as clipsvd.evaluate writes them, for the tracking and
    plotting phases."""
    import numpy as np

    from clipsvd.io import write_json
    from clipsvd.metrics import classification_metrics

    rng = np.random.default_rng(0)
    labels = np.arange(200) % n_classes
    probs = rng.dirichlet(np.ones(n_classes), size=len(labels))
    names = [f"class{i}" for i in range(n_classes)]
    metrics = classification_metrics(labels, probs, names)
    tags = {"study": "bench", "dataset": "bench", "method": "clip_svd", "setting": "few_shot",
            "shots": "1", "seed": "1", "model": "bench:random", "config_hash": "0"}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "metrics.json", metrics)
    with open(run_dir / "train_history.csv", "w") as handle:
        handle.write("step,loss,accuracy,lr\n")
        handle.writelines(f"{i},1.0,0.5,0.001\n" for i in range(1, 101))
    return metrics, tags


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "biomedclip-size"],
                        choices=["ViT-B-16", "biomedclip-size"])
    parser.add_argument("--model", help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures to this file (as "
                        "benchmarks/run_setup.json, which benchmarks/paper_scale.py reads)")
    parser.add_argument("--steps-per-run", type=int, default=None,
                        help="steps of the K = 1 run (default: clipsvd's CLIP-SVD recipe)")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child, args.batch, args.model, Path(args.work))))
        return
    if args.steps_per_run is None:
        sys.path.insert(0, str(ROOT / "src"))
        from clipsvd.config import ClipSvdConfig
        from clipsvd.train import total_steps

        args.steps_per_run = total_steps(ClipSvdConfig(), n_support=args.batch, shots=1)
    print(f"K = 1 run of {args.steps_per_run} steps, batch {args.batch}", flush=True)
    rows = {}
    for model in args.models:
        work = Path(tempfile.mkdtemp(prefix="run-setup-"))
        env = {**os.environ, "CLIPSVD_SVD_CACHE": str(work / "svd"),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]),
               "MLFLOW_CONFIGURE_LOGGING": "false"}
        try:
            for label in ("cold cache", "warm cache"):
                shutil.rmtree(work / "run", ignore_errors=True)
                (work / "mlflow.db").unlink(missing_ok=True)
                started = time.time()
                done = subprocess.run([sys.executable, __file__, "--child", repr(started),
                                       "--batch", str(args.batch), "--model", model,
                                       "--work", str(work)],
                                      capture_output=True, text=True, env=env, cwd=ROOT)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                if done.returncode or not lines:
                    raise SystemExit(done.stderr[-3000:])
                marks = json.loads(lines[-1][7:])
                fixed = (marks["to_first_step_end"] - marks["first_step"] + marks["tracking"]
                         + marks["plotting"])
                steps = args.steps_per_run * marks["steady_step"]
                warm_fixed = fixed - marks["process_start_to_main"] - marks["imports"]
                marks.update(fixed=fixed, share_own_process=fixed / (fixed + steps),
                             share_worker=warm_fixed / (warm_fixed + steps))
                rows[f"{model}, {label}"] = marks
                print(f"{model}, {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in marks.items()),
                      flush=True)
        finally:  # the factors of ViT-B/16 take about 0.6 GB
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"steps_per_run": args.steps_per_run,
                                               "batch": args.batch, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
