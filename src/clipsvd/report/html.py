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
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def key_values(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='kv'><tbody>{body}</tbody></table>"


def render_page(study: str, config: dict | None, config_facts: list[tuple[str, str]],
                sections: list[tuple[str, list[Table]]], comparison: Table | None,
                figures: list[tuple[Path, str]], provenance: dict) -> str:
    """sections: (title, tables); figures: (png path, caption)."""
    parts = [f"<h1>Study report: {escape(study)}</h1>",
             f"<p>Generated {escape(provenance.get('report_date', ''))} by clipsvd "
             f"{escape(provenance.get('report_packages', {}).get('clipsvd', ''))} from "
             f"{provenance.get('n_runs', 0)} runs.</p>",
             "<nav><a href='#config'>Configuration</a><a href='#tables'>Tables</a>"
             "<a href='#statistics'>Statistics</a><a href='#figures'>Figures</a>"
             "<a href='#provenance'>Provenance</a></nav>",
             "<h2 id='config'>Configuration</h2>", key_values(config_facts)]
    if config is not None:
        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
        parts.append(f"<details><summary>Full resolved configuration</summary><pre>"
                     f"{escape(text)}</pre></details>")
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
        parts.append(f"<figure><img src='{data_uri(path)}' alt='{escape(caption)}'>"
                     f"<figcaption>{escape(caption)}</figcaption></figure>")
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
