"""A picture of a DiffReport: one self-contained HTML file (inline CSS and SVG, the curve as
an inline PNG; nothing is fetched, no script), and the hidden-state divergence curve as a PNG.

The page: the diagnosis, the two files, a heat map of each tensor's relative error (layers as
rows, tensor kinds as columns in the kind table's order, log10 colour scale; a defect is
outlined and numbered, and a key under the map names its class), the per-stage divergence of
the hidden states along the logit path against its tolerance, and the findings. Every string
that comes from a file (names, messages, paths, config values) is escaped.
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
KIND_ORDER = {k.kind: i for i, k in enumerate(names.TENSOR_KIND_ROWS)}
CELL_W, CELL_H = 34, 24
KEY_TENSORS = 3                          # tensors named per defect class under the map


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.2e}"


def _colour(rel: float | None) -> str:
    """Blue (identical) through yellow to red (rel L2 1 or more), on log10(rel L2); grey for
    a tensor without values compared (missing on one side, shapes differ)."""
    if rel is None:
        return "#c8c8c8"
    if math.isnan(rel):
        rel = math.inf
    t = 0.0 if rel <= 0 else (min(max(math.log10(rel), LOG_MIN), LOG_MAX) - LOG_MIN) / (LOG_MAX - LOG_MIN)
    stops = [(0.0, (49, 54, 149)), (0.5, (254, 224, 144)), (1.0, (165, 0, 38))]
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            u = (t - t0) / (t1 - t0)
            return "#%02x%02x%02x" % tuple(round(a + (b - a) * u) for a, b in zip(c0, c1))
    return "#a50026"


def _rel(f: R.TensorFinding) -> float | None:
    """The relative L2 a cell shows: None when no values were compared."""
    if f.stats is not None:
        return f.stats.rel_l2
    return None if f.defect else 0.0


def _cells(report: R.DiffReport) -> tuple[list[str], list[str], dict[tuple[str, str], R.TensorFinding]]:
    """(row labels, column labels, {(row, column): finding}) for the heat map: the non-layer
    tensors in row "model", then the layers in order; kinds in the kind table's order, names
    no kind has after them (in row "model")."""
    family = (report.a.config or report.b.config or {}).get("family")
    if not isinstance(family, str):
        family = None
    cells: dict[tuple[str, str], R.TensorFinding] = {}
    rows: set[str] = set()
    cols: dict[str, tuple[int, int]] = {}          # label -> sort key
    for n, f in enumerate(report.tensors):
        found = (names.kind_of(f.name, family) if family in names.FAMILIES else None) \
            or names.kind_of(f.name)
        if found is not None:
            kind, layer = found
            row, col = (f"layer {layer}" if layer is not None else OTHER), kind.kind
            key = (KIND_ORDER.get(col, len(KIND_ORDER)), 0)
        else:
            row, col, key = OTHER, f.name, (len(KIND_ORDER) + 1, n)
        cells[(row, col)] = f
        rows.add(row)
        cols.setdefault(col, key)
    layers = sorted((r for r in rows if r != OTHER), key=lambda r: int(r.split()[1]))
    return (([OTHER] if OTHER in rows else []) + layers,
            sorted(cols, key=lambda c: cols[c]), cells)


def _short(col: str) -> str:
    return col[:-len(".weight")] if col.endswith(".weight") else col


def _defect_classes(report: R.DiffReport) -> list[str]:
    """The defect classes of the tensors, most structural first: each gets a number."""
    present = {f.defect for f in report.tensors if f.defect}
    order = {c: i for i, c in enumerate(R.CLASS_PRIORITY)}
    return sorted(present, key=lambda c: (order.get(c, len(order)), c))


def heat_map_svg(report: R.DiffReport) -> str:
    rows, cols, cells = _cells(report)
    number = {c: i + 1 for i, c in enumerate(_defect_classes(report))}
    cw, ch = CELL_W, CELL_H
    left = 90
    top = 20 + 7 * max((len(_short(c)) for c in cols), default=4)
    legend_w = 9 * 36
    width = max(left + cw * len(cols) + 30, left + legend_w + 180)
    height = top + ch * len(rows) + 56
    out = [f'<svg id="heatmap" xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height}" font-family="sans-serif" font-size="12">']
    for j, col in enumerate(cols):
        x = left + j * cw + cw / 2 + 4
        out.append(f'<text x="{x}" y="{top - 6}" transform="rotate(-60 {x} {top - 6})">'
                   f'{_esc(_short(col))}</text>')
    for i, row in enumerate(rows):
        y = top + i * ch
        out.append(f'<text x="{left - 8}" y="{y + ch / 2 + 4}" text-anchor="end">{_esc(row)}</text>')
        for j, col in enumerate(cols):
            f = cells.get((row, col))
            if f is None:
                continue
            rel = _rel(f)
            what = f"{f.name}: {f.defect or f.relation}" + (
                f", rel L2 {rel:.2e}" if rel is not None else "") + f" — {f.message}"
            x = left + j * cw
            if f.defect:
                attrs = ' class="cell defect" stroke="#000" stroke-width="3"'
            else:
                attrs = ' class="cell" stroke="#fff" stroke-width="1"'
            out.append(f'<rect{attrs} data-tensor="{_esc(f.name)}" '
                       f'data-defect="{_esc(f.defect or "")}" x="{x}" y="{y}" '
                       f'width="{cw}" height="{ch}" fill="{_colour(rel)}">'
                       f'<title>{_esc(what)}</title></rect>')
            if f.defect:
                out.append(f'<text class="mark" x="{x + cw / 2}" y="{y + ch / 2 + 5}" '
                           f'text-anchor="middle" font-weight="bold" font-size="14" fill="#000" '
                           f'stroke="#fff" stroke-width="3" paint-order="stroke">'
                           f'{number[f.defect]}</text>')
    # legend: the colour scale
    ly = top + ch * len(rows) + 16
    for k in range(9):
        out.append(f'<rect x="{left + k * 36}" y="{ly}" width="36" height="14" '
                   f'fill="{_colour(10.0 ** (LOG_MIN + k))}"/>')
        label = ("≤" if k == 0 else "≥" if k == 8 else "") + f"1e{int(LOG_MIN + k)}"
        out.append(f'<text x="{left + k * 36 + 18}" y="{ly + 30}" text-anchor="middle">'
                   f'{label}</text>')
    out.append(f'<rect x="{left + legend_w + 12}" y="{ly}" width="14" height="14" '
               f'fill="{_colour(None)}"/>')
    out.append(f'<text x="{left + legend_w + 32}" y="{ly + 12}">no values compared</text>')
    out.append("</svg>")
    return "\n".join(out)


def _defect_key(report: R.DiffReport) -> str:
    """Under the map: each defect number, its class and the tensors it marks."""
    classes = _defect_classes(report)
    if not classes:
        return "<p id='defect-key'>No tensor is defective.</p>"
    items = []
    for i, c in enumerate(classes, 1):
        hit = [f.name for f in report.tensors if f.defect == c]
        shown = ", ".join(f"<code>{_esc(n)}</code>" for n in hit[:KEY_TENSORS])
        more = f" and {len(hit) - KEY_TENSORS} more" if len(hit) > KEY_TENSORS else ""
        items.append(f"<li><span class='num'>{i}</span> <b>{_esc(c)}</b> "
                     f"({len(hit)} tensor{'s' if len(hit) != 1 else ''}): {shown}{more}</li>")
    return f"<ul id='defect-key'>{''.join(items)}</ul>"


def divergence_png(report: R.DiffReport) -> bytes:
    """The hidden-state divergence per stage (rel L2, log scale) with the tolerance; the first
    divergent stage is marked. A stage where A and B agree exactly (rel L2 0) is drawn as a
    hollow marker on the bottom of the plot."""
    lg = report.logits
    if not lg.ran or not lg.stages:
        raise AprError(f"no divergence curve: the logits were not compared ({lg.note or 'no stages'})")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    values = [s.rel_l2 if math.isfinite(s.rel_l2) else math.inf for s in lg.stages]
    positive = [v for v in values + [lg.tolerance] if 0 < v < math.inf]
    floor = 10.0 ** (math.floor(math.log10(min(positive))) - 2) if positive else 1e-16
    xs = list(range(len(lg.stages)))
    ys = [min(max(v, floor), 1e3) for v in values]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    ax.semilogy(xs, ys, color="tab:blue", zorder=2)
    zero = [i for i, v in enumerate(values) if v <= 0]
    rest = [i for i in xs if i not in zero]
    ax.semilogy([xs[i] for i in rest], [ys[i] for i in rest], "o", color="tab:blue", zorder=3,
                label="hidden state rel L2, B against A")
    if zero:
        ax.semilogy([xs[i] for i in zero], [ys[i] for i in zero], "o", mfc="white",
                    color="tab:blue", zorder=3, label="identical (0)")
    if lg.tolerance > 0:
        ax.axhline(lg.tolerance, color="tab:red", linestyle="--",
                   label=f"tolerance {lg.tolerance:.1e}")
    first = next((i for i, s in enumerate(lg.stages) if s.stage == lg.first_divergent), None)
    if first is not None:
        ax.axvline(first, color="tab:orange", alpha=0.6, linewidth=6, zorder=1,
                   label=f"first divergent: {lg.first_divergent}")
    ax.set_xticks(xs)
    ax.set_xticklabels([s.stage for s in lg.stages], rotation=45 if len(xs) > 8 else 0,
                       ha="right" if len(xs) > 8 else "center", fontsize=8)
    ax.set_ylim(floor / 3, max(ys + [lg.tolerance]) * 5)
    ax.set_ylabel("rel L2")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.set_title("hidden-state divergence along the logit path", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _findings_table(report: R.DiffReport) -> str:
    rows = [f"<tr class='{'bad' if f.defect else ''}'><td><code>{_esc(f.name)}</code></td>"
            f"<td>{_esc(f.relation)}</td><td>{_esc(f.defect or '')}</td>"
            f"<td>{_num(f.stats.rel_l2 if f.stats else None)}</td><td>{_esc(f.message)}</td></tr>"
            for f in report.tensors if f.defect or f.relation != R.IDENTICAL]
    rows += [f"<tr class='{'bad' if c.defect else ''}'><td>config: <code>{_esc(c.key)}</code></td>"
             f"<td></td><td>{_esc(c.defect or '')}</td><td></td><td>{_esc(c.message)}</td></tr>"
             for c in report.config]
    rows += [f"<tr class='{'bad' if t.defect else ''}'><td>tokenizer: {_esc(t.what)}</td>"
             f"<td></td><td>{_esc(t.defect or '')}</td><td></td><td>{_esc(t.message)}</td></tr>"
             for t in report.tokenizer]
    identical = sum(f.relation == R.IDENTICAL and not f.defect for f in report.tensors)
    if not rows:
        rows = ["<tr><td colspan='5'>every tensor identical, same config and tokenizer</td></tr>"]
    elif identical:
        rows.append(f"<tr><td colspan='5'>{identical} other tensors identical</td></tr>")
    return ("<table id='findings'><tr><th>tensor / what</th><th>relation</th><th>defect</th>"
            "<th>rel L2</th><th>message</th></tr>" + "".join(rows) + "</table>")


def _config_text(c: dict | None) -> str:
    if not c:
        return "no model architecture"
    fields = (("family", "{}"), ("hidden_size", "hidden {}"), ("num_layers", "{} layers"),
              ("num_heads", "{} heads"), ("num_kv_heads", "{} kv heads"),
              ("vocab_size", "vocab {}"), ("rope_theta", "rope θ {}"))
    return ", ".join(fmt.format(c[k]) for k, fmt in fields if c.get(k) is not None)


def _files_table(report: R.DiffReport) -> str:
    rows = []
    for side, s in (("A", report.a), ("B", report.b)):
        dt = ", ".join(f"{n} {d}" for d, n in s.dtypes.items())
        rows.append(f"<tr><th>{side}</th><td><code>{_esc(s.path)}</code></td><td>{_esc(s.format)}</td>"
                    f"<td>{_esc(s.tensors)} ({_esc(dt)})</td><td>{_esc(_config_text(s.config))}</td>"
                    f"<td>{_esc(s.tokenizer)}</td></tr>")
    return ("<table id='files'><tr><th></th><th>file</th><th>format</th><th>tensors</th>"
            "<th>model</th><th>tokenizer</th></tr>" + "".join(rows) + "</table>")


def _logits_text(lg: R.LogitsReport) -> str:
    if not lg.ran:
        return ""
    return (f"<p class='logits'>{len(lg.tokens)} tokens in {_esc(lg.dtype)}: logits max |Δ| "
            f"{lg.max_abs:.2e}, rel L2 {lg.rel_l2:.2e} (tolerance {lg.tolerance:.1e}), "
            f"top-1 agreement {lg.top1_agreement:.0%}. {_esc(lg.message)}</p>")


CSS = """body{font-family:sans-serif;margin:24px 32px;color:#222;max-width:1300px}
#diagnosis{font-size:20px;font-weight:bold;padding:14px 18px;border-radius:6px;
border-left:8px solid}
#diagnosis.equivalent{background:#e4f4e4;border-color:#2e7d32}
#diagnosis.defect{background:#fbe3e0;border-color:#c62828}
table{border-collapse:collapse;font-size:13px;margin-top:12px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr.bad td{background:#fff3f1}
h2{margin-top:30px;font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px}
code{font-size:12px}#defect-key{list-style:none;padding-left:0;font-size:13px}
#defect-key li{margin:4px 0}.num{display:inline-block;border:2px solid #000;min-width:16px;
text-align:center;font-weight:bold}.logits,.note{font-size:13px}"""


def render_html(report: R.DiffReport) -> str:
    lg = report.logits
    if lg.ran and lg.stages:
        png = base64.b64encode(divergence_png(report)).decode()
        curve = f'<img id="divergence" alt="divergence curve" src="data:image/png;base64,{png}">'
    else:
        curve = f'<p id="divergence">The logits were not compared: {_esc(lg.note)}</p>'
    cls = "equivalent" if report.equivalent else "defect"
    notes = "".join(f"<p class='note'>note: {_esc(n)}</p>" for n in report.notes)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>apr-ref diff</title>"
            f"<style>{CSS}</style></head><body>"
            f"<div id='diagnosis' class='{cls}'>{_esc(report.diagnosis.line)}</div>"
            f"{_files_table(report)}"
            f"<h2>Tensors: relative error</h2><p class='note'>Relative L2 error of each "
            f"tensor of B against A (log colour scale), layers as rows and tensor kinds as "
            f"columns; a defective tensor is outlined and numbered by its class.</p>"
            f"{heat_map_svg(report)}{_defect_key(report)}"
            f"<h2>Hidden states along the logit path</h2>{_logits_text(lg)}{curve}"
            f"<h2>Findings</h2>{_findings_table(report)}{notes}</body></html>")


def write_outputs(report: R.DiffReport, report_path: str | Path | None,
                  plot_path: str | Path | None) -> None:
    """Write the page and/or the curve. Everything is rendered before any file is made, and
    a failed write of either removes both temporaries; only the two renames at the end are
    separate steps."""
    page = render_html(report) if report_path is not None else None
    data = divergence_png(report) if plot_path is not None else None   # errors before any file
    if page is not None and data is not None:
        with atomic_file(plot_path) as tmp_plot, atomic_file(report_path) as tmp_page:
            Path(tmp_plot).write_bytes(data)
            Path(tmp_page).write_text(page, encoding="utf-8")
    elif page is not None:
        with atomic_file(report_path) as tmp:
            Path(tmp).write_text(page, encoding="utf-8")
    elif data is not None:
        with atomic_file(plot_path) as tmp:
            Path(tmp).write_bytes(data)


def write_report(report: R.DiffReport, path: str | Path) -> None:
    write_outputs(report, path, None)


def write_plot(report: R.DiffReport, path: str | Path) -> None:
    write_outputs(report, None, path)
