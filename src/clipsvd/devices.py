"""Choosing the device a job computes on."""
from __future__ import annotations

import logging

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> torch.device:
    """auto → the job's first visible GPU if there is one, else the CPU (and say so)."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("key 'device': 'cuda' was asked for but no CUDA GPU is visible to this "
                              "job; set device: auto or cpu, or run where a GPU is available")
        return torch.device("cuda")
    if torch.cuda.is_available():
        return torch.device("cuda")
    log.info("no GPU visible: running on the CPU")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype to use, or None for fp32; mixed precision is GPU only."""
    if precision == "fp32":
        return None
    if device.type != "cuda":
        log.info("precision %s is GPU only: training in fp32 on the CPU", precision)
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16
