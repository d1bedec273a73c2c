"""What the adapter tests share: class prompts, a prediction and a few training steps."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clipsvd.models import encode_class_prompts, encode_images, logits

CLASSES = ["benign_tumor", "malignant tumor", "normal scan"]
TEMPLATES = ["a photo of a {}."]


def predict(loaded, images):
    text = encode_class_prompts(loaded, CLASSES, TEMPLATES)
    return logits(loaded.model, encode_images(loaded.model, images), text, 100.0)


def train_steps(loaded, adapter, steps=3, lr=5e-2, seed=0):
    """A few AdamW steps on random images, in train mode, with the adapter's step cache."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 64, 64, generator=generator)
    labels = torch.randint(0, len(CLASSES), (8,), generator=generator)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=lr, weight_decay=0.01)
    loaded.model.train()
    for _ in range(steps):
        with adapter.cached():
            loss = F.cross_entropy(predict(loaded, images), labels)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    loaded.model.eval()
