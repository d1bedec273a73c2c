"""CLIP-LoRA: train a low-rank update of chosen attention (and optionally MLP) matrices.

Follows CLIP-LoRA (Zanella & Ben Ayed, arXiv 2405.18541). Each adapted matrix ``W`` (or one
q/k/v row block of a fused projection) computes ``h = W x + s · B A dropout(x)`` with ``A``
(rank × in) Kaiming-uniform (a = √5), ``B`` (out × rank) zero, ``s = alpha / √rank`` (as the
CLIP-LoRA code scales, not LoRA's ``alpha / rank``) and dropout applied to the branch's input
only. ``B = 0`` makes the adapted model compute exactly the pretrained function at
initialisation. Only the A and B matrices train; everything else is frozen.

How it attaches, per layout (target finding is shared with CLIP-SVD, :func:`select_targets`):

- ``nn.Linear`` targets (timm ``attn.qkv`` / ``proj`` / ``fc1`` / ``fc2``, BERT ``query`` /
  ``key`` / ``value`` / ``dense``, open_clip ``mlp.c_fc`` / ``c_proj`` / ``attn.out_proj``)
  become :class:`LoRALinear`, an ``nn.Linear`` holding the *same* weight and bias parameters
  plus its branches (one per selected row block of a fused q/k/v weight).
- open_clip's ``nn.MultiheadAttention`` projects q, k, v with its fused ``in_proj_weight``
  inside ``F.multi_head_attention_forward`` (or a fused kernel), where a dropout on a branch's
  input cannot be written as a change of weights. It is replaced by
  :class:`LoRAMultiheadAttention`: the same parameters under the same state-dict names, the same
  attention (``attn_mask`` 2-D/3-D, bool or additive, ``key_padding_mask``, ``batch_first``,
  ``need_weights``). While training with dropout > 0 it runs the attention written out, each
  branch on its own dropped-out input (equal to ``nn.MultiheadAttention`` to 1e-5 at init,
  tested). Otherwise (evaluation, or dropout 0) the update is exactly a change of weights, so
  it runs ``nn.MultiheadAttention.forward`` itself on ``W + ΔW``: the same code path as the
  unadapted model (fused inference kernel included), bit-identical to it at init.

Keys (saved files, :meth:`LoRAAdapter.state_dict`) are ``{encoder}.layer{i}.{matrix}.A`` and
``.B``, with the matrix names of CLIP-SVD (``vision.layer0.q.A``, ``text.layer11.v.B``).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .base import Adapter, count_parameters, freeze, has_adapter
from .svd import ENCODERS, MATRICES, TargetSelection, TargetSite, select_targets

log = logging.getLogger(__name__)


@dataclass
class LoRAConfig(TargetSelection):
    """Which matrices get a LoRA branch, and the branch's shape.

    Selection fields (``encoders``, ``matrices``, ``layers``) as in
    :class:`~clipsvd.adapters.svd.TargetSelection`, but ``matrices`` defaults to q, k, v.
    ``rank``: r of A (r × in) and B (out × r); ``alpha``: the update is scaled by
    ``alpha / √rank``; ``dropout``: probability of the dropout on each branch's input (training
    only; 0 turns it off).
    """

    label: ClassVar[str] = "clip_lora"

    matrices: Sequence[str] = ("q", "k", "v")
    rank: int = 2
    alpha: float = 1.0
    dropout: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ModelError(f"{self.label} rank {self.rank!r} invalid; give a whole number ≥ 1")
        try:
            self.alpha = float(self.alpha)
            self.dropout = float(self.dropout)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{self.label} alpha and dropout must be numbers (got "
                             f"{self.alpha!r}, {self.dropout!r})") from exc
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ModelError(f"{self.label} alpha {self.alpha} invalid; give a number > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"{self.label} dropout {self.dropout} invalid; give 0 ≤ dropout < 1")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank)


class LoRABranch(nn.Module):
    """``x ↦ s · B A dropout(x)`` for one matrix of shape (out, in)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float,
                 dropout: float, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.scaling = float(scaling)
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def up(self) -> torch.Tensor:
        """The up-projection actually used (Comp-LoRA projects it; plain LoRA: B)."""
        return self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A) * self.scaling, self.up())

    def delta_weight(self) -> torch.Tensor:
        """The update this branch adds to its matrix: ``s · B A`` (out × in)."""
        return self.scaling * (self.up() @ self.A)

    def info(self) -> dict[str, Any]:
        """Extra per-matrix facts for :meth:`LoRAAdapter.describe`."""
        return {}

    def extra_repr(self) -> str:
        out, inp = self.shape
        return f"in={inp}, out={out}, rank={self.A.shape[0]}, scaling={self.scaling:.4g}"


def _blocks_delta(x: torch.Tensor, branches: nn.ModuleDict, num_blocks: int,
                  block_rows: int) -> torch.Tensor:
    """The branches' outputs laid side by side over the row blocks (zeros where none)."""
    if num_blocks == 1:
        return branches["0"](x)
    pieces: list[torch.Tensor | None] = [
        branches[str(b)](x) if str(b) in branches else None for b in range(num_blocks)]
    like = next(p for p in pieces if p is not None)
    return torch.cat([p if p is not None else like.new_zeros(*like.shape[:-1], block_rows)
                      for p in pieces], dim=-1)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (same weight and bias objects) plus LoRA branches on row blocks.

    ``branches`` maps a row block (0 for an unfused matrix; 0/1/2 for q/k/v of a fused
    weight split in ``num_blocks`` = 3) to its branch.
    """

    is_adapter_module: ClassVar[bool] = True

    def __init__(self, base: nn.Linear, branches: Mapping[int, LoRABranch], num_blocks: int = 1):
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias
        if self.out_features % num_blocks:
            raise ModelError(f"a {self.out_features}-row weight cannot be split into "
                             f"{num_blocks} blocks")
        self.num_blocks = num_blocks
        self.block_rows = self.out_features // num_blocks
        self.lora = nn.ModuleDict({str(block): branch for block, branch in branches.items()})
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if len(self.lora):
            out = out + _blocks_delta(x, self.lora, self.num_blocks, self.block_rows)
        return out


class _WeightView:
    """What nn.MultiheadAttention.forward reads from its out_proj: weight and bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight
        self.bias = bias


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention semantics: a bool mask is True where attention is not allowed."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf"))
    return mask.to(dtype)


class LoRAMultiheadAttention(nn.Module):
    """Stands in for an ``nn.MultiheadAttention`` (packed q/k/v, no bias_k/bias_v, no zero
    attention), computing the same attention with LoRA branches on q, k and/or v.

    Parameters are the original objects under the original names (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.*``), so the base entries of the model's state dict are
    unchanged; ``out_proj`` is called as a module, so a :class:`LoRALinear` there adds its
    branch. ``branches`` maps 0/1/2 (q/k/v) to branches.
    """

    is_adapter_module: ClassVar[bool] = True

    def __init__(self, attention: nn.MultiheadAttention, branches: Mapping[int, LoRABranch]):
        super().__init__()
        if (not attention._qkv_same_embed_dim or attention.in_proj_weight is None
                or attention.bias_k is not None or attention.bias_v is not None
                or attention.add_zero_attn):
            raise ModelError("LoRA supports nn.MultiheadAttention with a packed in_proj_weight "
                             "and without bias_k/bias_v/add_zero_attn (open_clip's layout)")
        self.embed_dim = attention.embed_dim
        self.kdim = self.vdim = attention.embed_dim
        self._qkv_same_embed_dim = True
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.dropout = float(attention.dropout)
        self.batch_first = attention.batch_first
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.in_proj_weight = attention.in_proj_weight
        if attention.in_proj_bias is None:
            self.register_parameter("in_proj_bias", None)
        else:
            self.in_proj_bias = attention.in_proj_bias
        self.out_proj = attention.out_proj
        self.lora = nn.ModuleDict({str(block): branch for block, branch in branches.items()})
        self.train(attention.training)

    def _in_projection(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       self_attention: bool) -> tuple[torch.Tensor, ...]:
        width = self.embed_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if self_attention:  # one packed product, as nn.MultiheadAttention does
            packed = F.linear(query, weight, bias)
            if len(self.lora):
                packed = packed + _blocks_delta(query, self.lora, 3, width)
            return packed.split(width, dim=-1)
        projected = []
        for block, x in enumerate((query, key, value)):
            rows = slice(block * width, (block + 1) * width)
            y = F.linear(x, weight[rows], None if bias is None else bias[rows])
            if str(block) in self.lora:
                y = y + self.lora[str(block)](x)
            projected.append(y)
        return tuple(projected)

    def _branches(self) -> list[LoRABranch]:
        branches = list(self.lora.values())
        if isinstance(self.out_proj, LoRALinear):
            branches.extend(self.out_proj.lora.values())
        return branches  # type: ignore[return-value]

    def dropout_active(self) -> bool:
        """True while some branch applies its input dropout (training with dropout > 0)."""
        return self.training and any(isinstance(b.dropout, nn.Dropout) and b.dropout.p > 0
                                     for b in self._branches())

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training with branch dropout: the explicit computation (:meth:`forward_explicit`).
        Otherwise the update is exactly a change of weights, and nn.MultiheadAttention's own
        forward runs with ``W + ΔW`` (:meth:`forward_merged`): the same code path, fused kernel
        included, as the unadapted model, so the output at init is bit-identical."""
        arguments = dict(key_padding_mask=key_padding_mask, need_weights=need_weights,
                         attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                         is_causal=is_causal)
        if self.dropout_active():
            return self.forward_explicit(query, key, value, **arguments)
        return self.forward_merged(query, key, value, **arguments)

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(in_proj_weight + ΔW_qkv, out_proj.weight + ΔW_out), differentiable in A and B."""
        in_weight = self.in_proj_weight
        if len(self.lora):
            width = self.embed_dim
            deltas = [self.lora[str(b)].delta_weight() if str(b) in self.lora
                      else in_weight.new_zeros(width, in_weight.shape[1]) for b in range(3)]
            in_weight = in_weight + torch.cat(deltas, dim=0).to(in_weight.dtype)
        out_weight = self.out_proj.weight
        if isinstance(self.out_proj, LoRALinear) and len(self.out_proj.lora):
            out_weight = out_weight + self.out_proj.lora["0"].delta_weight().to(out_weight.dtype)
        return in_weight, out_weight

    def forward_merged(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       **arguments: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """nn.MultiheadAttention.forward on a throwaway instance holding the merged weights."""
        in_weight, out_weight = self.merged_weights()
        shim = nn.MultiheadAttention.__new__(nn.MultiheadAttention)
        nn.Module.__init__(shim)
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads",
                     "head_dim", "dropout", "batch_first", "bias_k", "bias_v", "add_zero_attn"):
            object.__setattr__(shim, name, getattr(self, name))
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            object.__setattr__(shim, name, None)
        object.__setattr__(shim, "in_proj_weight", in_weight)
        object.__setattr__(shim, "in_proj_bias", self.in_proj_bias)
        object.__setattr__(shim, "out_proj", _WeightView(out_weight, self.out_proj.bias))
        shim.training = self.training
        return nn.MultiheadAttention.forward(shim, query, key, value, **arguments)

    def forward_explicit(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                         attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                         is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention written out, with each branch applied to its (dropped-out) input."""
        self_attention = query is key and key is value
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence, whatever batch_first says
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, _ = query.shape
        source = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._in_projection(query, key, value, self_attention)
        q = q.reshape(batch, length, heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, source, heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, source, heads, head_dim).transpose(1, 2)

        mask = None
        if attn_mask is not None:
            mask = _additive_mask(attn_mask, q.dtype)
            if mask.dim() == 2:
                mask = mask.view(1, 1, length, source)
            else:  # (batch × heads, L, S), batch-major like nn.MultiheadAttention
                mask = mask.view(batch, heads, length, source)
        if key_padding_mask is not None:
            padding = _additive_mask(key_padding_mask, q.dtype).view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        if is_causal and mask is None:
            mask = torch.full((length, source), float("-inf"), dtype=q.dtype,
                              device=q.device).triu_(1).view(1, 1, length, source)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, dropout_p, training=dropout_p > 0) @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}")


@dataclass
class LoRATarget:
    """One adapted matrix: readable key, where it lives, and its branch."""

    key: str
    encoder: str
    layer: int
    matrix: str
    module: str
    shape: tuple[int, int]
    branch: LoRABranch = field(repr=False)

    @property
    def A(self) -> nn.Parameter:  # noqa: N802 (the paper's name)
        return self.branch.A

    @property
    def B(self) -> nn.Parameter:  # noqa: N802
        return self.branch.B


def _replace_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class LoRAAdapter(Adapter):
    """CLIP-LoRA attached to an open_clip model: only the A and B matrices train."""

    kind = "clip_lora"
    method: ClassVar[str] = "CLIP-LoRA"
    config_class: ClassVar[type[LoRAConfig]] = LoRAConfig
    # Config fields that change what a saved A/B pair computes; a file trained with other
    # values is refused on load (shapes alone cannot tell).
    load_checked: ClassVar[tuple[str, ...]] = ("rank", "alpha")

    def __init__(self, model: nn.Module, config: LoRAConfig, targets: list[LoRATarget],
                 base_fingerprint: str, base_num_parameters: int):
        self.model = model
        self.config = config
        self.targets = targets
        self.base_fingerprint = base_fingerprint
        self.base_num_parameters = base_num_parameters

    @classmethod
    def make_branch(cls, weight: torch.Tensor, config: LoRAConfig, site: TargetSite
                    ) -> LoRABranch:
        """The branch for one pretrained matrix ``weight`` (out × in)."""
        return LoRABranch(weight.shape[1], weight.shape[0], config.rank, config.scaling,
                          config.dropout, device=weight.device, dtype=weight.dtype)

    @classmethod
    def attach(cls, model: nn.Module, config: LoRAConfig | Mapping[str, Any] | None = None
               ) -> "LoRAAdapter":
        """Put branches on the selected matrices (in place) and freeze everything else."""
        from ..models import model_fingerprint

        config = cls.config_class.from_dict(config)
        if has_adapter(model):
            raise ModelError("this model already has an adapter attached; load a fresh model "
                             "before attaching another")
        sites = select_targets(model, config, cls.method)
        base_fingerprint = model_fingerprint(model)
        base_count = count_parameters(model)
        by_module: dict[str, list[TargetSite]] = {}
        for site in sites:
            by_module.setdefault(site.module_path, []).append(site)
        modules = {path: model.get_submodule(path) for path in by_module}
        for path, module in modules.items():
            if not isinstance(module, (nn.Linear, nn.MultiheadAttention)):
                raise ModelError(f"{cls.method} can adapt nn.Linear and nn.MultiheadAttention, "
                                 f"not {type(module).__name__} at {path}")
        freeze(model)
        targets: list[LoRATarget] = []

        def branches_for(path: str, weight: torch.Tensor, num_blocks: int) -> dict[int, LoRABranch]:
            rows = weight.shape[0] // num_blocks
            branches = {}
            for site in by_module[path]:
                block = site.block or 0
                part = weight.detach()[block * rows:(block + 1) * rows]
                branch = cls.make_branch(part, config, site)
                branches[block] = branch
                where = f"{path}.{site.param_name}" + (
                    f"[block {block}]" if site.block is not None else "")
                targets.append(LoRATarget(key=site.key, encoder=site.encoder, layer=site.layer,
                                          matrix=site.matrix, module=where,
                                          shape=(rows, weight.shape[1]), branch=branch))
            return branches

        # Linear layers first; an attention whose out_proj got a branch must then be replaced
        # too, since nn.MultiheadAttention reads out_proj.weight instead of calling out_proj.
        attentions = {path for path, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
        for path, module in modules.items():
            if path in attentions:
                continue
            num_blocks = 3 if any(site.block is not None for site in by_module[path]) else 1
            wrapped = LoRALinear(module, branches_for(path, module.weight, num_blocks),
                                 num_blocks)
            _replace_submodule(model, path, wrapped)
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            if isinstance(parent, nn.MultiheadAttention) and name == "out_proj":
                attentions.add(parent_path)
        for path in sorted(attentions):
            attention = model.get_submodule(path)
            branches = (branches_for(path, attention.in_proj_weight, 3)
                        if path in by_module else {})
            _replace_submodule(model, path, LoRAMultiheadAttention(attention, branches))

        targets.sort(key=lambda t: (ENCODERS.index(t.encoder), t.layer,
                                    MATRICES.index(t.matrix)))
        adapter = cls(model, config, targets, base_fingerprint, base_count)
        log.info("%s: %d matrices, rank %d, %d parameters trained (%.4f%% of %d)", cls.method,
                 len(targets), config.rank, adapter.num_trainable(),
                 100 * adapter.trainable_fraction(), base_count)
        return adapter

    def named_trainable(self) -> dict[str, nn.Parameter]:
        named: dict[str, nn.Parameter] = {}
        for target in self.targets:
            named[f"{target.key}.A"] = target.A
            named[f"{target.key}.B"] = target.B
        return named

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def describe(self) -> list[dict[str, Any]]:
        return [{"key": t.key, "encoder": t.encoder, "layer": t.layer, "matrix": t.matrix,
                 "module": t.module, "shape": list(t.shape), "rank": self.config.rank,
                 "trained": t.A.numel() + t.B.numel(), **t.branch.info()}
                for t in self.targets]

    def target(self, key: str) -> LoRATarget:
        for t in self.targets:
            if t.key == key:
                return t
        raise KeyError(key)

    def delta_weight(self, key: str) -> torch.Tensor:
        """The update currently added to matrix ``key`` (out × in), read from its branch."""
        return self.target(key).branch.delta_weight()

    def load(self, path: str | os.PathLike, check_fingerprint: bool = True) -> dict[str, str]:
        """As :meth:`Adapter.load`, and also refuses a file trained with another rank, alpha
        (or, for Comp-LoRA, protected subspace setting): same shapes, different function."""
        header = self.read_metadata(path)
        if header.get("adapter_kind") == self.kind:
            try:
                saved = json.loads(header.get("adapter_config", "{}"))
            except json.JSONDecodeError:
                saved = {}
            mine = self.config_dict()
            differ = [f"{name} {saved[name]!r} (this adapter: {mine[name]!r})"
                      for name in self.load_checked if name in saved and saved[name] != mine[name]]
            if differ:
                raise ModelError(f"adapter file {path} was trained with {', '.join(differ)}; "
                                 f"attach {self.method} with the file's settings to load it")
        return super().load(path, check_fingerprint=check_fingerprint)
