"""The feature-side baselines (clipsvd.feature_adapters): Tip-Adapter, Tip-Adapter-F, LP++ and
CLIP-Adapter. Their defining properties on fixed tensors, a learning test for each trained one
that a loss-ascent variant fails, and the evaluation of each through `evaluate` on a store's
frozen features, in both settings."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from clipsvd import config, feature_adapters as fa, layout
from clipsvd.config import (ClipAdapterConfig, DemoConfig, LPPlusPlusConfig, TipAdapterConfig,
                            TipAdapterFConfig)
from clipsvd.data.demo import generate_demo_dataset
from clipsvd.data.prepare import prepare_dataset
from clipsvd.data.sampling import sample_split, write_split
from clipsvd.data.store import PreparedStore
from clipsvd.errors import ConfigError
from clipsvd.evaluate import evaluate
from clipsvd.features import compute_features
from clipsvd.io import read_json

SCALE = 30.0


def clusters(n_classes=4, dim=16, per_class=8, noise=0.6, seed=0):
    """Normalised features around one centre per class, and text features near the centres."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)

    def draw(n):
        y = torch.arange(n_classes).repeat_interleave(n)
        return F.normalize(centres[y] + noise * torch.randn(len(y), dim, generator=g), dim=-1), y
    text = F.normalize(centres + 0.8 * torch.randn(n_classes, dim, generator=g), dim=-1)
    return draw, text


# --- Tip-Adapter -----------------------------------------------------------------------------

def test_tip_adapter_with_no_cache_weight_is_zero_shot_exactly():
    draw, text = clusters()
    (x, y), (keys, labels) = draw(20), draw(4)
    zero_shot = fa.zero_shot_logits(SCALE, x, text)
    values = F.one_hot(labels, 4).float()
    assert torch.equal(fa.tip_logits(zero_shot, x, keys, values, 0.0, 5.0), zero_shot)


def test_a_cache_of_the_test_images_with_a_large_beta_classifies_them_all():
    draw, text = clusters(noise=1.5)  # zero-shot is far from perfect here
    x, y = draw(30)
    zero_shot = fa.zero_shot_logits(SCALE, x, text)
    assert fa.accuracy(zero_shot, y) < 0.8
    values = F.one_hot(y, 4).float()
    assert fa.accuracy(fa.tip_logits(zero_shot, x, x, values, 1e4, 1e3), y) == 1.0


def test_the_search_grid_and_its_tie_rule_are_the_published_ones():
    assert fa.search_values(7.0, 200)[:2] == [0.1, 0.1 + 6.9 / 200]
    assert len(fa.search_values(50.0, 200)) == 200 and max(fa.search_values(50.0, 200)) < 50
    draw, text = clusters(noise=1.2)
    (keys, key_y), (x, y) = draw(4), draw(6)
    values = F.one_hot(key_y, 4).float()
    zero_shot = fa.zero_shot_logits(SCALE, x, text)
    betas, alphas = fa.search_values(10.0, 20), fa.search_values(10.0, 20)
    beta, alpha, best = fa.search_alpha_beta(zero_shot, x, y, keys, values, betas, alphas)
    # direct search in the published order: the first best it meets
    expected = (-1.0, None, None)
    for b in betas:
        for a in alphas:
            score = fa.accuracy(fa.tip_logits(zero_shot, x, keys, values, a, b), y)
            if score > expected[0]:
                expected = (score, b, a)
    assert (best, beta, alpha) == pytest.approx(expected)


# --- LP++ ------------------------------------------------------------------------------------

def test_lp_pp_closed_form_rules_match_a_direct_computation():
    draw, text = clusters(per_class=5)
    x, y = draw(5)
    n, shots = len(y), 5
    f, t = x.double().numpy(), text.double().numpy()
    lr_w, lr_alpha = fa.lp_pp_step_sizes(x, text)
    eig = np.linalg.eigvalsh(f.T @ f).max()
    assert lr_w == pytest.approx(4 * n / eig, rel=1e-5)
    column = max(sum((f[i] @ t[c]) ** 2 for i in range(n)) for c in range(4))
    assert lr_alpha == pytest.approx(n / (4 * column), rel=1e-5)
    # the published rule: 250 / K × (K × class centroids of f·tᵀ), averaged over every entry
    centroids = np.stack([(f[y.numpy() == c] @ t.T).mean(0) for c in range(4)])
    published = np.mean(250 / shots * (centroids * shots))
    assert fa.lp_pp_initial_alpha(x, y, text, 4, 250.0) == pytest.approx(published, rel=1e-5)


def test_lp_pp_first_step_is_a_gradient_step_of_the_closed_form_size():
    draw, text = clusters(per_class=5)
    x, y = draw(5)
    one = fa.fit_lp_pp(x, y, text, 4, LPPlusPlusConfig(epochs=1))
    lr_w, _ = fa.lp_pp_step_sizes(x, text)
    w0 = (F.one_hot(y, 4).float().t() @ x).double()
    alpha0 = fa.lp_pp_initial_alpha(x, y, text, 4, 250.0)
    logits = x.double() @ w0.t() + alpha0 * (x.double() @ text.double().t())
    p = torch.softmax(logits, 1)
    gradient = (p - F.one_hot(y, 4).double()).t() @ x.double() / len(y)
    assert torch.allclose(one.weight.double(), w0 - lr_w * gradient, atol=1e-4)
    assert torch.allclose(one.bias.double(), -lr_w * (p - F.one_hot(y, 4).double()).mean(0),
                          atol=1e-5)
    assert torch.equal(one.alpha, torch.full((4,), float(torch.tensor(alpha0))))


def test_lp_pp_alpha_steps_use_the_gradient_at_the_step_not_a_running_sum():
    """Three epochs with α updated every epoch, against a hand-written loop: heavy-ball steps
    on (W, b), and α − lr_α · ∂L/∂α of that epoch (the public code's α step sums every
    gradient since the start)."""
    draw, text = clusters(per_class=5)
    x, y = draw(5)
    fitted = fa.fit_lp_pp(x, y, text, 4, LPPlusPlusConfig(epochs=3, alpha_every=1))
    lr_w, lr_alpha = fa.lp_pp_step_sizes(x, text)
    w = (F.one_hot(y, 4).float().t() @ x).requires_grad_()
    b = torch.zeros(4, requires_grad=True)
    a = torch.full((4,), fa.lp_pp_initial_alpha(x, y, text, 4, 250.0), requires_grad=True)
    velocity = [torch.zeros_like(w), torch.zeros_like(b)]
    for _ in range(3):
        loss = F.cross_entropy(x @ w.t() + b + (x @ text.t()) * a, y)
        gw, gb, ga = torch.autograd.grad(loss, (w, b, a))
        with torch.no_grad():
            for i, (p, g) in enumerate(((w, gw), (b, gb))):
                velocity[i] = 0.9 * velocity[i] + g if _ else g.clone()
                p -= lr_w * velocity[i]
            a -= lr_alpha * ga
    assert torch.allclose(fitted.weight, w, atol=1e-4)
    assert torch.allclose(fitted.alpha, a, atol=1e-5)


# --- learning: each trained method, and a loss-ascent variant that must fail ----------------

def _learning(method):
    """(first loss, last loss, training accuracy before, after) on a separable set."""
    draw, text = clusters(noise=0.5, seed=3)
    x, y = draw(8)
    text = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(9)), dim=-1)
    before = fa.accuracy(fa.zero_shot_logits(SCALE, x, text), y)
    if method == "tip_adapter_f":
        values = F.one_hot(y, 4).float()
        zero_shot = fa.zero_shot_logits(SCALE, x, text)
        keys, info = fa.fine_tune_keys(F.normalize(torch.randn(32, 16), dim=-1), values, x, y,
                                       zero_shot, 10.0, 1.0, TipAdapterFConfig(lr=0.05),
                                       seed=1, val=(x[:0], y[:0], zero_shot[:0]))
        after = fa.accuracy(fa.tip_logits(zero_shot, x, keys, values, 10.0, 1.0), y)
        losses = info["losses"]
    elif method == "lp_pp":
        model = fa.fit_lp_pp(x, y, text, 4, LPPlusPlusConfig(epochs=100))
        after, losses = fa.accuracy(model.logits(x), y), model.info["losses"]
    else:
        adapter, info = fa.fit_clip_adapter(x, y, text, SCALE,
                                            ClipAdapterConfig(lr=0.5, epochs=60, ratio=0.6), 1)
        with torch.no_grad():
            after = fa.accuracy(fa.zero_shot_logits(SCALE, adapter(x), text), y)
        losses = info["losses"]
    return losses[0], losses[-1], before, after


def assert_learns(method):
    first, last, before, after = _learning(method)
    assert last < 0.5 * first, (method, first, last)
    assert after >= before + 0.25 and after >= 0.9, (method, before, after)


@pytest.mark.parametrize("method", ["tip_adapter_f", "lp_pp", "clip_adapter"])
def test_each_trained_method_learns(method):
    assert_learns(method)


@pytest.mark.parametrize("method", ["tip_adapter_f", "lp_pp", "clip_adapter"])
def test_a_loss_ascent_variant_fails_the_learning_test(method, monkeypatch):
    descent = F.cross_entropy
    monkeypatch.setattr(fa.F, "cross_entropy", lambda logits, target: -descent(logits, target))
    with pytest.raises(AssertionError):
        assert_learns(method)


# --- through evaluate, on a store's frozen features -------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature_adapters")
    generate_demo_dataset(root / "raw", DemoConfig(per_class=40, image_size=64, seed=0))
    cfg = config.from_dict({
        "study": "features", "device": "cpu", "tracking": {"enabled": False},
        "datasets": [{"name": "toy", "format": "csv", "root": str(root / "raw"),
                      "manifest": "manifest.csv", "templates": ["a {} scan"]}],
        "methods": ["zero_shot", *fa.METHODS], "settings": ["few_shot", "base_to_novel"],
        "shots": [4], "seeds": [1]})
    prepare_dataset(cfg.dataset("toy"), root / "store", 64)
    store = PreparedStore.open(root / "store")
    for setting in ("few_shot", "base_to_novel"):
        write_split(root / f"{setting}.json",
                    sample_split(store, setting, 4, 1, cfg.dataset("toy").sampling))
    compute_features(cfg, root / "store", root / "features.npy")
    return root, cfg


def _evaluate(toy, method, setting, name=None):
    root, cfg = toy
    out = root / (name or f"{method}-{setting}")
    evaluate(cfg, "toy", method, root / f"{setting}.json", root / "store", out,
             features_path=root / "features.npy")
    return out


@pytest.mark.parametrize("method", fa.METHODS)
def test_each_method_evaluates_from_the_store_features(toy, method):
    out = _evaluate(toy, method, "few_shot")
    metrics = read_json(out / layout.METRICS)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["n_test"] > 0
    params = read_json(out / layout.RUN_RECORD)["params"]
    assert params["method"] == method
    assert (out / layout.FEATURE_ADAPTER).is_file()
    if method.startswith("tip_adapter"):
        assert float(params["tip_beta"]) > 0 and "tip_val_accuracy" in params


def test_tip_adapter_scores_novel_classes_as_zero_shot_does(toy):
    tip = pd.read_csv(_evaluate(toy, "tip_adapter", "base_to_novel") / layout.PREDICTIONS)
    zero = pd.read_csv(_evaluate(toy, "zero_shot", "base_to_novel") / layout.PREDICTIONS)
    novel_tip, novel_zero = tip[tip.group == "novel"], zero[zero.group == "novel"]
    assert len(novel_tip) > 0
    probabilities = [c for c in tip.columns if c.startswith("p_")]
    assert np.array_equal(novel_tip[probabilities].to_numpy(),
                          novel_zero[probabilities].to_numpy(), equal_nan=True)
    assert not np.array_equal(tip[tip.group == "base"][probabilities].to_numpy(),
                              zero[zero.group == "base"][probabilities].to_numpy(), equal_nan=True)


def test_lp_pp_sits_out_base_to_novel(toy):
    root, cfg = toy
    with pytest.raises(ConfigError, match="lp_pp does not run in the base_to_novel setting"):
        _evaluate(toy, "lp_pp", "base_to_novel")
    assert config.runs_in("clip_adapter", "base_to_novel")
    with pytest.raises(ConfigError, match="remove lp_pp from methods or add few_shot"):
        config.from_dict({"study": "s", "datasets": [{"name": "d", "format": "folder",
                                                      "root": "x"}],
                          "methods": ["zero_shot", "lp_pp"], "settings": ["base_to_novel"]})


def test_a_feature_method_without_features_is_refused_in_one_line(toy):
    root, cfg = toy
    with pytest.raises(ConfigError, match=r"tip_adapter is fitted on the store's frozen image "
                                          r"features: give --features NPY"):
        evaluate(cfg, "toy", "tip_adapter", root / "few_shot.json", root / "store",
                 root / "no-features")
    assert not (root / "no-features").exists()
