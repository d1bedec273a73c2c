"""Benchmark 2: time from process start to the end of the first training step, ViT-B/16 size.

    .venv/bin/python benchmarks/run_setup.py [--steps-per-run 500] [--batch 10]

Runs a fresh Python process twice with the same new, empty SVD cache directory: the first
(cold) computes and stores every SVD, the second (warm) reads them, as every later run of a
study does. Phases: imports, model construction (open_clip ViT-B-16, random weights), CLIP-SVD
attach (SVD or cache read, plus the weight fingerprint), data (a K = 1, 10-class support set of
uint8 224 px images, augmented and normalised like clipsvd.train), first step. The share of a
K = 1 run is set-up / (set-up + steps × the measured step time), with ``--steps-per-run`` the
run's step count (default: what clipsvd's default CLIP-SVD recipe trains for a 10-image support
set, ``clipsvd.train.total_steps``) and the batch the whole 10-image support set.
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


def child(started: float, batch: int) -> dict:
    marks = {"process_start_to_main": time.time() - started}
    t = time.perf_counter()
    import torch
    import torch.nn.functional as F
    from torchvision.transforms import v2

    from clipsvd.adapters.svd import SVDAdapter
    from clipsvd.models import load_model
    marks["imports"] = time.perf_counter() - t
    t = time.perf_counter()
    loaded = load_model("ViT-B-16", None, init_seed=0)
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
    return marks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--steps-per-run", type=int, default=None,
                        help="steps of the K = 1 run (default: clipsvd's CLIP-SVD recipe)")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child, args.batch)))
        return
    if args.steps_per_run is None:
        sys.path.insert(0, str(ROOT / "src"))
        from clipsvd.config import ClipSvdConfig
        from clipsvd.train import total_steps

        args.steps_per_run = total_steps(ClipSvdConfig(), n_support=args.batch, shots=1)
    print(f"K = 1 run of {args.steps_per_run} steps, batch {args.batch}", flush=True)
    cache = tempfile.mkdtemp(prefix="svd-cache-")
    env = {**os.environ, "CLIPSVD_SVD_CACHE": cache, "PYTHONPATH": str(ROOT / "src")}
    rows = {}
    try:
        for label in ("cold cache", "warm cache"):
            started = time.time()
            done = subprocess.run([sys.executable, __file__, "--child", repr(started), "--batch",
                                   str(args.batch)], capture_output=True, text=True, env=env, cwd=ROOT)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(done.stderr[-3000:])
            rows[label] = marks = json.loads(lines[-1][7:])
            setup = marks["to_first_step_end"] - marks["first_step"]
            total = setup + args.steps_per_run * marks["steady_step"]
            marks["setup"] = setup
            marks["share_of_k1_run"] = setup / total
            print(f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in marks.items()), flush=True)
    finally:  # the factors of ViT-B/16 take about 0.6 GB
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
