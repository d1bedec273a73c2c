"""Words for attention heads: what each head of the vision encoder's last layers writes into the
image embedding, described with text (a TextSpan-style decomposition, Gandelsman et al. 2024).

Direct contribution of a head. The image embedding is ``proj(LN(r))`` with ``r`` the residual
stream of the class token after the last block, ``LN`` the final LayerNorm (open_clip
``ln_post``; timm ``trunk.norm``) and ``proj`` the projection into the joint space. ``r`` is a
sum of terms (embeddings, every head's output, every MLP's output, biases). Head ``h`` of a
block at the class token writes ``c_h = ls · W_out[:, cols_h] · Σ_j a_h(0, j) v_h(j)``
(``a_h`` its attention from the class token, ``v_h`` its values, ``ls`` the block's layer
scale if any). LayerNorm is linear once its statistics are fixed, so with the final token's
standard deviation ``σ(r)`` taken as a constant per image (TextSpan's approximation):

    contribution_h = proj( γ ⊙ (c_h - mean(c_h)) / σ(r) )

and the contributions of all terms plus ``proj(β)`` add up exactly to the embedding before its
L2 normalisation. The approximation is that σ depends on every term (it is not a property of
the head alone); effects of the head through later blocks (indirect effects) are not counted.

Decomposition. For one head, take its contributions over N images (N × E), centre them over
images, and take the corpus' text embeddings (M × E, L2-normalised, centred over the corpus so
the direction shared by every "medical image" caption does not dominate). Greedily, k times:
normalise every remaining text direction to unit length, score each by the variance of the
contributions along it (``Σ_n (c_n · t)² / N``), pick the best, then remove that direction
from the contributions and from every text direction (Gram-Schmidt). The explained variance of
a pick is its score over the head's total variance (trace of the covariance); the picks are
orthogonal, so their fractions add up to at most 1. Unlike the TextSpan code, directions are
renormalised after each removal, so a score is a real explained variance, and no projection
onto the head's principal subspace is made first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelError

log = logging.getLogger(__name__)

CORPUS_RESOURCE = "medical_descriptions.txt"


def default_corpus_path() -> Path:
    return Path(str(resources.files("clipsvd") / "resources" / CORPUS_RESOURCE))


def load_corpus(path: str | Path | None = None) -> list[str]:
    """Descriptions from a text file, one per line; blank lines and '#' comments skipped,
    repeats dropped (first kept). ``None``: the corpus shipped with clipsvd."""
    path = Path(path) if path is not None else default_corpus_path()
    if not path.is_file():
        raise ConfigError(f"description corpus {path} not found; give a text file with one "
                          "description per line")
    seen: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text and not text.startswith("#"):
            seen.setdefault(text, None)
    texts = list(seen)
    if len(texts) < 2:
        raise ConfigError(f"description corpus {path} has {len(texts)} description(s); it needs "
                          "at least 2 (one per line)")
    return texts


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str],
                 device: torch.device, batch_size: int = 128) -> np.ndarray:
    """L2-normalised text embeddings (M × E, float64) of the texts, in batches."""
    parts = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        parts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(parts).to(torch.float64).numpy()


@dataclass
class Pick:
    index: int  # position in the corpus
    explained: float  # variance along this (orthogonalised) direction / head's total variance


def decompose(contributions: np.ndarray, texts: np.ndarray, k: int = 5,
              center_texts: bool = True) -> list[Pick]:
    """Greedy choice of ``k`` text directions explaining most variance of ``contributions``
    (N × E) among ``texts`` (M × E); see the module docstring."""
    data = np.asarray(contributions, dtype=np.float64)
    data = data - data.mean(axis=0, keepdims=True)
    total = float((data ** 2).sum()) / max(len(data), 1)
    directions = np.asarray(texts, dtype=np.float64).copy()
    if center_texts:
        directions -= directions.mean(axis=0, keepdims=True)
    reference = np.linalg.norm(directions, axis=1)
    available = np.ones(len(directions), dtype=bool)
    picks: list[Pick] = []
    if total <= 0:
        return picks
    for _ in range(min(k, len(directions))):
        norms = np.linalg.norm(directions, axis=1)
        # Directions (almost) inside the span of earlier picks carry no new meaning.
        usable = available & (norms > 1e-6 * np.maximum(reference, 1e-12))
        if not usable.any():
            break
        units = np.zeros_like(directions)
        units[usable] = directions[usable] / norms[usable, None]
        scores = ((data @ units.T) ** 2).sum(axis=0) / len(data)
        scores[~usable] = -np.inf
        best = int(np.argmax(scores))
        picks.append(Pick(index=best, explained=float(scores[best]) / total))
        unit = units[best]
        data = data - np.outer(data @ unit, unit)
        directions = directions - np.outer(directions @ unit, unit)
        available[best] = False
    return picks


@dataclass
class VisionParts:
    """Where a CLIP vision tower keeps what the head decomposition needs."""

    family: str  # openai | timm
    blocks: list[nn.Module]
    final_norm: nn.LayerNorm
    project: Callable[[torch.Tensor], torch.Tensor]  # D -> E, linear, no bias


def vision_parts(model: nn.Module) -> VisionParts:
    """The blocks, final LayerNorm and projection of ``model.visual``; ModelError for
    towers where the class-token decomposition does not apply."""
    visual = getattr(model, "visual", None)
    if visual is None:
        raise ModelError("the model has no vision tower (model.visual)")
    if hasattr(visual, "transformer") and hasattr(visual, "ln_post"):
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type",
                                                                     "tok") != "tok":
            raise ModelError("head descriptions need class-token pooling; this vision tower "
                             f"pools with {getattr(visual, 'pool_type', '?')!r}/attention pooling")
        proj = visual.proj
        return VisionParts("openai", list(visual.transformer.resblocks), visual.ln_post,
                           (lambda x: x @ proj.to(x.dtype)) if proj is not None else (lambda x: x))
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks"):
        if getattr(trunk, "global_pool", "token") != "token" or not isinstance(
                getattr(trunk, "fc_norm", nn.Identity()), nn.Identity):
            raise ModelError("head descriptions need class-token pooling without fc_norm; this "
                             f"timm trunk pools with {trunk.global_pool!r}")
        head = getattr(visual, "head", None)
        linear = getattr(head, "proj", None) if head is not None else None
        extra = [m for name, m in (head.named_children() if head is not None else [])
                 if name not in ("proj", "drop") and not isinstance(m, (nn.Identity, nn.Dropout))]
        if not isinstance(linear, nn.Linear) or extra:
            raise ModelError("head descriptions need a linear projection head (timm_proj "
                             "'linear'); this tower's head is not one")
        weight = linear.weight
        return VisionParts("timm", list(trunk.blocks), trunk.norm,
                           lambda x: x @ weight.t().to(x.dtype))
    raise ModelError(f"head descriptions support open_clip and timm ViT towers, not "
                     f"{type(visual).__name__}")


def _layer_scale(module: nn.Module) -> torch.Tensor | float:
    gamma = getattr(module, "gamma", None)
    if isinstance(module, nn.Identity) or gamma is None:
        if not isinstance(module, nn.Identity):
            raise ModelError(f"unsupported layer scale {type(module).__name__}")
        return 1.0
    return gamma


def _head_outputs(block: nn.Module, family: str, x: torch.Tensor) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Per-head outputs at the class token written into the residual stream (N × H × D),
    and what the module itself adds at the class token (N × D), for a consistency check.
    ``x``: the block's input, batch first (N × T × D)."""
    if family == "openai":
        attn = block.attn
        if getattr(attn, "_qkv_same_embed_dim", True) is False:
            raise ModelError("separate q/k/v projection weights are not supported")
        h = block.ln_1(x)
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        out_w, out_b = attn.out_proj.weight, attn.out_proj.bias
        heads, scale, ls = attn.num_heads, _layer_scale(block.ls_1), block.ls_1
        q_norm = k_norm = None
        layout_x = h if attn.batch_first else h.transpose(0, 1)
        reference = ls(attn(layout_x, layout_x, layout_x, need_weights=False)[0])
        reference = reference if attn.batch_first else reference.transpose(0, 1)
    else:
        attn = block.attn
        if getattr(attn, "gate", None) is not None or not isinstance(
                getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise ModelError("timm attention with a gate or a post-attention norm is not "
                             "supported")
        h = block.norm1(x)
        weight, bias = attn.qkv.weight, attn.qkv.bias
        out_w, out_b = attn.proj.weight, attn.proj.bias
        heads, scale, ls = attn.num_heads, _layer_scale(block.ls1), block.ls1
        q_norm, k_norm = attn.q_norm, attn.k_norm
        reference = ls(attn(h))
    n, t, d = h.shape
    qkv = F.linear(h, weight, bias)  # N × T × 3·width
    width = qkv.shape[-1] // 3
    head_dim = width // heads
    q, k, v = (qkv[..., i * width:(i + 1) * width].reshape(n, t, heads, head_dim)
               for i in range(3))
    q = q[:, 0]  # class token queries: N × H × dh
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    scores = torch.einsum("nhd,nthd->nht", q, k) * head_dim ** -0.5
    attention = scores.softmax(dim=-1)
    values = torch.einsum("nht,nthd->nhd", attention, v)
    written = torch.einsum("nhd,ehd->nhe", values, out_w.reshape(out_w.shape[0], heads, head_dim))
    written = written * scale if not isinstance(scale, float) else written
    full = written.sum(dim=1) + (out_b * scale if out_b is not None else 0.0)
    return written, (reference[:, 0], full)


@torch.no_grad()
def head_contributions(model: nn.Module, batches: Sequence[torch.Tensor] | Callable,
                       layers: Sequence[int]) -> dict[int, np.ndarray]:
    """Direct contributions (module docstring) of every head of ``layers`` (block indices,
    negative from the end) to the image embedding: layer -> array N × H × E (float64).

    ``batches``: normalised image batches (N_b × 3 × S × S) on the model's device. A wrong
    reading of the architecture is caught by checking, on every batch, that the heads' outputs
    plus the output bias reproduce the attention module's output at the class token.
    """
    parts = vision_parts(model)
    depth = len(parts.blocks)
    chosen = sorted({int(i) % depth for i in layers if -depth <= int(i) < depth})
    if not chosen:
        raise ModelError(f"no valid layer in {list(layers)} for a vision encoder of {depth} "
                         "blocks")
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str, batch_first: bool = True):
        def hook(_module, args, kwargs=None):
            tensor = args[0] if args else (kwargs or {}).get("q_x", (kwargs or {}).get("x"))
            captured[name] = tensor if batch_first else tensor.transpose(0, 1)
        return hook

    for layer in chosen:
        block = parts.blocks[layer]
        batch_first = True
        if parts.family == "openai":
            batch_first = bool(getattr(block.attn, "batch_first", True))
        handles.append(block.register_forward_pre_hook(keep(f"block{layer}", batch_first),
                                                       with_kwargs=True))
    handles.append(parts.final_norm.register_forward_pre_hook(keep("final"), with_kwargs=True))
    results: dict[int, list[torch.Tensor]] = {layer: [] for layer in chosen}
    worst = 0.0
    try:
        for batch in batches:
            captured.clear()
            model.encode_image(batch)
            final = captured["final"][:, 0].float()
            sigma = torch.sqrt(final.var(dim=-1, unbiased=False) + parts.final_norm.eps)
            gamma = parts.final_norm.weight.float() if parts.final_norm.weight is not None else 1.0
            for layer in chosen:
                written, (reference, full) = _head_outputs(parts.blocks[layer], parts.family,
                                                           captured[f"block{layer}"])
                scale = reference.float().norm(dim=-1).clamp_min(1e-12)
                worst = max(worst, float(((reference.float() - full.float()).norm(dim=-1)
                                          / scale).max()))
                written = written.float()
                centred = written - written.mean(dim=-1, keepdim=True)
                normed = centred / sigma[:, None, None] * gamma
                results[layer].append(parts.project(normed).to(torch.float64).cpu())
    finally:
        for handle in handles:
            handle.remove()
    if worst > 1e-3:
        raise ModelError(f"per-head outputs do not add up to the attention output (relative "
                         f"error {worst:.2g}); this architecture is not read correctly")
    log.debug("head decomposition check: largest relative error %.2g", worst)
    return {layer: torch.cat(chunks).numpy() for layer, chunks in results.items()}


__all__ = ["Pick", "VisionParts", "decompose", "default_corpus_path", "encode_texts",
           "head_contributions", "load_corpus", "vision_parts"]
