"""Linear probe: logistic regression on frozen, L2-normalised image features.

The inverse regularisation strength C is chosen on the split's validation support set (the
test set is never looked at); with no validation images the middle of the grid is used.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from .io import write_safetensors

log = logging.getLogger(__name__)


def _fit(x: np.ndarray, y: np.ndarray, c: float, n_classes: int, max_iter: int, seed: int):
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def _full_proba(model, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all classes (a class absent from training gets probability 0)."""
    probs = np.zeros((len(x), n_classes))
    probs[:, model.classes_] = model.predict_proba(x)
    return probs


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                     val_y: np.ndarray, n_classes: int, c_grid: tuple[float, ...],
                     max_iter: int, seed: int) -> tuple[LogisticRegression, float, dict[float, float]]:
    """Choose C by validation accuracy (ties: the smaller C, i.e. stronger regularisation)."""
    scores: dict[float, float] = {}
    if len(val_y):
        for c in sorted(c_grid):
            model = _fit(train_x, train_y, c, n_classes, max_iter, seed)
            scores[c] = float((model.predict(val_x) == val_y).mean())
        best = max(sorted(c_grid), key=lambda c: (scores[c], -c))
    else:
        best = sorted(c_grid)[len(c_grid) // 2]
    log.info("linear probe: C=%g chosen on %d validation images (accuracy by C: %s)", best,
             len(val_y), ", ".join(f"{c:g}: {a:.3f}" for c, a in scores.items()) or "none")
    return _fit(train_x, train_y, best, n_classes, max_iter, seed), best, scores


def probe_probabilities(model: LogisticRegression, x: np.ndarray, n_classes: int) -> np.ndarray:
    return _full_proba(model, x, n_classes)


def save_probe(path, model: LogisticRegression, n_classes: int, c: float) -> None:
    """Only what was trained: the weight matrix and bias over all classes (safetensors)."""
    weight = np.zeros((n_classes, model.coef_.shape[1]), dtype=np.float32)
    bias = np.full(n_classes, -np.inf, dtype=np.float32)
    if len(model.classes_) == 2:  # sklearn stores one row for binary problems
        weight[model.classes_[1]] = model.coef_[0] / 2
        weight[model.classes_[0]] = -model.coef_[0] / 2
        bias[model.classes_[1]], bias[model.classes_[0]] = model.intercept_[0] / 2, -model.intercept_[0] / 2
    else:
        weight[model.classes_] = model.coef_
        bias[model.classes_] = model.intercept_
    write_safetensors(path, {"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)},
                      {"method": "linear_probe", "C": repr(c)})
