"""Evaluate one run on its split's test set: per-sample predictions and metrics.

The test set is evaluated once, at the end (no model selection on it).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import feature_adapters as fa
from . import layout, timing
from .config import ADAPTER_METHODS, FEATURE_METHODS, StudyConfig, runs_in
from .data.store import PreparedStore, split_summary
from .errors import ConfigError
from .devices import (batch_size_on_oom, claimed_gpu_slot, model_to_device, resolve_device,
                      to_device)
from .io import atomic_path, read_json, write_json
from .metrics import classification_metrics
from .models import encode_class_prompts, encode_images, load_model
from .provenance import file_sha256, git_state, package_versions
from .probe import fit_linear_probe, probe_probabilities, save_probe
from .report.figures import run_confusion_matrix
from .train import attach_adapter, class_logits, image_scorer, logit_scale_value, split_images

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(loaded, images: torch.Tensor, class_names: list[str], templates, scale: torch.Tensor,
            device: torch.device, batch_size: int, adapter=None) -> torch.Tensor:
    """Class probabilities for uint8 images (N,3,H,W) already at the model's size.

    Batches travel as uint8 (a quarter of float32's bytes), from pinned memory on a GPU, and
    are scaled and normalised on the device; logits and softmax are float32.
    """
    mean = torch.tensor(loaded.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std, device=device).view(1, 3, 1, 1)
    scores = image_scorer(loaded, class_names, templates, scale, device, adapter)
    probs = []
    for start in range(0, len(images), batch_size):
        batch = to_device(images[start:start + batch_size], device).float().div_(255)
        features = encode_images(loaded.model, (batch - mean) / std)
        probs.append(scores(features).softmax(dim=1).cpu())
    return torch.cat(probs) if probs else torch.empty(0, len(class_names))


def _prediction_table(split, key, labels, probs, class_names, group) -> pd.DataFrame:
    table = pd.DataFrame({
        "sample_id": [str(i) for i in split[key]],
        "group": group,
        "label": labels.numpy(),
        "class_name": [class_names[i] for i in labels.tolist()],
        "prediction": probs.argmax(1).numpy(),
    })
    table["predicted_class"] = [class_names[i] for i in table["prediction"]]
    for i, name in enumerate(class_names):
        table[f"p_{name}"] = probs[:, i].numpy()
    return table


def _feature_rows(features: np.ndarray, store: PreparedStore, ids: list) -> np.ndarray:
    return features[store.rows([str(i) for i in ids])]


def _probabilities(cfg: StudyConfig, dataset: str, method: str, split: dict[str, Any],
                   store: PreparedStore, loaded, device: torch.device, run_dir: Path,
                   features_path: Path | None, adapter_path: Path | None, chosen: dict):
    """A function (split key, class names) -> class probabilities, and the context it runs in.

    ``chosen`` receives what the method decided on the support sets (the probe's C)."""
    templates = cfg.dataset(dataset).templates
    scale = logit_scale_value(loaded, cfg.model.logit_scale).to(device)
    if method == "zero_shot":
        features = np.load(features_path, mmap_mode="r")

        def zero_shot(key, class_names):
            with torch.no_grad():
                text = encode_class_prompts(loaded, class_names, templates, device).float().cpu()
            image = torch.from_numpy(np.asarray(_feature_rows(features, store, split[key])))
            return class_logits(scale.cpu(), image, text).softmax(dim=1)
        return zero_shot, contextlib.nullcontext()
    if method == "linear_probe":
        features = np.load(features_path, mmap_mode="r")
        _, train_y = split_images(store, split, "train", with_images=False)
        _, val_y = split_images(store, split, "val", with_images=False)
        settings = cfg.linear_probe
        model, c, _ = fit_linear_probe(
            _feature_rows(features, store, split["train"]), train_y.numpy(),
            _feature_rows(features, store, split["val"]), val_y.numpy(), len(split["classes"]),
            settings.c_grid, settings.max_iter, int(split["seed"]))
        save_probe(run_dir / layout.PROBE, model, len(split["classes"]), c)
        chosen.update(C=c, c_grid=list(settings.c_grid), max_iter=settings.max_iter)

        def probe(key, class_names):
            x = _feature_rows(features, store, split[key])
            return torch.from_numpy(probe_probabilities(model, x, len(class_names)))
        return probe, contextlib.nullcontext()
    if method in fa.METHODS:
        features = np.load(features_path, mmap_mode="r")

        def rows(key):
            return fa.as_tensor(_feature_rows(features, store, split[key]))

        def text(class_names):
            with torch.no_grad():
                return encode_class_prompts(loaded, class_names, templates, device).float().cpu()
        labels = {key: split_images(store, split, key, with_images=False)[1]
                  for key in ("train", "val")}
        fitted = fa.fit(method, getattr(cfg, method), rows("train"), labels["train"],
                        rows("val"), labels["val"], text, list(split["classes"]),
                        float(scale), int(split["seed"]))
        fitted.save(run_dir / layout.FEATURE_ADAPTER)
        chosen.update(fitted.chosen)

        def feature_side(key, class_names):
            with torch.no_grad():
                return fitted.logits(rows(key), list(class_names)).softmax(dim=1)
        return feature_side, contextlib.nullcontext()
    adapter = attach_adapter(method, loaded.model, cfg.training(method, dataset),
                             tokenizer=loaded.tokenizer)
    adapter.load(adapter_path or run_dir / layout.ADAPTER)
    model_to_device(loaded.model, device).eval()
    prompts = adapter.prompt_templates(templates)

    def adapted(key, class_names):
        images, _ = split_images(store, split, key)
        return predict(loaded, images, class_names, prompts, scale, device, cfg.eval_batch_size,
                       adapter)
    return adapted, adapter.cached()


def evaluate(cfg: StudyConfig, dataset: str, method: str, split_path: Path, store_dir: Path,
             run_dir: Path, features_path: Path | None = None,
             adapter_path: Path | None = None, device: torch.device | None = None) -> dict[str, Any]:
    started_at = time.time()
    split = read_json(split_path)
    if not runs_in(method, split["setting"]):
        # Its weights cover only the base classes: novel images would be scored as base ones.
        raise ConfigError(f"{split_path}: {method} does not run in the {split['setting']} "
                          f"setting (it has weights only for the classes it was trained on); "
                          f"evaluate it on a few_shot split")
    if method in FEATURE_METHODS and features_path is None:
        raise ConfigError(f"{method} is fitted on the store's frozen image features: give "
                          "--features NPY (made by 'clipsvd features')")
    device = device or resolve_device(cfg.device)
    store = PreparedStore.open(store_dir)
    loaded = load_model(cfg.model.name, cfg.model.pretrained, cfg.model.init_seed)
    model_to_device(loaded.model, device).eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    chosen: dict[str, Any] = {}
    probabilities, cached = _probabilities(cfg, dataset, method, split, store, loaded, device,
                                           run_dir, features_path, adapter_path, chosen)

    base_to_novel = split["setting"] == "base_to_novel"
    groups = [("test", split["classes"], "base" if base_to_novel else "all")]
    if base_to_novel:
        groups.append(("test_novel", split["novel_classes"], "novel"))
    metrics: dict[str, Any] = {}
    tables = []
    with cached, batch_size_on_oom("eval_batch_size", cfg.eval_batch_size, device):
        for key, class_names, group in groups:
            _, labels = split_images(store, split, key, with_images=False)
            probs = probabilities(key, class_names).float()
            result = classification_metrics(labels.numpy(), probs.numpy(), list(class_names))
            if group == "all":
                metrics.update(result)
            else:
                metrics.update({f"{group}_{k}": v for k, v in result.items()})
            tables.append(_prediction_table(split, key, labels, probs, class_names, group))
    if base_to_novel:
        base, novel = metrics["base_accuracy"], metrics["novel_accuracy"]
        metrics["harmonic_mean"] = 2 * base * novel / (base + novel) if base + novel > 0 else 0.0
        metrics["accuracy"] = metrics["harmonic_mean"]
    metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
    timing.record("evaluation", time.perf_counter() - started)
    log.info("%s %s K=%s seed=%s: accuracy %.4f on %d test images", dataset, method,
             split["shots"], split["seed"], metrics["accuracy"],
             sum(len(t) for t in tables))

    summary_path = (adapter_path or run_dir / layout.ADAPTER).parent / layout.TRAIN_SUMMARY
    summary = read_json(summary_path) if method in ADAPTER_METHODS and summary_path.exists() else {}
    record = run_record(cfg, dataset, method, split, split_path, str(device), loaded.fingerprint)
    record["params"] = run_params(cfg, dataset, method, split, summary, chosen)
    record["inputs"] = dataset_inputs(store, split, split_path)
    record["timing"] = {"started_at": summary.get("started_at", started_at),
                        "finished_at": time.time()}
    with atomic_path(run_dir / layout.PREDICTIONS) as tmp:
        pd.concat(tables, ignore_index=True).to_csv(tmp, index=False)
    run_confusion_matrix(metrics, f"{dataset} {method} K={split['shots']} seed={split['seed']}",
                         run_dir / layout.CONFUSION)
    write_json(run_dir / layout.RUN_RECORD, record)
    write_json(run_dir / layout.METRICS, metrics)
    return record


def run_record(cfg: StudyConfig, dataset: str, method: str, split: dict[str, Any],
               split_path: Path, device: str, model_fingerprint: str) -> dict[str, Any]:
    """The run's identity (MLflow tags) and provenance, so results/ can rebuild MLflow alone."""
    tags = {"study": cfg.study, "dataset": dataset, "method": method,
            "setting": split["setting"], "shots": str(split["shots"]), "seed": str(split["seed"]),
            "model": f"{cfg.model.name}:{cfg.model.pretrained or 'random'}",
            "config_hash": cfg.fingerprint()}
    git = git_state()
    if git:
        tags["git_commit"] = str(git["git_commit"])
    provenance = {**git, "packages": package_versions(), "config_hash": cfg.fingerprint(),
                  "model_fingerprint": model_fingerprint, "split_path": str(split_path),
                  "split_sha256": file_sha256(split_path),
                  "device": device, "gpu_slot": claimed_gpu_slot()}
    return {"tags": tags, "provenance": provenance}


# Settings that mean the same for every method that has them; logged under these names (no
# method prefix) so one MLflow column compares methods.
SHARED_SETTINGS = ("lr", "weight_decay", "batch_size", "epochs", "iterations_per_shot",
                   "min_lr", "encoders", "layers", "matrices", "crop_scale", "flip",
                   "precision", "execution", "rank", "alpha", "dropout", "protect_rank",
                   "protect_energy", "optimizer", "momentum", "warmup_epochs", "warmup_lr",
                   "n_ctx", "ctx_init", "w", "sccm_lambda", "kdsp_lambda", "tau")
TRAINING_FACTS = ("total_steps", "trainable_parameters", "trainable_fraction")


def param_value(value: Any) -> str:
    """A setting as an MLflow parameter: lists as JSON, None as 'none', booleans lower-case."""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def run_params(cfg: StudyConfig, dataset: str, method: str, split: dict[str, Any],
               summary: dict[str, Any], chosen: dict[str, Any]) -> dict[str, str]:
    """What identifies a run and what compares it with other runs, whatever its method: the
    same names for the same meaning, the method's own settings as its training used them."""
    zero_shot = method == "zero_shot"
    params: dict[str, Any] = {
        "dataset": dataset, "method": method, "setting": split["setting"],
        "shots": int(split["shots"]),
        "seed": None if zero_shot else int(split["seed"]),  # zero-shot has no randomness
        "model": cfg.model.name, "pretrained": cfg.model.pretrained,
        "logit_scale": cfg.model.logit_scale, "templates": list(summary.get("config", {}).get("templates")
                                                   or cfg.dataset(dataset).templates),
        "support_size": len(split["train"]), "val_size": len(split["val"]),
        "test_size": len(split["test"]) + len(split.get("test_novel", [])),
        "classes": len(split["classes"]) + len(split.get("novel_classes", [])),
    }
    if method in ADAPTER_METHODS:
        used = summary.get("config", {}).get(method) or asdict(cfg.training(method, dataset))
        params.update({k: used[k] for k in SHARED_SETTINGS if k in used})
        params.update({k: summary[k] for k in TRAINING_FACTS if k in summary})
    elif method in fa.METHODS:
        params.update(asdict(getattr(cfg, method)))
    params.update(chosen)
    return {key: param_value(value) for key, value in params.items()}


def dataset_inputs(store: PreparedStore, split: dict[str, Any],
                   split_path: Path) -> list[dict[str, Any]]:
    """The run's MLflow dataset inputs: the prepared store its test set comes from, and (for a
    method that learns from it) the split file of its support sets."""
    provenance = store.provenance
    digest_of = json.dumps([provenance.get("fingerprint"), provenance.get("inputs_fingerprint")])
    splits = provenance.get("splits") or split_summary(store.index)
    inputs = [{
        "name": store.name, "context": "test", "source": str(store.path),
        "digest": hashlib.sha256(digest_of.encode()).hexdigest()[:16],
        "profile": {"test_images": len(split["test"]) + len(split.get("test_novel", [])),
                    "classes": len(store.classes),
                    **{f"{name}_images": part["images"] for name, part in splits.items()}},
    }]
    if split["train"]:
        inputs.append({
            "name": f"{store.name} K={split['shots']} seed={split['seed']}",
            "context": "training", "source": str(split_path),
            "digest": file_sha256(split_path)[:16],
            "profile": {"support_images": len(split["train"]),
                        "validation_images": len(split["val"])},
        })
    return inputs
