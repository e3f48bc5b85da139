"""`compare(a, b)`: every finding about two model files, and the one-line diagnosis."""
from __future__ import annotations

import os
import time
from contextlib import ExitStack
from typing import Sequence

import numpy as np

from apr import names
from apr.console import progress_bar
from apr.errors import AprError
from apr.model import ModelView, open_model

from . import relations
from .ahead import BytesAhead
from . import report as R
from .logits import (DEFAULT_TOKENS, SHORT_TOKENS, compare_logits, default_tokens, param_count,
                     run_dtype)
from .generation import compare_generation
from .meta import compare_configs, compare_tokenizers, layout_notes, metadata_only
from .tensors import compare_tensors, tensor_bytes
from .values import lossiest

SHOW_TENSORS = 4          # tensors named in the diagnosis line


# --------------------------------------------------------------------------- token ids

def _vocab_limit(va: ModelView, vb: ModelView) -> int:
    return min(va.config.vocab_size, vb.config.vocab_size)


def resolve_tokens(va: ModelView, vb: ModelView, tokens: Sequence[int] | None,
                   prompt: str | None, short: bool) -> list[int]:
    """The ids both models run on: given, encoded from a prompt with an embedded tokenizer,
    or a fixed default sequence valid for both vocabularies."""
    limit = _vocab_limit(va, vb)
    if prompt is not None:
        td = va.tokenizer or vb.tokenizer
        if td is None:
            raise AprError("--prompt needs a tokenizer, and neither file embeds one")
        from apr.tokenizer import build_tokenizer
        tokens = build_tokenizer(td, add_bos=td.add_bos_token, default_pre="gpt-2").encode(prompt).ids
        if not tokens:
            raise AprError(f"--prompt {prompt!r} encodes to no tokens")
    if tokens is None:
        return default_tokens(limit, SHORT_TOKENS if short else len(DEFAULT_TOKENS))
    tokens = [int(t) for t in tokens]
    bad = [t for t in tokens if not 0 <= t < limit]
    if not tokens or bad:
        raise AprError(f"token ids must be in [0, {limit}) for both files; got {bad or 'none'}")
    return tokens


# --------------------------------------------------------------------------- logits

def _full_model(v: ModelView) -> bool:
    return v.config is not None


def run_logits(va: ModelView, vb: ModelView, logits: bool, tokens: Sequence[int] | None,
               prompt: str | None, tensors: list[R.TensorFinding], config: list[R.ConfigFinding],
               max_memory: str | None = None, progress: bool = False) -> R.LogitsReport:
    """logits: True runs them whenever both files hold a model, at any size (a model larger
    than its half of ``max_memory`` streamed from its file); False skips them."""
    if logits is False:
        return R.LogitsReport(ran=False, note="skipped (--no-logits)")
    missing = [s for s, v in (("A", va), ("B", vb)) if not _full_model(v)]
    if missing:
        who = "A and B hold" if len(missing) == 2 else f"{missing[0]} holds"
        return R.LogitsReport(ran=False, note=f"{who} no model architecture: logits not compared")
    dtype = run_dtype(param_count(va, vb))
    ids = resolve_tokens(va, vb, tokens, prompt, short=dtype == np.float32)
    return compare_logits(va, vb, ids, dtype, tensors, config, max_memory, progress)


# --------------------------------------------------------------------------- runnable

def cannot_run(va: ModelView, vb: ModelView, tensors: list[R.TensorFinding]) -> list[str]:
    """A side whose tensors do not make the model its config describes (a tensor it implies
    is missing, or of another shape) cannot be run, whatever the tensors present say: each
    such tensor becomes a MISSING or SHAPE finding of that side, unless a finding already
    names it or another defect already makes the pair non-equivalent (then it is a note).
    Returns the notes."""
    named = {f.name for f in tensors if f.defect}
    other_defects = bool(named)
    notes = []
    for side, view in (("A", va), ("B", vb)):
        if view.config is None:
            continue
        for m in view.mismatches():
            if m.kind not in ("missing", "shape"):
                continue
            text = f"{side} cannot be run: {m}"
            if m.name == names.LM_HEAD and m.kind == "missing":
                text += " (its config does not tie the embeddings)"
            if m.name in named or other_defects:
                notes.append(text)
                continue
            ref = view.tensors.get(m.name)
            cls = R.MISSING if m.kind == "missing" else R.SHAPE
            tensors.append(R.TensorFinding(
                m.name, "cannot-run", cls, text,
                dtype_a=ref.dtype.name if ref is not None and side == "A" else None,
                dtype_b=ref.dtype.name if ref is not None and side == "B" else None,
                shape_a=list(m.found) if m.found and side == "A" else None,
                shape_b=list(m.found) if m.found and side == "B" else None,
                detail={"side": side, "expected_shape": list(m.expected or ())}))
            named.add(m.name)
    return notes


# --------------------------------------------------------------------------- diagnosis

def _names_text(items: list[str]) -> str:
    shown = ", ".join(items[:SHOW_TENSORS])
    return shown + (f" (+{len(items) - SHOW_TENSORS} more)" if len(items) > SHOW_TENSORS else "")


def _defect_classes(tensors: list[R.TensorFinding], config: list[R.ConfigFinding],
                    tokenizer: list[R.TokenizerFinding], lg: R.LogitsReport) -> list[str]:
    """Every defect class found, most structural first (LOGITS: a divergence nothing explains)."""
    found = {f.defect for f in tensors if f.defect}
    found |= {c.defect for c in config if c.defect}
    found |= {t.defect for t in tokenizer if t.defect}
    if lg.ran and not lg.agree and not lg.culprit_tensors and not lg.culprit_config:
        found.add(R.LOGITS)
    return [c for c in R.CLASS_PRIORITY if c in found]


def _primary(classes: list[str], tensors: list[R.TensorFinding], lg: R.LogitsReport) -> str:
    """A culprit the logits localized first, else the most structural class."""
    by_name = {f.name: f for f in tensors if f.defect}
    for name in lg.culprit_tensors:
        if name in by_name:
            return by_name[name].defect
    if lg.confirmed and R.CONFIG in classes:
        return R.CONFIG
    return classes[0]


def _equivalent(tensors: list[R.TensorFinding], lg: R.LogitsReport) -> R.Diagnosis:
    compared = [f for f in tensors if f.stats is not None]
    rounding = [f for f in compared if f.relation == R.ROUNDING]
    if not rounding:
        msg = f"{R.EQUIVALENT} — all {len(compared)} tensors identical"
    else:
        worst = max(f.stats.max_abs for f in rounding)
        dtype = lossiest(*[d for f in rounding for d in (f.precision_a or f.dtype_a, f.precision_b or f.dtype_b,
                                                         f.detail.get("rounded_to")) if d])
        msg = f"{R.EQUIVALENT} — max |Δ| {worst:.1e}, within {dtype} rounding"
    if lg.ran:
        msg += f"; logits KL {lg.kl_mean:.1e}, top-1 {lg.top1_agreement:.0%}, max |Δ| {lg.max_abs:.1e}"
    return R.Diagnosis(R.EQUIVALENT, [], msg)


def _defect_message(cls: str, tensors: list[R.TensorFinding], config: list[R.ConfigFinding],
                    tokenizer: list[R.TokenizerFinding], lg: R.LogitsReport) -> R.Diagnosis:
    if cls in (R.CONFIG, R.GENERATION):
        items = [c for c in config if c.defect == cls]
        first = [c for c in items if c.key in lg.culprit_config] if lg.confirmed else []
        items = first + [c for c in items if c not in first]
        return R.Diagnosis(cls, [], f"{cls} — " + "; ".join(c.message for c in items),
                           [c.key for c in items])
    if cls == R.TOKENIZER:
        items = [t for t in tokenizer if t.defect]
        return R.Diagnosis(cls, [], f"{cls} — " + "; ".join(t.message for t in items),
                           [t.what for t in items])
    if cls == R.LOGITS:
        return R.Diagnosis(cls, [], f"{cls} — {lg.message}")
    items = [f for f in tensors if f.defect == cls]
    names = list(dict.fromkeys(f.name for f in items))
    if cls == R.LAYERS_REORDERED:            # one permutation explains them all
        return R.Diagnosis(cls, names, f"{cls} — {items[0].message}")
    if cls == R.SWAPPED:                     # name each pair once
        pairs, seen = [], set()
        for f in items:                      # in model order: the first of each pair leads
            if f.relation == "fused-parts-swapped":
                pairs.append(f"{f.name} parts {'/'.join(f.detail['order'])}")
            elif frozenset((f.name, f.detail["with"])) not in seen:
                seen.add(frozenset((f.name, f.detail["with"])))
                pairs.append(f"{f.name} <-> {f.detail['with']}")
        return R.Diagnosis(cls, names, f"{cls} — {_names_text(pairs)}")
    msg = f"{cls} — {_names_text(names)}"
    if len(items) == 1:
        msg += f": {items[0].message}"
    return R.Diagnosis(cls, names, msg)


def diagnose(tensors: list[R.TensorFinding], config: list[R.ConfigFinding],
             tokenizer: list[R.TokenizerFinding], lg: R.LogitsReport) -> R.Diagnosis:
    classes = _defect_classes(tensors, config, tokenizer, lg)
    if not classes:
        return _equivalent(tensors, lg)
    cls = _primary(classes, tensors, lg)
    diag = _defect_message(cls, tensors, config, tokenizer, lg)
    if lg.ran and not lg.agree and cls != R.LOGITS:
        diag.message += f" ({lg.message})"
    others = [c for c in classes if c != cls]
    if others:
        diag.message += f" [also: {', '.join(others)}]"
    return diag


# --------------------------------------------------------------------------- compare

def summarize(path: str | os.PathLike, v: ModelView) -> R.FileSummary:
    dtypes: dict[str, int] = {}
    for ref in v.tensors.values():
        dtypes[ref.dtype.name] = dtypes.get(ref.dtype.name, 0) + 1
    tok = v.tokenizer
    return R.FileSummary(str(path), v.format, len(v.tensors), dict(sorted(dtypes.items())),
                         v.config.to_dict() if v.config else None,
                         f"{tok.vocab_size} tokens, {len(tok.merges)} merges" if tok else "none")


def compare(a_path: str | os.PathLike, b_path: str | os.PathLike, logits: bool | None = True,
            tokens: Sequence[int] | None = None, prompt: str | None = None,
            progress: bool = False, ahead: bool = True,
            max_memory: str | None = None) -> R.DiffReport:
    """Compare two model files (APR, GGUF, .safetensors or HF directory), B against A.

    logits: True (or None) compares the reference models' logits when both files hold a
    model, of any size: models larger than their half of ``max_memory`` (--max-memory; None:
    the default budget) run streamed from their files, in lockstep; False never. tokens: the ids to run
    (default: a fixed sequence valid for both vocabularies); prompt: text encoded with an
    embedded tokenizer instead. ahead: compare the tensors' bytes in a child process while
    both files are opened (two large models, where a fork is safe). Raises
    AprError when a file cannot be read."""
    t0 = time.perf_counter()
    with ExitStack() as files:
        # the tensors' bytes compared in a child process while both files are opened here
        bytes_ahead = BytesAhead.start(a_path, b_path) if ahead else None
        if bytes_ahead is not None:
            files.callback(bytes_ahead.close)
        va = files.enter_context(open_model(a_path))
        vb = files.enter_context(open_model(b_path))
        t1 = time.perf_counter()
        with progress_bar(progress, total=tensor_bytes(va, vb), unit="B", unit_scale=True,
                          desc="comparing") as bar:
            tensors = list(compare_tensors(va, vb, bar.update, bytes_ahead))
        relations.apply(va, vb, tensors)
        unrunnable = cannot_run(va, vb, tensors)
        config = compare_configs(va.config, vb.config)
        generation, generation_notes = compare_generation(va, vb)
        tokenizer = compare_tokenizers(va, vb)
        t2 = time.perf_counter()
        lg = run_logits(va, vb, logits is not False, tokens, prompt, tensors, config, max_memory,
                        progress)
        config += generation
        t3 = time.perf_counter()
        notes = layout_notes(va, vb) + [n for n in unrunnable if n.split(": ", 1)[1] not in lg.note]
        notes += generation_notes
        if lg.note:
            notes.append(f"logits: {lg.note}")
        return R.DiffReport(a=summarize(a_path, va), b=summarize(b_path, vb), tensors=tensors,
                            config=config, tokenizer=tokenizer, logits=lg,
                            diagnosis=diagnose(tensors, config, tokenizer, lg), notes=notes,
                            metadata_only=metadata_only(va, vb),
                            timings={"open_s": t1 - t0, "tensors_s": t2 - t1, "logits_s": t3 - t2,
                                     "answers_ahead": bytes_ahead.used if bytes_ahead else 0})
