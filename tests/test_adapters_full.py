"""Full fine-tuning (the ablations' reference): what trains, and an exact save/load."""
from __future__ import annotations

import pytest
import torch

from clipsvd.adapters import attach
from clipsvd.errors import ModelError
from clipsvd.models import load_model


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-biomedclip"])
def test_the_chosen_encoders_train_and_the_temperature_does_not(name):
    model = load_model(name, None, init_seed=0).model
    adapter = attach("full_finetune", model, {"encoders": ["vision"]})
    trained = set(adapter.named_trainable())
    assert trained and all(k.startswith("visual.") for k in trained)
    assert {k for k, p in model.named_parameters() if p.requires_grad} == trained
    both = attach("full_finetune", load_model(name, None, init_seed=0).model)
    names = set(dict(both.model.named_parameters()))
    assert set(both.named_trainable()) == names - {"logit_scale", "logit_bias"}
    assert both.num_trainable() == sum(p.numel() for k, p in both.model.named_parameters()
                                       if k != "logit_scale" and k != "logit_bias")


def test_save_and_load_restore_every_trained_weight(tmp_path):
    model = load_model("tiny-clip", None, init_seed=0).model
    adapter = attach("full_finetune", model, {"encoders": ["text"]})
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.01)
    adapter.save(tmp_path / "full.safetensors")
    fresh = attach("full_finetune", load_model("tiny-clip", None, init_seed=0).model,
                   {"encoders": ["text"]})
    fresh.load(tmp_path / "full.safetensors", check_fingerprint=True)
    for (key, a), b in zip(adapter.named_trainable().items(), fresh.trainable_parameters()):
        assert torch.equal(a, b), key
    with pytest.raises(ModelError, match="lacks key"):
        attach("full_finetune", load_model("tiny-clip", None, init_seed=0).model,
               {"encoders": ["vision"]}).load(tmp_path / "full.safetensors")
    with pytest.raises(ModelError, match="encoders"):
        attach("full_finetune", load_model("tiny-clip", None, init_seed=0).model,
               {"encoders": ["audio"]})
