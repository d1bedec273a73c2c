"""Linear probe: logistic regression on frozen, L2-normalised image features.

The inverse regularisation strength C is chosen on the split's validation support set (the
test set is never looked at), by this rule:

1. the highest validation accuracy (the CLIP/CoOp linear-probe protocol);
2. among Cs tied on accuracy, the lowest validation log-loss (mean negative log-probability of
   the true class). A validation support set has at most 4 images per class, so accuracy ties
   are common; the smallest C of a tie gives near-uniform probabilities (one run of the demo:
   100 % accuracy with 67 % ECE), and log-loss, the proper scoring rule logistic regression
   itself minimises, prefers the C whose probabilities are right as well as its argmax;
3. among Cs whose log-losses are also equal (to 1e-9: the same predictions), the smallest C,
   the most regularised model that does as well.

With no validation images the grid's middle value is used (the upper middle of an even grid;
1.0, scikit-learn's default, for the default grid), and the log says so.
"""
from __future__ import annotations

import logging
import math
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


LOG_LOSS_TIE = 1e-9  # log-losses closer than this count as equal (rule 3)
PROBABILITY_FLOOR = 1e-15  # a true class given probability 0 costs -log(1e-15), not infinity


def validation_scores(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                      val_y: np.ndarray, n_classes: int, c_grid: tuple[float, ...],
                      max_iter: int, seed: int) -> dict[float, tuple[float, float]]:
    """(accuracy, log-loss) on the validation set of a probe fitted on the training set, per C."""
    scores: dict[float, tuple[float, float]] = {}
    for c in sorted(c_grid):
        model = _fit(train_x, train_y, c, n_classes, max_iter, seed)
        probs = _full_proba(model, val_x, n_classes)
        true = np.clip(probs[np.arange(len(val_y)), val_y], PROBABILITY_FLOOR, 1.0)
        accuracy = float((probs.argmax(1) == val_y).mean())
        scores[c] = (accuracy, float(-np.log(true).mean()))
    return scores


def choose_c(scores: dict[float, tuple[float, float]]) -> float:
    """The module's rule: best accuracy, then lowest log-loss, then the smallest C."""
    best_accuracy = max(accuracy for accuracy, _ in scores.values())
    tied = [c for c, (accuracy, _) in scores.items() if accuracy == best_accuracy]
    lowest = min(scores[c][1] for c in tied)
    return min(c for c in tied if math.isclose(scores[c][1], lowest, rel_tol=0,
                                                 abs_tol=LOG_LOSS_TIE))


def default_c(c_grid: tuple[float, ...]) -> float:
    """C without validation images: the grid's (upper) middle value."""
    return sorted(c_grid)[len(c_grid) // 2]


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                     val_y: np.ndarray, n_classes: int, c_grid: tuple[float, ...],
                     max_iter: int, seed: int) -> tuple[LogisticRegression, float, dict[float, float]]:
    """Fit the probe with C chosen on the validation set; returns (model, C, accuracy by C)."""
    if len(val_y):
        scores = validation_scores(train_x, train_y, val_x, val_y, n_classes, c_grid,
                                   max_iter, seed)
        best = choose_c(scores)
        log.info("linear probe: C=%g chosen on %d validation images (best accuracy, then lowest "
                 "log-loss, then smallest C; accuracy/log-loss by C: %s)", best, len(val_y),
                 ", ".join(f"{c:g}: {a:.3f}/{loss:.4f}" for c, (a, loss) in scores.items()))
    else:
        scores = {}
        best = default_c(c_grid)
        log.info("linear probe: no validation images; C=%g, the middle of the grid %s", best,
                 ", ".join(f"{c:g}" for c in sorted(c_grid)))
    accuracy = {c: a for c, (a, _) in scores.items()}
    return _fit(train_x, train_y, best, n_classes, max_iter, seed), best, accuracy


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
