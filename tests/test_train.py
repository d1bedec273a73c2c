"""The learning-rate schedule anneals once over all steps (not once per epoch)."""
import math

import pytest

from clipsvd import config
from clipsvd.train import cosine_lr, total_steps


def test_cosine_anneals_once_over_all_steps():
    steps, base, floor = 100, 1e-2, 1e-6
    lrs = [cosine_lr(s, steps, base, floor) for s in range(steps)]
    assert lrs[0] == pytest.approx(base)
    assert lrs[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "learning rate must never rise again"
    assert lrs[steps // 2] == pytest.approx(floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * 50 / 99)))


def test_total_steps_epochs_and_iterations():
    raw = {"study": "s", "datasets": [{"name": "d", "format": "folder", "root": "r"}],
           "clip_svd": {"epochs": 10, "batch_size": 32}}
    cfg = config.from_dict(raw)
    assert total_steps(cfg.training("clip_svd", "d"), 64, 16) == 20
    assert total_steps(cfg.training("clip_svd", "d"), 4, 1) == 10
    raw["clip_svd"] = {"iterations_per_shot": 200}
    assert total_steps(config.from_dict(raw).training("clip_svd", "d"), 4, 2) == 400
    # The CLIP-LoRA recipe: 500 × K iterations by default.
    assert total_steps(cfg.training("clip_lora", "d"), 4, 2) == 1000


def test_dataset_overrides_apply_to_their_method_only():
    raw = {"study": "s", "datasets": [{"name": "d", "format": "folder", "root": "r",
                                       "overrides": {"clip_svd": {"lr": 0.007, "epochs": 100}}},
                                      {"name": "e", "format": "folder", "root": "r2"}]}
    cfg = config.from_dict(raw)
    assert cfg.training("clip_svd", "d").lr == 0.007
    assert cfg.training("clip_svd", "d").epochs == 100
    assert cfg.training("clip_svd", "e").lr == cfg.clip_svd.lr
    assert cfg.training("clip_lora", "d").lr == cfg.clip_lora.lr
