"""Config keys and embedded tokenizers of the two files.

Configs are compared field by field on `apr.config.ModelConfig` (each format's spelling is
already mapped there). `rope_type` is how Q/K rows are stored, undone before values are
compared, so it is a layout note, not a difference; tied embeddings are judged on the
tensors (see diff/tensors.py). Floats are equal within 1e-6 relative: GGUF stores
rope_theta and rms_norm_eps as float32.

Tokenizers: token i is the same when its strings are equal or when both are placeholders
(unused, or row pads such as ``[PAD448]``). Beyond the shorter vocabulary only placeholders
may follow: a GGUF pads its tokens with unused ones up to the embedding rows, and that is
equivalent to an HF tokenizer without them.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import replace
from typing import Any

import numpy as np

from apr.config import ModelConfig
from apr.errors import AprError
from apr.model import ModelView
from apr.tokenizer import (ADDED_TOKEN_FLAGS, CONTROL, UNKNOWN, UNUSED, TokenizerData, build_tokenizer,
                           is_row_pad, row_pad_start)

from .chat import render_chat

from .report import CONFIG, ConfigFinding, TokenizerFinding

CONFIG_KEYS: tuple[str, ...] = (
    "computes_as", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta",
    "rms_norm_eps", "attention_bias", "mlp_bias", "hidden_act", "sliding_window", "layer_types",
    "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "rope_local_theta",
)
FLOAT_REL = 1e-6
TOKENIZER_FORMATS = ("apr", "gguf", "hf")      # formats that carry a tokenizer
SHOW = 3                                       # examples named in a message
# what both tokenizers encode: code, Unicode, emoji, whitespace runs, digits, case
PROBES = (
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Grüße aus Köln — naïve café, 東京タワー, Ελληνικά, 한국어",
    "emoji 🚀🎉👩‍💻 and symbols ∑∫√ ©®",
    "  \t\tleading, trailing   \n\n\n  runs\t \r\n",
    "3.14159 1234567890 0x1F 1e-9 $42.00",
    "Hello HELLO hello hElLo I'm we'll they've",
)
VOLATILE_KEYS = ("created_at", "name", "source", "original_format", "general.name", "total_size")


# --------------------------------------------------------------------------- config

def _same(x: Any, y: Any) -> bool:
    if isinstance(x, float) or isinstance(y, float):
        try:
            fx, fy = float(x), float(y)
        except (TypeError, ValueError):
            return False
        return math.isclose(fx, fy, rel_tol=FLOAT_REL, abs_tol=0.0)
    return x == y


def compare_configs(ca: ModelConfig | None, cb: ModelConfig | None) -> list[ConfigFinding]:
    """Field by field (the family as it computes: a Mistral without a window is a Llama);
    RoPE by the inverse frequencies and attention factor each config implies, so llama3
    parameters and a GGUF's rope_freqs.weight that give the same frequencies are the same."""
    if ca is None or cb is None:
        return []
    out = [ConfigFinding(k, getattr(ca, k), getattr(cb, k), CONFIG,
                         f"{k}: A {getattr(ca, k)!r}, B {getattr(cb, k)!r}")
           for k in CONFIG_KEYS if not _same(getattr(ca, k), getattr(cb, k))]
    if ca.head_dim == cb.head_dim and _same(ca.rope_theta, cb.rope_theta):
        (ia, fa), (ib, fb) = ca.inverse_frequencies(), cb.inverse_frequencies()
        worst = float(np.max(np.abs(ia - ib) / np.abs(ib)))
        if worst > FLOAT_REL or not math.isclose(fa, fb, rel_tol=FLOAT_REL):
            def what(c: ModelConfig) -> str:
                return c.rope_scaling.describe() if c.rope_scaling else "plain"
            out.append(ConfigFinding("rope_scaling", what(ca), what(cb), CONFIG,
                                     f"rope_scaling: A {what(ca)}, B {what(cb)} (inverse "
                                     f"frequencies differ by up to {worst:.3g} relative)"))
    return out


def layout_notes(va: ModelView, vb: ModelView) -> list[str]:
    """Known layouts undone before comparing (not differences)."""
    notes = []
    for side, v in (("A", va), ("B", vb)):
        if v.config is not None and v.config.rope_type == "adjacent":
            notes.append(f"{side} stores Q/K rows in llama.cpp's adjacent-pair rotary order "
                         "(compared in HF order)")
        if v.training:
            notes.append(f"{side} holds {len(v.training)} training-state tensors (not compared)")
    return notes


def metadata_only(va: ModelView, vb: ModelView, limit: int = 20) -> list[str]:
    """Other metadata keys that differ between two files of one format (informational)."""
    if va.format != vb.format:
        return []
    out = []
    for k in sorted(set(va.metadata) | set(vb.metadata)):
        if k.startswith("tokenizer.") or k in VOLATILE_KEYS:
            continue
        x, y = va.metadata.get(k), vb.metadata.get(k)
        structured = isinstance(x, (list, dict)) or isinstance(y, (list, dict))
        if (x != y) if structured else not _same(x, y):
            out.append(f"{k}: A {_short(x)}, B {_short(y)}")
    return out[:limit]


def _short(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return f"<{type(v).__name__} of {len(v)}>"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- tokenizer

def is_placeholder(td: TokenizerData, i: int) -> bool:
    return td.token_type[i] == UNUSED or is_row_pad(td.vocab[i], i)


def same_token(ta: TokenizerData, tb: TokenizerData, i: int) -> bool:
    return ta.vocab[i] == tb.vocab[i] or (is_placeholder(ta, i) and is_placeholder(tb, i))


def _examples(ids: list[int], ta: TokenizerData, tb: TokenizerData) -> str:
    shown = ", ".join(f"{i}: {ta.vocab[i]!r} vs {tb.vocab[i]!r}" for i in ids[:SHOW])
    return shown + (f" (+{len(ids) - SHOW} more)" if len(ids) > SHOW else "")


def _vocab_findings(ta: TokenizerData, tb: TokenizerData) -> list[TokenizerFinding]:
    if ta.vocab == tb.vocab and ta.token_type == tb.token_type:
        return []       # what the loops below would find, without a call per token
    n = min(ta.vocab_size, tb.vocab_size)
    bad = [i for i in range(n) if not same_token(ta, tb, i)]
    out = []
    if bad:
        out.append(TokenizerFinding("vocab", f"{len(bad)} of the first {n} tokens differ: "
                                             + _examples(bad, ta, tb)))
    def is_special(t: TokenizerData, i: int) -> bool:
        return t.token_type[i] in (CONTROL, UNKNOWN)    # both are matched in text as specials

    bad_set = set(bad)
    special = [i for i in range(n) if i not in bad_set and not is_placeholder(ta, i)
               and is_special(ta, i) != is_special(tb, i)]
    if special:
        shown = ", ".join(f"{i} {ta.vocab[i]!r} ({'special' if is_special(ta, i) else 'plain'} "
                          f"in A, {'special' if is_special(tb, i) else 'plain'} in B)"
                          for i in special[:SHOW])
        out.append(TokenizerFinding("special_tokens", f"{len(special)} tokens are special on one "
                                                      f"side only: {shown}"))
    longer, side = (ta, "A") if ta.vocab_size > tb.vocab_size else (tb, "B")
    tail = longer.token_type[n:]
    real = [] if tail.count(UNUSED) == len(tail) else \
        [i for i in range(n, longer.vocab_size) if not is_placeholder(longer, i)]
    if real:
        out.append(TokenizerFinding("vocab_size", f"{side} has {len(real)} more real tokens "
                                                  f"({ta.vocab_size} vs {tb.vocab_size} in all)"))
    return out


_FLAG_MEANING = {"lstrip": "lstrip (swallow the whitespace before them)",
                 "rstrip": "rstrip (swallow the whitespace after them)",
                 "normalized": "normalized (matched in the normalized text, not the raw text)"}


def _field_findings(ta: TokenizerData, tb: TokenizerData) -> list[TokenizerFinding]:
    out = []
    if ta.model_type != tb.model_type:
        out.append(TokenizerFinding("model_type", f"tokenizer model: A {ta.model_type}, "
                                                  f"B {tb.model_type}"))
    elif ta.is_spm:
        # merges (HF) and scores (GGUF) are two spellings of one merge order: the probes below
        # compare what they do; the space prefix and the unknown token are compared here
        for key in ("space_prefix", "unknown_token_id"):
            x, y = getattr(ta, key), getattr(tb, key)
            if x != y:
                out.append(TokenizerFinding(key, f"{key}: A {x!r}, B {y!r}"))
    elif ta.merges != tb.merges:
        first = next((i for i, (x, y) in enumerate(zip(ta.merges, tb.merges)) if x != y),
                     min(len(ta.merges), len(tb.merges)))
        out.append(TokenizerFinding("merges", f"merges differ from #{first} "
                                              f"({len(ta.merges)} vs {len(tb.merges)})"))
    for key in ADDED_TOKEN_FLAGS:
        x, y = getattr(ta, key), getattr(tb, key)
        if x != y:
            shown = ", ".join(f"{i} {(ta if i in x else tb).vocab[i]!r}" for i in sorted(x ^ y)[:SHOW])
            out.append(TokenizerFinding(key, f"{len(x ^ y)} added tokens {_FLAG_MEANING[key]} on "
                                             f"one side only: {shown}"))
    for key in ("bos_token_id", "eos_token_id", "add_bos_token", "add_eos_token"):
        x, y = getattr(ta, key), getattr(tb, key)
        if x != y:
            out.append(TokenizerFinding(key, f"{key}: A {x!r}, B {y!r}"))
    if ta.pre_type and tb.pre_type and ta.pre_type != tb.pre_type:
        out.append(TokenizerFinding("pre_type", f"pre-tokenizer: A {ta.pre_type!r}, B {tb.pre_type!r}"))
    return out


def _rows_finding(side: str, view: ModelView) -> TokenizerFinding | None:
    """GGUF: token count must equal the embedding rows (llama.cpp asserts it); any format:
    no token id beyond the embedding."""
    td, cfg = view.tokenizer, view.config
    if td is None or cfg is None:
        return None
    rows = cfg.vocab_size
    if view.format == "gguf" and td.vocab_size != rows:
        return TokenizerFinding("token_count", f"{side} (GGUF) has {td.vocab_size} tokens but "
                                               f"{rows} embedding rows")
    if td.vocab_size > rows:
        return TokenizerFinding("token_count", f"{side} has {td.vocab_size} tokens but only "
                                               f"{rows} embedding rows")
    return None


def _pre_findings(va: ModelView, vb: ModelView) -> list[TokenizerFinding]:
    """A GGUF without tokenizer.ggml.pre where the other side names one: llama.cpp then
    splits text with its default pre-tokenizer, silently."""
    ta, tb = va.tokenizer, vb.tokenizer
    out = []
    for side, t, other, view in (("A", ta, tb, va), ("B", tb, ta, vb)):
        if t.pre_type is None and other.pre_type is not None and view.format == "gguf":
            out.append(TokenizerFinding("pre_type", f"{side} (GGUF) has no tokenizer.ggml.pre; the "
                                                    f"other side's is {other.pre_type!r} (llama.cpp "
                                                    "would split text with its default)"))
    return out


def probe_texts(ta: TokenizerData, tb: TokenizerData) -> list[str]:
    """The fixed probe set, plus the special tokens both sides name, in text."""
    specials = [t.vocab[i] for t in (ta, tb) for i in (t.bos_token_id, t.eos_token_id)
                if i is not None]
    return [*PROBES, "".join(dict.fromkeys(specials)) + "hi" + "".join(dict.fromkeys(specials))]


def _without_row_pads(td: TokenizerData) -> TokenizerData:
    n = row_pad_start(td.vocab, td.token_type)
    if n == td.vocab_size:
        return td
    try:
        return replace(td, vocab=td.vocab[:n], token_type=td.token_type[:n],
                       scores=None if td.scores is None else td.scores[:n])
    except AprError:        # e.g. an id that points into the pads: compare as it is
        return td


def _behaviour_findings(ta: TokenizerData, tb: TokenizerData) -> list[TokenizerFinding]:
    """Both tokenizers encode the probe set; the first string whose ids differ is named.
    Equal tokenizer data builds equal tokenizers, so that case is not probed; nor is data that
    differs only by the unused row pads at the end of one side's vocabulary (never produced:
    see `apr.tokenizer.row_pad_start`)."""
    if ta == tb or _without_row_pads(ta) == _without_row_pads(tb):
        return []
    try:
        ea, eb = (build_tokenizer(t, add_bos=t.add_bos_token, add_eos=t.add_eos_token)
                  for t in (ta, tb))
    except AprError:
        return []          # a pre-tokenizer we cannot build: the fields above say what we know
    differ = []
    for text in probe_texts(ta, tb):
        ia, ib = ea.encode(text).ids, eb.encode(text).ids
        if ia != ib:
            k = next((j for j, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
            differ.append(f"{_short(text)} -> A {ia[k:k + SHOW * 2]}, B {ib[k:k + SHOW * 2]} "
                          f"(from token {k})")
    if not differ:
        return []
    return [TokenizerFinding("encoding", f"{len(differ)} of {len(probe_texts(ta, tb))} probe "
                                         f"strings encode differently; first: {differ[0]}")]


def _template_findings(ta: TokenizerData, tb: TokenizerData) -> list[TokenizerFinding]:
    """The chat template: missing on one side, or a different text (the first changed lines)
    that renders a short conversation differently (Jinja2, sandboxed, in a child process)."""
    xa, xb = ta.chat_template, tb.chat_template
    if xa == xb:
        return []
    if xa is None or xb is None:
        return [TokenizerFinding("chat_template", f"{'A' if xa is None else 'B'} has no chat template")]
    changed = [ln for ln in difflib.unified_diff(xa.splitlines(), xb.splitlines(), "A", "B",
                                                 lineterm="", n=0)
               if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    text = " | ".join(_short(ln) for ln in changed[:2]) or "whitespace only"
    ra, rb = render_chat(xa, ta), render_chat(xb, tb)
    if ra == rb:
        return [TokenizerFinding("chat_template", f"chat templates differ in text ({text}) but "
                                                  "render the probe conversation alike", defect=None)]
    la, lb = ra.splitlines() or [""], rb.splitlines() or [""]
    k = next((j for j, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
    return [TokenizerFinding("chat_template",
                             f"chat templates differ ({text}); the probe conversation renders "
                             f"differently from line {k + 1}: A {_short(la[k] if k < len(la) else '')}, "
                             f"B {_short(lb[k] if k < len(lb) else '')}")]


def compare_tokenizers(va: ModelView, vb: ModelView) -> list[TokenizerFinding]:
    ta, tb = va.tokenizer, vb.tokenizer
    out = [f for f in (_rows_finding("A", va), _rows_finding("B", vb)) if f is not None]
    if ta is None and tb is None:
        return out
    if ta is None or tb is None:
        side, view = ("A", va) if ta is None else ("B", vb)
        if view.format in TOKENIZER_FORMATS:
            out.append(TokenizerFinding("missing", f"{side} has no embedded tokenizer"))
        return out
    return (out + _vocab_findings(ta, tb) + _field_findings(ta, tb) + _pre_findings(va, vb)
            + _behaviour_findings(ta, tb) + _template_findings(ta, tb))


def tokenizer_summary(va: ModelView, vb: ModelView) -> str:
    ta, tb = va.tokenizer, vb.tokenizer
    if ta is None and tb is None:
        return "no tokenizer on either side"
    parts = []
    for side, t in (("A", ta), ("B", tb)):
        if t is None:
            parts.append(f"{side} none")
        elif t.is_spm:
            parts.append(f"{side} {t.vocab_size} tokens, SentencePiece-style "
                         f"({'scores' if t.scores is not None else f'{len(t.merges)} merges'}, "
                         f"space prefix {t.space_prefix})")
        else:
            parts.append(f"{side} {t.vocab_size} tokens, {len(t.merges)} merges")
    return "; ".join(parts)
