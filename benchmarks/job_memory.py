"""Peak memory of the workflow's jobs on the CPU, per model and batch size.

    .venv/bin/python benchmarks/job_memory.py                      # every model, every point
    .venv/bin/python benchmarks/job_memory.py --models ViT-B-16 --write

Each point runs the real step function (``clipsvd.train.adapt``, ``clipsvd.features.
compute_features``, ``clipsvd.evaluate.evaluate``) in a fresh subprocess on a small demo store
(320 images; 64 for features) and reports the subprocess's peak resident set size
(``VmHWM``): what SLURM's memory limit sees, imports, weights, SVD factors, activations and
allocator caches included. Models are built with random weights (the architectures are what
matter for memory):

- ``tiny-clip``, ``tiny-biomedclip``: the repository's offline architectures;
- ``ViT-B-16``: open_clip's OpenAI CLIP ViT-B/16 architecture (224 px, 77-token text);
- ``biomedclip-size``: BiomedCLIP's architecture as its hub config describes it (timm
  ``vit_base_patch16_224`` trunk, a BERT-base text tower: 12 layers, width 768, vocabulary
  30522, context 256, MLP projection), written here to a temporary folder because the hub
  config cannot be fetched offline.

Adaptation points vary the batch size (images per step) and the number of class prompts
(classes × templates: the text tower runs on all of them every step, with gradients); the
fit in ``clipsvd.job_resources`` is linear in both. ``--write`` stores the figures in
benchmarks/job_memory.json (docs/slurm.md shows them); ``--fit`` prints the coefficients that
file gives for ``clipsvd.job_resources`` (the largest of the measured models for each).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BIOMEDCLIP_SIZE = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": "./bert-base", "hf_tokenizer_name": "./bert-base",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 256},
    }
}
BERT_BASE = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522,
             "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
             "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
             "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
             "pad_token_id": 0, "position_embedding_type": "absolute"}

# (step, method, batch, templates): adapt batch = images per step; templates × 4 classes =
# class prompts per step; features/evaluate batch = eval_batch_size.
LARGE_POINTS = [("adapt", "clip_svd", 1, 1), ("adapt", "clip_svd", 4, 1),
                ("adapt", "clip_svd", 1, 2), ("evaluate", "clip_svd", 64, 1),
                ("features", None, 64, 1), ("features", None, 8, 1)]
TINY_POINTS = [("adapt", "clip_svd", 8, 1), ("adapt", "clip_svd", 32, 1),
               ("adapt", "clip_svd", 32, 2), ("adapt", "clip_lora", 32, 1),
               ("features", None, 64, 1), ("evaluate", "clip_svd", 64, 1)]
MODELS = {"tiny-clip": TINY_POINTS, "tiny-biomedclip": TINY_POINTS,
          "ViT-B-16": LARGE_POINTS, "biomedclip-size": LARGE_POINTS}
N_CLASSES = 4  # the demo dataset's classes


def _register_biomedclip_size(folder: Path) -> None:
    from clipsvd import models

    bert = folder / "bert-base"
    bert.mkdir(parents=True, exist_ok=True)
    (bert / "config.json").write_text(json.dumps(BERT_BASE))
    tiny_bert = models.MODEL_CONFIG_DIR.parent / "resources" / "tiny-bert"
    for name in ("vocab.txt", "tokenizer_config.json"):  # token ids only; sizes come from config
        shutil.copy(tiny_bert / name, bert / name)
    (folder / "biomedclip-size.json").write_text(json.dumps(BIOMEDCLIP_SIZE))
    models._register_hf_text_configs(folder)


def _study(root: Path, model: str, method: str | None, batch: int, templates: int) -> dict:
    prompts = ["a {} scan", "an image of {}", "a medical image showing {}"][:templates]
    training = {"batch_size": batch, "epochs": 2}
    return {"study": "memory", "threads": 1, "device": "cpu", "eval_batch_size": batch,
            "model": {"name": model, "pretrained": None},
            "datasets": [{"name": "bench", "format": "csv", "root": str(root / "raw"),
                          "manifest": "manifest.csv", "templates": prompts}],
            "methods": [method or "zero_shot"], "shots": [1], "seeds": [1],
            "clip_svd": dict(training), "clip_lora": dict(training), "interpret": {"enabled": False},
            "tracking": {"enabled": False}}


def measure_one(spec: dict) -> dict:
    """In a fresh process: run one step, return its peak RSS in MB."""
    import torch

    from clipsvd import config
    from clipsvd.data.sampling import sample_split, write_split
    from clipsvd.data.store import PreparedStore

    torch.set_num_threads(1)
    root = Path(spec["root"])
    if spec["model"] == "biomedclip-size":
        _register_biomedclip_size(root / "models")
    cfg = config.from_dict(_study(root, spec["model"], spec["method"], spec["batch"],
                                  spec["templates"]))
    store_dir = root / f"store{spec['image_size']}"
    out = root / f"run-{spec['model']}-{spec['method']}-{spec['batch']}-{spec['templates']}"
    started = time.perf_counter()
    if spec["step"] == "adapt":
        from clipsvd.train import adapt

        shots = math.ceil(spec["batch"] / N_CLASSES)  # a support set of at least one batch
        split = sample_split(PreparedStore.open(store_dir), "few_shot", shots, 1,
                             cfg.dataset("bench").sampling)
        write_split(out / "split.json", split)
        adapt(cfg, "bench", spec["method"], out / "split.json", store_dir, out,
              device=torch.device("cpu"))
    elif spec["step"] == "features":
        from clipsvd.features import compute_features

        compute_features(cfg, root / f"store{spec['image_size']}-small", out / "features.npy",
                         device=torch.device("cpu"))
    else:
        from clipsvd.evaluate import evaluate

        adapted = next(iter(sorted(root.glob(f"run-{spec['model']}-clip_svd-*-1"))), None)
        if adapted is None:
            raise SystemExit(f"evaluate needs an adapter of a clip_svd adapt point of {spec['model']}")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(adapted / "adapter.safetensors", out / "adapter.safetensors")
        evaluate(cfg, "bench", "clip_svd", adapted / "split.json", store_dir, out,
                 device=torch.device("cpu"))
    return {"peak_mb": round(peak_rss_mb()), "seconds": round(time.perf_counter() - started, 1)}


def peak_rss_mb() -> float:
    """This process's resident high-water mark (VmHWM). Not ``ru_maxrss``: Linux carries that
    over fork and exec, so a child would report its parent's peak when that was larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def fit(points: list[dict]) -> dict[str, float]:
    """Coefficients of clipsvd.job_resources from measured points: the process's fixed part
    from the tiny models, then per large model the slopes in images and prompts and what is
    left per million block parameters; the largest over the models is printed."""
    from clipsvd import architectures

    def peak(model, step, batch, prompts=4 * 1):
        return next(p["peak_mb"] for p in points if (p["model"], p["step"], p["batch"],
                    p["prompts"]) == (model, step, batch, prompts)
                    and p["method"] in ("clip_svd", None))

    process = max(p["peak_mb"] for p in points if p["model"].startswith("tiny-"))
    found: dict[str, list[float]] = {}
    for model in ("ViT-B-16", "biomedclip-size"):
        if not any(p["model"] == model for p in points):
            continue
        name = ("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
                if model == "biomedclip-size" else model)
        arch = architectures.describe(name)
        image = arch.vision_layers * arch.vision_tokens * arch.vision_width / 1e6
        prompt = arch.text_layers * arch.text_context * arch.text_width / 1e6
        train_image = (peak(model, "adapt", 4) - peak(model, "adapt", 1)) / (3 * image)
        train_prompt = (peak(model, "adapt", 1, 8) - peak(model, "adapt", 1)) / (4 * prompt)
        adapt_weights = (peak(model, "adapt", 1) - process - train_image * image
                         - train_prompt * 4 * prompt) / arch.parameters_m
        eval_image = (peak(model, "features", 64) - peak(model, "features", 8)) / (56 * image)
        features_weights = (peak(model, "features", 8) - process
                            - eval_image * 8 * image) / arch.parameters_m
        evaluate_weights = (peak(model, "evaluate", 64) - process
                            - eval_image * (64 * image + 4 * prompt)) / arch.parameters_m
        for key, value in (("TRAIN_IMAGE_PER_ACTIVATION", train_image),
                           ("TRAIN_PROMPT_PER_ACTIVATION", train_prompt),
                           ("WEIGHTS_PER_MPARAM[adapt]", adapt_weights),
                           ("EVAL_IMAGE_PER_ACTIVATION", eval_image),
                           ("WEIGHTS_PER_MPARAM[features]", features_weights),
                           ("WEIGHTS_PER_MPARAM[evaluate]", evaluate_weights)):
            found.setdefault(key, []).append(value)
            print(f"{model:16s} {key:30s} {value:8.1f}")
    result = {"PROCESS_MB": process, **{k: max(v) for k, v in found.items()}}
    for key, value in result.items():
        print(f"{'largest':16s} {key:30s} {value:8.1f}")
    return result


def _prepare_stores(root: Path, sizes: set[int]) -> None:
    """Per input size: a store of 320 images (64 of them test images, one evaluation batch)
    and one of 64 (a features batch of 64 without computing five)."""
    from dataclasses import replace

    from clipsvd.config import DemoConfig, from_dict
    from clipsvd.data.demo import generate_demo_dataset
    from clipsvd.data.prepare import prepare_dataset

    dataset = from_dict(_study(root, "tiny-clip", "clip_svd", 1, 1)).dataset("bench")
    for raw, per_class, suffix in (("raw", 80, ""), ("raw-small", 16, "-small")):
        if not (root / raw / "manifest.csv").exists():
            generate_demo_dataset(root / raw, DemoConfig(per_class=per_class, image_size=64,
                                                         seed=0))
        for size in sorted(sizes):
            if not (root / f"store{size}{suffix}" / "images.npy").exists():
                prepare_dataset(replace(dataset, root=str(root / raw)),
                                root / f"store{size}{suffix}", size, threads=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", nargs="+", choices=["adapt", "features", "evaluate"],
                        help="only these steps' points (default: all)")
    parser.add_argument("--batch", type=int, help="only the points of this batch size")
    parser.add_argument("--write", action="store_true", help="store benchmarks/job_memory.json")
    parser.add_argument("--work", help="a folder for the stores and runs (default: a temporary "
                        "one, removed at the end); reused when given, so a stopped run resumes")
    parser.add_argument("--fit", action="store_true",
                        help="print the coefficients benchmarks/job_memory.json gives")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one point, as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return
    if args.fit:
        fit(json.loads((ROOT / "benchmarks" / "job_memory.json").read_text())["points"])
        return
    sizes = {"tiny-clip": 64, "tiny-biomedclip": 64, "ViT-B-16": 224, "biomedclip-size": 224}
    results = []
    with tempfile.TemporaryDirectory(prefix="clipsvd-memory-") as tmp:
        root = Path(args.work or tmp)
        root.mkdir(parents=True, exist_ok=True)
        _prepare_stores(root, {sizes[m] for m in args.models})
        for model in args.models:
            for step, method, batch, templates in MODELS[model]:
                if (args.steps and step not in args.steps) or (args.batch and batch != args.batch):
                    continue
                spec = {"root": str(root), "model": model, "step": step, "method": method,
                        "batch": batch, "templates": templates, "image_size": sizes[model]}
                # No SVD cache: the first adaptation of a study computes every decomposition,
                # and its peak is the one a request must cover.
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                                      capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT / "src"),
                                           "CLIPSVD_SVD_CACHE": "off", "OMP_NUM_THREADS": "1",
                                           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
                if proc.returncode != 0:
                    raise SystemExit(f"{spec} failed:\n{proc.stderr[-3000:]}")
                point = {**{k: spec[k] for k in ("model", "step", "method", "batch")},
                         "prompts": templates * N_CLASSES,
                         **json.loads(proc.stdout.strip().splitlines()[-1])}
                results.append(point)
                print(json.dumps(point), flush=True)
    if args.write:
        path = ROOT / "benchmarks" / "job_memory.json"
        old = json.loads(path.read_text()) if path.exists() else {"points": []}

        def key(point):
            return tuple(point[k] for k in ("model", "step", "method", "batch", "prompts"))

        new = {key(p) for p in results}
        keep = [p for p in old["points"] if key(p) not in new]
        path.write_text(json.dumps({"threads": 1, "points": keep + results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
