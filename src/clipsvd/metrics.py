"""Classification metrics of one run, from labels and predicted class probabilities."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score)

ECE_BINS = 15


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE with equal-width confidence bins: Σ_b |B|/N · |acc(B) − conf(B)|."""
    if len(labels) == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 goes to bin 0.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def macro_auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over the classes present in the labels (NaN if fewer than two)."""
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    scores = [roc_auc_score(labels == c, probs[:, c]) for c in present]
    return float(np.mean(scores))


def classification_metrics(labels: np.ndarray, probs: np.ndarray,
                           class_names: list[str] | None = None) -> dict:
    """Scalar metrics plus per-class precision/recall and the confusion matrix."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    classes = np.arange(n_classes)
    names = class_names or [str(c) for c in classes]
    preds = probs.argmax(axis=1)
    precision, recall, _, support = precision_recall_fscore_support(
        labels, preds, labels=classes, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "macro_auroc": macro_auroc(labels, probs),
        "ece": expected_calibration_error(labels, probs),
        "n_test": int(len(labels)),
        "per_class": {name: {"precision": float(p), "recall": float(r), "support": int(s)}
                      for name, p, r, s in zip(names, precision, recall, support)},
        "confusion_matrix": confusion_matrix(labels, preds, labels=classes).tolist(),
        "class_names": list(names),
    }
