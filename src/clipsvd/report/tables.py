"""Presentation tables: Markdown and LaTeX (booktabs) from the summaries, values in percent."""
from __future__ import annotations

import math

import pandas as pd

from .aggregate import AVERAGE, METRIC_LABELS, SETTING_LABELS, method_label

DASH = "–"


def pm(mean: float, std: float | None = None, scale: float = 100.0, digits: int = 2,
       n_seeds: int | None = None) -> str:
    """'80.00 ± 14.14' (percent by default); a dash for a missing value; no '±' for a single
    seed (there is no spread to show)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return DASH
    text = f"{scale * mean:.{digits}f}"
    if n_seeds == 1:
        return text
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {scale * std:.{digits}f}"
    return text


SIGNIFICANT = "†"
ONE_SEED = "(n = 1 seed)"


def accuracy_cell(mean: float, std: float, n_seeds: int, interval=None, mark: bool = False) -> str:
    """A main-table cell: 'mean ± std', or 'mean (n = 1 seed)'; the test-set bootstrap 95%
    interval '[low, high]' when given (cells with few seeds); † for a significant paired
    difference from CLIP-SVD."""
    text = pm(mean, std, n_seeds=n_seeds)
    if text == DASH:
        return text
    if interval is not None and not any(math.isnan(v) for v in interval):
        text += f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
    if n_seeds == 1:
        text += f" {ONE_SEED}"
    return text + (SIGNIFICANT if mark else "")


def dataset_label(dataset: str, n_datasets: int | None = None) -> str:
    if dataset == AVERAGE and n_datasets:
        return f"Average ({n_datasets} dataset{'s' if n_datasets != 1 else ''})"
    return dataset


class Table:
    """A caption, a header, rows of strings, optional bold cells (row, column), and how many
    leading columns hold names (left-aligned in LaTeX; the rest are numbers, right-aligned)."""

    def __init__(self, caption: str, header: list[str], rows: list[list[str]],
                 bold: set[tuple[int, int]] | None = None, note: str = "", text_columns: int = 2):
        self.caption, self.header, self.rows = caption, header, rows
        self.text_columns = text_columns
        self.bold = bold or set()
        self.note = note

    def markdown(self) -> str:
        def cell(i, j, text):
            return f"**{text}**" if (i, j) in self.bold else text

        lines = [f"**{self.caption}**", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(cell(i, j, c) for j, c in enumerate(row)) + " |"
                  for i, row in enumerate(self.rows)]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        def cell(i, j, text):
            text = latex_escape(text)
            return f"\\textbf{{{text}}}" if (i, j) in self.bold else text

        align = "l" * self.text_columns + "r" * (len(self.header) - self.text_columns)
        lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{latex_escape(self.caption)}}}",
                 f"\\begin{{tabular}}{{{align}}}", "\\toprule",
                 " & ".join(latex_escape(h) for h in self.header) + " \\\\", "\\midrule"]
        previous = None
        for i, row in enumerate(self.rows):
            if previous is not None and row[0] != previous and self.text_columns > 1:
                lines.append("\\midrule")
            previous = row[0]
            lines.append(" & ".join(cell(i, j, c) for j, c in enumerate(row)) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        if self.note:
            lines.append(f"\\par\\smallskip{{\\footnotesize {latex_escape(self.note)}}}")
        lines.append("\\end{table}")
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        from html import escape

        def cell(i, j, text):
            text = escape(text)
            return f"<td><b>{text}</b></td>" if (i, j) in self.bold else f"<td>{text}</td>"

        head = "".join(f"<th>{escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(cell(i, j, c) for j, c in enumerate(row)) + "</tr>"
                       for i, row in enumerate(self.rows))
        note = f"<p class='note'>{escape(self.note)}</p>" if self.note else ""
        return (f"<table><caption>{escape(self.caption)}</caption><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table>{note}")


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}", "±": r"$\pm$", "–": "--", "≥": r"$\geq$",
                 "−": "-", "×": r"$\times$",
                 "†": r"\textsuperscript{\dag}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _bold_best(rows: list[list[str]], values: list[list[float]], group_of, lower_better=False):
    """Bold the best value of each column within each group of rows (e.g. one dataset)."""
    bold = set()
    groups: dict = {}
    for i in range(len(rows)):
        groups.setdefault(group_of(i), []).append(i)
    n_cols = max((len(v) for v in values), default=0)
    for members in groups.values():
        for j in range(n_cols):
            scored = [(values[i][j], i) for i in members
                      if j < len(values[i]) and not math.isnan(values[i][j])]
            if len(scored) < 2:
                continue
            best = min(scored)[0] if lower_better else max(scored)[0]
            bold |= {(i, j) for v, i in scored if v == best}
    return bold


def accuracy_by_shots(table: pd.DataFrame, setting: str,
                      bootstrap: pd.DataFrame | None = None) -> Table:
    """Rows (dataset, method), columns K; accuracy mean ± std in %, best per column in bold.

    ``table`` is the wide table of aggregate.with_average (accuracy_mean/std columns);
    ``bootstrap`` (bootstrap.test_set_bootstrap) adds the test-set intervals of cells with
    fewer than FEW_SEEDS seeds and the † of significant paired differences from CLIP-SVD."""
    from .bootstrap import FEW_SEEDS, N_TEST_RESAMPLES

    intervals, marks, compared = {}, set(), set()
    if bootstrap is not None and len(bootstrap):
        # Keyed without the setting below: a dataset in both settings has a row of each.
        for r in bootstrap[bootstrap.setting == setting].itertuples(index=False):
            intervals[(r.dataset, r.method, r.shots)] = (r.ci_low, r.ci_high)
            if r.method != "zero_shot" and r.reference_shots == r.shots:
                compared.add(r.dataset)
                if r.significant is True:
                    marks.add((r.dataset, r.method, r.shots))
    shots = sorted(table.shots.unique())
    header = ["Dataset", "Method"] + [f"K={k}" for k in shots]
    rows, values, groups = [], [], []
    any_interval = any_mark = any_single = False
    for (dataset, method), part in table.groupby(["dataset", "method"], sort=False):
        by_k = part.set_index("shots")
        n_datasets = int(part.n_datasets.max()) if "n_datasets" in part else None
        cells, nums = [], []
        for k in shots:
            if k in by_k.index:
                n = int(by_k.loc[k, "n_seeds"])
                interval = intervals.get((dataset, method, k)) if n < FEW_SEEDS else None
                mark = (dataset, method, k) in marks
                any_interval |= interval is not None
                any_mark |= mark
                any_single |= n == 1
                cells.append(accuracy_cell(by_k.loc[k, "accuracy_mean"],
                                           by_k.loc[k, "accuracy_std"], n, interval, mark))
                nums.append(float(by_k.loc[k, "accuracy_mean"]))
            else:
                cells.append(DASH)
                nums.append(float("nan"))
        rows.append([dataset_label(dataset, n_datasets), method_label(method)] + cells)
        values.append([float("nan"), float("nan")] + nums)
        groups.append(dataset)
    bold = _bold_best(rows, values, lambda i: groups[i])
    what = "harmonic mean of base and novel accuracy" if setting == "base_to_novel" else "accuracy"
    notes = ["Zero-shot is K=0."]
    if set(groups) == {AVERAGE}:
        scope = f"averaged over {int(table.n_datasets.max())} datasets"
        notes.insert(0, AVERAGE_NOTE)
        notes.append("Best per K in bold.")
    else:
        scope = "per dataset"
        notes.append("Best per dataset and K in bold.")
    if any_single:
        notes.append(f"{ONE_SEED}: a single run, no spread over seeds.")
    if any_interval:
        notes.append(f"[low, high]: 95% interval from a bootstrap of the test images "
                     f"({N_TEST_RESAMPLES:,} resamples), shown for cells with fewer than "
                     f"{FEW_SEEDS} seeds.")
    test = ("paired test-set bootstrap over the seeds both methods have: the 95% interval of "
            "the difference excludes 0; it covers test-set sampling, not training randomness")
    if any_mark:
        notes.append(f"{SIGNIFICANT}: differs from CLIP-SVD at the same K ({test}).")
    elif compared & set(groups):
        notes.append(f"No method differs from CLIP-SVD at the same K ({test}).")
    return Table(f"{SETTING_LABELS.get(setting, setting)}: test {what} (%) by shots per class K, "
                 f"{scope}, mean ± std over seeds", header, rows, bold, note=" ".join(notes))


AVERAGE_NOTE = ("Average: mean of the per-dataset means; its std is the std over seeds of the "
                "per-seed average over datasets.")


def all_metrics(table: pd.DataFrame, setting: str, metrics: list[str]) -> Table:
    """Rows (dataset, method, K), one column per metric (mean ± std, %; ECE lower is better)."""
    metrics = [m for m in metrics if f"{m}_mean" in table.columns]
    header = ["Dataset", "Method", "K"] + [METRIC_LABELS.get(m, m) for m in metrics] + ["seeds"]
    rows = []
    for row in table.itertuples(index=False):
        r = row._asdict()
        n_datasets = r.get("n_datasets")
        rows.append([dataset_label(r["dataset"], n_datasets), method_label(r["method"]),
                     str(r["shots"])]
                    + [pm(r[f"{m}_mean"], r[f"{m}_std"], n_seeds=int(r["n_seeds"])) for m in metrics]
                    + [str(r["n_seeds"])])
    label = SETTING_LABELS.get(setting, setting)
    return Table(f"{label}: every metric (%), mean ± std over seeds",
                 header, rows, note=AVERAGE_NOTE + " ECE: expected calibration error "
                 "(15 equal-width bins), lower is better. With 1 seed a cell is that run's value "
                 "(no spread).")


def base_to_novel(table: pd.DataFrame) -> Table:
    """Rows (dataset, method, K): Base, Novel (mean ± std) and HM of the means, in %."""
    header = ["Dataset", "Method", "K", "Base", "Novel", "HM"]
    rows, values, groups = [], [], []
    for r in table.itertuples(index=False):
        rows.append([dataset_label(r.dataset, r.n_datasets), method_label(r.method), str(r.shots),
                     pm(r.base_mean, r.base_std, n_seeds=int(r.n_seeds)),
                     pm(r.novel_mean, r.novel_std, n_seeds=int(r.n_seeds)), pm(r.hm)])
        values.append([float("nan")] * 3 + [r.base_mean, r.novel_mean, r.hm])
        groups.append(r.dataset)
    bold = _bold_best(rows, values, lambda i: groups[i])
    note = ("HM is the harmonic mean of the mean base and mean novel accuracy (as in "
            "CoOp/CoCoOp/CLIP-SVD). " + AVERAGE_NOTE + " Best per dataset in bold.")
    present = set(table["method"]) if "method" in table else set()
    cached = [method_label(m) for m in CACHE_ONLY_BASE if m in present]
    if cached:
        note += (f" {' and '.join(cached)}: the cache holds base classes only, so novel classes "
                 "are scored with zero-shot's logits (their Novel is zero-shot's).")
    return Table("Base-to-novel: base and novel test accuracy (%, mean ± std over seeds) and "
                 "their harmonic mean (HM)", header, rows, bold, note=note)


# Methods whose novel-class logits in base-to-novel are zero-shot's (clipsvd.feature_adapters).
CACHE_ONLY_BASE = ("tip_adapter", "tip_adapter_f")


def comparison(table: pd.DataFrame) -> Table:
    """The paired comparison, differences in percentage points."""
    header = ["Setting", "CLIP-SVD vs", "Scope", "pairs", "CLIP-SVD", "Other", "Mean diff.",
              "95% CI", "p (Wilcoxon)", "Note"]
    rows = []
    for r in table.itertuples(index=False):
        ci = DASH if math.isnan(r.ci_low) else f"[{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]"
        p = DASH if math.isnan(r.p_value) else f"{r.p_value:.3g}"
        note = r.note
        if r.zero_shot_reused:
            note = "zero-shot run reused for every pair" + (f"; {note}" if note else "")
        rows.append([SETTING_LABELS.get(r.setting, r.setting), method_label(r.method), r.scope,
                     str(r.n_pairs), pm(r.mean_reference), pm(r.mean_other),
                     f"{100 * r.mean_difference:+.2f}", ci, p, note])
    from .stats import ASSUMPTIONS

    return Table("Paired comparison of CLIP-SVD with each method: accuracy difference in "
                 "percentage points (CLIP-SVD − other; base-to-novel: HM)", header, rows,
                 note=ASSUMPTIONS, text_columns=3)


def datasets(summary: pd.DataFrame) -> Table:
    """Per dataset: images, groups (patients, volumes) and classes of each split, then the test
    images each setting evaluated (from datasets.summary; per-class counts stay in the CSV)."""
    header = ["Dataset", "Split", "Images", "Groups", "Classes"]
    rows = []

    def number(value) -> str:
        return DASH if pd.isna(value) else str(int(value))

    totals = summary[summary.class_name == "(all)"]
    for r in totals.itertuples(index=False):
        rows.append([r.dataset, r.split, number(r.images), number(r.groups), number(r.classes)])
    return Table("Datasets: images, groups (patients or volumes) and classes per split, and the "
                 "test images each setting evaluated", header, rows,
                 note="Groups: distinct patients/volumes (a group is never in two splits). "
                      "'evaluated' rows: the test images every run of that setting was scored "
                      "on (base-to-novel: base and novel classes separately). Images per class "
                      "and split: datasets.csv.")


def per_class(table: pd.DataFrame, best: dict, setting: str) -> Table:
    """Per dataset, method (at its best K) and class: support, precision, recall, F1 (%)."""
    part = table[table.setting == setting]
    chosen = part[[best.get((d, setting, m)) == k for d, m, k in
                   zip(part.dataset, part.method, part.shots)]]
    b2n = setting == "base_to_novel"
    header = ["Dataset", "Method", "K"] + (["Classes"] if b2n else []) + [
        "Class", "Test images", "Precision", "Recall", "F1"]
    rows = []
    for r in chosen.itertuples(index=False):
        n = int(r.n_seeds)
        rows.append([r.dataset, method_label(r.method), str(r.shots)] + (
            [r.group] if b2n else []) + [r.class_name, str(r.support),
                                         pm(r.precision_mean, r.precision_std, n_seeds=n),
                                         pm(r.recall_mean, r.recall_std, n_seeds=n),
                                         pm(r.f1_mean, r.f1_std, n_seeds=n)])
    label = SETTING_LABELS.get(setting, setting)
    return Table(f"{label}: per-class precision, recall and F1 (%) on the test set, each method "
                 "at its best K, mean ± std over seeds", header, rows,
                 note="Best K: the highest mean accuracy (ties: the smaller K). F1 per run is "
                      "2PR/(P+R); every K is in per_class.csv.",
                 text_columns=5 if b2n else 4)


def render(tables: list[Table], kind: str) -> str:
    if kind == "md":
        return "\n".join(t.markdown() for t in tables)
    return "% Requires \\usepackage{booktabs}\n" + "\n".join(t.latex() for t in tables)
