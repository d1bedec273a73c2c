"""CoOp: learned context vectors in place of the words of a hand-written prompt.

The prompt of class c is ``"<ctx_init> <c>."`` ("a photo of a neutrophil."); the token
embeddings of ctx_init's words are replaced, in every prompt of that form, by ``n_ctx`` trained
vectors shared by all classes (CoOp's unified context, class token at the end). The
replacement happens at the output of the text tower's word-embedding table, through a forward
hook, so one mechanism serves every tower clipsvd loads:

- OpenAI-style open_clip text transformers (``token_embedding``, then the positional
  embedding, the causal mask and end-of-text pooling, unchanged);
- BiomedCLIP's Hugging Face BERT tower (``text.transformer.embeddings.word_embeddings``: BERT
  adds its own position and token-type embeddings to what the hook returns, and pools [CLS],
  exactly as when context vectors are given to it as ``inputs_embeds``);
- mini-clip (an open_clip text transformer with its own word-level tokenizer).

Only rows whose tokens at the context positions are ctx_init's are changed, so any other text
the model encodes (interpretation's descriptions, say) is untouched. Initialised from ctx_init's
own embeddings, the adapted model's text features equal the plain model's for the same
prompts, bit for bit (tests/test_prompt_learning.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .base import Adapter, config_from_options, count_parameters, freeze

CONTEXT = "clipsvd_context"  # the context vectors' name on the word-embedding module
# Where open_clip models keep their text tower's word embeddings, in the order tried.
WORD_EMBEDDINGS = ("token_embedding", "text.token_embedding",
                   "text.transformer.embeddings.word_embeddings")


def word_embeddings(model: nn.Module) -> tuple[str, nn.Embedding]:
    for path in WORD_EMBEDDINGS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Embedding):
            return path, module
    raise ModelError(f"{type(model).__name__} has no text word-embedding table at "
                     f"{', '.join(WORD_EMBEDDINGS)}; CoOp needs one to put its context in")


def context_tokens(tokenizer: Callable[[list[str]], torch.Tensor], ctx_init: str
                   ) -> tuple[int, torch.Tensor]:
    """(position of the first context token, ctx_init's token ids) in a tokenised prompt:
    what the tokenizer puts before a text (a start token, or nothing) is read off the empty
    text's tokens."""
    def ids(text: str) -> torch.Tensor:
        row = tokenizer([text])[0]
        return row[row != 0]  # every tokenizer here pads with 0
    empty, full = ids(""), ids(ctx_init)
    prefix = 1 if len(empty) >= 2 else 0  # [start, end] around nothing
    n = len(full) - len(empty)
    if n <= 0:
        raise ModelError(f"ctx_init {ctx_init!r} has no tokens; give the words the context "
                         "starts from, e.g. 'a photo of a'")
    return prefix, full[prefix:prefix + n].clone()


@dataclass
class CoOpConfig:
    label: ClassVar[str] = "CoOp"
    n_ctx: int = 4
    ctx_init: str = "a photo of a"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "CoOpConfig" | None) -> "CoOpConfig":
        if isinstance(data, cls):
            return data
        return config_from_options(cls, data)

    def template(self) -> str:
        return f"{self.ctx_init} {{}}."


class CoOpAdapter(Adapter):
    """The context vectors (n_ctx × the text tower's width, float32) are all that trains."""

    kind = "coop"
    config_class: ClassVar[type[CoOpConfig]] = CoOpConfig

    def __init__(self, model: nn.Module, config: CoOpConfig, start: int,
                 ids: torch.Tensor, embedding_path: str, base_fingerprint: str,
                 base_num_parameters: int):
        self.model = model
        self.config = config
        self.start = start
        self.ids = ids
        self.embedding_path = embedding_path
        self.base_fingerprint = base_fingerprint
        self.base_num_parameters = base_num_parameters
        self.injecting = True
        self.row_shift: torch.Tensor | None = None  # CoCoOp: a shift of the context per row

    @contextlib.contextmanager
    def hand_written(self) -> Iterator[None]:
        """The frozen model's own prompts: no context injected inside."""
        self.injecting = False
        try:
            yield
        finally:
            self.injecting = True

    @classmethod
    def attach(cls, model: nn.Module, config: Any = None,
               tokenizer: Callable[[list[str]], torch.Tensor] | None = None) -> "CoOpAdapter":
        from ..models import model_fingerprint

        config = cls.config_class.from_dict(config)
        if tokenizer is None:
            raise ModelError(f"{config.label} needs the model's tokenizer to find its context "
                             "words")
        if getattr(model, "_clipsvd_prompt_adapter", False):
            raise ModelError("this model already has an adapter attached; load a fresh model "
                             "before attaching another")
        start, ids = context_tokens(tokenizer, config.ctx_init)
        if len(ids) != config.n_ctx:
            raise ModelError(f"{config.label} n_ctx is {config.n_ctx} but ctx_init "
                             f"{config.ctx_init!r} is {len(ids)} tokens; set n_ctx to {len(ids)} "
                             "or change ctx_init")
        path, embedding = word_embeddings(model)
        base_fingerprint = model_fingerprint(model)
        base_count = count_parameters(model)
        freeze(model)
        ctx = nn.Parameter(embedding.weight.detach()[ids.to(embedding.weight.device)]
                           .float().clone())
        # Registered on the embedding table, so it moves with the model to its device.
        embedding.register_parameter(CONTEXT, ctx)
        adapter = cls(model, config, start, ids, path, base_fingerprint, base_count)
        embedding.register_forward_hook(adapter._inject)
        model._clipsvd_prompt_adapter = True
        return adapter

    def _inject(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.injecting:
            return output
        (tokens,) = inputs
        span = slice(self.start, self.start + len(self.ids))
        if tokens.shape[1] < span.stop:
            return output
        # Which rows are the context's prompts, on the device: no host sync per step.
        rows = (tokens[:, span] == self.ids.to(tokens.device)).all(dim=1)
        ctx = getattr(module, CONTEXT).to(output.dtype)
        if self.row_shift is None:
            placed = torch.zeros_like(output[:1])
            placed[:, span] = ctx
        else:  # every row its own context: ctx + its shift (one per text row)
            placed = torch.zeros_like(output)
            placed[:, span] = ctx.unsqueeze(0) + self.row_shift.to(output.dtype).unsqueeze(1)
        where = torch.zeros(output.shape[:2], dtype=torch.bool, device=output.device)
        where[:, span] = rows.unsqueeze(1)
        return torch.where(where.unsqueeze(-1), placed, output)

    def prompt_templates(self, templates) -> tuple[str, ...]:
        return (self.config.template(),)

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return {"ctx": self.model.get_submodule(self.embedding_path).get_parameter(CONTEXT)}

    def describe(self) -> list[dict[str, Any]]:
        ctx = self.named_trainable()["ctx"]
        return [{"encoder": "text", "layer": None, "matrix": f"{self.embedding_path} (context)",
                 "shape": list(ctx.shape), "trained": ctx.numel()}]

    def config_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self.config, f.name) for f in fields(self.config)}


@dataclass
class KgCoOpConfig(CoOpConfig):
    label: ClassVar[str] = "KgCoOp"
    w: float = 8.0


def knowledge_distance(learned: torch.Tensor, hand_written: torch.Tensor) -> torch.Tensor:
    """KgCoOp's term: 1 − the mean over classes of the cosine between the learned prompts'
    text features and the hand-written prompts' (for unit vectors, half their mean squared
    distance), as its public code computes it."""
    return 1.0 - F.cosine_similarity(learned.float(), hand_written.float(), dim=1,
                                     eps=1e-7).mean()


class KgCoOpAdapter(CoOpAdapter):
    """CoOp whose text features are held near the frozen model's for the hand-written
    prompt "<ctx_init> <class>." (weight ``w``)."""

    kind = "kgcoop"
    config_class = KgCoOpConfig

    def extra_loss(self, loaded, class_names, text: torch.Tensor, image_features=None,
                   logits=None, scale=None) -> torch.Tensor:
        key = tuple(class_names)
        cached = getattr(self, "_hand_written", {})
        if key not in cached:
            from ..models import encode_class_prompts

            with self.hand_written(), torch.no_grad():
                cached[key] = encode_class_prompts(loaded, list(class_names),
                                                   [self.config.template()],
                                                   text.device).float()
            self._hand_written = cached
        return self.config.w * knowledge_distance(text, cached[key])


@dataclass
class BiomedCoOpConfig(CoOpConfig):
    label: ClassVar[str] = "BiomedCoOp"
    sccm_lambda: float = 1.0
    kdsp_lambda: float = 1.0
    tau: float = 1.5


def kept_descriptions(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """BiomedCoOp's pruning: description i is kept where its score's z-score (from the median
    and the median absolute deviation), standardised again over the descriptions, is at most
    ``tau`` in size. The standardisation makes the MAD step cancel, so this is
    ``|s - mean s| <= tau * std s``, which also holds where the public code divides by a zero
    MAD (equal scores: every description is kept, not none) and runs on the device."""
    if scores.numel() < 2:  # one description: no spread to prune by
        return torch.ones_like(scores, dtype=torch.bool)
    return (scores - scores.mean()).abs() <= tau * scores.std()


def biomedcoop_terms(text: torch.Tensor, image_features: torch.Tensor, logits: torch.Tensor,
                     descriptions: torch.Tensor, scale: torch.Tensor, tau: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(SCCM, KDSP) before their λ: the mean squared difference between the learned prompts'
    unit text features (C×D) and the unit mean of each class's description features
    (``descriptions``: C×N×D, unit rows), and KL(zero-shot ‖ learned) summed and divided by
    the logits' size, where the zero-shot logits use the unit mean of the descriptions kept by
    ``kept_descriptions`` (scored, as published, by the batch mean of each description's best
    class logit)."""
    feats = F.normalize(image_features.float(), dim=-1)
    scale = scale.float()
    per = scale * torch.einsum("bd,cnd->bnc", feats, descriptions)  # B×N×C
    scores = per.max(dim=2).values.mean(dim=0)
    kept = kept_descriptions(scores, tau).to(descriptions.dtype)
    teacher = F.normalize((descriptions * kept[None, :, None]).sum(1), dim=-1)
    zero_shot = scale * feats @ teacher.t()
    sccm = F.mse_loss(text.float(), F.normalize(descriptions.mean(1), dim=-1))
    kdsp = F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(zero_shot, dim=1),
                    reduction="sum", log_target=True) / logits.numel()
    return sccm, kdsp


class BiomedCoOpAdapter(CoOpAdapter):
    """CoOp held to each class's descriptions: their mean text feature (SCCM) and the
    zero-shot logits of the descriptions that survive pruning (KDSP), both from the frozen
    model. The descriptions (``descriptions``: per class, in the split's class order) are
    set before training (clipsvd.descriptions)."""

    kind = "biomedcoop"
    config_class = BiomedCoOpConfig
    needs_descriptions = True
    descriptions: list[list[str]] | None = None

    def description_features(self, loaded, class_names, device) -> torch.Tensor:
        """C×N×D unit text features of the frozen model, computed once per class list."""
        key = tuple(class_names)
        cached = getattr(self, "_description_features", {})
        if key not in cached:
            if self.descriptions is None or len(self.descriptions) != len(class_names):
                raise ModelError(f"{self.config.label} needs one list of descriptions per "
                                 "class before training; set adapter.descriptions")
            flat = [s for sentences in self.descriptions for s in sentences]
            with self.hand_written(), torch.no_grad():
                tokens = loaded.tokenizer(flat).to(device)
                feats = F.normalize(loaded.model.encode_text(tokens).float(), dim=-1)
            cached[key] = feats.reshape(len(class_names), len(self.descriptions[0]), -1)
            self._description_features = cached
        return cached[key]

    def extra_loss(self, loaded, class_names, text: torch.Tensor, image_features=None,
                   logits=None, scale=None) -> torch.Tensor:
        descriptions = self.description_features(loaded, class_names, text.device)
        sccm, kdsp = biomedcoop_terms(text, image_features, logits, descriptions, scale,
                                      self.config.tau)
        return self.config.sccm_lambda * sccm + self.config.kdsp_lambda * kdsp


@dataclass
class CoCoOpConfig(CoOpConfig):
    label: ClassVar[str] = "CoCoOp"


# Text rows per text-tower forward when scoring many images (each image has its own prompts).
CONDITIONED_ROWS = 1024


class CoCoOpAdapter(CoOpAdapter):
    """CoOp whose context is shifted, per image, by a meta-network of that image's unit
    feature (Linear(D, D/16), ReLU, Linear(D/16, width), float32): every image gets its own
    class prompts, so its logits come from :meth:`conditioned_logits`, not from one text
    feature per class."""

    kind = "cocoop"
    config_class = CoCoOpConfig
    image_conditioned = True
    META = "clipsvd_meta_net"  # the meta-network's name on the word-embedding module

    @classmethod
    def attach(cls, model: nn.Module, config: Any = None,
               tokenizer: Callable[[list[str]], torch.Tensor] | None = None) -> "CoCoOpAdapter":
        adapter = super().attach(model, config, tokenizer=tokenizer)
        embedding = model.get_submodule(adapter.embedding_path)
        width = getattr(embedding, CONTEXT).shape[1]
        with torch.no_grad():  # the joint space's size: what the text tower returns
            dim = model.encode_text(tokenizer([""]).to(embedding.weight.device)).shape[-1]
        hidden = max(1, dim // 16)
        meta = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, width)).to(embedding.weight.device)
        embedding.add_module(cls.META, meta)
        return adapter

    @property
    def meta_net(self) -> nn.Module:
        return self.model.get_submodule(f"{self.embedding_path}.{self.META}")

    def conditioned_logits(self, loaded, class_names, templates, image_features: torch.Tensor,
                           scale: torch.Tensor) -> torch.Tensor:
        """B×C float32 logits: image i against the prompts built with ctx + meta(f_i)."""
        from ..models import format_prompts

        prompts = format_prompts(list(class_names), list(templates))
        n_classes = len(class_names)
        if len(prompts) != n_classes:
            raise ModelError(f"{self.config.label} scores one prompt per class; got "
                             f"{len(templates)} templates")
        tokens = loaded.tokenizer(prompts).to(image_features.device)
        feats = F.normalize(image_features.float(), dim=-1)
        step = max(1, CONDITIONED_ROWS // n_classes)
        out = []
        for start in range(0, len(feats), step):
            chunk = feats[start:start + step]
            self.row_shift = self.meta_net(chunk).float().repeat_interleave(n_classes, dim=0)
            try:
                text = loaded.model.encode_text(tokens.repeat(len(chunk), 1))
            finally:
                self.row_shift = None
            text = F.normalize(text.float(), dim=-1).reshape(len(chunk), n_classes, -1)
            out.append(scale.float() * torch.einsum("bd,bcd->bc", chunk, text))
        return torch.cat(out) if out else feats.new_zeros(0, n_classes)

    def named_trainable(self) -> dict[str, nn.Parameter]:
        trained = super().named_trainable()
        trained.update({f"meta_net.{k}": p for k, p in self.meta_net.named_parameters()})
        return trained

    def describe(self) -> list[dict[str, Any]]:
        rows = super().describe()
        for name, p in self.meta_net.named_parameters():
            rows.append({"encoder": "text", "layer": None, "matrix": f"meta_net.{name}",
                         "shape": list(p.shape), "trained": p.numel()})
        return rows
