"""The one place where randomness is seeded: every random draw of a run flows from its seed."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def torch_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator for ``seed``; with ``keys``, an independent stream per key tuple (e.g. one
    per generated image, so any image can be made without making the ones before it)."""
    return np.random.default_rng([seed, *keys] if keys else seed)
