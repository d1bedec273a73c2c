"""Every metric against values computed by hand on small inputs."""
import numpy as np
import pytest

from clipsvd.metrics import classification_metrics, expected_calibration_error, macro_auroc

LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array([
    [0.8, 0.1, 0.1],  # right, conf 0.8
    [0.3, 0.6, 0.1],  # wrong (1), conf 0.6
    [0.2, 0.7, 0.1],  # right, conf 0.7
    [0.1, 0.9, 0.0],  # right, conf 0.9
    [0.5, 0.0, 0.5],  # argmax 0 (first max): wrong, conf 0.5
    [0.0, 0.1, 0.9],  # right, conf 0.9
])


def test_accuracy_balanced_f1_per_class_confusion():
    m = classification_metrics(LABELS, PROBS, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recalls: a 1/2, b 2/2, c 1/2 -> balanced 2/3
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    # predictions: [0,1,1,1,0,2]; precision a 1/2, b 2/3, c 1/1
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"] == {"precision": 1.0, "recall": 0.5, "support": 2}
    f1 = [2 * p * r / (p + r) for p, r in [(0.5, 0.5), (2 / 3, 1.0), (1.0, 0.5)]]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["n_test"] == 6


def test_ece_by_hand():
    # 15 equal bins: 0.5 -> bin 7 (0.4667, 0.5333]; 0.6 -> bin 8; 0.7 -> bin 10; 0.8 -> bin 11;
    # 0.9 -> bin 13 (two samples, both right).
    expected = (1 / 6) * abs(0 - 0.5) + (1 / 6) * abs(0 - 0.6) + (1 / 6) * abs(1 - 0.7) \
        + (1 / 6) * abs(1 - 0.8) + (2 / 6) * abs(1 - 0.9)
    assert expected_calibration_error(LABELS, PROBS) == pytest.approx(expected)


def test_ece_zero_when_calibrated():
    labels = np.array([0, 1])
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(labels, probs) == 0.0


def test_macro_auroc_by_hand():
    # class 0 scores: positives 0.8, 0.3; negatives 0.2, 0.1, 0.5, 0.0
    # pairs won: 0.8 beats 4; 0.3 beats 0.2, 0.1, 0.0 (3) -> 7/8
    # class 1: positives 0.7, 0.9; negatives 0.1, 0.6, 0.0, 0.1 -> 8/8
    # class 2: positives 0.5, 0.9; negatives 0.1, 0.1, 0.1, 0.0 -> 8/8
    assert macro_auroc(LABELS, PROBS) == pytest.approx((7 / 8 + 1 + 1) / 3)


def test_auroc_undefined_with_one_class():
    assert np.isnan(macro_auroc(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]])))
