"""Interpret one CLIP-SVD run folder: tables, heatmaps and a Markdown summary in interpret/."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .. import layout, timing
from ..adapters import attach
from ..config import StudyConfig
from ..data.store import PreparedStore
from ..devices import (batch_size_on_oom, gpu_memory_guard, model_to_device, resolve_device,
                       to_device)
from ..errors import ConfigError
from ..io import atomic_dir, atomic_path, read_json, write_json, write_text
from ..models import load_model
from .figures import head_heatmap, matrix_heatmap
from .spans import decompose, encode_texts, head_contributions, load_corpus, vision_parts
from .weights import encoder_depths, head_table, matrix_table, singular_value_table

log = logging.getLogger(__name__)

METHOD = "clip_svd"
# Files of an interpret/ folder.
FOLDER = "interpret"
SINGULAR_VALUES = "singular_value_changes.csv"
MATRICES = "matrix_changes.csv"
HEADS = "head_changes.csv"
DESCRIPTIONS = "head_descriptions.csv"
SPANS = "head_spans.csv"
MATRIX_HEATMAP = "matrix_heatmap.png"
HEAD_HEATMAP = "head_heatmap.png"
SUMMARY = "summary.md"
RECORD = "interpret.json"


def _csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def _test_images(store: PreparedStore, split: dict[str, Any], max_images: int,
                 seed: int) -> torch.Tensor:
    """uint8 test images (N, 3, H, W): the split's test set (and novel test set), a seeded
    random subset of at most ``max_images``, kept in store order."""
    ids = [str(i) for key in ("test", "test_novel") for i in split.get(key, [])
           if isinstance(split.get(key), list)]
    rows = store.rows(ids)
    if len(rows) > max_images:
        chosen = np.random.default_rng(seed).choice(len(rows), size=max_images, replace=False)
        rows = rows[np.sort(chosen)]
    return torch.from_numpy(np.ascontiguousarray(store.images[np.sort(rows)]))


def _batches(images: torch.Tensor, loaded, device: torch.device, batch_size: int):
    mean = torch.tensor(loaded.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std, device=device).view(1, 3, 1, 1)
    for start in range(0, len(images), batch_size):
        batch = to_device(images[start:start + batch_size], device).float().div_(255)
        if batch.shape[-1] != loaded.image_size or batch.shape[-2] != loaded.image_size:
            batch = F.interpolate(batch, size=(loaded.image_size, loaded.image_size),
                                  mode="bicubic", align_corners=False).clamp_(0, 1)
        yield (batch - mean) / std


def resolve_span_layers(span_layers: int | Sequence[int], depth: int) -> list[int]:
    """An int N: the last N blocks; a list: block indices (negative from the end)."""
    if isinstance(span_layers, int):
        if span_layers < 1:
            raise ConfigError(f"span_layers must be at least 1, got {span_layers}")
        return list(range(max(0, depth - span_layers), depth))
    layers = sorted({int(i) % depth for i in span_layers if -depth <= int(i) < depth})
    if not layers:
        raise ConfigError(f"span_layers {list(span_layers)} selects no block of {depth}")
    return layers


def describe_heads(before: dict[int, np.ndarray], after: dict[int, np.ndarray],
                   text_before: np.ndarray, text_after: np.ndarray, corpus: list[str],
                   heads: pd.DataFrame, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(head_descriptions, head_spans) for every head of the described layers."""
    ranks = {(int(r.layer), int(r.head)): (int(r.rank), float(r.ov_change))
             for r in heads[heads["encoder"] == "vision"].itertuples()}
    rows, spans = [], []
    for layer in sorted(before):
        for head in range(before[layer].shape[1]):
            picked = {}
            variance = {}
            for model, contributions, texts in (("original", before, text_before),
                                                ("adapted", after, text_after)):
                data = contributions[layer][:, head, :]
                variance[model] = float(((data - data.mean(0)) ** 2).sum(1).mean())
                picked[model] = decompose(data, texts, k)
            names = {m: [corpus[p.index] for p in picks] for m, picks in picked.items()}
            rank, change = ranks.get((layer, head), (None, 0.0))
            for model, picks in picked.items():
                other = set(names["adapted" if model == "original" else "original"])
                cumulative = 0.0
                for i, pick in enumerate(picks, start=1):
                    cumulative += pick.explained
                    rows.append({"encoder": "vision", "layer": layer, "head": head,
                                 "model": model, "pick": i, "description": corpus[pick.index],
                                 "explained": pick.explained, "cumulative": cumulative,
                                 "in_both": corpus[pick.index] in other, "head_rank": rank})
            shared = set(names["original"]) & set(names["adapted"])
            union = set(names["original"]) | set(names["adapted"])
            spans.append({
                "encoder": "vision", "layer": layer, "head": head, "head_rank": rank,
                "ov_change": change,
                "variance_original": variance["original"], "variance_adapted": variance["adapted"],
                "explained_original": sum(p.explained for p in picked["original"]),
                "explained_adapted": sum(p.explained for p in picked["adapted"]),
                "overlap": len(shared), "jaccard": len(shared) / len(union) if union else 1.0,
                "kept": " | ".join(n for n in names["adapted"] if n in shared),
                "new": " | ".join(n for n in names["adapted"] if n not in shared),
                "dropped": " | ".join(n for n in names["original"] if n not in shared)})
    descriptions = pd.DataFrame(rows)
    span_table = pd.DataFrame(spans)
    if not span_table.empty:
        span_table = span_table.sort_values(["head_rank", "layer", "head"], na_position="last",
                                            kind="stable").reset_index(drop=True)
    return descriptions, span_table


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def summary_markdown(record: dict[str, Any], matrices: pd.DataFrame, heads: pd.DataFrame,
                     descriptions: pd.DataFrame, spans: pd.DataFrame, top: int = 10,
                     top_heads: int = 4) -> str:
    lines = [f"# What CLIP-SVD changed: {record['run']}", "",
             f"{record['n_matrices']} adapted matrices, {record['n_values']} singular values. "
             "Relative change of a matrix = ‖Δs‖/‖s0‖ = ‖ΔW‖_F/‖W‖_F. Heads are ranked by the "
             "relative change of their value-output circuit W_out[:, head] · W_v[head, :] "
             "(heads are rows of the value projection and columns of the output projection, "
             "not blocks of sorted singular values).", "",
             f"## Most changed matrices (top {min(top, len(matrices))})", "",
             "| rank | matrix | ‖Δs‖/‖s0‖ (%) | mean abs(Δs/s0) (%) | max abs(Δs) | values up / down |",
             "|---|---|---|---|---|---|"]
    for r in matrices.head(top).itertuples():
        lines.append(f"| {r.rank} | {r.key} | {_pct(r.rel_change)} | {_pct(r.mean_abs_rel)} | "
                     f"{r.max_abs_delta:.4g} | {r.n_increased} / {r.n_decreased} |")
    lines += ["", f"## Most changed attention heads (top {min(top, len(heads))})", "",
              "| rank | encoder | layer | head | OV change (%) | value rows (%) | out columns (%) "
              "| QK change (%) |", "|---|---|---|---|---|---|---|---|"]
    for r in heads.head(top).itertuples():
        lines.append(f"| {r.rank} | {r.encoder} | {r.layer} | {r.head} | {_pct(r.ov_change)} | "
                     f"{_pct(r.v_rel)} | {_pct(r.out_rel)} | {_pct(r.qk_change)} |")
    if not spans.empty:
        lines += ["", "## Words for the most changed heads of the last vision layers", "",
                  f"Descriptions from a corpus of {record['corpus_size']} texts that explain most "
                  f"of the variance of each head's direct contribution to the image embedding "
                  f"over {record['n_images']} test images (TextSpan-style, greedy, orthogonalised;"
                  " % = share of the head's variance). Original: pretrained model and its text "
                  "encoder; adapted: the trained singular values in both encoders.", ""]
        for span in spans.head(top_heads).itertuples():
            rank = "" if pd.isna(span.head_rank) else f", change rank {int(span.head_rank)}"
            lines += [f"### Vision layer {span.layer}, head {span.head}{rank}", "",
                      f"OV change {_pct(span.ov_change)} %; variance original "
                      f"{span.variance_original:.4g}, adapted {span.variance_adapted:.4g}; "
                      f"explained by {record['k']} texts: {_pct(span.explained_original)} % → "
                      f"{_pct(span.explained_adapted)} %; {span.overlap} of {record['k']} shared.",
                      "", "| # | original | % | adapted | % |", "|---|---|---|---|---|"]
            part = descriptions[(descriptions.layer == span.layer)
                                & (descriptions["head"] == span.head)]
            before = part[part.model == "original"].reset_index(drop=True)
            after = part[part.model == "adapted"].reset_index(drop=True)
            for i in range(max(len(before), len(after))):
                cells = []
                for side in (before, after):
                    if i < len(side):
                        mark = "" if side.in_both[i] else " *"
                        cells += [f"{side.description[i]}{mark}", _pct(side.explained[i])]
                    else:
                        cells += ["", ""]
                lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
            lines.append("")
        lines.append("`*`: not among the other model's descriptions of this head.")
    lines.append("")
    return "\n".join(lines)


def interpret_run(cfg: StudyConfig, run_dir: Path, split_path: Path, store_dir: Path,
                  out_dir: Path, corpus_path: Path | None = None,
                  span_layers: int | Sequence[int] = 2, k: int = 5, max_images: int = 512,
                  device: torch.device | None = None) -> dict[str, Any]:
    """Interpret the CLIP-SVD adapter of ``run_dir`` (trained on the split in ``split_path``)
    and write interpret/ files into ``out_dir`` (replaced as a whole, atomically).

    ``span_layers``: the vision blocks whose heads get descriptions (an int N: the last N).
    ``k``: descriptions per head. ``max_images``: test images used (a seeded subset).
    ``device``: where to compute (the CLI passes the GPU slot it claimed); None resolves the
    study's ``device`` here. Returns the record also written to interpret.json.
    """
    started = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    split = read_json(split_path)
    dataset = split["dataset"]
    adapter_file = run_dir / layout.ADAPTER
    if not adapter_file.is_file():
        raise ConfigError(f"{run_dir} has no {layout.ADAPTER}; only CLIP-SVD runs can be "
                          "interpreted, after training")
    device_ = device or resolve_device(cfg.device)
    corpus = load_corpus(corpus_path)
    store = PreparedStore.open(store_dir)
    loaded = load_model(cfg.model.name, cfg.model.pretrained, cfg.model.init_seed)
    model = model_to_device(loaded.model, device_).eval()
    images = _test_images(store, split, max_images, int(split.get("seed", 0)))
    depth = len(vision_parts(model).blocks)
    layers = resolve_span_layers(span_layers, depth)
    log.info("interpret %s: %d test images, %d descriptions, vision layers %s", run_dir,
             len(images), len(corpus), layers)

    def contributions():
        with batch_size_on_oom("eval_batch_size", cfg.eval_batch_size, device_):
            return head_contributions(
                model, _batches(images, loaded, device_, cfg.eval_batch_size), layers)

    def texts():
        with gpu_memory_guard(device_, f"while encoding the {len(corpus)} descriptions",
                              "free the GPU of other processes, or set device: cpu in the "
                              "study config"):
            return encode_texts(model, loaded.tokenizer, corpus, device_)

    text_before = texts()
    before = contributions()
    log.info("original model: head contributions and %d text embeddings done (%.1f s)",
             len(corpus), time.perf_counter() - started)
    adapter = attach(METHOD, model, cfg.training(METHOD, dataset))
    adapter.load(adapter_file)
    model.eval()
    with adapter.cached():
        text_after = texts()
        after = contributions()
    log.info("adapted model: head contributions done (%.1f s)", time.perf_counter() - started)
    values = singular_value_table(adapter)
    matrices = matrix_table(values)
    heads = head_table(adapter)
    log.info("weight changes: %d matrices, %d heads (%.1f s)", len(matrices), len(heads),
             time.perf_counter() - started)
    descriptions, spans = describe_heads(before, after, text_before, text_after, corpus, heads, k)
    depths = encoder_depths(model)
    top_matrix = matrices.iloc[0] if len(matrices) else None
    top_head = heads.iloc[0] if len(heads) else None
    record = {
        "run": str(run_dir), "dataset": dataset, "split": str(split_path),
        "n_matrices": int(len(matrices)), "n_values": int(len(values)),
        "n_images": int(len(images)), "corpus": str(corpus_path or "clipsvd default"),
        "corpus_size": len(corpus), "span_layers": layers, "k": k,
        "top_matrix": None if top_matrix is None else {
            "key": top_matrix["key"], "rel_change": float(top_matrix["rel_change"])},
        "top_head": None if top_head is None else {
            "encoder": top_head["encoder"], "layer": int(top_head["layer"]),
            "head": int(top_head["head"]), "ov_change": float(top_head["ov_change"])},
        "ranked_by": {"matrices": "rel_change = |Δs|/|s0|", "heads": "ov_change"},
        "files": [SINGULAR_VALUES, MATRICES, HEADS, DESCRIPTIONS, SPANS, SUMMARY, RECORD],
    }
    with atomic_dir(out_dir) as tmp:
        _csv(values, tmp / SINGULAR_VALUES)
        _csv(matrices, tmp / MATRICES)
        _csv(heads, tmp / HEADS)
        _csv(descriptions, tmp / DESCRIPTIONS)
        _csv(spans, tmp / SPANS)
        if len(matrices):
            matrix_heatmap(matrices, depths, tmp / MATRIX_HEATMAP)
            record["files"].append(MATRIX_HEATMAP)
        if len(heads):
            head_heatmap(heads, depths, tmp / HEAD_HEATMAP)
            record["files"].append(HEAD_HEATMAP)
        record["seconds"] = round(time.perf_counter() - started, 2)
        timing.record("interpretation", time.perf_counter() - started)
        write_text(tmp / SUMMARY, summary_markdown(record, matrices, heads, descriptions, spans))
        write_json(tmp / RECORD, record)
    log.info("interpretation of %s written to %s (%.1f s)", run_dir, out_dir, record["seconds"])
    return record
