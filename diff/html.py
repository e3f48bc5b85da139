"""A picture of a DiffReport: one self-contained HTML file (inline CSS and SVG, the curve as
an inline PNG; nothing is fetched), and the hidden-state divergence curve as a PNG.

The page: the diagnosis, the two files, a heat map of each tensor's relative error (layers as
rows, tensor kinds as columns, log10 colour scale; a defect is outlined and named), the
per-stage divergence of the hidden states along the logit path against its tolerance, and the
findings. Every string that comes from a file is escaped.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from apr import names
from apr.atomic import atomic_file
from apr.errors import AprError

from . import report as R

LOG_MIN, LOG_MAX = -8.0, 0.0           # colour scale: rel L2 1e-8 (and identical) .. 1
OTHER = "model"                         # the row of tensors outside the layers


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _colour(rel: float | None) -> str:
    """Blue (identical) through yellow to red (rel L2 1 or more), on log10(rel L2)."""
    if rel is None:
        return "#dddddd"
    t = 0.0 if rel <= 0 else (min(max(math.log10(rel), LOG_MIN), LOG_MAX) - LOG_MIN) / (LOG_MAX - LOG_MIN)
    stops = [(0.0, (49, 54, 149)), (0.5, (254, 224, 144)), (1.0, (165, 0, 38))]
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            u = (t - t0) / (t1 - t0)
            return "#%02x%02x%02x" % tuple(round(a + (b - a) * u) for a, b in zip(c0, c1))
    return "#a50026"


def _cells(report: R.DiffReport) -> tuple[list[str], list[str], dict[tuple[str, str], R.TensorFinding]]:
    """(row labels, column labels, {(row, column): finding}) for the heat map."""
    family = (report.a.config or report.b.config or {}).get("family")
    cells: dict[tuple[str, str], R.TensorFinding] = {}
    rows: list[str] = []
    cols: list[str] = []
    for f in report.tensors:
        found = names.kind_of(f.name, family) or names.kind_of(f.name)
        if found is not None:
            kind, layer = found
            row, col = (f"layer {layer}" if layer is not None else OTHER), kind.kind
        else:
            row, col = OTHER, f.name
        cells[(row, col)] = f
        if row not in rows:
            rows.append(row)
        if col not in cols:
            cols.append(col)
    layers = sorted((r for r in rows if r != OTHER), key=lambda r: int(r.split()[1]))
    return ([OTHER] if OTHER in rows else []) + layers, cols, cells


def heat_map_svg(report: R.DiffReport) -> str:
    rows, cols, cells = _cells(report)
    cw, ch, left, top = 26, 18, 80, 150
    width = max(left + cw * len(cols) + 20, left + 9 * 30 + 260)
    height = top + ch * len(rows) + 60
    out = [f'<svg id="heatmap" xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height}" font-family="sans-serif" font-size="11">']
    for j, col in enumerate(cols):
        x = left + j * cw + cw / 2
        out.append(f'<text x="{x}" y="{top - 6}" transform="rotate(-60 {x} {top - 6})">'
                   f'{_esc(col)}</text>')
    for i, row in enumerate(rows):
        y = top + i * ch
        out.append(f'<text x="{left - 6}" y="{y + ch - 5}" text-anchor="end">{_esc(row)}</text>')
        for j, col in enumerate(cols):
            f = cells.get((row, col))
            if f is None:
                continue
            rel = f.stats.rel_l2 if f.stats is not None else None
            what = f"{f.name}: {f.defect or f.relation}" + (
                f", rel L2 {rel:.2e}" if rel is not None else "") + f" — {f.message}"
            stroke = ' stroke="#000" stroke-width="2.5"' if f.defect else ' stroke="#fff"'
            cls = "cell defect" if f.defect else "cell"
            out.append(f'<rect class="{cls}" data-tensor="{_esc(f.name)}" '
                       f'data-defect="{_esc(f.defect or "")}" x="{left + j * cw}" y="{y}" '
                       f'width="{cw}" height="{ch}" fill="{_colour(0.0 if rel is None and not f.defect else rel)}"'
                       f'{stroke}><title>{_esc(what)}</title></rect>')
            if f.defect:
                out.append(f'<text x="{left + j * cw + cw / 2}" y="{y + ch - 5}" '
                           'text-anchor="middle" font-weight="bold" fill="#fff">!</text>')
    # legend: the colour scale
    ly = top + ch * len(rows) + 20
    for k in range(9):
        out.append(f'<rect x="{left + k * 30}" y="{ly}" width="30" height="12" '
                   f'fill="{_colour(10.0 ** (LOG_MIN + k))}"/>')
        out.append(f'<text x="{left + k * 30}" y="{ly + 26}">1e{int(LOG_MIN + k)}</text>')
    out.append(f'<text x="{left + 9 * 30 + 8}" y="{ly + 10}">rel L2 (outlined, "!": a defect)</text>')
    out.append("</svg>")
    return "\n".join(out)


def divergence_png(report: R.DiffReport) -> bytes:
    """The hidden-state divergence per stage (rel L2, log scale) with the tolerance."""
    lg = report.logits
    if not lg.ran or not lg.stages:
        raise AprError(f"no divergence curve: the logits were not compared ({lg.note or 'no stages'})")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    xs = list(range(len(lg.stages)))
    ys = [max(s.rel_l2, 1e-16) for s in lg.stages]
    ax.semilogy(xs, ys, marker="o", label="hidden state rel L2 (B vs A)")
    ax.axhline(max(lg.tolerance, 1e-16), color="tab:red", linestyle="--", label="tolerance")
    ax.set_xticks(xs)
    ax.set_xticklabels([s.stage for s in lg.stages], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("rel L2")
    ax.set_title("divergence along the logit path")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _findings_table(report: R.DiffReport) -> str:
    rows = [f"<tr><td>{_esc(f.name)}</td><td>{_esc(f.relation)}</td><td>{_esc(f.defect or '')}</td>"
            f"<td>{_esc(f.stats.rel_l2 if f.stats else '')}</td><td>{_esc(f.message)}</td></tr>"
            for f in report.tensors if f.defect or f.relation != R.IDENTICAL]
    rows += [f"<tr><td>config: {_esc(c.key)}</td><td></td><td>{_esc(c.defect or '')}</td><td></td>"
             f"<td>{_esc(c.message)}</td></tr>" for c in report.config]
    rows += [f"<tr><td>tokenizer: {_esc(t.what)}</td><td></td><td>{_esc(t.defect or '')}</td><td></td>"
             f"<td>{_esc(t.message)}</td></tr>" for t in report.tokenizer]
    if not rows:
        rows = ["<tr><td colspan='5'>every tensor identical, same config and tokenizer</td></tr>"]
    return ("<table id='findings'><tr><th>what</th><th>relation</th><th>defect</th>"
            "<th>rel L2</th><th>message</th></tr>" + "".join(rows) + "</table>")


CSS = """body{font-family:sans-serif;margin:24px;color:#222}
#diagnosis{font-size:18px;font-weight:bold;padding:12px;border-radius:6px}
.equivalent{background:#e4f4e4}.defect{background:#fbe3e0}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:left;vertical-align:top}h2{margin-top:28px}.files td{border:none}"""


def render_html(report: R.DiffReport) -> str:
    lg = report.logits
    if lg.ran and lg.stages:
        png = base64.b64encode(divergence_png(report)).decode()
        curve = f'<img id="divergence" alt="divergence curve" src="data:image/png;base64,{png}">'
    else:
        curve = f'<p id="divergence">The logits were not compared: {_esc(lg.note)}</p>'
    files = "".join(f"<tr><td><b>{side}</b></td><td>{_esc(s.path)}</td><td>{_esc(s.format)}, "
                    f"{s.tensors} tensors, tokenizer {_esc(s.tokenizer)}</td></tr>"
                    for side, s in (("A", report.a), ("B", report.b)))
    cls = "equivalent" if report.equivalent else "defect"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>apr-ref diff</title>"
            f"<style>{CSS}</style></head><body>"
            f"<div id='diagnosis' class='{cls}'>{_esc(report.diagnosis.line)}</div>"
            f"<table class='files'>{files}</table>"
            f"<h2>Tensors: relative error</h2>{heat_map_svg(report)}"
            f"<h2>Hidden states along the logit path</h2>{curve}"
            f"<h2>Findings</h2>{_findings_table(report)}</body></html>")


def write_report(report: R.DiffReport, path: str | Path) -> None:
    text = render_html(report)
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_plot(report: R.DiffReport, path: str | Path) -> None:
    data = divergence_png(report)            # an error before any file is made
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)
