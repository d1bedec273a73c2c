"""A disk cache of singular value decompositions, shared by every run that adapts the same weights.

A study adapts one model hundreds of times (methods × datasets × shots × seeds); each run would
otherwise repeat the same float64 SVD of every adapted matrix (ViT-B/16: 144 matrices, tens of
seconds on a CPU). :func:`decompose` computes ``U, s, Vh`` once per matrix and stores them.

- **Key**: sha256 over (format version, dtype, shape, raw bytes) of the matrix itself, so a
  cached entry is reused whatever the model's name, the adapter's target selection or the row
  block of a fused q/k/v weight, and a changed weight can never hit a stale entry.
- **Format**: one safetensors file per matrix (``<key>.safetensors`` with tensors ``U``, ``s``,
  ``Vh`` as float32, exactly what the adapter keeps); never pickle.
- **Where**: ``$CLIPSVD_SVD_CACHE`` if set, else ``results/cache/svd/`` under the working
  directory (the workflow runs in the study's directory). ``CLIPSVD_SVD_CACHE=off`` disables it.
- **Concurrency**: entries are written to a temporary file and renamed into place
  (:func:`clipsvd.io.atomic_path`), so a reader sees a complete file or none; two jobs that
  compute the same entry both succeed (the contents are identical, the last rename wins). An
  unreadable entry (say a disk filled up before the rename) is recomputed and rewritten.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .io import atomic_path

log = logging.getLogger(__name__)

ENV = "CLIPSVD_SVD_CACHE"
DEFAULT_DIR = Path("results") / "cache" / "svd"
FORMAT = "svd-v1"  # change when what is stored (or how it is computed) changes
_DISABLED = {"off", "none", "0", "false", "no"}


def cache_dir() -> Path | None:
    """The cache directory in effect, or None when caching is switched off."""
    value = os.environ.get(ENV)
    if value is None or value.strip() == "":
        return DEFAULT_DIR
    if value.strip().lower() in _DISABLED:
        return None
    return Path(value).expanduser()


def matrix_key(matrix: torch.Tensor) -> str:
    """sha256 of the matrix's dtype, shape and bytes (independent of device and layout)."""
    tensor = matrix.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{FORMAT}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    if tensor.numel():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def compute(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 on the CPU, returned as contiguous float32 CPU tensors."""
    source = matrix.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(source, full_matrices=False)
    return (u.to(torch.float32).contiguous(), s.to(torch.float32).contiguous(),
            vh.to(torch.float32).contiguous())


def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor("U"), handle.get_tensor("s"), handle.get_tensor("Vh")
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged entry: recompute it rather than fail the run
        log.warning("SVD cache entry %s unreadable (%s); recomputing it", path, exc)
        return None


def decompose(matrix: torch.Tensor, directory: str | os.PathLike | None | bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, Vh)`` of ``matrix`` (float32, CPU), from the cache when it holds them.

    ``directory``: True (default) uses :func:`cache_dir`; None or False computes without
    caching; a path uses that directory.
    """
    if directory is True:
        directory = cache_dir()
    if directory is None or directory is False:
        return compute(matrix)
    path = Path(directory) / f"{matrix_key(matrix)}.safetensors"
    found = _read(path)
    if found is not None and _fits(found, matrix):
        return found
    factors = compute(matrix)
    try:
        with atomic_path(path) as tmp:
            save_file(dict(zip(("U", "s", "Vh"), factors)), str(tmp),
                      metadata={"format": FORMAT, "shape": "x".join(map(str, matrix.shape)),
                                "dtype": str(matrix.dtype)})
    except OSError as exc:  # a read-only or full disk must not stop a run
        log.warning("could not write SVD cache entry %s (%s); continuing without it", path, exc)
    return factors


def _fits(factors: tuple[torch.Tensor, ...], matrix: torch.Tensor) -> bool:
    u, s, vh = factors
    rows, cols = matrix.shape
    rank = min(rows, cols)
    return (tuple(u.shape) == (rows, rank) and tuple(s.shape) == (rank,)
            and tuple(vh.shape) == (rank, cols))
