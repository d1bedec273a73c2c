"""Every adapter learns: on classes the model can separate, training lowers the loss and the
adapted model beats the unadapted one on the test set at K = 4, by margins derived from the
data; a broken variant (gradient sign flipped, or evaluation with the adapter detached) fails
the same check.

The data: the demo generator's four classes (100 images each, 64 px; 80 test images), on
tiny-clip with random weights, whose zero-shot model predicts one class for every image (26 %).
At K = 4 (seed 1) the adapters reach 72-74 %: McNemar z = 5.3-5.4 against the required 3, and a
loss drop of 5-11 standard errors against the required 3. One CPU thread, so the numbers are
the same on every machine.
"""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from clipsvd import config, layout
from clipsvd.adapters.base import Adapter
from clipsvd.config import DemoConfig
from clipsvd.data.demo import generate_demo_dataset
from clipsvd.data.prepare import prepare_dataset
from clipsvd.data.sampling import sample_split, write_split
from clipsvd.data.store import PreparedStore
from clipsvd.descriptions import SHIPPED
from clipsvd.evaluate import evaluate
from clipsvd.features import compute_features
from clipsvd.train import adapt

ADAPTER_METHODS = ("clip_svd", "clip_lora", "comp_lora", "full_finetune", "coop", "cocoop",
                   "kgcoop", "biomedcoop")
SHOTS = 4
Z = 3.0  # one-sided normal quantile of p ≈ 0.0013, for both margins below


def study(root) -> dict:
    return {"study": "learning",
            "datasets": [{"name": "toy", "format": "csv", "root": str(root / "raw"),
                          "manifest": "manifest.csv", "templates": ["a {} scan"],
                          "descriptions": str(SHIPPED / "demo.yaml")}],
            "methods": ["zero_shot", *ADAPTER_METHODS], "shots": [SHOTS], "seeds": [1],
            "device": "cpu",
            # 16 support images, batch 32: every step sees the whole support set, cropped anew.
            "clip_svd": {"lr": 0.01, "epochs": 40},
            "clip_lora": {"lr": 0.02, "epochs": 40},
            "comp_lora": {"lr": 0.02, "epochs": 40, "protect_energy": 0.9},
            "full_finetune": {"lr": 1e-3, "epochs": 40},
            # AdamW here, so the flipped-gradient break below reaches it too (its recipe's SGD
            # and warm-up: test_prompt_learning.py)
            "coop": {"lr": 0.01, "epochs": 40, "optimizer": "adamw", "warmup_epochs": 0},
            # CoCoOp's meta-network shifts every prompt by far more than tiny-clip's token
            # embeddings (std 0.02) at its default initialisation: longer, at a higher rate
            "cocoop": {"lr": 0.03, "epochs": 120, "optimizer": "adamw", "warmup_epochs": 0,
                       "batch_size": 16},
            "kgcoop": {"lr": 0.01, "epochs": 40, "optimizer": "adamw", "warmup_epochs": 0,
                       "batch_size": 32, "w": 0.1},
            "biomedcoop": {"lr": 0.01, "epochs": 40, "optimizer": "adamw", "warmup_epochs": 0,
                           "batch_size": 32, "sccm_lambda": 0.1, "kdsp_lambda": 0.1},
            "tracking": {"enabled": False}}


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, one_thread):
    """The prepared store, the K = 4 split, the study and the zero-shot run folder."""
    root = tmp_path_factory.mktemp("learning")
    generate_demo_dataset(root / "raw", DemoConfig(per_class=100, image_size=64, seed=0))
    cfg = config.from_dict(study(root))
    prepare_dataset(cfg.dataset("toy"), root / "store", 64)
    split = sample_split(PreparedStore.open(root / "store"), "few_shot", SHOTS, 1,
                         cfg.dataset("toy").sampling)
    write_split(root / "split.json", split)
    compute_features(cfg, root / "store", root / "features.npy")
    evaluate(cfg, "toy", "zero_shot", root / "split.json", root / "store", root / "zero_shot",
             features_path=root / "features.npy")
    return root, cfg


def train_and_evaluate(toy, method, out):
    root, cfg = toy
    adapt(cfg, "toy", method, root / "split.json", root / "store", out)
    evaluate(cfg, "toy", method, root / "split.json", root / "store", out)
    return out


def assert_learns(run_dir, zero_shot_dir) -> None:
    """The check every adapter must pass, read from the run folders' files only.

    1. The training loss falls: the mean loss of the last quarter of the steps is below that
       of the first quarter by more than Z standard errors of the difference (Welch: the
       step-to-step spread of each quarter, which comes from the random crops).
    2. The adapted model beats the unadapted one on the same test images (McNemar): with b
       images only the adapted model gets right and c only the unadapted one does, under "no
       difference" b ~ Binomial(b + c, 1/2); the accuracy gain (b - c) / n must exceed
       Z * sqrt(b + c) / n, i.e. z = (b - c) / sqrt(b + c) > Z.
    """
    history = pd.read_csv(run_dir / layout.TRAIN_HISTORY)
    quarter = len(history) // 4
    first, last = history.loss.iloc[:quarter], history.loss.iloc[-quarter:]
    spread = math.sqrt(first.var() / quarter + last.var() / quarter)
    assert first.mean() - last.mean() > Z * spread, (
        f"training loss did not fall: first quarter {first.mean():.3f}, last quarter "
        f"{last.mean():.3f}, needed a drop of more than {Z * spread:.3f}")
    adapted = pd.read_csv(run_dir / layout.PREDICTIONS).set_index("sample_id")
    unadapted = pd.read_csv(zero_shot_dir / layout.PREDICTIONS).set_index("sample_id")
    assert sorted(adapted.index) == sorted(unadapted.index)  # the same test images
    unadapted = unadapted.loc[adapted.index]
    right = adapted.prediction == adapted.label
    right_before = unadapted.prediction == unadapted.label
    b, c, n = int((right & ~right_before).sum()), int((~right & right_before).sum()), len(right)
    margin = Z * math.sqrt(b + c) / n
    assert (b - c) / n > margin, (
        f"test accuracy {right.mean():.3f} does not beat the unadapted model's "
        f"{right_before.mean():.3f} by more than {margin:.3f} (b = {b}, c = {c}, n = {n})")


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """Each adapter trained and evaluated once, shared by the tests below."""
    out = tmp_path_factory.mktemp("trained")
    return {m: train_and_evaluate(toy, m, out / m) for m in ADAPTER_METHODS}


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_every_adapter_learns_at_four_shots(toy, trained, method):
    """Catches an adapter that does not learn or whose trained weights do not reach
    evaluation; the two tests below run such breaks and show that they fail this check."""
    root, _ = toy
    assert_learns(trained[method], root / "zero_shot")


class AscendingAdamW(torch.optim.AdamW):
    """AdamW that climbs the loss: the gradient's sign flipped."""

    used = 0

    def __init__(self, params, **kwargs):
        AscendingAdamW.used += 1
        super().__init__(params, **{**kwargs, "maximize": True})


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_flipped_gradient_sign_fails_the_check(toy, method, tmp_path, monkeypatch):
    """The break: every optimizer step goes up the loss (torch.optim.AdamW replaced)."""
    monkeypatch.setattr(torch.optim, "AdamW", AscendingAdamW)
    used = AscendingAdamW.used
    run = train_and_evaluate(toy, method, tmp_path / method)
    assert AscendingAdamW.used == used + 1  # the break reached the training loop
    with pytest.raises(AssertionError, match="training loss did not fall"):
        assert_learns(run, toy[0] / "zero_shot")


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_evaluation_with_the_adapter_detached_fails_the_check(toy, trained, method, tmp_path,
                                                               monkeypatch):
    """The break: evaluation attaches the adapter but never copies the trained weights into it,
    so the model it evaluates is the unadapted one (the training history is the good run's)."""
    root, cfg = toy

    def read_header_only(self, path, check_fingerprint=True):
        return self.read_metadata(path)

    monkeypatch.setattr(Adapter, "load", read_header_only)
    run = tmp_path / method
    run.mkdir()
    for name in (layout.ADAPTER, layout.TRAIN_HISTORY):
        (run / name).write_bytes((trained[method] / name).read_bytes())
    evaluate(cfg, "toy", method, root / "split.json", root / "store", run)
    with pytest.raises(AssertionError, match="does not beat the unadapted model"):
        assert_learns(run, root / "zero_shot")


@pytest.mark.parametrize("length", [{"epochs": 1}, {"epochs": 3}, {"iterations_per_shot": 5}])
def test_learning_rate_of_a_run_anneals_once_over_all_its_steps(toy, tmp_path, length):
    """The learning rates a real run recorded in train_history.csv: one cosine from lr to
    min_lr over all its steps, never rising, however the length is given (4 steps per epoch
    here: 16 support images, batch 4). Catches the public code's schedule (T_max = epochs,
    stepped every batch: it rises again after `epochs` steps) and one that restarts every
    epoch."""
    root, _ = toy
    raw = study(root)
    raw["clip_svd"] = {"lr": 0.01, "min_lr": 1e-4, "batch_size": 4, **length}
    cfg = config.from_dict(raw)
    adapt(cfg, "toy", "clip_svd", root / "split.json", root / "store", tmp_path / "run")
    lrs = pd.read_csv(tmp_path / "run" / layout.TRAIN_HISTORY).lr.tolist()
    steps = 4 * length["epochs"] if "epochs" in length else SHOTS * length["iterations_per_shot"]
    assert len(lrs) == steps
    assert lrs[0] == pytest.approx(0.01, rel=1e-12) and lrs[-1] == pytest.approx(1e-4, rel=1e-9)
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), lrs
    one_cosine = [1e-4 + 0.5 * (0.01 - 1e-4) * (1 + math.cos(math.pi * t / (steps - 1)))
                  for t in range(steps)]
    assert lrs == pytest.approx(one_cosine, rel=1e-9)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_validation_accuracy_of_a_run_is_the_adapted_models_on_the_val_support_set(
        toy, trained, method, tmp_path):
    """train.json's val_accuracy (what `clipsvd select` chooses learning rates by) is the
    accuracy of the adapted model on the split's validation support set, as evaluation
    measures it when that set is its test set."""
    root, cfg = toy
    split = json.loads((root / "split.json").read_text())
    as_test = {**split, "test": split["val"]}
    (tmp_path / "val_as_test.json").write_text(json.dumps(as_test))
    run = tmp_path / "run"
    run.mkdir()
    (run / layout.ADAPTER).write_bytes((trained[method] / layout.ADAPTER).read_bytes())
    evaluate(cfg, "toy", method, tmp_path / "val_as_test.json", root / "store", run)
    metrics = json.loads((run / layout.METRICS).read_text())
    summary = json.loads((trained[method] / layout.TRAIN_SUMMARY).read_text())
    assert summary["val_images"] == len(split["val"]) == 16
    assert summary["val_accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    evaluate(cfg, "toy", "zero_shot", tmp_path / "val_as_test.json", root / "store",
             tmp_path / "zero_shot", features_path=root / "features.npy")
    unadapted = json.loads((tmp_path / "zero_shot" / layout.METRICS).read_text())
    assert summary["val_accuracy"] > unadapted["accuracy"]
