"""The interface every way of changing a backbone implements (CLIP-SVD now, LoRA later).

An adapter attaches to a model in place, freezes everything it does not train, and saves and
loads only what it trained, as safetensors with provenance (adapter kind, its config, the base
model's fingerprint) in the file header. Checking that header and every key's shape on load
turns "wrong model for this adapter file" into a clear ModelError instead of a silent mix-up.
"""
from __future__ import annotations

import contextlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Mapping

import torch
from safetensors import safe_open
from torch import nn

from ..errors import ModelError
from ..io import write_safetensors


def config_from_options(cls, data: Mapping[str, Any] | None) -> Any:
    """An adapter config dataclass from plain options; unknown keys are one ModelError naming
    them and the known ones (``cls.label`` names the method)."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    extra = sorted(set(data) - known)
    if extra:
        raise ModelError(f"unknown {cls.label} option(s) {extra}; known: {sorted(known)}")
    return cls(**data)

FORMAT_VERSION = "1"


class Adapter(ABC):
    """Shared behaviour: parameter bookkeeping, safetensors save/load with header checks.

    Subclasses set ``kind``, implement :meth:`attach`, :meth:`named_trainable` (stable
    readable key → parameter) and :meth:`describe`, and keep ``self.model``,
    ``self.config`` and ``self.base_fingerprint``.
    """

    kind: ClassVar[str] = "adapter"

    model: nn.Module
    config: Any
    base_fingerprint: str
    base_num_parameters: int

    @classmethod
    @abstractmethod
    def attach(cls, model: nn.Module, config: Any) -> "Adapter":
        """Modify ``model`` in place and freeze every parameter the adapter does not train."""

    @abstractmethod
    def named_trainable(self) -> dict[str, nn.Parameter]:
        """Trained parameters under stable, readable keys (the keys of saved files)."""

    @abstractmethod
    def describe(self) -> list[dict[str, Any]]:
        """One row per adapted matrix: encoder, layer, matrix, shape, trained count."""

    def config_dict(self) -> dict[str, Any]:
        """The adapter's configuration as JSON-able data (stored in saved files)."""
        return {}

    def cached(self) -> ContextManager[None]:
        """Context for one training step or an evaluation in which adapted weights may be
        computed once and reused; adapters without such weights need nothing."""
        return contextlib.nullcontext()

    def prompt_templates(self, templates) -> tuple[str, ...]:
        """The prompts the adapted model is scored with: the dataset's templates, except for
        a prompt learner, whose own prompt replaces them."""
        return tuple(templates)

    # Whether training sets ``descriptions`` (per class, sentences) first (BiomedCoOp).
    needs_descriptions = False
    # Whether every image has its own class prompts (CoCoOp): logits then come from
    # ``conditioned_logits(loaded, class_names, templates, image_features, scale)``.
    image_conditioned = False

    def extra_loss(self, loaded, class_names, text: torch.Tensor,
                   image_features: torch.Tensor | None = None,
                   logits: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """A term the method adds to the cross-entropy of a step, from the step's class text
        features, image features, logits and logit scale (KgCoOp's distance to the
        hand-written prompts, BiomedCoOp's description terms); none for most methods."""
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named_trainable().values())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def trainable_fraction(self) -> float:
        """Trained count over the base model's parameter count (buffers not counted)."""
        return self.num_trainable() / max(self.base_num_parameters, 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only what was trained: detached CPU copies keyed like :meth:`named_trainable`."""
        return {key: p.detach().to("cpu").clone().contiguous()
                for key, p in self.named_trainable().items()}

    def metadata(self) -> dict[str, str]:
        return {
            "adapter_kind": self.kind,
            "adapter_config": json.dumps(self.config_dict(), sort_keys=True),
            "model_fingerprint": self.base_fingerprint,
            "num_trainable": str(self.num_trainable()),
            "format_version": FORMAT_VERSION,
        }

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        """Write the trained tensors atomically; ``metadata`` (str → str) joins the header.

        The adapter's own keys (kind, config, fingerprint) win over the caller's, so a file
        always says truthfully what produced it.
        """
        header = {str(k): str(v) for k, v in (metadata or {}).items()}
        header.update(self.metadata())
        write_safetensors(path, self.state_dict(), header)

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, str]:
        """The header of a saved adapter file, without loading its tensors."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"adapter file {path} not found")
        try:
            with safe_open(str(path), framework="pt") as handle:
                return dict(handle.metadata() or {})
        except Exception as exc:
            raise ModelError(f"adapter file {path} is not a readable safetensors file: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             ) from exc

    def load(self, path: str | os.PathLike, check_fingerprint: bool = True) -> dict[str, str]:
        """Load a saved file into this attached adapter; returns the file's header.

        Refuses (ModelError naming the file) another adapter kind, a missing or unexpected
        key, a shape mismatch (expected vs found), and, with ``check_fingerprint``, a file
        trained on a base model of other weights or architecture
        (:func:`clipsvd.models.model_fingerprint`).
        """
        path = Path(path)
        header = self.read_metadata(path)
        found_kind = header.get("adapter_kind")
        if found_kind != self.kind:
            raise ModelError(f"adapter file {path} holds a {found_kind or 'unknown'!s} adapter, "
                             f"not {self.kind}; load it with the matching method")
        expected = self.named_trainable()
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            for key in [k for k in expected if k not in keys]:
                raise ModelError(f"adapter file {path} lacks key {key!r} (shape "
                                 f"{tuple(expected[key].shape)}): it was trained with another "
                                 "model or adapter configuration")
            for key in sorted(keys - set(expected)):
                raise ModelError(f"adapter file {path} has key {key!r} that this model/adapter "
                                 "does not have: it was trained with another model or "
                                 "adapter configuration")
            tensors = {key: handle.get_tensor(key) for key in expected}
        for key, tensor in tensors.items():
            want = tuple(expected[key].shape)
            if tuple(tensor.shape) != want:
                raise ModelError(f"adapter file {path}: key {key!r} expected shape {want}, found "
                                 f"{tuple(tensor.shape)}; it was trained with another model")
        found_fp = header.get("model_fingerprint")
        if check_fingerprint and found_fp and found_fp != self.base_fingerprint:
            raise ModelError(f"adapter file {path} was trained on base model {found_fp} "
                             f"(architecture and weights), but this model is "
                             f"{self.base_fingerprint}; load the same model and pretrained "
                             "weights it was trained with")
        with torch.no_grad():
            for key, tensor in tensors.items():
                parameter = expected[key]
                parameter.copy_(tensor.to(device=parameter.device, dtype=parameter.dtype))
        return header


def freeze(model: nn.Module) -> None:
    """requires_grad False on every parameter (adapters then enable only their own)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def has_adapter(model: nn.Module) -> bool:
    """True when an adapter is attached: a parametrized weight (CLIP-SVD) or a module an
    adapter put in place (marked with a true class attribute ``is_adapter_module``)."""
    from torch.nn.utils import parametrize

    return any(parametrize.is_parametrized(m) or getattr(m, "is_adapter_module", False)
               for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    """Parameters of a model (buffers excluded), each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total
