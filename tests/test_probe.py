"""The linear probe: C chosen on validation only, probabilities over all classes, saved weights."""
import numpy as np
import torch
from safetensors.torch import load_file

from clipsvd.probe import fit_linear_probe, probe_probabilities, save_probe


def clusters(n_per_class, n_classes=4, dim=16, seed=0, spread=0.6, noise_seed=None):
    centres = np.random.default_rng(seed).normal(size=(n_classes, dim))
    rng = np.random.default_rng(seed if noise_seed is None else noise_seed)
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, dim)) for c in centres])
    y = np.repeat(np.arange(n_classes), n_per_class)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y


def test_probe_beats_chance_and_chooses_c_on_validation():
    train_x, train_y = clusters(2, seed=1)
    val_x, val_y = clusters(2, seed=1, noise_seed=2)
    test_x, test_y = clusters(50, seed=1, noise_seed=3)
    model, c, scores = fit_linear_probe(train_x, train_y, val_x, val_y, 4,
                                        (0.01, 1.0, 100.0), 1000, seed=1)
    assert c in (0.01, 1.0, 100.0) and set(scores) == {0.01, 1.0, 100.0}
    assert scores[c] == max(scores.values())
    probs = probe_probabilities(model, test_x, 4)
    assert np.allclose(probs.sum(1), 1)
    assert (probs.argmax(1) == test_y).mean() > 0.5  # chance is 0.25


def test_saved_probe_reproduces_probabilities(tmp_path):
    for n_classes in (2, 3):
        x, y = clusters(5, n_classes=n_classes, seed=n_classes)
        model, c, _ = fit_linear_probe(x, y, x[:0], y[:0], n_classes, (1.0,), 1000, seed=0)
        save_probe(tmp_path / "probe.safetensors", model, n_classes, c)
        saved = load_file(tmp_path / "probe.safetensors")
        logits = torch.from_numpy(x).float() @ saved["weight"].t() + saved["bias"]
        assert np.allclose(logits.softmax(1).numpy(), probe_probabilities(model, x, n_classes), atol=1e-5)
