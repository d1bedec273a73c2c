"""Few-shot adaptation of a CLIP model by training its singular values (CLIP-SVD).

Loss: cross-entropy over ``logit_scale · cos(image, class prompt)``; the text features are
recomputed every step because the text encoder is adapted too. AdamW with a cosine schedule that
anneals **once** over all steps (the public code's schedule restarts every epoch; not copied).
"""
from __future__ import annotations

import csv
import logging
import math
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from . import layout
from .adapters import ADAPTERS, attach
from .adapters.base import Adapter
from .config import ADAPTER_METHODS, StudyConfig, TrainingConfig
from .data.store import PreparedStore
from .devices import autocast_dtype, batch_size_on_oom, claimed_gpu_slot, resolve_device
from .errors import ConfigError, TrainingError
from .io import atomic_path, read_json, write_json
from .models import LoadedModel, encode_class_prompts, encode_images, load_model
from .seeding import seed_everything, torch_generator

log = logging.getLogger(__name__)


def split_images(store: PreparedStore, split: dict[str, Any], key: str,
                 with_images: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """uint8 images (N,3,H,W) and labels relative to the split's classes, read from the store."""
    ids = [str(i) for i in split[key]]
    rows = store.rows(ids)
    images = torch.from_numpy(np.ascontiguousarray(store.images[rows])) if with_images else None
    classes = split["novel_classes"] if key == "test_novel" else split["classes"]
    position = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([position[n] for n in store.index["class_name"].to_numpy()[rows]],
                          dtype=torch.long)
    return images, labels


def normalizer(loaded: LoadedModel) -> v2.Normalize:
    return v2.Normalize(mean=list(loaded.mean), std=list(loaded.std))


def logit_scale_value(loaded: LoadedModel, configured: Any) -> torch.Tensor:
    """A fixed number, or the model's own learned scale (detached, never trained)."""
    if configured == "model":
        return loaded.model.logit_scale.detach().exp()
    return torch.tensor(float(configured))


def total_steps(settings: TrainingConfig, n_support: int, shots: int) -> int:
    """Epochs over the support set, or iterations × K (the CLIP-LoRA and natural-image recipes)."""
    if settings.iterations_per_shot is not None:
        return settings.iterations_per_shot * shots
    return settings.epochs * math.ceil(n_support / settings.batch_size)


def attach_adapter(method: str, model: torch.nn.Module, settings: TrainingConfig) -> Adapter:
    """Attach the method's adapter, configured from the study's settings of that method."""
    if method not in ADAPTERS:
        raise ConfigError(f"method '{method}' has no adapter; adapter methods are "
                          f"{', '.join(ADAPTER_METHODS)}")
    return attach(method, model, settings)


def cosine_lr(step: int, steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate before optimizer step ``step`` (0-based): one cosine from base to min."""
    if steps <= 1:
        return base_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * step / (steps - 1)))


def adapt(cfg: StudyConfig, dataset: str, method: str, split_path: Path, store_dir: Path,
          out_dir: Path, device: torch.device | None = None) -> dict[str, Any]:
    """Train one adapter on one split; write the adapter, the history and a summary into out_dir."""
    started_at = time.time()  # the run's start in MLflow: its work, not its logging
    split = read_json(split_path)
    shots, seed = int(split["shots"]), int(split["seed"])
    dataset_cfg = cfg.dataset(dataset)
    settings = cfg.training(method, dataset)
    device = device or resolve_device(cfg.device)
    seed_everything(seed)

    store = PreparedStore.open(store_dir)
    loaded = load_model(cfg.model.name, cfg.model.pretrained, cfg.model.init_seed)
    model = loaded.model
    adapter = attach_adapter(method, model, settings)
    model.to(device)
    n_model = adapter.base_num_parameters
    n_trainable = adapter.num_trainable()
    log.info("%s: %d trainable parameters (%.4f%% of %d model parameters) in %d matrices",
             method, n_trainable, 100 * n_trainable / n_model, n_model, len(adapter.describe()))

    images, labels = split_images(store, split, "train")
    if device.type == "cuda":  # a few-shot support set fits: crop and resize on the GPU
        images = images.to(device)
    size = loaded.image_size
    augment = v2.Compose([
        v2.RandomResizedCrop(size, scale=tuple(settings.crop_scale),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        *([v2.RandomHorizontalFlip()] if settings.flip else []),
    ])
    normalize = normalizer(loaded)
    lr = settings.lr
    steps = total_steps(settings, len(labels), shots)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=lr, betas=(0.9, 0.999),
                                  weight_decay=settings.weight_decay)
    amp_dtype = autocast_dtype(settings.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    scale = logit_scale_value(loaded, cfg.model.logit_scale).to(device)
    generator = torch_generator(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    history: list[dict[str, float]] = []
    order = torch.empty(0, dtype=torch.long)
    # Time spent building batches from the in-memory store (crop, flip, normalise); on a GPU
    # the crops are queued asynchronously, so their kernels count in the step instead.
    data_seconds = 0.0
    model.train()
    started = time.perf_counter()
    last_report = started
    overridden = "batch_size" in dataset_cfg.overrides.get(method, {})
    batch_key = (f"datasets[{dataset}].overrides.{method}.batch_size" if overridden
                 else f"{method}.batch_size")
    with batch_size_on_oom(batch_key, settings.batch_size, device):
        for step in range(steps):
            loading = time.perf_counter()
            if len(order) == 0:
                order = torch.randperm(len(labels), generator=generator)
            batch_idx, order = order[:settings.batch_size], order[settings.batch_size:]
            batch = torch.stack([augment(images[i]) for i in batch_idx.tolist()])
            batch = normalize(batch.float().div_(255)).to(device, non_blocking=True)
            target = labels[batch_idx].to(device)
            data_seconds += time.perf_counter() - loading
            step_lr = cosine_lr(step, steps, lr, settings.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            with adapter.cached(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                  enabled=amp_dtype is not None):
                text = encode_class_prompts(loaded, split["classes"], dataset_cfg.templates, device)
                feats = encode_images(model, batch)
                logits = scale * feats @ text.t()
                loss = F.cross_entropy(logits.float(), target)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss.item()} at step {step + 1} of {steps} (learning rate "
                        f"{step_lr:.3g}); lower the learning rate ({method}.lr or "
                        f"datasets.*.overrides.{method}.lr)")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            accuracy = (logits.argmax(1) == target).float().mean().item()
            history.append({"step": step + 1, "loss": loss.item(), "accuracy": accuracy, "lr": step_lr})
            now = time.perf_counter()
            if step == 0 or now - last_report > 10 or step + 1 == steps:
                rate = (step + 1) / (now - started)
                log.info("step %d/%d loss %.4f batch accuracy %.3f lr %.2e (%.1f steps/s, ETA %.0f s)",
                         step + 1, steps, loss.item(), accuracy, step_lr, rate, (steps - step - 1) / rate)
                last_report = now
    seconds = time.perf_counter() - started
    model.eval()

    summary = {
        "dataset": dataset, "setting": split["setting"], "shots": shots, "seed": seed,
        "method": method, "device": str(device), "gpu_slot": claimed_gpu_slot(), "total_steps": steps,
        "started_at": started_at, "finished_at": time.time(),
        "train_seconds": round(seconds, 3), "steps_per_second": round(steps / max(seconds, 1e-9), 3),
        "data_seconds": round(data_seconds, 3), "cpu_threads": torch.get_num_threads(),
        "loader_fraction": round(data_seconds / max(seconds, 1e-9), 4),
        "trainable_parameters": n_trainable, "model_parameters": n_model,
        "trainable_fraction": n_trainable / n_model, "model_fingerprint": loaded.fingerprint,
        "lr": lr, "final_loss": history[-1]["loss"] if history else None,
        "config": {"model": asdict(cfg.model), method: asdict(settings),
                   "templates": list(dataset_cfg.templates), "config_hash": cfg.fingerprint()},
    }
    if device.type == "cuda":
        summary["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # the process's peak resident memory (Linux reports KiB)
        summary["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter.save(out_dir / layout.ADAPTER, {
        "method": method, "model_name": cfg.model.name, "model_fingerprint": loaded.fingerprint,
        "dataset": dataset, "shots": str(shots), "seed": str(seed)})
    with atomic_path(out_dir / layout.TRAIN_HISTORY) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "loss", "accuracy", "lr"])
            writer.writeheader()
            writer.writerows(history)
    write_json(out_dir / layout.TRAIN_SUMMARY, summary)
    log.info("trained %d steps in %.1f s; adapter saved to %s", steps, seconds, out_dir / layout.ADAPTER)
    return summary
