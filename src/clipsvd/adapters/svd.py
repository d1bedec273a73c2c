"""CLIP-SVD: adapt a CLIP-style model by training only the singular values of its weights.

Each target weight ``W0`` (or one q/k/v row block of a fused attention projection) is
decomposed once, ``W0 = U diag(s0) Vh`` (float64 SVD, kept as float32 buffers), and ``s``
(initialised to ``s0``) is the only trainable tensor. Each adapted layer applies the weight one
of two ways, chosen per layer and call by a cost model (:func:`choose_execution`):

- recompose: form ``W = W0 + U diag(s - s0) Vh`` once per step; the delta form keeps the model
  *bit-identical* to the pretrained one at initialisation (the delta is exactly zero);
- factored: ``x -> Vh^T -> *s -> U^T`` without forming W (the public code's form), cheaper for
  wide MLP layers and few tokens; at initialisation it differs from ``x W0^T`` only by the
  float32 round-off of the SVD product (~1e-6 relative).

``execution: recompose`` in the study config forces the bit-exact form everywhere.

Under autocast (bf16/fp16 training) ``s``, ``s - s0`` and their products stay float32: the
recomposed weight is formed in float32 and keeps the dtype of the weight it replaces, and the
factored form scales by ``s`` in float32 (docs/precision.md).

Keys (in saved files, :meth:`SVDAdapter.state_dict`, :meth:`describe`) are
``{encoder}.layer{i}.{matrix}``: encoder ``vision`` or ``text``, ``i`` the block index from
0 (input side), matrix one of ``q k v out mlp_fc mlp_proj`` (e.g. ``vision.layer0.q``,
``text.layer11.mlp_fc``). The same keys name the same matrices whatever the architecture
(open_clip OpenAI-style blocks, timm ViT blocks, Hugging Face BERT layers).
"""
from __future__ import annotations

import contextlib
import logging
import time
import types
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .. import svd_cache
from ..errors import ModelError
from .base import Adapter, config_from_options, count_parameters, freeze, has_adapter

log = logging.getLogger(__name__)

ENCODERS = ("vision", "text")
MATRICES = ("q", "k", "v", "out", "mlp_fc", "mlp_proj")
EXECUTIONS = ("auto", "recompose", "factored")
MATRIX_GROUPS = {"mlp": ("mlp_fc", "mlp_proj"), "attn": ("q", "k", "v", "out"),
                 "qkv": ("q", "k", "v")}

# Per block family: matrix -> (submodule path inside the block, parameter name, row block of
# a fused q/k/v weight or None).
_FUSED = {"q": 0, "k": 1, "v": 2}
FAMILIES: dict[str, dict[str, tuple[str, str, int | None]]] = {
    "openai": {**{m: ("attn", "in_proj_weight", i) for m, i in _FUSED.items()},
               "out": ("attn.out_proj", "weight", None),
               "mlp_fc": ("mlp.c_fc", "weight", None),
               "mlp_proj": ("mlp.c_proj", "weight", None)},
    "timm": {**{m: ("attn.qkv", "weight", i) for m, i in _FUSED.items()},
             "out": ("attn.proj", "weight", None),
             "mlp_fc": ("mlp.fc1", "weight", None),
             "mlp_proj": ("mlp.fc2", "weight", None)},
    "bert": {"q": ("attention.self.query", "weight", None),
             "k": ("attention.self.key", "weight", None),
             "v": ("attention.self.value", "weight", None),
             "out": ("attention.output.dense", "weight", None),
             "mlp_fc": ("intermediate.dense", "weight", None),
             "mlp_proj": ("output.dense", "weight", None)},
}
# Where each family's blocks live in an open_clip model, per encoder.
BLOCK_LISTS: dict[str, tuple[tuple[str, str], ...]] = {
    "vision": (("visual.transformer.resblocks", "openai"), ("visual.trunk.blocks", "timm")),
    "text": (("transformer.resblocks", "openai"), ("text.transformer.resblocks", "openai"),
             ("text.transformer.encoder.layer", "bert")),
}


@dataclass
class TargetSelection:
    """Which matrices of which blocks an adapter changes (shared by every adapter's config).

    ``encoders``: subset of ("vision", "text"). ``matrices``: subset of q, k, v, out, mlp_fc,
    mlp_proj, with shorthands mlp (both MLP layers), attn (q k v out), qkv. ``layers``:
    "all"; "top<N>" (the N blocks nearest the output); "bottom<N>" (the N nearest the input);
    "middle" (the middle third of the blocks, at most 4: blocks 4-7 of 12); or a list of block
    indices, negative ones counting from the end. The same layer choice applies to each encoder.
    Subclasses add their own fields; ``label`` names the config in error messages.
    """

    label: ClassVar[str] = "adapter"

    encoders: Sequence[str] = ("vision", "text")
    matrices: Sequence[str] = ("q", "k", "v", "out", "mlp")
    layers: str | Sequence[int] = "all"

    def __post_init__(self) -> None:
        if isinstance(self.encoders, str):
            self.encoders = (self.encoders,)
        if isinstance(self.matrices, str):
            self.matrices = (self.matrices,)
        self.encoders = tuple(self.encoders)
        self.matrices = tuple(self.matrices)
        if not isinstance(self.layers, str):
            self.layers = [int(i) for i in self.layers]
        unknown = [e for e in self.encoders if e not in ENCODERS]
        if unknown or not self.encoders:
            raise ModelError(f"{self.label} encoders {list(self.encoders)} invalid; choose from "
                             f"{list(ENCODERS)}")
        allowed = set(MATRICES) | set(MATRIX_GROUPS)
        bad = [m for m in self.matrices if m not in allowed]
        if bad or not self.matrices:
            raise ModelError(f"{self.label} matrices {bad or []} invalid; choose from "
                             f"{sorted(allowed)}")
        if isinstance(self.layers, str):
            _parse_layer_spec(self.layers, depth=None, label=self.label)
        elif not self.layers:
            raise ModelError(f"{self.label} layers is an empty list; give 'all' or block indices")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "TargetSelection" | None) -> Any:
        """Build from plain config data; unknown keys are a ModelError naming them."""
        if isinstance(data, cls):
            return data
        if isinstance(data, TargetSelection):
            raise ModelError(f"a {type(data).__name__} cannot configure {cls.label}; pass a "
                             f"{cls.__name__} or plain options")
        return config_from_options(cls, data)

    def expanded_matrices(self) -> tuple[str, ...]:
        chosen: set[str] = set()
        for name in self.matrices:
            chosen.update(MATRIX_GROUPS.get(name, (name,)))
        return tuple(m for m in MATRICES if m in chosen)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["encoders"] = list(self.encoders)
        data["matrices"] = list(self.matrices)
        return data


@dataclass
class SVDConfig(TargetSelection):
    """Which singular values to train (fields and their meaning: :class:`TargetSelection`),
    and how layers that can choose apply them (``execution``: auto, recompose, factored)."""

    label: ClassVar[str] = "svd"

    execution: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.execution not in EXECUTIONS:
            raise ModelError(f"svd execution {self.execution!r} invalid; choose from "
                             f"{list(EXECUTIONS)}")


def _parse_layer_spec(spec: str, depth: int | None, label: str = "svd") -> list[int] | None:
    """Resolve a string layer spec against ``depth`` blocks (depth None: only validate)."""
    text = spec.strip().lower()
    if text == "all":
        return None if depth is None else list(range(depth))
    if text == "middle":
        if depth is None:
            return None
        count = max(1, min(4, depth // 3))
        start = (depth - count) // 2
        return list(range(start, start + count))
    for prefix in ("top", "bottom"):
        if text.startswith(prefix):
            number = text[len(prefix):]
            if not number.isdigit() or int(number) < 1:
                break
            count = int(number)
            if depth is None:
                return None
            if count > depth:
                raise ModelError(f"{label} layers {spec!r} asks for {count} blocks but the encoder "
                                 f"has {depth}")
            return list(range(depth - count, depth)) if prefix == "top" else list(range(count))
    raise ModelError(f"{label} layers {spec!r} invalid; use 'all', 'top<N>', 'bottom<N>', "
                     "'middle' or a list of block indices")


def resolve_layers(spec: str | Sequence[int], depth: int, encoder: str = "",
                   label: str = "svd") -> list[int]:
    """Sorted block indices selected by ``spec`` in an encoder of ``depth`` blocks."""
    if isinstance(spec, str):
        layers = _parse_layer_spec(spec, depth, label)
        assert layers is not None
        return layers
    resolved = set()
    for index in spec:
        if not -depth <= int(index) < depth:
            where = f"the {encoder} encoder" if encoder else "the encoder"
            raise ModelError(f"{label} layer index {index} out of range: {where} has {depth} "
                             f"blocks (valid {-depth}..{depth - 1})")
        resolved.add(int(index) % depth)
    return sorted(resolved)


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def find_blocks(model: nn.Module) -> dict[str, tuple[str, str, list[nn.Module]]]:
    """Per encoder: (module path of the block list, family, blocks) for the layouts we know."""
    found: dict[str, tuple[str, str, list[nn.Module]]] = {}
    for encoder, candidates in BLOCK_LISTS.items():
        for path, family in candidates:
            blocks = _get_submodule(model, path)
            if blocks is None or not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
                continue
            blocks = list(blocks)
            sub, name, _ = FAMILIES[family]["out"]
            if blocks and all(_get_submodule(b, sub) is not None for b in blocks):
                found[encoder] = (path, family, blocks)
                break
    return found


@dataclass(frozen=True)
class TargetSite:
    """One matrix an adapter changes and where it lives: the module holding the weight, the
    weight's name there, and its row block when q/k/v are fused in one weight (0 q, 1 k, 2 v;
    None for an unfused matrix)."""

    encoder: str
    layer: int
    matrix: str
    family: str
    module_path: str
    param_name: str
    block: int | None

    @property
    def key(self) -> str:
        return f"{self.encoder}.layer{self.layer}.{self.matrix}"


def select_targets(model: nn.Module, config: TargetSelection, method: str) -> list[TargetSite]:
    """The matrices ``config`` selects in ``model``, ordered by encoder, layer, matrix.

    ``method`` (e.g. "CLIP-SVD") names the adapter in errors: no known blocks at all, or a
    chosen encoder whose blocks are missing.
    """
    found = find_blocks(model)
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise ModelError(f"{method} found no transformer blocks it knows (open_clip "
                         "ResidualAttentionBlock, timm ViT Block, BERT layer); module types "
                         f"present: {', '.join(kinds[:20])}")
    missing = [e for e in config.encoders if e not in found]
    if missing:
        raise ModelError(f"{method} cannot find the {', '.join(missing)} encoder's blocks in "
                         f"this model (found: {', '.join(sorted(found)) or 'none'}); drop it "
                         f"from {config.label} encoders")
    matrices = config.expanded_matrices()
    sites = []
    for encoder in ENCODERS:
        if encoder not in config.encoders:
            continue
        path, family, blocks = found[encoder]
        for layer in resolve_layers(config.layers, len(blocks), encoder, config.label):
            for matrix in matrices:
                sub, pname, fused = FAMILIES[family][matrix]
                sites.append(TargetSite(encoder=encoder, layer=layer, matrix=matrix,
                                        family=family, module_path=f"{path}.{layer}.{sub}",
                                        param_name=pname, block=fused))
    return sites


class SingularValueDelta(nn.Module):
    """Parametrization ``W0 -> W0 + [U_b diag(s_b - s0_b) Vh_b]_b`` over row blocks of W0.

    ``num_blocks`` is 3 for a fused q/k/v weight (each third decomposed separately) and 1
    otherwise; blocks not selected get no delta. U, s0, Vh are non-persistent buffers (they are
    recomputed from W0 at attach, or read from the SVD cache (:mod:`clipsvd.svd_cache`,
    ``cache``: True for the default directory, None to bypass it, or a directory), so they
    never bloat a model's state dict).

    ``execution`` ("auto", "recompose" or "factored") is how an unfused ``nn.Linear`` whose
    forward SVDAdapter took over applies the adapted weight; see :func:`choose_execution`.
    """

    def __init__(self, weight: torch.Tensor, num_blocks: int, selected: Sequence[int],
                 cache: Any = True):
        super().__init__()
        rows = weight.shape[0]
        if rows % num_blocks:
            raise ModelError(f"fused weight with {rows} rows cannot be split into {num_blocks} "
                             "blocks")
        self.num_blocks = num_blocks
        self.block_rows = rows // num_blocks
        self.selected = sorted(selected)
        self.s = nn.ParameterDict()
        self.execution = "auto"
        self.label = ""
        self._announced: set[str] = set()
        source = weight.detach().to("cpu")
        device = weight.device
        for block in self.selected:
            part = source[block * self.block_rows:(block + 1) * self.block_rows]
            u, s0, vh = svd_cache.decompose(part, cache)
            self.register_buffer(f"U_{block}", u.to(device), persistent=False)
            self.register_buffer(f"Vh_{block}", vh.to(device), persistent=False)
            self.register_buffer(f"s0_{block}", s0.to(device), persistent=False)
            self.s[str(block)] = nn.Parameter(s0.to(device).clone())

    def factors(self, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (getattr(self, f"U_{block}"), getattr(self, f"s0_{block}"),
                getattr(self, f"Vh_{block}"))

    def delta(self, block: int) -> torch.Tensor:
        """``U diag(s - s0) Vh`` of one row block (float32 outside autocast)."""
        u, s0, vh = self.factors(block)
        return (u * (self.s[str(block)] - s0)) @ vh

    def factored(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x (U diag(s) Vh)ᵀ + bias`` without forming the matrix: x → Vhᵀ → ·s → Uᵀ.

        The two products with U and Vh run in ``x``'s dtype (under autocast: the autocast
        dtype, like every other layer); the scaling by ``s`` runs in float32, so ``s`` is
        never rounded to bf16/fp16 and its gradient is summed over the tokens in float32.
        """
        u, _, vh = self.factors(0)
        dtype = x.dtype
        s = self.s["0"]
        scaled = F.linear(x, vh.to(dtype)).to(s.dtype) * s
        return F.linear(scaled.to(dtype), u.to(dtype), None if bias is None else bias.to(dtype))

    def choose(self, x: torch.Tensor) -> str:
        """The execution for one call on input ``x`` (logged once per layer and choice)."""
        u, _, vh = self.factors(0)
        rows, cols = u.shape[0], vh.shape[1]
        tokens = x.numel() // max(cols, 1)
        training = torch.is_grad_enabled() and self.s["0"].requires_grad
        if self.execution != "auto":
            choice = self.execution
        else:
            choice = choose_execution(rows, cols, tokens, training)
        if choice not in self._announced:
            self._announced.add(choice)
            recompose, factored = execution_costs(rows, cols, tokens, training)
            log.info("CLIP-SVD %s (%dx%d): %s for %d tokens (%s; est. multiply-adds: recompose "
                     "%.3g, factored %.3g)", self.label or "layer", rows, cols, choice, tokens,
                     "training" if training else "no grad", recompose, factored)
        return choice

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``W0 + ΔW`` in ``W0``'s dtype, computed in float32 with autocast off.

        Under autocast an ``addmm`` would return the autocast dtype: the singular values'
        products would be rounded to bf16/fp16, and the adapted weight would no longer have
        the dtype of the weight it replaces (open_clip casts its whole text tower to the
        dtype of ``resblocks[0].mlp.c_fc.weight``). The layers that use the weight still cast
        it to the autocast dtype, exactly as they cast the unadapted ``W0``.
        """
        with torch.autocast(device_type=weight.device.type, enabled=False):
            base = weight.float()
            if self.num_blocks == 1:
                u, s0, vh = self.factors(0)
                return torch.addmm(base, u * (self.s["0"] - s0), vh).to(weight.dtype)
            pieces = []
            for block in range(self.num_blocks):
                if block in self.selected:
                    pieces.append(self.delta(block))
                else:
                    pieces.append(base.new_zeros(self.block_rows, weight.shape[1]))
            return (base + torch.cat(pieces, dim=0)).to(weight.dtype)


def execution_costs(rows: int, cols: int, tokens: int, training: bool = True
                    ) -> tuple[float, float]:
    """Estimated multiply-adds of the two ways to apply an adapted rows × cols weight (rank
    r = min(rows, cols)) to ``tokens`` input rows. Returns (recompose, factored).

    Training step (forward and backward), m = rows, n = cols, T = tokens:

    - recompose: form W (m·n·r), apply it (T·m·n), input gradient (T·m·n), weight gradient
      Gᵀ X (T·m·n), project it onto s (dW Vhᵀ: m·n·r) → ``3·T·m·n + 2·m·n·r``;
    - factored: x → Vhᵀ → ·s → Uᵀ forward (T·r·(m + n)) and the same again for the input
      gradient; the gradient of s is an elementwise product of saved activations
      → ``2·T·r·(m + n)``.

    For a square d × d layer the factored form wins when T < 2d (ViT-B/16 width 768: under
    1,536 tokens, a batch of 7 images; a batch-32 step of 6,304 tokens recomposes). For the
    4×-wide MLP layers (m·n = 4d², r = d) it wins at every T: 10·T·d² against 12·T·d² + 8·d³.
    Without gradients (evaluation inside ``cached()``) the recomposed weight is reused by every
    call, so recompose is chosen and its cost counted once (m·n·r + T·m·n against
    T·r·(m + n)).
    """
    rank = min(rows, cols)
    if training:
        return (3.0 * tokens * rows * cols + 2.0 * rows * cols * rank,
                2.0 * tokens * rank * (rows + cols))
    return (float(rows) * cols * rank + float(tokens) * rows * cols,
            float(tokens) * rank * (rows + cols))


def choose_execution(rows: int, cols: int, tokens: int, training: bool = True) -> str:
    """"factored" when :func:`execution_costs` says it is cheaper during training, else
    "recompose"."""
    if not training:
        return "recompose"
    recompose, factored = execution_costs(rows, cols, tokens, training)
    return "factored" if factored < recompose else "recompose"


def _adaptive_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Forward of an adapted, unfused ``nn.Linear``: recompose or factored per call."""
    delta: SingularValueDelta = self.parametrizations.weight[0]
    if delta.choose(x) == "factored":
        return delta.factored(x, self.bias)
    return F.linear(x, self.weight, self.bias)


def _factorable(model: nn.Module, module_path: str, module: nn.Module, pname: str,
                num_blocks: int) -> bool:
    """True for an unfused ``nn.Linear`` weight that its own forward applies. q/k/v inside a
    fused weight and ``nn.MultiheadAttention.out_proj`` (whose weight the attention reads
    directly, never calling the Linear) always recompose."""
    if num_blocks != 1 or pname != "weight" or type(module).forward is not nn.Linear.forward:
        return False
    parent_path = module_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    return not isinstance(parent, nn.MultiheadAttention)


@dataclass
class SVDTarget:
    """One adapted matrix: its readable key, where it lives, and its trainable vector."""

    key: str
    encoder: str
    layer: int
    matrix: str
    module_path: str
    param_name: str
    block: int
    shape: tuple[int, int]
    parametrization: SingularValueDelta = field(repr=False)

    @property
    def s(self) -> nn.Parameter:
        return self.parametrization.s[str(self.block)]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, s0, Vh) of the pretrained matrix, for interpretation of the trained s."""
        return self.parametrization.factors(self.block)


class SVDAdapter(Adapter):
    """CLIP-SVD attached to an open_clip model: only chosen singular values are trainable."""

    kind = "clip_svd"

    def __init__(self, model: nn.Module, config: SVDConfig, targets: list[SVDTarget],
                 base_fingerprint: str, base_num_parameters: int, seconds: float):
        self.model = model
        self.config = config
        self.targets = targets
        self.base_fingerprint = base_fingerprint
        self.base_num_parameters = base_num_parameters
        self.svd_seconds = seconds

    @classmethod
    def attach(cls, model: nn.Module, config: SVDConfig | Mapping[str, Any] | None = None
               ) -> "SVDAdapter":
        """Decompose the selected weights, reparametrise them in place, freeze the rest."""
        from ..models import model_fingerprint

        config = SVDConfig.from_dict(config)
        if has_adapter(model):
            raise ModelError("this model already has an adapter attached; load a fresh model "
                             "before attaching another")
        sites = select_targets(model, config, "CLIP-SVD")
        base_fingerprint = model_fingerprint(model)
        base_count = count_parameters(model)
        # Group the selected row blocks by the tensor they live in, so a fused q/k/v weight
        # gets one parametrization covering its selected thirds.
        plan: dict[tuple[str, str], dict[str, Any]] = {}
        for site in sites:
            entry = plan.setdefault((site.module_path, site.param_name), {
                "num_blocks": 1 if site.block is None else 3, "items": []})
            entry["items"].append((site.encoder, site.layer, site.matrix,
                                   0 if site.block is None else site.block))
        freeze(model)
        started = time.perf_counter()
        targets: list[SVDTarget] = []
        for (module_path, pname), entry in plan.items():
            module = model.get_submodule(module_path)
            weight = getattr(module, pname)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ModelError(f"CLIP-SVD expected a 2-D weight at {module_path}.{pname}")
            blocks = [item[3] for item in entry["items"]]
            delta = SingularValueDelta(weight, entry["num_blocks"], blocks)
            delta.label = module_path
            factorable = _factorable(model, module_path, module, pname, entry["num_blocks"])
            parametrize.register_parametrization(module, pname, delta, unsafe=True)
            if factorable:
                module.forward = types.MethodType(_adaptive_linear_forward, module)
            original = module.parametrizations[pname].original
            original.requires_grad_(False)
            rows = weight.shape[0] // entry["num_blocks"]
            for encoder, layer, matrix, block in entry["items"]:
                targets.append(SVDTarget(
                    key=f"{encoder}.layer{layer}.{matrix}", encoder=encoder, layer=layer,
                    matrix=matrix, module_path=module_path, param_name=pname, block=block,
                    shape=(rows, weight.shape[1]), parametrization=delta))
        seconds = time.perf_counter() - started
        targets.sort(key=lambda t: (ENCODERS.index(t.encoder), t.layer,
                                    MATRICES.index(t.matrix)))
        adapter = cls(model, config, targets, base_fingerprint, base_count, seconds)
        adapter.set_execution(config.execution)
        log.info("CLIP-SVD: %d matrices, %d singular values trained (%.4f%% of %d), SVD took "
                 "%.1f s", len(targets), adapter.num_trainable(),
                 100 * adapter.trainable_fraction(), base_count, seconds)
        choosing = sum(adapter.executions().values())
        log.info("CLIP-SVD execution %s: %d matrices choose recompose or factored per call "
                 "(logged at first use), %d always recompose (fused q/k/v, attention output "
                 "read by nn.MultiheadAttention)", config.execution, choosing,
                 len(targets) - choosing)
        return adapter

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return {t.key: t.s for t in self.targets}

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def describe(self) -> list[dict[str, Any]]:
        return [{"key": t.key, "encoder": t.encoder, "layer": t.layer, "matrix": t.matrix,
                 "module": f"{t.module_path}.{t.param_name}"
                 + (f"[block {t.block}]" if t.parametrization.num_blocks > 1 else ""),
                 "shape": list(t.shape), "trained": t.s.numel()} for t in self.targets]

    def target(self, key: str) -> SVDTarget:
        for t in self.targets:
            if t.key == key:
                return t
        raise KeyError(key)

    def set_execution(self, mode: str) -> None:
        """Force "recompose" or "factored" on every layer that can choose, or "auto" (default).
        Fused q/k/v blocks and attention output projections always recompose."""
        if mode not in EXECUTIONS:
            raise ModelError(f"CLIP-SVD execution {mode!r} invalid; choose from {EXECUTIONS}")
        for t in self.targets:
            t.parametrization.execution = mode

    def executions(self) -> dict[str, bool]:
        """Per adapted key: whether its layer can choose the factored form."""
        out = {}
        for t in self.targets:
            module = self.model.get_submodule(t.module_path)
            out[t.key] = getattr(module.forward, "__func__", None) is _adaptive_linear_forward
        return out

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Compute each adapted weight once per block of code (one training step's forward
        and backward, or a whole evaluation) instead of at every attribute access."""
        with parametrize.cached():
            yield
