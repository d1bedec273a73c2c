"""Full fine-tuning of the chosen encoders: every weight trains.

Not one of the paper's methods: the upper reference of the miniature's ablations (what the
same budget buys when nothing is held fixed), run by the same training loop as the adapters.
Its file holds every trained tensor (about the model's size), under the parameter names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from ..errors import ModelError
from .base import Adapter, count_parameters, freeze
from .svd import ENCODERS

# Parameters of neither tower: the learned temperature (never trained by any method here).
NOT_AN_ENCODER = ("logit_scale", "logit_bias")


def encoder_of(name: str) -> str | None:
    """The tower a parameter of an open_clip model belongs to (CLIP and CustomTextCLIP)."""
    if name in NOT_AN_ENCODER:
        return None
    return "vision" if name.startswith("visual.") else "text"


@dataclass
class FullFinetuneConfig:
    label: ClassVar[str] = "full fine-tuning"
    encoders: tuple[str, ...] = ("vision", "text")

    def __post_init__(self) -> None:
        self.encoders = (self.encoders,) if isinstance(self.encoders, str) else tuple(self.encoders)
        if not self.encoders or any(e not in ENCODERS for e in self.encoders):
            raise ModelError(f"{self.label} encoders {list(self.encoders)} invalid; choose from "
                             f"{list(ENCODERS)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "FullFinetuneConfig" | None):
        if isinstance(data, cls):
            return data
        data = dict(data or {})
        extra = sorted(set(data) - {"encoders"})
        if extra:
            raise ModelError(f"unknown {cls.label} option(s) {extra}; known: ['encoders']")
        return cls(**data)


class FullFinetuneAdapter(Adapter):
    kind = "full_finetune"

    def __init__(self, model: nn.Module, config: FullFinetuneConfig,
                 trained: dict[str, nn.Parameter], base_fingerprint: str, base_num_parameters: int):
        self.model = model
        self.config = config
        self.trained = trained
        self.base_fingerprint = base_fingerprint
        self.base_num_parameters = base_num_parameters

    @classmethod
    def attach(cls, model: nn.Module, config: Any = None) -> "FullFinetuneAdapter":
        from ..models import model_fingerprint

        config = FullFinetuneConfig.from_dict(config)
        base_fingerprint = model_fingerprint(model)
        freeze(model)
        trained = {name: p for name, p in model.named_parameters()
                   if encoder_of(name) in config.encoders}
        for parameter in trained.values():
            parameter.requires_grad_(True)
        return cls(model, config, trained, base_fingerprint, count_parameters(model))

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.trained)

    def describe(self) -> list[dict[str, Any]]:
        return [{"encoder": encoder_of(name), "layer": None, "matrix": name,
                 "shape": list(p.shape), "trained": p.numel()} for name, p in self.trained.items()]

    def config_dict(self) -> dict[str, Any]:
        return {"encoders": list(self.config.encoders)}
