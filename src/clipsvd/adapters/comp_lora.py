"""Comp-LoRA: LoRA whose update avoids the pretrained weight's principal subspace.

A reimplementation from the description in "Complementary Subspace Low-Rank Adaptation of
Vision-Language Models for Few-Shot Classification" (Wang et al., arXiv 2501.15040); the
authors published no code, so details beyond that description are this project's choices.

Formulation used here: for each adapted matrix ``W`` (each q/k/v block of a fused weight
separately), ``W = U diag(s) Vᵀ`` (float64 SVD at attach), ``U_k`` its top-k left singular
vectors, and the update is

    ΔW = (I − U_k U_kᵀ) · s · B A,

so ``U_kᵀ ΔW = 0``: the update never writes into the directions that carry most of the
pretrained matrix's output. ``k`` is given as a count (``protect_rank``) or as the smallest k
whose singular values hold a fraction of the spectral energy (``protect_energy``:
Σ_{i≤k} s_i² / Σ s_i² ≥ energy); ``protect_rank`` wins when both are set. ``U_k`` is a
frozen, non-persistent buffer (recomputed from ``W`` at attach, never saved); the projector
is applied to B (``B − U_k (U_kᵀ B)``, in float32 outside autocast), never built as d × d.
Everything else (init with B = 0, so the output is unchanged at attach; dropout; scaling;
save/load of A and B only) is :mod:`clipsvd.adapters.lora`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import ModelError
from .lora import LoRAAdapter, LoRABranch, LoRAConfig
from .svd import TargetSite

ENERGY_TOLERANCE = 1e-9  # so an energy that a prefix reaches exactly is not missed by rounding


@dataclass
class CompLoRAConfig(LoRAConfig):
    """:class:`~clipsvd.adapters.lora.LoRAConfig` plus the protected subspace's size.

    ``protect_rank``: k as a count (≥ 1), taking precedence when set; ``protect_energy``: k as
    the smallest count holding this fraction (0 < energy ≤ 1) of Σ s². One must be set.
    """

    label: ClassVar[str] = "comp_lora"

    protect_rank: int | None = None
    protect_energy: float | None = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.protect_rank is not None:
            if (isinstance(self.protect_rank, bool) or not isinstance(self.protect_rank, int)
                    or self.protect_rank < 1):
                raise ModelError(f"comp_lora protect_rank {self.protect_rank!r} invalid; give a "
                                 "whole number ≥ 1 (or null to use protect_energy)")
        elif self.protect_energy is None:
            raise ModelError("comp_lora needs protect_rank (a count) or protect_energy (a "
                             "fraction of spectral energy); both are null")
        if self.protect_energy is not None:
            try:
                self.protect_energy = float(self.protect_energy)
            except (TypeError, ValueError) as exc:
                raise ModelError(f"comp_lora protect_energy {self.protect_energy!r} is not a "
                                 "number") from exc
            if not 0.0 < self.protect_energy <= 1.0:
                raise ModelError(f"comp_lora protect_energy {self.protect_energy} invalid; give "
                                 "0 < energy ≤ 1")


def protected_rank(singular_values: torch.Tensor | Sequence[float], count: int | None = None,
                   energy: float | None = None) -> int:
    """k: ``count`` itself, or the smallest k with Σ_{i≤k} s_i² / Σ s_i² ≥ ``energy``.

    Singular values are taken in descending order (as torch.linalg.svd returns them). A zero
    matrix has no principal subspace: k = 0 under the energy rule.
    """
    values = torch.as_tensor(singular_values, dtype=torch.float64).flatten()
    if count is not None:
        if count > values.numel():
            raise ModelError(f"comp_lora protect_rank {count} exceeds the {values.numel()} "
                             "singular values of the matrix")
        return int(count)
    if energy is None:
        raise ModelError("protected_rank needs count or energy")
    power = values.square()
    total = power.sum()
    if total <= 0:
        return 0
    fraction = power.cumsum(0) / total
    reached = fraction >= energy - ENERGY_TOLERANCE
    return int(torch.nonzero(reached)[0, 0]) + 1 if bool(reached.any()) else values.numel()


class CompLoRABranch(LoRABranch):
    """A LoRA branch whose up-projection is projected off ``U_k`` (out × k)."""

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float, dropout: float,
                 protect_rank: int | None, protect_energy: float | None, key: str = ""):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, rank, scaling, dropout,
                         device=weight.device, dtype=weight.dtype)
        u, s, _ = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
        k = protected_rank(s, protect_rank, protect_energy)
        if k >= out_features:
            raise ModelError(f"comp_lora would protect all {out_features} output directions of "
                             f"{key or 'a matrix'} (k = {k}), leaving no room for an update; "
                             "lower protect_rank / protect_energy")
        power = s.square()
        self.protected = k
        self.protected_energy = float(power[:k].sum() / power.sum()) if power.sum() > 0 else 0.0
        self.register_buffer("U", u[:, :k].to(weight.device, torch.float32).contiguous(),
                             persistent=False)

    def up(self) -> torch.Tensor:
        b = self.B
        with torch.autocast(device_type=b.device.type, enabled=False):
            full = b.float()
            projected = full - self.U @ (self.U.t() @ full)
        return projected.to(b.dtype)

    def info(self) -> dict[str, Any]:
        return {"protected": self.protected, "protected_energy": round(self.protected_energy, 6)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, protected={self.protected}"


class CompLoRAAdapter(LoRAAdapter):
    """Comp-LoRA attached to an open_clip model: LoRA branches with protected subspaces."""

    kind = "comp_lora"
    method: ClassVar[str] = "Comp-LoRA"
    config_class: ClassVar[type[LoRAConfig]] = CompLoRAConfig
    load_checked: ClassVar[tuple[str, ...]] = ("rank", "alpha", "protect_rank", "protect_energy")

    @classmethod
    def make_branch(cls, weight: torch.Tensor, config: LoRAConfig, site: TargetSite
                    ) -> LoRABranch:
        assert isinstance(config, CompLoRAConfig)
        return CompLoRABranch(weight, config.rank, config.scaling, config.dropout,
                              config.protect_rank, config.protect_energy, key=site.key)

    def protected_basis(self, key: str) -> torch.Tensor:
        """U_k (out × k) of matrix ``key``: the directions its update stays orthogonal to."""
        branch = self.target(key).branch
        assert isinstance(branch, CompLoRABranch)
        return branch.U
