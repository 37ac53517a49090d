"""Rendering a built `Report` as one self-contained HTML page (figures as base64 PNG) and as Markdown."""
from __future__ import annotations

import base64
import html
import math
from typing import Any

import pandas as pd

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 1.5em 2em; color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f4f5f7; }
table.prov th { width: 12em; }
table.num td { text-align: right; font-variant-numeric: tabular-nums; }
table.num td.txt { text-align: left; }
figure { margin: 1em 0 2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #444; max-width: 70em; }
.skipped li, .notes li { margin-bottom: 0.3em; }
.warn { background: #fff7e0; border-left: 4px solid #f0b400; padding: 0.5em 0.9em; }
.scroll { overflow-x: auto; }
nav a { margin-right: 1em; }
.headline { background: #eef6ee; border-left: 4px solid #2e8b57; padding: 0.4em 0.9em 0.6em 0.9em; }
.headline table { font-size: 0.95em; margin: 0.3em 0; }
.headline th { background: none; border: none; padding: 2px 10px 2px 0; white-space: nowrap; }
.headline td { border: none; padding: 2px 0; }
.headline code { background: #fff; padding: 1px 4px; }
"""


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def _table_html(df: pd.DataFrame, cls: str = "num") -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            v = row[c]
            is_txt = not isinstance(v, (int, float)) or isinstance(v, bool)
            attr = ' class="txt"' if is_txt else ""
            cells.append(f"<td{attr}>{_esc(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>' + \
        "".join(body) + "</tbody></table></div>"


def _transposed(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """Rows become columns (headed by ``key``'s values): wide tables of few rows read better this way."""
    t = df.set_index(key).T.reset_index().rename(columns={"index": "field"})
    t.columns = ["field", *[f"{key} {c}" for c in t.columns[1:]]]
    return t


def _wide_table_html(df: pd.DataFrame, key: str) -> str:
    return _table_html(_transposed(df, key) if 0 < len(df) <= 12 else df)


def _table_md(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(c.replace("|", "/") for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "/").replace("\n", " ") for c in df.columns) + " |")
    return "\n".join(lines) + "\n"


def _env_frame(envs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    keys = ("device", "gpu_name", "gpu_driver", "cpu_model", "logical_cores", "torch_threads", "python", "torch",
            "timm", "optuna", "fvcore", "numpy", "cuda_runtime", "cudnn", "tpsexplore", "git_commit", "git_dirty",
            "float32_matmul_precision", "tf32_matmul", "os", "hostname")
    rows = []
    for key, env in envs.items():
        rows.append({"environment": key, **{k: env.get(k) for k in keys if env.get(k) is not None}})
    return pd.DataFrame(rows)


def _headline_html(rep: Any) -> str:
    rows = []
    for k, v in rep.headline:
        cell = f"<code>{_esc(v)}</code>" if k == "export" else _esc(v)
        rows.append(f"<tr><th>{_esc(k)}</th><td>{cell}</td></tr>")
    notes = getattr(rep.recommendation, "notes", ()) or ()
    tail = "".join(f"<p class=\"sub\">{_esc(n)}</p>" for n in notes)
    return (f'<div class="headline" id="headline"><h2 style="border:none;margin-top:0.4em">Recommended config</h2>'
            f"<table>{''.join(rows)}</table>{tail}<p class=\"sub\">{_esc(HEADLINE_RULE)}</p></div>")


HEADLINE_RULE = ("Rule: the most accurate trial within the budget; of the trials an exact McNemar test cannot tell "
                 "apart from it (p >= 0.05, same images), the cheapest in GMACs. Confirmed accuracies (mean over "
                 "fine-tune seeds) are used where the confirmation stage ran. Accuracies in percent with the 95% "
                 "Wilson interval; the drop's interval is Newcombe's for paired proportions.")


PARETO_TEXT = ("The front of the study's objectives over the trials within budget, most accurate first. Accuracy "
               "in percent with its 95% Wilson interval and n (digits as the interval supports); 'vs most "
               "accurate' is the exact McNemar test on the same images; cost in GMACs (analytic, one MAC = one "
               "FLOP, the papers' 'GFLOPs'); speed as the paired speed-up (reduced over the baseline measured "
               "beside it) with its range. Every raw measurement (columns kind@fidelity, kind@bs<batch>/<dtype>/"
               "<device>) is in pareto.csv and trials.csv.")


FLAGS_TEXT = ("Trials whose timing was taken on a loaded machine (other runnable processes, CPU steal, other GPU "
              "processes or throttling) or whose baseline, timed beside them, drifted more than 10% from the study's "
              "reference. Their paired speed-up is still usable (both sides saw the same load), but treat their raw "
              "img/s and ms with care.")


def render_html(rep: Any, generated: str) -> str:
    data = rep.study
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tpsexplore report: "
             f"{_esc(data.name)}</title><style>{CSS}</style></head><body>"]
    parts.append(f"<h1>tpsexplore report: {_esc(data.name)}</h1>")
    parts.append(f"<p class=\"sub\">Generated {_esc(generated)} by <code>tpsexplore report</code></p>")
    if data.is_proxy:
        parts.append('<p class="warn">Proxy task: the accuracies below are on the offline proxy data, not '
                     "ImageNet. They rank configurations; they are not ImageNet accuracies.</p>")
    parts.append(_headline_html(rep))
    nav = ["<a href=\"#headline\">Recommended</a>", "<a href=\"#provenance\">Provenance</a>",
           "<a href=\"#summary\">Summary</a>",
           "<a href=\"#figures\">Figures</a>", "<a href=\"#pareto\">Pareto-optimal configs</a>",
           "<a href=\"#speed-flags\">Speed flags</a>",
           "<a href=\"#skipped\">Skipped</a>"]
    parts.append("<nav>" + "".join(nav) + "</nav>")
    parts.append("<h2 id=\"provenance\">Provenance</h2><table class=\"prov\">")
    for k, v in rep.provenance:
        parts.append(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>")
    parts.append("</table>")
    parts.append("<h2 id=\"summary\">Summary: best config per method within budget</h2>")
    parts.append(_table_html(rep.summary) if rep.summary is not None and len(rep.summary) else "<p>(none)</p>")
    parts.append("<h2 id=\"figures\">Figures</h2>")
    for f in rep.figures:
        b64 = base64.b64encode(f.png.read_bytes()).decode("ascii")
        parts.append(f"<figure id=\"fig-{_esc(f.name)}\"><h3>{_esc(f.title)}</h3>"
                     f"<img alt=\"{_esc(f.title)}\" src=\"data:image/png;base64,{b64}\">"
                     f"<figcaption>{_esc(f.caption)} <em>(files: figures/{_esc(f.name)}.png, .svg)</em>"
                     "</figcaption></figure>")
    parts.append("<h2 id=\"pareto\">Pareto-optimal configs (within budget)</h2>")
    parts.append(f"<p>{_esc(PARETO_TEXT)}</p>")
    parts.append(_wide_table_html(rep.pareto_display, "trial") if rep.pareto_display is not None
                 and len(rep.pareto_display) else "<p>(none)</p>")
    parts.append(f"<h2 id=\"speed-flags\">Speed flags</h2><p>{_esc(FLAGS_TEXT)}</p>")
    parts.append(_table_html(rep.speed_flags) if rep.speed_flags is not None and len(rep.speed_flags)
                 else "<p>No trial's timing is flagged.</p>")
    if rep.environments:
        parts.append("<h3>Environments (hardware and software of the measurements)</h3>")
        parts.append(_wide_table_html(_env_frame(rep.environments), "environment"))
    if rep.published is not None and len(rep.published):
        parts.append("<h2 id=\"published\">Published points (ImageNet-1k, 224x224)</h2>")
        parts.append(_table_html(rep.published.rename(columns={"top1": "top-1 (%)", "gmacs": "GMACs"})))
    parts.append("<h2 id=\"skipped\">Skipped figures</h2>")
    if rep.skipped:
        parts.append("<ul class=\"skipped\">" + "".join(f"<li><b>{_esc(n)}</b>: {_esc(w)}</li>"
                                                     for n, w in rep.skipped) + "</ul>")
    else:
        parts.append("<p>None: the study's data allowed every figure.</p>")
    if rep.notes:
        parts.append("<h2>Notes</h2><ul class=\"notes\">" + "".join(f"<li>{_esc(n)}</li>" for n in rep.notes)
                     + "</ul>")
    parts.append("<p class=\"sub\">Files beside this page: report.md, trials.csv (every trial), pareto.csv, "
                 "figures/*.png and *.svg.</p></body></html>")
    return "\n".join(parts)


def render_markdown(rep: Any, generated: str) -> str:
    data = rep.study
    out = [f"# tpsexplore report: {data.name}", "", f"Generated {generated} by `tpsexplore report`.", ""]
    if data.is_proxy:
        out += ["> **Proxy task**: the accuracies are on the offline proxy data, not ImageNet. They rank "
                "configurations; they are not ImageNet accuracies.", ""]
    out += ["## Recommended config", "", "| | |", "|---|---|"]
    out += [f"| **{k}** | {('`' + v + '`') if k == 'export' else v.replace('|', '/')} |" for k, v in rep.headline]
    out += [""] + [f"_{n}_" for n in (getattr(rep.recommendation, "notes", ()) or ())] + [f"_{HEADLINE_RULE}_", ""]
    out += ["## Provenance", "", "| field | value |", "|---|---|"]
    out += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rep.provenance]
    summary = rep.summary if rep.summary is not None else pd.DataFrame()
    out += ["", "## Summary: best config per method within budget", "", _table_md(summary), "## Figures", ""]
    for f in rep.figures:
        out += [f"### {f.title}", "", f"![{f.title}](figures/{f.name}.png)", "", f"{f.caption} "
                f"([SVG](figures/{f.name}.svg))", ""]
    pareto = rep.pareto_display if rep.pareto_display is not None else pd.DataFrame()
    out += ["## Pareto-optimal configs (within budget)", "", PARETO_TEXT, "",
            _table_md(_transposed(pareto, "trial") if 0 < len(pareto) <= 12 else pareto)]
    flags = rep.speed_flags if rep.speed_flags is not None else pd.DataFrame()
    out += ["## Speed flags", "", FLAGS_TEXT, "",
            _table_md(flags) if len(flags) else "No trial's timing is flagged.\n"]
    if rep.environments:
        out += ["### Environments", "", _table_md(_transposed(_env_frame(rep.environments), "environment"))]
    if rep.published is not None and len(rep.published):
        out += ["## Published points (ImageNet-1k, 224x224)", "",
                _table_md(rep.published.rename(columns={"top1": "top-1 (%)", "gmacs": "GMACs"}))]
    out += ["## Skipped figures", ""]
    out += [f"- **{n}**: {w}" for n, w in rep.skipped] or ["None: the study's data allowed every figure."]
    if rep.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in rep.notes]
    return "\n".join(out) + "\n"
