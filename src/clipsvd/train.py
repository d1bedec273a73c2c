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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import layout, timing
from .adapters import ADAPTERS, attach
from .adapters.base import Adapter
from .config import ADAPTER_METHODS, StudyConfig, TrainingConfig
from .data.augment import random_resized_crops
from .data.store import PreparedStore
from .data.views import CROP_SOURCES, support_images
from .descriptions import class_descriptions, description_path
from .devices import (autocast_dtype, batch_size_on_oom, claimed_gpu_slot, gpu_memory_guard,
                      model_to_device, resolve_device, to_device)
from .errors import ConfigError, TrainingError
from .io import atomic_path, read_json, write_json
from .models import LoadedModel, encode_class_prompts, encode_images, load_model
from .seeding import CROP_STREAM, ORDER_STREAM, seed_everything, torch_generator

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


def attach_adapter(method: str, model: torch.nn.Module, settings: TrainingConfig,
                   tokenizer=None) -> Adapter:
    """Attach the method's adapter, configured from the study's settings of that method (a
    prompt learner also reads the model's tokenizer)."""
    if method not in ADAPTERS:
        raise ConfigError(f"method '{method}' has no adapter; adapter methods are "
                          f"{', '.join(ADAPTER_METHODS)}")
    return attach(method, model, settings, tokenizer=tokenizer)


def schedule(settings: TrainingConfig, steps: int, steps_per_epoch: int) -> list[float]:
    """The rate before each step: a constant warm-up of ``warmup_epochs`` epochs at
    ``warmup_lr`` where the method's recipe has one (Dassl's, for CoOp), then one cosine from
    lr to min_lr over the remaining steps."""
    warmup = min(getattr(settings, "warmup_epochs", 0) * steps_per_epoch, max(steps - 1, 0))
    rest = steps - warmup
    warm = [settings.warmup_lr] * warmup if warmup else []
    return warm + [cosine_lr(step, rest, settings.lr, settings.min_lr) for step in range(rest)]


def make_optimizer(settings: TrainingConfig, parameters) -> torch.optim.Optimizer:
    """AdamW for the adapters; SGD with momentum where the method's recipe says so (CoOp)."""
    if getattr(settings, "optimizer", "adamw") == "sgd":
        return torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    return torch.optim.AdamW(parameters, lr=settings.lr, betas=(0.9, 0.999),
                             weight_decay=settings.weight_decay)


def cosine_lr(step: int, steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate before optimizer step ``step`` (0-based): one cosine from base to min."""
    if steps <= 1:
        return base_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * step / (steps - 1)))


def class_logits(scale: torch.Tensor, image_features: torch.Tensor,
                 text_features: torch.Tensor) -> torch.Tensor:
    """``scale · image · textᵀ`` in float32, also inside autocast.

    Under bf16 autocast the product would be rounded to bf16 before any ``.float()``: with a
    logit scale of 100 a logit near 80 then has a spacing of 0.5. The features are taken to
    float32 and the product runs with autocast off (in this order of operations, so fp32 runs
    are bit-identical to ``scale * image @ text.t()``).
    """
    with torch.autocast(image_features.device.type, enabled=False):
        return scale.float() * image_features.float() @ text_features.float().t()


def image_scorer(loaded, class_names, templates, scale: torch.Tensor, device: torch.device,
                 adapter: Adapter | None = None):
    """image features -> float32 logits: against one text feature per class, computed once,
    or, for an image-conditioned adapter (CoCoOp), against each image's own prompts."""
    if adapter is not None and adapter.image_conditioned:
        return lambda feats: adapter.conditioned_logits(loaded, class_names, templates, feats,
                                                        scale)
    text = encode_class_prompts(loaded, class_names, templates, device)
    return lambda feats: class_logits(scale, feats, text)


@torch.no_grad()
def validation_accuracy(model, prompts, store: PreparedStore, split: dict[str, Any], templates,
                        scale: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                        device: torch.device, adapter: Adapter | None = None) -> float | None:
    """Accuracy of the adapted model on the split's validation support set (None without one).

    The count stays on the device and is read once, after the last batch.
    """
    if not split["val"]:
        return None
    images, labels = split_images(store, split, "val")
    labels = to_device(labels, device)
    scores = image_scorer(prompts, split["classes"], templates, scale, device, adapter)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(labels), 256):
        batch = (to_device(images[start:start + 256], device).float() / 255 - mean) / std
        predicted = scores(encode_images(model, batch)).argmax(1)
        correct += (predicted == labels[start:start + 256]).sum()
    return int(correct) / len(labels)


def tokens_moved_once(loaded: LoadedModel, device: torch.device) -> LoadedModel:
    """``loaded`` whose tokenizer hands out each prompt list's tokens already on ``device``.

    The text features are recomputed every step from the same prompts; tokenizing them anew
    and copying the tokens from pageable host memory would make the host wait for the device
    every step (a synchronous copy), for the same tokens.
    """
    tokens: dict[tuple[str, ...], torch.Tensor] = {}

    def tokenize(prompts: list[str]) -> torch.Tensor:
        key = tuple(prompts)
        if key not in tokens:
            tokens[key] = to_device(loaded.tokenizer(list(prompts)), device)
        return tokens[key]

    return replace(loaded, tokenizer=tokenize)


def _first_non_finite(losses: torch.Tensor) -> int | None:
    """The position of the first non-finite value (one host sync), or None."""
    bad = ~torch.isfinite(losses)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


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
    adapter = attach_adapter(method, model, settings, tokenizer=loaded.tokenizer)
    if adapter.needs_descriptions:  # checked against the split's classes before any training
        adapter.descriptions = class_descriptions(description_path(dataset_cfg),
                                                  split["classes"])
    templates = adapter.prompt_templates(dataset_cfg.templates)
    model_to_device(model, device)
    n_model = adapter.base_num_parameters
    n_trainable = adapter.num_trainable()
    log.info("%s: %d trainable parameters (%.4f%% of %d model parameters) in %d matrices",
             method, n_trainable, 100 * n_trainable / n_model, n_model, len(adapter.describe()))

    # The support set stays on the device for the whole run; crops are cut there, in batches.
    host_images, sizes, origin = support_images(store, [str(i) for i in split["train"]])
    _, labels = split_images(store, split, "train", with_images=False)
    view_key = f"datasets[{dataset}].preprocessing.train_view"
    with gpu_memory_guard(device, f"while moving the support set ({len(labels)} images of up to "
                          f"{host_images.shape[2]} x {host_images.shape[3]} px, "
                          f"{host_images.numel() / 2**20:.0f} MB) to it",
                          f"lower {view_key} (now {dataset_cfg.preprocessing.train_view}) in the "
                          "study config, or free the GPU of other processes"):
        images = to_device(host_images, device)
        labels_on_device = to_device(labels, device)
    log.info("training crops from %s: %d images, %d x %d px at most", CROP_SOURCES[origin],
             len(labels), host_images.shape[2], host_images.shape[3])
    size = loaded.image_size
    prompts = tokens_moved_once(loaded, device)
    mean = torch.tensor(loaded.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std, device=device).view(1, 3, 1, 1)
    lr = settings.lr
    steps = total_steps(settings, len(labels), shots)
    optimizer = make_optimizer(settings, adapter.trainable_parameters())
    amp_dtype = autocast_dtype(settings.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    scale = logit_scale_value(loaded, cfg.model.logit_scale).to(device)
    generator = torch_generator(seed, ORDER_STREAM)
    crop_generator = torch_generator(seed, CROP_STREAM)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Loss and batch accuracy stay on the device until the end: reading them every step would
    # make the host wait for the device every step. They are read (and checked for a
    # non-finite loss) at each progress report, at least every 10 s, and at the end.
    losses = torch.zeros(steps, device=device)
    accuracies = torch.zeros(steps, device=device)
    learning_rates = schedule(settings, steps, math.ceil(len(labels) / settings.batch_size))
    order = torch.empty(0, dtype=torch.long)
    # Time spent building batches (crop boxes, resampling, flip, normalise); on a GPU the
    # kernels are queued asynchronously, so their device time counts in the step instead.
    data_seconds = 0.0
    model.train()
    started = time.perf_counter()
    last_report = started
    overridden = "batch_size" in dataset_cfg.overrides.get(method, {})
    batch_key = (f"datasets[{dataset}].overrides.{method}.batch_size" if overridden
                 else f"{method}.batch_size")

    def stop_if_not_finite(done: int) -> None:
        bad = _first_non_finite(losses[:done])
        if bad is not None:
            raise TrainingError(
                f"loss became {float(losses[bad])} at step {bad + 1} of {steps} (learning rate "
                f"{learning_rates[bad]:.3g}); lower the learning rate ({method}.lr or "
                f"datasets.*.overrides.{method}.lr)")

    with batch_size_on_oom(batch_key, settings.batch_size, device):
        for step in range(steps):
            loading = time.perf_counter()
            if len(order) == 0:
                order = torch.randperm(len(labels), generator=generator)
            batch_idx, order = order[:settings.batch_size], order[settings.batch_size:]
            batch = random_resized_crops(images, sizes, batch_idx, size,
                                         tuple(settings.crop_scale), settings.flip,
                                         crop_generator)
            batch = (batch - mean) / std
            target = labels_on_device[batch_idx.to(device, non_blocking=True)]
            data_seconds += time.perf_counter() - loading
            for group in optimizer.param_groups:
                group["lr"] = learning_rates[step]
            with adapter.cached(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                  enabled=amp_dtype is not None):
                feats = encode_images(model, batch)
                if adapter.image_conditioned:
                    text = None
                    logits = adapter.conditioned_logits(prompts, split["classes"], templates,
                                                        feats, scale)
                else:
                    text = encode_class_prompts(prompts, split["classes"], templates, device)
                    logits = class_logits(scale, feats, text)
                loss = F.cross_entropy(logits, target)
                extra = adapter.extra_loss(prompts, split["classes"], text, feats, logits, scale)
                if extra is not None:
                    loss = loss + extra
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses[step] = loss.detach()
            accuracies[step] = (logits.detach().argmax(1) == target).float().mean()
            now = time.perf_counter()
            if step == 0 or now - last_report > 10 or step + 1 == steps:
                stop_if_not_finite(step + 1)
                rate = (step + 1) / (now - started)
                log.info("step %d/%d loss %.4f batch accuracy %.3f lr %.2e (%.1f steps/s, ETA %.0f s)",
                         step + 1, steps, float(losses[step]), float(accuracies[step]),
                         learning_rates[step], rate, (steps - step - 1) / rate)
                last_report = now
        history = [{"step": step + 1, "loss": loss_value, "accuracy": accuracy,
                    "lr": learning_rates[step]}
                   for step, (loss_value, accuracy) in enumerate(zip(losses.tolist(),
                                                                    accuracies.tolist()))]
    seconds = time.perf_counter() - started
    timing.record("training", seconds)
    model.eval()
    val_accuracy = validation_accuracy(model, prompts, store, split, templates, scale, mean, std,
                                       device, adapter)

    summary = {
        "dataset": dataset, "setting": split["setting"], "shots": shots, "seed": seed,
        "method": method, "device": str(device), "gpu_slot": claimed_gpu_slot(), "total_steps": steps,
        "started_at": started_at, "finished_at": time.time(),
        "train_seconds": round(seconds, 3), "steps_per_second": round(steps / max(seconds, 1e-9), 3),
        "data_seconds": round(data_seconds, 3), "cpu_threads": torch.get_num_threads(),
        # the store file crops were cut from, and the largest (height, width) there
        "crops_from": origin, "crop_source_size": [int(host_images.shape[2]),
                                                   int(host_images.shape[3])],
        "loader_fraction": round(data_seconds / max(seconds, 1e-9), 4),
        "trainable_parameters": n_trainable, "model_parameters": n_model,
        "trainable_fraction": n_trainable / n_model, "model_fingerprint": loaded.fingerprint,
        "lr": lr, "final_loss": history[-1]["loss"] if history else None,
        # on the split's validation support set: what a learning rate is chosen by (the test
        # set is never looked at; docs/miniature.md)
        "val_accuracy": val_accuracy, "val_images": len(split["val"]),
        "config": {"model": asdict(cfg.model), method: asdict(settings),
                   "templates": list(templates), "config_hash": cfg.fingerprint()},
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
