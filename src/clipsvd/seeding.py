"""The one place where randomness is seeded: every random draw of a run flows from its seed."""
from __future__ import annotations

import random

import numpy as np
import torch

# Independent streams of one run, drawn from their own generators (so that, say, a change in how
# many random numbers the crops use never shifts the batch order).
ORDER_STREAM = 0
CROP_STREAM = 1


def seed_everything(seed: int) -> None:
    """Python, numpy, the CPU generator and every CUDA generator (torch.manual_seed seeds them
    all, lazily where CUDA is not initialised yet): each seed gives its own GPU stream too."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def torch_generator(seed: int, stream: int = ORDER_STREAM) -> torch.Generator:
    """A CPU generator for one stream of the run; stream 0 is seeded with the seed itself."""
    generator = torch.Generator()
    if stream == ORDER_STREAM:
        generator.manual_seed(seed)
    else:
        state = np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]
        generator.manual_seed(int(state))
    return generator


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator for ``seed``; with ``keys``, an independent stream per key tuple (e.g. one
    per generated image, so any image can be made without making the ones before it)."""
    return np.random.default_rng([seed, *keys] if keys else seed)
