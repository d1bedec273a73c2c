"""The paper's feature-side baselines: Tip-Adapter, Tip-Adapter-F, LP++ and CLIP-Adapter.

They adapt on the store's frozen, L2-normalised image features (the ``features`` rule), so no
training image is encoded again per run, and they run on the CPU in seconds. Their recipes are
the published biomedical ones (BiomedCoOp's configs for BiomedCLIP; docs/methods.md has the
table and where clipsvd differs from that code). Everything a method chooses, it chooses on
the split's validation support set; the test set is only scored.

Zero-shot logits here are the study's own (``scale · f · tᵀ`` with its logit scale), so with
its cache weight at 0 Tip-Adapter is exactly zero-shot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def zero_shot_logits(scale: float, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return scale * features @ text.t()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


# --- Tip-Adapter and Tip-Adapter-F ---------------------------------------------------------

def cache_logits(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 beta: float) -> torch.Tensor:
    """exp(−β (1 − f·kᵀ)) · L: each support image votes for its class by its affinity."""
    return torch.exp(-beta * (1.0 - features @ keys.t())) @ values


def tip_logits(zero_shot: torch.Tensor, features: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return zero_shot + alpha * cache_logits(features, keys, values, beta)


def search_values(scale: float, steps: int) -> list[float]:
    """The published search grid: ``steps`` values from 0.1 up to (not including) ``scale``."""
    return [0.1 + i * (scale - 0.1) / steps for i in range(steps)]


def search_alpha_beta(zero_shot: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor, betas: list[float],
                      alphas: list[float]) -> tuple[float, float, float]:
    """(β, α, accuracy) with the best validation accuracy; ties to the smaller β, then the
    smaller α (the published search's order: the first best it meets)."""
    alpha_t = torch.tensor(alphas, dtype=zero_shot.dtype).view(-1, 1, 1)
    best = (-1.0, betas[0], alphas[0])
    for beta in betas:
        cache = cache_logits(features, keys, values, beta)
        predicted = (zero_shot.unsqueeze(0) + alpha_t * cache.unsqueeze(0)).argmax(-1)
        scores = (predicted == labels.unsqueeze(0)).float().mean(1)
        i = int(scores.argmax())  # the first of the best α for this β
        if float(scores[i]) > best[0]:
            best = (float(scores[i]), beta, alphas[i])
    return best[1], best[2], best[0]


def fine_tune_keys(keys: torch.Tensor, values: torch.Tensor, features: torch.Tensor,
                   labels: torch.Tensor, zero_shot: torch.Tensor, alpha: float, beta: float,
                   settings, seed: int, val: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Tip-Adapter-F: the cache keys as a trained layer (AdamW, cosine over every step), at
    the initial α and β; the keys of the epoch with the best validation accuracy are kept
    (the first such epoch; the last epoch without validation images)."""
    generator = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(keys.clone())
    optimizer = torch.optim.AdamW([weight], lr=settings.lr, eps=settings.eps,
                                  weight_decay=settings.weight_decay)
    batches = math.ceil(len(labels) / settings.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs * batches)
    val_x, val_y, val_zero_shot = val
    best_accuracy, best_keys, best_epoch, losses = -1.0, weight.detach().clone(), 0, []
    for epoch in range(settings.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), settings.batch_size):
            index = order[start:start + settings.batch_size]
            logits = tip_logits(zero_shot[index], features[index], weight, values, alpha, beta)
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        if len(val_y):
            with torch.no_grad():
                score = accuracy(tip_logits(val_zero_shot, val_x, weight, values, alpha, beta),
                                 val_y)
            if score > best_accuracy:
                best_accuracy, best_keys, best_epoch = score, weight.detach().clone(), epoch + 1
        else:
            best_keys, best_epoch = weight.detach().clone(), epoch + 1
    return best_keys, {"epoch_kept": best_epoch, "losses": losses}


# --- LP++ ---------------------------------------------------------------------------------

def lp_pp_step_sizes(features: torch.Tensor, text: torch.Tensor) -> tuple[float, float]:
    """LP++'s closed-form step sizes: for the visual weights 4N / λ_max(FᵀF), for the blending
    vector N / (4 · max_c Σ_i (f_i·t_c)²)."""
    n = features.shape[0]
    gram = (features.t() @ features).double()
    lr_w = 4 * n / float(torch.linalg.eigvalsh(gram).max())
    text_scores = features @ text.t()
    lr_alpha = n / (4 * float((text_scores ** 2).sum(0).max()))
    return lr_w, lr_alpha


def lp_pp_initial_alpha(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                        n_classes: int, factor: float) -> float:
    """The blending vector's starting value: ``factor`` × the mean, over classes c and
    prompts j, of the class-c mean of f·t_j (each class's K cancels in the published rule)."""
    scores = features @ text.t()
    means = torch.stack([scores[labels == c].mean(0) for c in range(n_classes)])
    return float(factor * means.mean())


@dataclass
class LinearProbePlusPlus:
    """logits = f·Wᵀ + b + (f·tᵀ) ⊙ α, one α per class."""
    weight: torch.Tensor
    bias: torch.Tensor
    alpha: torch.Tensor
    text: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.t() + self.bias + (features @ self.text.t()) * self.alpha


def fit_lp_pp(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, n_classes: int,
              settings) -> LinearProbePlusPlus:
    """Full-batch training as published: the visual weights start at each class's sum of
    support features and take SGD steps (momentum 0.9) of the closed-form size every epoch;
    every ``alpha_every`` epochs α takes one gradient step of its own closed-form size. No
    validation search; the last epoch is kept.

    (The public code never clears α's gradient, so its α step is the sum of every gradient
    since the start; here it is the gradient at the step, block coordinate descent as the
    paper describes it.)"""
    lr_w, lr_alpha = lp_pp_step_sizes(features, text)
    one_hot = F.one_hot(labels, n_classes).to(features.dtype)
    weight = nn.Parameter(one_hot.t() @ features)
    bias = nn.Parameter(torch.zeros(n_classes, dtype=features.dtype))
    alpha0 = lp_pp_initial_alpha(features, labels, text, n_classes, settings.alpha_init_factor)
    alpha = nn.Parameter(torch.full((n_classes,), alpha0, dtype=features.dtype))
    optimizer = torch.optim.SGD([weight, bias], lr=lr_w, momentum=settings.momentum)
    text_scores = features @ text.t()
    losses = []
    for epoch in range(settings.epochs):
        logits = features @ weight.t() + bias + text_scores * alpha
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        alpha.grad = None
        loss.backward()
        optimizer.step()
        if (epoch + 1) % settings.alpha_every == 0:
            with torch.no_grad():
                alpha -= lr_alpha * alpha.grad
        losses.append(loss.item())
    return LinearProbePlusPlus(weight.detach(), bias.detach(), alpha.detach(), text,
                               {"lr_w": lr_w, "lr_alpha": lr_alpha, "alpha_init": alpha0,
                                "losses": losses})


# --- CLIP-Adapter --------------------------------------------------------------------------

class ClipAdapter(nn.Module):
    """A bottleneck MLP on the image feature, mixed back into it: ``r·A(f) + (1 − r)·f``."""

    def __init__(self, dim: int, reduction: int, ratio: float):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, dim, bias=False), nn.ReLU(inplace=True))
        self.ratio = ratio

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mixed = self.ratio * self.mlp(features) + (1 - self.ratio) * features
        return F.normalize(mixed, dim=-1)


def warmup_cosine(epoch: int, settings) -> float:
    """The learning rate of an epoch: a constant warm-up, then cosine over the rest (Dassl's
    ConstantWarmupScheduler around CosineAnnealingLR, stepped per epoch)."""
    if epoch < settings.warmup_epochs:
        return settings.warmup_lr
    return 0.5 * settings.lr * (1 + math.cos(math.pi * epoch / settings.epochs))


def fit_clip_adapter(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                     scale: float, settings, seed: int) -> tuple[ClipAdapter, dict[str, Any]]:
    """Cross-entropy on the support features, SGD with the warm-up cosine schedule; the last
    epoch is kept (as the published code scores it)."""
    torch.manual_seed(seed)
    adapter = ClipAdapter(features.shape[1], settings.reduction, settings.ratio)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=settings.lr,
                                momentum=settings.momentum, weight_decay=settings.weight_decay)
    losses = []
    for epoch in range(settings.epochs):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(epoch, settings)
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), settings.batch_size):
            index = order[start:start + settings.batch_size]
            logits = zero_shot_logits(scale, adapter(features[index]), text)
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    adapter.eval()
    return adapter, {"losses": losses}


def as_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# --- one interface for the evaluation ------------------------------------------------------

METHODS = ("tip_adapter", "tip_adapter_f", "lp_pp", "clip_adapter")


@dataclass
class Fitted:
    """A fitted feature-side method: logits for any class list, what it chose, its tensors."""
    method: str
    score: Any  # (features, class names) -> logits
    tensors: dict[str, torch.Tensor]
    chosen: dict[str, Any]

    def logits(self, features: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        return self.score(features, class_names)

    def save(self, path) -> None:
        from .io import write_safetensors

        write_safetensors(path, {k: v.contiguous() for k, v in self.tensors.items()},
                          {"method": self.method,
                           **{k: repr(v) for k, v in self.chosen.items()}})


def fit(method: str, settings, train_x: torch.Tensor, train_y: torch.Tensor,
        val_x: torch.Tensor, val_y: torch.Tensor, text_of, base_classes: list[str],
        scale: float, seed: int) -> Fitted:
    """Fit ``method`` on the support features; ``text_of(class names)`` gives the class text
    features (C×D, normalised). Classes other than the base ones (base-to-novel's novel
    classes) are scored by what the method can say about them: Tip-Adapter's cache holds base
    classes only, so novel classes get zero-shot's logits; CLIP-Adapter adapts the image
    feature, so it scores any class."""
    n_classes = len(base_classes)
    text = text_of(base_classes)
    chosen: dict[str, Any] = {}
    if method in ("tip_adapter", "tip_adapter_f"):
        values = F.one_hot(train_y, n_classes).float()
        keys = train_x.clone()
        alpha, beta = settings.init_alpha, settings.init_beta
        val_zero_shot = zero_shot_logits(scale, val_x, text)
        if method == "tip_adapter_f":
            keys, info = fine_tune_keys(keys, values, train_x, train_y,
                                        zero_shot_logits(scale, train_x, text), alpha, beta,
                                        settings, seed, (val_x, val_y, val_zero_shot))
            chosen["epoch_kept"] = info["epoch_kept"]
        if len(val_y):
            betas = search_values(settings.search_scale[0], settings.search_step[0])
            alphas = search_values(settings.search_scale[1], settings.search_step[1])
            with torch.no_grad():
                beta, alpha, score = search_alpha_beta(val_zero_shot, val_x, val_y, keys,
                                                       values, betas, alphas)
            chosen["tip_val_accuracy"] = round(score, 6)
        chosen.update(tip_alpha=alpha, tip_beta=beta)

        def tip(features, class_names):
            zero_shot = zero_shot_logits(scale, features, text_of(class_names))
            if list(class_names) != base_classes:
                return zero_shot
            return tip_logits(zero_shot, features, keys, values, alpha, beta)
        return Fitted(method, tip, {"keys": keys, "values": values}, chosen)
    if method == "lp_pp":
        model = fit_lp_pp(train_x, train_y, text, n_classes, settings)
        chosen.update(lp_lr_w=model.info["lr_w"], lp_lr_alpha=model.info["lr_alpha"],
                      lp_alpha_init=model.info["alpha_init"])

        def lp(features, class_names):
            if list(class_names) != base_classes:
                raise ValueError("LP++ has weights only for the classes it was trained on")
            return model.logits(features)
        return Fitted(method, lp, {"weight": model.weight, "bias": model.bias,
                                                 "alpha": model.alpha}, chosen)
    if method == "clip_adapter":
        adapter, _ = fit_clip_adapter(train_x, train_y, text, scale, settings, seed)

        def clip_adapter(features, class_names):
            with torch.no_grad():
                return zero_shot_logits(scale, adapter(features), text_of(class_names))
        return Fitted(method, clip_adapter,
                      {k: v.detach() for k, v in adapter.state_dict().items()}, chosen)
    raise ValueError(f"not a feature-side method: {method}")
