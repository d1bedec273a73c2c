"""Ways of changing a backbone behind one interface (attach, trainable parameters, save/load).

``ADAPTERS`` maps a study method name to its adapter class, ``CONFIGS`` to its config class;
:func:`config_for` and :func:`attach` build either from a method's options.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from torch import nn

from ..errors import ModelError
from .base import Adapter, count_parameters, freeze, has_adapter
from .comp_lora import CompLoRAAdapter, CompLoRAConfig, protected_rank
from .full import FullFinetuneAdapter, FullFinetuneConfig
from .lora import LoRAAdapter, LoRAConfig
from .prompt import (BiomedCoOpAdapter, BiomedCoOpConfig, CoCoOpAdapter, CoCoOpConfig,
                     CoOpAdapter, CoOpConfig, KgCoOpAdapter, KgCoOpConfig)
from .svd import SVDAdapter, SVDConfig, TargetSelection

ADAPTERS: dict[str, type[Adapter]] = {"clip_svd": SVDAdapter, "clip_lora": LoRAAdapter,
                                      "comp_lora": CompLoRAAdapter,
                                      "full_finetune": FullFinetuneAdapter, "coop": CoOpAdapter,
                                      "kgcoop": KgCoOpAdapter, "biomedcoop": BiomedCoOpAdapter,
                                      "cocoop": CoCoOpAdapter}
CONFIGS: dict[str, Any] = {"clip_svd": SVDConfig, "clip_lora": LoRAConfig,
                           "comp_lora": CompLoRAConfig, "full_finetune": FullFinetuneConfig,
                           "coop": CoOpConfig, "kgcoop": KgCoOpConfig,
                           "biomedcoop": BiomedCoOpConfig, "cocoop": CoCoOpConfig}
# Adapters that put context into the prompts: they need the model's tokenizer to attach.
PROMPT_LEARNERS = ("coop", "cocoop", "kgcoop", "biomedcoop")


def config_for(method: str, options: Mapping[str, Any] | Any = None) -> TargetSelection:
    """The adapter config of ``method`` from its options (a mapping or a dataclass such as the
    study's method settings); options the adapter does not use (lr, batch_size, ...) belong to
    training and are ignored here."""
    if method not in CONFIGS:
        raise ModelError(f"method {method!r} has no adapter; adapter methods are "
                         f"{', '.join(ADAPTERS)}")
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        options = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    config_class = CONFIGS[method]
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class.from_dict({k: v for k, v in dict(options or {}).items() if k in names})


def attach(method: str, model: nn.Module, options: Mapping[str, Any] | Any = None,
           tokenizer=None) -> Adapter:
    """Attach ``method``'s adapter to ``model`` (in place), configured from ``options``; a
    prompt learner also needs the model's ``tokenizer``."""
    if method in PROMPT_LEARNERS:
        return ADAPTERS[method].attach(model, config_for(method, options), tokenizer=tokenizer)
    return ADAPTERS[method].attach(model, config_for(method, options))


__all__ = ["ADAPTERS", "CONFIGS", "PROMPT_LEARNERS", "Adapter", "CoOpAdapter", "CoOpConfig",
           "CompLoRAAdapter", "CompLoRAConfig", "LoRAAdapter",
           "LoRAConfig", "SVDAdapter", "SVDConfig", "TargetSelection", "attach", "config_for",
           "count_parameters", "freeze", "has_adapter", "protected_rank"]
