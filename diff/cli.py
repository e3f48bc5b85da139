"""`apr-ref diff A B`: the click command. It only parses options and formats a DiffReport.

Register it on the CLI group with ``main.add_command(diff_command, "diff")``.
"""
from __future__ import annotations

import re
import sys

import click

from apr.console import handle_errors, json_text, parse_token_ids, show_progress

from . import report as R

DEFAULT_LIMIT = 50
EXIT_EQUIVALENT, EXIT_DEFECT = 0, 1          # 2: unreadable input (apr.console)


# --------------------------------------------------------------------------- formatting

def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _dtypes(f: R.TensorFinding) -> str:
    a, b = f.dtype_a or "-", f.dtype_b or "-"
    return a if a == b else f"{a}→{b}"


def _label(f: R.TensorFinding) -> str:
    return f.defect or f.relation


def _row(f: R.TensorFinding, width: int) -> list[str]:
    s = f.stats
    cols = (f"  {f.name:<{width}}  {_label(f):<22} {_dtypes(f):<10} "
            f"{_num(s.max_abs if s else None):>9} {_num(s.rmse if s else None):>9} "
            f"{(f'{s.cosine:.5f}' if s else '-'):>8}")
    lines = [cols]
    if f.relation not in (R.IDENTICAL,):
        lines.append(f"  {'':<{width}}  {f.message}")
    return lines


def _selected(report: R.DiffReport, show_all: bool, pattern: str | None) -> list[R.TensorFinding]:
    rows = report.tensors if show_all else [f for f in report.tensors
                                            if f.defect or f.relation == R.TIED_COPY]
    if pattern:
        rx = re.compile(pattern)
        rows = [f for f in rows if rx.search(f.name)]
    return rows


def _benign_summary(report: R.DiffReport) -> str:
    counts: dict[str, int] = {}
    for f in report.tensors:
        if not f.defect:
            counts[f.relation] = counts.get(f.relation, 0) + 1
    words = {R.IDENTICAL: "identical", R.ROUNDING: "within dtype rounding", R.TIED_COPY: "tied copy"}
    return ", ".join(f"{n} {words.get(k, k)}" for k, n in counts.items())


def _file_line(tag: str, s: R.FileSummary) -> str:
    dt = ", ".join(f"{n} {d}" for d, n in s.dtypes.items())
    return f"{tag}: {s.path} ({s.format}, {s.tensors} tensors: {dt}; tokenizer: {s.tokenizer})"


def _table(report: R.DiffReport, show_all: bool, pattern: str | None, limit: int) -> list[str]:
    rows = _selected(report, show_all, pattern)
    out = []
    if rows:
        width = max(len(f.name) for f in rows[:limit])
        out.append(f"  {'tensor':<{width}}  {'relation':<22} {'dtype':<10} {'max |Δ|':>9} "
                   f"{'rmse':>9} {'cosine':>8}")
        for f in rows[:limit]:
            out.extend(_row(f, width))
        if len(rows) > limit:
            out.append(f"  ... {len(rows) - limit} more (--limit)")
    benign = _benign_summary(report)
    if benign:
        out.append(f"  {benign}" + ("" if show_all else " (--all to list them)"))
    return out


def _config_lines(report: R.DiffReport) -> list[str]:
    if not report.config:
        c = report.a.config or report.b.config
        if report.a.config and report.b.config:
            same = "same"
        elif report.a.config or report.b.config:
            same = "only one side has a model config"
        else:
            same = "neither side has a model architecture (bare tensors)"
        if c:
            same += (f" ({c['family']}, hidden {c['hidden_size']}, {c['num_layers']} layers, heads "
                     f"{c['num_heads']}/{c['num_kv_heads']}, rope_theta {c['rope_theta']:g}, "
                     f"rms eps {c['rms_norm_eps']:g})")
        return [f"config: {same}"]
    return ["config:"] + [f"  {c.message}" + (f"   [{c.defect}]" if c.defect else "")
                          for c in report.config]


def _tokenizer_lines(report: R.DiffReport) -> list[str]:
    if not report.tokenizer:
        return [f"tokenizer: same (A {report.a.tokenizer}; B {report.b.tokenizer})"]
    return ["tokenizer:"] + [f"  {t.message}   [{t.defect}]" for t in report.tokenizer]


def _logits_lines(lg: R.LogitsReport) -> list[str]:
    if not lg.ran:
        return [f"logits: not compared ({lg.note})"]
    head = (f"logits: {len(lg.tokens)} tokens, {lg.dtype}: max |Δ| {lg.max_abs:.2e}, rel L2 "
            f"{lg.rel_l2:.2e} (tolerance {lg.tolerance:.1e}), KL {lg.kl_mean:.2e} (max "
            f"{lg.kl_max:.2e}), top-1 agreement {lg.top1_agreement:.0%}")
    if lg.streamed:
        head += f" ({' and '.join(lg.streamed)} streamed from the file a layer at a time)"
    if lg.shared_stages:
        head += (f"; {lg.shared_stages} of B's {len(lg.stages) + 1} stages hold A's weights and "
                 "input exactly and took A's output")
    lines = [head, f"  {lg.message}"]
    if not lg.agree:
        lines += [f"    {s.stage:<12} rel L2 {s.rel_l2:.2e}  max |Δ| {s.max_abs:.2e}"
                  + ("  <- first divergent" if s.stage == lg.first_divergent else "")
                  for s in lg.stages]
    return lines


def format_report(report: R.DiffReport, show_all: bool = False, pattern: str | None = None,
                  limit: int = DEFAULT_LIMIT) -> str:
    lines = [_file_line("A", report.a), _file_line("B", report.b), ""]
    lines += ["tensors:"] + _table(report, show_all, pattern, limit)
    lines += _config_lines(report) + _tokenizer_lines(report) + _logits_lines(report.logits)
    if report.metadata_only:
        lines.append("other metadata that differs (not compared): " + "; ".join(report.metadata_only))
    lines += [f"note: {n}" for n in report.notes]
    lines.append(report.diagnosis.line)
    return "\n".join(lines)


# --------------------------------------------------------------------------- command

def _check_outputs(a: str, b: str, report_path: str | None, plot_path: str | None) -> None:
    """--report and --plot are two different files, neither of them an input nor inside an
    input directory (an HF model's own files)."""
    import os
    from pathlib import Path
    from apr.errors import AprError

    def resolve(p: str) -> Path:       # a symbolic link loop is the readers' error to give
        return Path(os.path.realpath(p))
    outs = [(opt, p) for opt, p in (("--report", report_path), ("--plot", plot_path)) if p]
    if not outs:
        return
    if len(outs) == 2 and resolve(report_path) == resolve(plot_path):
        raise AprError(f"--report and --plot both name {report_path}")
    inputs = {resolve(x) for x in (a, b)}
    for opt, p in outs:
        out = resolve(p)
        if out in inputs or any(i.is_dir() and i in out.parents for i in inputs):
            raise AprError(f"{opt} {p} is, or is inside, a model compared: write it elsewhere")
        if Path(p).is_dir():
            raise AprError(f"{opt} {p} is a directory")


@click.command("diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--logits/--no-logits", default=True, show_default=True,
              help="Compare the reference models' logits, layer by layer (whenever both files "
                   "hold a model, at any size: models larger than memory run streamed from "
                   "their files).")
@click.option("--max-memory", metavar="SIZE", default=None,
              help="Memory both models' weights may take together, e.g. 8G (default: half the "
                   "memory available); a model larger than its half runs streamed.")
@click.option("--tokens", default=None, help="Token ids to run, e.g. 1,2,3.")
@click.option("--prompt", default=None, help="Text to run, encoded with an embedded tokenizer.")
@click.option("--all", "show_all", is_flag=True, help="List identical tensors too.")
@click.option("--filter", "pattern", default=None, help="Only list tensors matching this regex.")
@click.option("--limit", default=DEFAULT_LIMIT, show_default=True, type=click.IntRange(min=1),
              help="List at most this many tensors.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON document.")
@click.option("--report", "report_path", type=click.Path(), default=None,
              help="Also write a self-contained HTML page: diagnosis, a per-layer x per-tensor "
                   "heat map of relative error, the divergence curve, the findings.")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="Also write the hidden-state divergence curve as a PNG (needs the logits).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def diff_command(a: str, b: str, logits: bool | None, tokens: str | None, prompt: str | None,
                 show_all: bool, pattern: str | None, limit: int, as_json: bool, quiet: bool,
                 report_path: str | None, plot_path: str | None, max_memory: str | None) -> None:
    """Compare two model files (APR, GGUF, .safetensors or HF directory) and name the
    defect class and the tensor. Exit 0: equivalent; 1: a defect; 2: unreadable input."""
    from apr.errors import AprError
    from .core import compare
    if tokens is not None and prompt is not None:
        raise AprError("give --tokens or --prompt, not both")
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise AprError(f"--filter {pattern!r}: {e}") from None
    if max_memory is not None:
        from ref.memory import parse_size
        parse_size(max_memory)
    _check_outputs(a, b, report_path, plot_path)
    if plot_path is not None and logits is False:
        raise AprError("--plot draws the logits' divergence curve: drop --no-logits")
    report = compare(a, b, logits=True if plot_path is not None else logits, prompt=prompt,
                     progress=show_progress(quiet), max_memory=max_memory,
                     tokens=None if tokens is None else parse_token_ids(tokens))
    from .html import write_outputs
    write_outputs(report, report_path, plot_path)
    if as_json:
        click.echo(json_text(report.to_json()))
    else:
        click.echo(format_report(report, show_all, pattern, limit))
    sys.exit(EXIT_EQUIVALENT if report.equivalent else EXIT_DEFECT)
