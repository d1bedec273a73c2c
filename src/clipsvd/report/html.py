"""The report as one self-contained HTML page: inline CSS, images as data: URIs, no scripts and
no external resources, so it opens offline and can be mailed or archived as a single file."""
from __future__ import annotations

import base64
from html import escape
from pathlib import Path

import yaml

from .tables import Table

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #d62728;padding-bottom:.2em}
h2{margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:14px}caption{text-align:left;font-weight:600;
padding:.3em 0}th,td{border-top:1px solid #ddd;border-bottom:1px solid #ddd;padding:.25em .6em;
text-align:left}thead th{border-bottom:2px solid #444;background:#f6f6f6}
td{font-variant-numeric:tabular-nums}.note{font-size:13px;color:#555;max-width:60em}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;
color:#555}pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:12px}
nav a{margin-right:1em}.kv td:first-child{font-weight:600}
"""


def data_uri(path: Path) -> str:
    kind = "svg+xml" if Path(path).suffix == ".svg" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def key_values(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='kv'><tbody>{body}</tbody></table>"


def render_page(study: str, config: dict | None, config_facts: list[tuple[str, str]],
                sections: list[tuple[str, list[Table]]], comparison: Table | None,
                figures: list[tuple[Path, str]], provenance: dict, interpretation: str = "",
                datasets: Table | None = None) -> str:
    """sections: (title, tables); figures: (SVG or PNG path, caption; the PNG beside an SVG is
    named under it); interpretation: the HTML of :func:`interpretation_section` or empty;
    datasets: the dataset table."""
    parts = [f"<h1>Study report: {escape(study)}</h1>",
             f"<p>Generated {escape(provenance.get('report_date', ''))} by clipsvd "
             f"{escape(provenance.get('report_packages', {}).get('clipsvd', ''))} from "
             f"{provenance.get('n_runs', 0)} runs.</p>",
             "<nav><a href='#config'>Configuration</a><a href='#datasets'>Datasets</a>"
             "<a href='#tables'>Tables</a>"
             "<a href='#statistics'>Statistics</a><a href='#figures'>Figures</a>"
             + ("<a href='#interpretation'>Interpretation</a>" if interpretation else "")
             + "<a href='#provenance'>Provenance</a></nav>",
             "<h2 id='config'>Configuration</h2>", key_values(config_facts)]
    if config is not None:
        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
        parts.append(f"<details><summary>Full resolved configuration</summary><pre>"
                     f"{escape(text)}</pre></details>")
    parts.append("<h2 id='datasets'>Datasets</h2>")
    parts.append(datasets.html() if datasets is not None and datasets.rows else
                 "<p>No dataset table: the runs' prepared stores were not found.</p>")
    parts.append("<h2 id='tables'>Tables</h2>")
    for title, tables in sections:
        parts.append(f"<h3>{escape(title)}</h3>")
        parts += [t.html() for t in tables]
    parts.append("<h2 id='statistics'>Statistics: paired comparison with CLIP-SVD</h2>")
    parts.append(comparison.html() if comparison is not None and comparison.rows else
                 "<p>No paired comparison: the study has no CLIP-SVD runs or no other method "
                 "with matching runs.</p>")
    parts.append("<h2 id='figures'>Figures</h2>")
    for path, caption in figures:
        files = f"{Path(path).name}" + (f", {Path(path).with_suffix('.png').name} (300 dpi)"
                                        if Path(path).suffix == ".svg" else "")
        parts.append(f"<figure><img src='{data_uri(path)}' alt='{escape(caption)}'>"
                     f"<figcaption>{escape(caption)} <span class='file'>Files: "
                     f"{escape(files)}.</span></figcaption></figure>")
    if interpretation:
        parts.append(interpretation)
    parts.append("<h2 id='provenance'>Provenance</h2>")
    parts.append(key_values([
        ("report date (UTC)", provenance.get("report_date", "")),
        ("git commit(s) of the runs", ", ".join(provenance.get("git_commits", [])) or "unknown"),
        ("uncommitted changes in any run", provenance.get("git_dirty", "unknown")),
        ("git commit of the report", provenance.get("report_git_commit", "unknown")),
        ("config hash(es) of the runs", ", ".join(provenance.get("config_hashes", [])) or
         "unknown"),
        ("config hash of the report's config", provenance.get("report_config_hash", "")),
        ("model(s)", ", ".join(provenance.get("models", []))),
        ("device(s)", ", ".join(provenance.get("devices", []))),
    ]))
    packages = provenance.get("packages", {})
    if packages:
        parts.append(key_values([(name, ", ".join(versions))
                                 for name, versions in sorted(packages.items())]))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{escape(study)} report</title><style>{CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


# --- Interpretation of CLIP-SVD (issue 9) ---------------------------------------------------
# Built from the aggregate that clipsvd.interpret.aggregate_interpretations wrote into the
# report's interpret/ folder; only the largest K per (dataset, setting) is shown on the page.

def interpretation_section(folder: Path, result: dict, top: int = 8, top_heads: int = 3) -> str:
    import pandas as pd

    from ..interpret.aggregate import (DESCRIPTION_SEEDS, HEAD_SEEDS, MATRIX_SEEDS,
                                       _select)

    def read(name: str) -> pd.DataFrame:
        try:
            return pd.read_csv(Path(folder) / name)
        except pd.errors.EmptyDataError:
            return pd.DataFrame()

    folder = Path(folder)
    matrices, heads, descriptions = (read(n) for n in (MATRIX_SEEDS, HEAD_SEEDS,
                                                        DESCRIPTION_SEEDS))
    largest: dict[tuple, dict] = {}
    for group in result["groups"]:
        key = (group["dataset"], group["setting"])
        if key not in largest or group["shots"] > largest[key]["shots"]:
            largest[key] = group
    parts = ["<h2 id='interpretation'>Interpretation of CLIP-SVD</h2>",
             "<p class='note'>Which singular values CLIP-SVD moved (relative change of a matrix "
             "‖Δs‖/‖s0‖ = ‖ΔW‖<sub>F</sub>/‖W‖<sub>F</sub>), which attention heads changed "
             "(relative change of a head's value-output circuit; heads are rows of the value "
             "projection and columns of the output projection), and descriptions from a text "
             "corpus that explain most of the variance of each last-layer vision head's direct "
             "contribution to the image embedding, before and after adaptation (count = seeds "
             "whose top descriptions include the text). Mean ± sample std over seeds; shown for "
             "the largest K of each dataset and setting, every K is in the interpret/ folder "
             "(docs/interpretation.md).</p>"]
    for (dataset, setting), group in sorted(largest.items()):
        n = group["n_seeds"]
        parts.append(f"<h3>{escape(dataset)}, {escape(setting)}, K = {group['shots']} "
                     f"({n} seed{'s' if n != 1 else ''})</h3>")
        parts.append(f"<figure><img src='{data_uri(folder / group['heatmap'])}' "
                     f"alt='relative change per layer and matrix'><figcaption>Relative change "
                     f"‖Δs‖/‖s0‖ (%) per layer and matrix, mean over seeds"
                     f"{' (± std)' if n > 1 else ''}; grey: not adapted.</figcaption></figure>")
        rows = [[str(r.order), r.key, f"{100 * r.rel_change_mean:.2f} ± {100 * r.rel_change_std:.2f}",
                 f"{r.rank_mean:.1f}"] for r in _select(matrices, group).head(top).itertuples()]
        parts.append(Table("Most changed matrices", ["#", "matrix", "‖Δs‖/‖s0‖ (%)",
                                                     "mean rank"], rows).html())
        chosen = _select(heads, group) if not heads.empty else heads
        if len(chosen):
            rows = [[str(r.order), r.encoder, str(r.layer), str(r.head),
                     f"{100 * r.ov_change_mean:.2f} ± {100 * r.ov_change_std:.2f}",
                     f"{r.rank_mean:.1f}"] for r in chosen.head(top).itertuples()]
            parts.append(Table("Most changed attention heads", ["#", "encoder", "layer", "head",
                                                                "OV change (%)", "mean rank"],
                               rows, text_columns=4).html())
        described = _select(descriptions, group) if not descriptions.empty else descriptions
        if len(chosen) and len(described):
            keys = set(zip(described["layer"], described["head"]))
            vision = chosen[chosen["encoder"] == "vision"]
            vision = vision[[(a, b) in keys for a, b in zip(vision["layer"], vision["head"])]]
            rows = []
            for r in vision.head(top_heads).itertuples():
                cells = []
                for model in ("original", "adapted"):
                    texts = described[(described["layer"] == r.layer)
                                      & (described["head"] == r.head)
                                      & (described["model"] == model)].head(group.get("k") or 5)
                    cells.append("; ".join(f"{d.description} ({d.n_seeds}/{d.of_seeds})"
                                           for d in texts.itertuples()))
                rows.append([f"layer {r.layer}, head {r.head}", *cells])
            parts.append(Table("Words for the most changed vision heads", [
                "head", "original model", "adapted model"], rows, text_columns=3).html())
    return "\n".join(parts)
