"""Frozen image features of a whole prepared store, computed once per (dataset, model).

Zero-shot and the linear probe both read them, so the frozen encoder runs once per dataset.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import timing
from .config import StudyConfig
from .data.store import PreparedStore
from .devices import batch_size_on_oom, model_to_device, resolve_device, to_device
from .io import atomic_path
from .models import encode_images, load_model

log = logging.getLogger(__name__)


@torch.no_grad()
def compute_features(cfg: StudyConfig, store_dir: Path, out_path: Path,
                     device: torch.device | None = None) -> np.ndarray:
    device = device or resolve_device(cfg.device)
    store = PreparedStore.open(store_dir)
    loaded = load_model(cfg.model.name, cfg.model.pretrained, cfg.model.init_seed)
    model = model_to_device(loaded.model, device).eval()
    mean = torch.tensor(loaded.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std, device=device).view(1, 3, 1, 1)
    n, batch_size = len(store.images), cfg.eval_batch_size
    chunks = []
    started = last = time.perf_counter()
    with batch_size_on_oom("eval_batch_size", batch_size, device):
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(np.array(store.images[start:start + batch_size]))
            batch = (to_device(batch, device).float().div_(255) - mean) / std
            chunks.append(encode_images(model, batch).float().cpu().numpy())
            now = time.perf_counter()
            if now - last > 10:
                done = start + len(batch)
                rate = done / (now - started)
                log.info("features: %d/%d images (%.0f images/s, ETA %.0f s)", done, n, rate, (n - done) / rate)
                last = now
    timing.record("features", time.perf_counter() - started)
    features = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, features.astype(np.float32))
    log.info("features of %d images (dim %d) in %.1f s", n, features.shape[1] if n else 0,
             time.perf_counter() - started)
    return features
