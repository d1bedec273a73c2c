"""Interpreting CLIP-SVD: which singular values moved, in which matrices and attention heads,
and what the most changed vision heads write into the image embedding, in words
(docs/interpretation.md).

- weights: singular-value changes per matrix, head-faithful attribution of ΔW = U diag(Δs) Vᵀ
- spans: per-head direct contributions to the image embedding, TextSpan-style decomposition
- run: one run folder → <run_dir>/interpret/; aggregate: over seeds, with spread
"""
from __future__ import annotations

from .aggregate import aggregate_interpretations
from .run import FOLDER, interpret_run
from .spans import decompose, default_corpus_path, head_contributions, load_corpus
from .weights import head_table, matrix_table, singular_value_table

__all__ = ["FOLDER", "aggregate_interpretations", "decompose", "default_corpus_path",
           "head_contributions", "head_table", "interpret_run", "load_corpus", "matrix_table",
           "singular_value_table"]
