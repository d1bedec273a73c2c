"""What CLIP-SVD changed in the weights: singular values per matrix, and per attention head.

Singular values. Every adapted matrix is ``W0 = U diag(s0) Vh``; the trained file holds ``s``.
With ``Δs = s - s0`` the weight change is ``ΔW = U diag(Δs) Vh``, and because U and V have
orthonormal columns ``‖ΔW‖_F = ‖Δs‖_2`` and ``‖W0‖_F = ‖s0‖_2``: the relative change of a
matrix, ``‖Δs‖ / ‖s0‖``, is exactly the relative Frobenius change of its weight.

Heads. Singular vectors mix heads, so blocks of *sorted* singular values are not heads (the
defect of the public interpretation scripts). Here ``ΔW`` is formed and split where the
architecture splits heads: head ``h`` (of ``H``, width ``d_h = d / H``) owns rows
``[h·d_h, (h+1)·d_h)`` of the query, key and value projections (their output dimensions) and
the same columns of the output projection (its input dimensions). Per head we report
``‖ΔW_v[rows_h, :]‖_F`` and ``‖ΔW_out[:, cols_h]‖_F`` (absolute and relative to the pretrained
slice), the same for q and k, and two circuit-level scores:

- ``ov_change``: the relative change of the head's value-output circuit
  ``OV_h = W_out[:, cols_h] · W_v[rows_h, :]`` (what the head writes into the residual stream
  for a given attended input), ``‖OV_h' - OV_h‖_F / ‖OV_h‖_F``. **Heads are ranked by this.**
- ``qk_change``: the same for the query-key circuit ``W_q[rows_h, :]ᵀ W_k[rows_h, :]`` (where the
  head attends), reported but not ranked by.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..adapters.svd import FAMILIES, MATRICES, SVDAdapter, find_blocks
from ..errors import ModelError

ATTENTION = ("q", "k", "v", "out")


def _f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def singular_value_table(adapter: SVDAdapter) -> pd.DataFrame:
    """One row per trained singular value: encoder, layer, matrix, key, index (0 = largest),
    s0, s, delta = s - s0, rel_delta = delta / s0 (NaN where s0 is numerically zero), ranked
    by |delta| over all matrices (rank 1 = largest absolute change)."""
    parts = []
    for target in adapter.targets:
        _, s0, _ = target.factors()
        s0 = _f64(s0)
        s = _f64(target.s)
        delta = s - s0
        tiny = s0 <= 1e-8 * max(float(s0.max(initial=0.0)), 1e-30)
        rel = np.where(tiny, np.nan, delta / np.where(tiny, 1.0, s0))
        parts.append(pd.DataFrame({
            "encoder": target.encoder, "layer": target.layer, "matrix": target.matrix,
            "key": target.key, "index": np.arange(len(s0)), "s0": s0, "s": s, "delta": delta,
            "rel_delta": rel}))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["encoder", "layer", "matrix", "key", "index", "s0", "s", "delta", "rel_delta"])
    table = table.iloc[np.argsort(-table["delta"].abs().to_numpy(), kind="stable")]
    table = table.reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def matrix_table(values: pd.DataFrame) -> pd.DataFrame:
    """Per matrix, from :func:`singular_value_table`: the summary of its Δs, ranked by
    ``rel_change = ‖Δs‖ / ‖s0‖`` (= ‖ΔW‖_F / ‖W0‖_F).

    Columns: encoder, layer, matrix, key, n_values, s0_norm, delta_l2, rel_change,
    mean_abs_rel (mean |Δs/s0|), max_abs_delta, max_abs_rel, argmax_index (index of the
    singular value with the largest |Δs|), mean_delta (signed), n_increased, n_decreased.
    """
    rows = []
    for key, part in values.groupby("key", sort=False):
        delta = part["delta"].to_numpy()
        s0 = part["s0"].to_numpy()
        rel = part["rel_delta"].to_numpy()
        norm0 = float(np.linalg.norm(s0))
        l2 = float(np.linalg.norm(delta))
        finite = rel[np.isfinite(rel)]
        rows.append({
            "encoder": part["encoder"].iloc[0], "layer": int(part["layer"].iloc[0]),
            "matrix": part["matrix"].iloc[0], "key": key, "n_values": int(len(part)),
            "s0_norm": norm0, "delta_l2": l2, "rel_change": l2 / norm0 if norm0 > 0 else 0.0,
            "mean_abs_rel": float(np.abs(finite).mean()) if len(finite) else 0.0,
            "max_abs_delta": float(np.abs(delta).max(initial=0.0)),
            "max_abs_rel": float(np.abs(finite).max(initial=0.0)),
            "argmax_index": int(part["index"].to_numpy()[np.argmax(np.abs(delta))]),
            "mean_delta": float(delta.mean()) if len(delta) else 0.0,
            "n_increased": int((delta > 0).sum()), "n_decreased": int((delta < 0).sum())})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    order = np.lexsort((table["key"].to_numpy(), -table["rel_change"].to_numpy()))
    table = table.iloc[order].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def num_heads(block: nn.Module, family: str) -> int:
    """Attention heads of one transformer block, read from the model itself."""
    if family in ("openai", "timm"):
        value = getattr(block.attn, "num_heads", None)
    elif family == "bert":
        value = getattr(block.attention.self, "num_attention_heads", None)
    else:
        value = None
    if not isinstance(value, int) or value < 1:
        raise ModelError(f"cannot read the number of attention heads of a {family} block "
                         f"({type(block).__name__})")
    return value


def _current_weight(model: nn.Module, path: str, family: str, layer: int, matrix: str
                    ) -> np.ndarray:
    """The matrix as the model uses it now (adapted where an adapter is attached)."""
    sub, pname, fused = FAMILIES[family][matrix]
    weight = getattr(model.get_submodule(f"{path}.{layer}.{sub}"), pname)
    if fused is not None:
        rows = weight.shape[0] // 3
        weight = weight[fused * rows:(fused + 1) * rows]
    return _f64(weight)


def _slices(weight: np.ndarray, heads: int, columns: bool) -> list[np.ndarray]:
    size = weight.shape[1 if columns else 0]
    if size % heads:
        raise ModelError(f"a {weight.shape} attention matrix cannot be split into {heads} heads")
    width = size // heads
    if columns:
        return [weight[:, h * width:(h + 1) * width] for h in range(heads)]
    return [weight[h * width:(h + 1) * width, :] for h in range(heads)]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (0.0 if a == 0 else math.inf)


def head_table(adapter: SVDAdapter) -> pd.DataFrame:
    """Per attention head of every layer with an adapted q, k, v or out matrix.

    Columns: encoder, layer, head, num_heads, head_dim, for m in q, k, v, out: ``{m}_abs``
    (‖ΔW_m slice‖_F) and ``{m}_rel`` (over the pretrained slice's norm; 0 when m was not
    adapted), ``vo_abs`` = sqrt(v_abs² + out_abs²), ``ov_change``, ``qk_change``, and
    ``rank`` by ``ov_change`` (ties: qk_change, then vo_abs), 1 = most changed.
    """
    model = adapter.model
    found = find_blocks(model)
    by_layer: dict[tuple[str, int], dict[str, Any]] = {}
    for target in adapter.targets:
        if target.matrix in ATTENTION:
            by_layer.setdefault((target.encoder, target.layer), {})[target.matrix] = target
    rows = []
    for (encoder, layer), targets in sorted(by_layer.items()):
        path, family, blocks = found[encoder]
        heads = num_heads(blocks[layer], family)
        adapted: dict[str, np.ndarray] = {}
        original: dict[str, np.ndarray] = {}
        deltas: dict[str, np.ndarray | None] = {}
        for matrix in ATTENTION:
            current = _current_weight(model, path, family, layer, matrix)
            if matrix in targets:
                u, s0, vh = (_f64(t) for t in targets[matrix].factors())
                delta = (u * (_f64(targets[matrix].s) - s0)) @ vh
                adapted[matrix], original[matrix] = original_plus(u, s0, vh, delta)
                deltas[matrix] = delta
            else:
                adapted[matrix] = original[matrix] = current
                deltas[matrix] = None
        per = {m: _slices(original[m], heads, columns=(m == "out")) for m in ATTENTION}
        per_new = {m: _slices(adapted[m], heads, columns=(m == "out")) for m in ATTENTION}
        per_delta = {m: (_slices(d, heads, columns=(m == "out")) if d is not None else None)
                     for m, d in deltas.items()}
        head_dim = original["v"].shape[0] // heads
        for h in range(heads):
            row: dict[str, Any] = {"encoder": encoder, "layer": layer, "head": h,
                                   "num_heads": heads, "head_dim": head_dim}
            for m in ATTENTION:
                change = 0.0 if per_delta[m] is None else float(np.linalg.norm(per_delta[m][h]))
                row[f"{m}_abs"] = change
                row[f"{m}_rel"] = _ratio(change, float(np.linalg.norm(per[m][h])))
            row["vo_abs"] = math.hypot(row["v_abs"], row["out_abs"])
            ov0 = per["out"][h] @ per["v"][h]
            ov1 = per_new["out"][h] @ per_new["v"][h]
            row["ov_change"] = _ratio(float(np.linalg.norm(ov1 - ov0)), float(np.linalg.norm(ov0)))
            qk0 = per["q"][h].T @ per["k"][h]
            qk1 = per_new["q"][h].T @ per_new["k"][h]
            row["qk_change"] = _ratio(float(np.linalg.norm(qk1 - qk0)), float(np.linalg.norm(qk0)))
            rows.append(row)
    columns = ["encoder", "layer", "head", "num_heads", "head_dim"] + [
        f"{m}_{kind}" for m in ATTENTION for kind in ("abs", "rel")] + [
        "vo_abs", "ov_change", "qk_change"]
    table = pd.DataFrame(rows, columns=columns)
    if table.empty:
        table.insert(0, "rank", [])
        return table
    table = table.sort_values(["ov_change", "qk_change", "vo_abs"], ascending=False,
                              kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def original_plus(u: np.ndarray, s0: np.ndarray, vh: np.ndarray, delta: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(adapted, pretrained) weight from the factors and the change, in float64."""
    base = (u * s0) @ vh
    return base + delta, base


def encoder_depths(model: nn.Module) -> dict[str, int]:
    """Blocks per encoder (for heatmaps that show every layer, adapted or not)."""
    return {encoder: len(blocks) for encoder, (_, _, blocks) in find_blocks(model).items()}


__all__ = ["ATTENTION", "MATRICES", "encoder_depths", "head_table", "matrix_table", "num_heads",
           "singular_value_table"]
