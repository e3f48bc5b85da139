"""Defect injection: from valid small models (HF Llama and Qwen2 converted to every format),
inject one defect class into a randomly chosen tensor (square or not, first or last layer),
write the corrupted file as APR, HF or GGUF, and check that `diff` names the class and the
tensor: in the DIAGNOSIS line, in the JSON, and, where the corrupted model still runs, in
the logits' first divergent layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apr.container import AprFile
from apr.dtypes import decode, dtype_by_name, encode
from apr.layout import adjacent_to_halves, halves_to_adjacent
from apr.model import open_model
from diff import compare
from diff import report as R
from test_diff_helpers import (EMBED, LM_HEAD, MODELS, clean, config, fresh, hf_tensors,
                               layer_name, rewrite_gguf, write_apr_variant, write_variant)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
F32_KINDS = ("hf", "apr", "gguf")   # tight logit tolerance: every defect here shows in the logits
FAMILIES = st.sampled_from(sorted(MODELS))
A_KINDS = st.sampled_from(["hf", "apr", "gguf", "apr-f16", "gguf-f16"])
LAYERS = st.sampled_from(["first", "last"])
SQUARE = ("self_attn.q_proj.weight", "self_attn.o_proj.weight")                # 64 x 64
NON_SQUARE = ("self_attn.k_proj.weight", "self_attn.v_proj.weight",            # 32 x 64
              "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


@dataclass
class Case:
    """A corrupted B and what diff must say about it."""
    family: str
    b_fmt: str
    tensors: dict[str, np.ndarray]
    expect_class: str
    expect_tensor: str | None
    changes: dict[str, Any] = field(default_factory=dict)
    runs: bool = True              # B still loads as a model (logits can run)


def layer_index(family: str, which: str) -> int:
    return 0 if which == "first" else MODELS[family]["layers"] - 1


def check(a_kind: str, case: Case) -> R.DiffReport:
    b = write_variant(case.b_fmt, case.family, case.tensors, case.changes)
    report = compare(clean(case.family, a_kind), b)
    diag = report.diagnosis
    head = f"DIAGNOSIS: {case.expect_class} — " + (case.expect_tensor or "")
    assert diag.line.startswith(head), (diag.line, [f.message for f in report.defects])
    assert diag.cls == case.expect_class
    js = report.to_json()
    assert js["diagnosis"]["class"] == case.expect_class
    if case.expect_tensor:
        assert js["diagnosis"]["tensors"][0] == case.expect_tensor
        record = next(t for t in js["tensors"] if t["name"] == case.expect_tensor and t["defect"])
        assert record["defect"] == case.expect_class
    lg = report.logits
    assert lg.ran == case.runs, lg.note
    if lg.ran and not lg.agree and case.expect_tensor:
        assert case.expect_tensor in lg.culprit_tensors, lg.message
    return report


# --------------------------------------------------------------------------- LAYOUT transposed

@given(FAMILIES, A_KINDS, LAYERS, st.sampled_from(SQUARE + NON_SQUARE), st.booleans(),
       st.sampled_from(["apr", "hf", "gguf"]))
@SETTINGS
def test_transposed(family, a_kind, which, suffix, reverse_shape, b_fmt):
    name = layer_name(layer_index(family, which), suffix)
    t = hf_tensors(family)
    w = t[name]
    square = w.shape[0] == w.shape[1]
    if reverse_shape and not square:
        b_fmt = "apr" if b_fmt == "gguf" else b_fmt       # convert refuses a wrong shape
        t[name] = w.T.copy()
    else:
        t[name] = np.ascontiguousarray(w.T).reshape(w.shape)  # the transpose's bytes, A's shape
    runs = square or not reverse_shape
    report = check(a_kind, Case(family, b_fmt, t, R.TRANSPOSED, name, runs=runs))
    if runs and a_kind in F32_KINDS:
        assert report.logits.first_divergent_layer == layer_index(family, which)


# --------------------------------------------------------------------------- LAYOUT rotary-permuted

def rotary_store(w: np.ndarray, heads: int, variant: str, heads_wrong: int) -> np.ndarray:
    """What a buggy writer stores instead of HF-order rows (for a halves-order file)."""
    if variant == "once":
        return halves_to_adjacent(w, heads)
    if variant == "twice":
        return halves_to_adjacent(halves_to_adjacent(w, heads), heads)
    return halves_to_adjacent(w, heads_wrong)          # "wrong heads"


@given(FAMILIES, A_KINDS, LAYERS, st.sampled_from(["q_proj", "k_proj"]), st.booleans(),
       st.sampled_from(["once", "twice", "wrong heads"]), st.sampled_from(["apr", "hf", "gguf"]))
@SETTINGS
def test_rotary_permuted(family, a_kind, which, proj, bias, variant, b_fmt):
    cfg = config(family)
    if not cfg.attention_bias:
        bias = False
    name = layer_name(layer_index(family, which), f"self_attn.{proj}.{'bias' if bias else 'weight'}")
    heads = cfg.num_heads if proj == "q_proj" else cfg.num_kv_heads
    wrong = cfg.num_kv_heads if proj == "q_proj" else cfg.num_heads
    t = hf_tensors(family)
    if b_fmt == "gguf" and family == "llama":
        # llama GGUF stores rows halves->adjacent with `heads`; make the stored rows wrong:
        # not permuted at all ("once" in the other direction), twice, or with the wrong count
        stored = {"once": t[name], "twice": rotary_store(t[name], heads, "once", wrong),
                  "wrong heads": halves_to_adjacent(t[name], wrong)}[variant]
        t[name] = adjacent_to_halves(stored, heads) if variant != "twice" else stored
    else:
        t[name] = rotary_store(t[name], heads, variant, wrong)
    report = check(a_kind, Case(family, b_fmt, t, R.ROTARY, name))
    finding = next(f for f in report.tensors if f.name == name)
    if variant == "twice":
        assert finding.detail["times"] == 2, finding.message
    if variant == "wrong heads" and not (b_fmt == "gguf" and family == "llama"):
        assert finding.detail["heads"] == wrong, finding.message


# --------------------------------------------------------------------------- PADDING

@given(FAMILIES, A_KINDS, st.sampled_from([EMBED, LM_HEAD]), st.sampled_from(["zeros", "random", "truncate"]),
       st.sampled_from(["apr", "hf"]))
@SETTINGS
def test_padded_or_truncated(family, a_kind, name, how, b_fmt):
    if MODELS[family]["tied"]:
        name = EMBED
    t = hf_tensors(family)
    w = t[name]
    if how == "truncate":
        t[name] = w[:400].copy()
    else:
        pad = np.zeros((64, w.shape[1]), np.float32) if how == "zeros" else \
            np.random.default_rng(0).standard_normal((64, w.shape[1])).astype(np.float32) * 0.02
        t[name] = np.concatenate([w, pad])
    changes = {"vocab_size": t[name].shape[0]} if name == EMBED else {}
    untied_with_head = not MODELS[family]["tied"]          # the other tensor keeps 448 rows
    report = check(a_kind, Case(family, b_fmt, t, R.PADDING, name, changes, runs=not untied_with_head))
    assert next(f for f in report.tensors if f.name == name).relation == \
        ("truncated" if how == "truncate" else "padded")


# --------------------------------------------------------------------------- TIED

@given(FAMILIES, A_KINDS, st.sampled_from(["apr", "hf", "gguf"]), st.booleans())
@SETTINGS
def test_tied(family, a_kind, b_fmt, inconsistent_copy):
    """Untied A vs a B that ties (and so drops A's lm_head), or tied A vs a B with its own
    lm_head; or a B that declares tied but stores an lm_head that is not its embedding."""
    t = hf_tensors(family)
    rng = np.random.default_rng(3)
    if inconsistent_copy:
        b_fmt = "apr"          # only APR stores an lm_head next to tied embeddings
        t[LM_HEAD] = rng.standard_normal(t[EMBED].shape).astype(np.float32) * 0.02
        changes = {"tie_word_embeddings": True}
    elif MODELS[family]["tied"]:
        t[LM_HEAD] = rng.standard_normal(t[EMBED].shape).astype(np.float32) * 0.02
        changes = {"tie_word_embeddings": False}
    else:
        del t[LM_HEAD]
        changes = {"tie_word_embeddings": True}
    report = check(a_kind, Case(family, b_fmt, t, R.TIED, LM_HEAD, changes))
    assert report.logits.culprit_tensors == [LM_HEAD] or report.logits.agree


def test_tied_apr_copy_is_equivalent():
    """aprender's convention: a tied APR stores lm_head as a copy; vs HF and GGUF without it."""
    for a in ("hf", "gguf", "gguf-f16"):
        r = compare(clean("qwen2", a), clean("qwen2", "apr"))
        assert r.equivalent, r.diagnosis.line
        head = next(f for f in r.tensors if f.name == LM_HEAD)
        assert head.relation == R.TIED_COPY and head.defect is None


# --------------------------------------------------------------------------- value relations

ANY_2D = SQUARE + NON_SQUARE


@given(FAMILIES, A_KINDS, LAYERS, st.sampled_from(ANY_2D + NORMS + ("embed", "norm")),
       st.sampled_from([0.5, 2.0, -1.0, 1.5, 0.25]), st.sampled_from(["apr", "hf", "gguf"]))
@SETTINGS
def test_scaled(family, a_kind, which, suffix, s, b_fmt):
    name = {"embed": EMBED, "norm": "model.norm.weight"}.get(suffix) or \
        layer_name(layer_index(family, which), suffix)
    t = hf_tensors(family)
    t[name] = t[name] * np.float32(s)
    report = check(a_kind, Case(family, b_fmt, t, R.SCALED, name))
    f = next(f for f in report.tensors if f.name == name)
    assert f.detail["scale"] == pytest.approx(s, rel=1e-2)


@given(FAMILIES, A_KINDS, LAYERS, st.sampled_from(ANY_2D + ("embed",)), st.integers(0, 2**16),
       st.sampled_from(["apr", "hf", "gguf"]))
@SETTINGS
def test_shuffled(family, a_kind, which, suffix, seed, b_fmt):
    name = EMBED if suffix == "embed" else layer_name(layer_index(family, which), suffix)
    t = hf_tensors(family)
    w = t[name]
    perm = np.random.default_rng(seed).permutation(w.shape[0])
    if np.array_equal(perm, np.arange(w.shape[0])):
        perm = perm[::-1]
    t[name] = w[perm]
    check(a_kind, Case(family, b_fmt, t, R.SHUFFLED, name))


@given(FAMILIES, A_KINDS, LAYERS, st.sampled_from(ANY_2D), st.integers(0, 2**16),
       st.sampled_from(["apr", "hf", "gguf"]))
@SETTINGS
def test_unrelated(family, a_kind, which, suffix, seed, b_fmt):
    name = layer_name(layer_index(family, which), suffix)
    t = hf_tensors(family)
    t[name] = np.random.default_rng(seed).standard_normal(t[name].shape).astype(np.float32) * 0.02
    check(a_kind, Case(family, b_fmt, t, R.UNRELATED, name))


@given(FAMILIES, st.sampled_from(["hf", "apr", "gguf"]), LAYERS, st.sampled_from(ANY_2D + NORMS),
       st.sampled_from(["Q4_0", "APR_Q4"]), st.sampled_from(["apr", "hf", "gguf"]))
@SETTINGS
def test_quantization_noise(family, a_kind, which, suffix, lossy, b_fmt):
    """B declares F32 but one tensor went through a 4-bit quantizer on the way: B's storage
    says lossless, so that is a change of values, not noise (noise is never claimed from the
    size of a difference alone; an F16 A allows 2x its own tolerance, far below 4-bit noise)."""
    name = layer_name(layer_index(family, which), suffix)
    t = hf_tensors(family)
    dt = dtype_by_name(lossy)
    t[name] = decode(encode(t[name], dt), dt, t[name].shape)
    check(a_kind, Case(family, b_fmt, t, R.VALUES_CHANGED, name))


# --------------------------------------------------------------------------- MISSING / EXTRA

@given(FAMILIES, A_KINDS, LAYERS, st.sampled_from(ANY_2D + NORMS), st.sampled_from(["apr", "hf"]))
@SETTINGS
def test_missing(family, a_kind, which, suffix, b_fmt):
    name = layer_name(layer_index(family, which), suffix)
    t = hf_tensors(family)
    del t[name]
    check(a_kind, Case(family, b_fmt, t, R.MISSING, name, runs=False))


@given(FAMILIES, A_KINDS, st.sampled_from(["model.layers.2.mlp.gate_proj.weight", "model.extra.weight",
                                           "model.layers.0.self_attn.rotary.weight"]),
       st.sampled_from(["apr", "hf"]))
@SETTINGS
def test_extra(family, a_kind, name, b_fmt):
    t = hf_tensors(family)
    t[name] = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    report = check(a_kind, Case(family, b_fmt, t, R.EXTRA, name))
    assert report.logits.agree          # B runs like A: the extra tensor is never consumed


# --------------------------------------------------------------------------- CONFIG through the logits

@given(FAMILIES, st.sampled_from(["hf", "apr", "gguf"]), st.sampled_from(["rope_theta", "rms_norm_eps"]),
       st.sampled_from(["apr", "hf", "gguf"]))
@settings(max_examples=10, deadline=None, derandomize=True, database=None)
def test_config_defect_found_through_logits(family, a_kind, key, b_fmt):
    """Identical tensors, one wrong metadata value: only the logits can show it. The diff
    localizes the divergence to layer 0, finds no tensor there, and confirms the key by
    re-running B with A's value."""
    cfg = config(family)
    wrong = {"rope_theta": cfg.rope_theta * 50, "rms_norm_eps": cfg.rms_norm_eps * 10}[key]
    case = Case(family, b_fmt, hf_tensors(family), R.CONFIG, None, {key: wrong})
    report = check(a_kind, case)
    assert report.diagnosis.line.startswith(f"DIAGNOSIS: CONFIG — {key}")
    assert report.diagnosis.keys == [key]
    assert all(f.defect is None for f in report.tensors)
    lg = report.logits
    assert lg.ran and not lg.agree
    assert lg.first_divergent_layer == 0 and lg.culprit_tensors == []
    assert lg.culprit_config == [key] and lg.confirmed


# --------------------------------------------------------------------------- TOKENIZER

def _apr_with_tokenizer_edit(family: str, edit: Callable[[dict], None]):
    with AprFile.open(clean(family, "apr")) as f:
        meta = dict(f.metadata)
    edit(meta)
    return write_apr_variant(family, hf_tensors(family), fresh(".apr"), meta_extra=meta)


def _swap_tokens(meta):
    v = list(meta["tokenizer.vocabulary"])
    v[300], v[301] = v[301], v[300]
    meta["tokenizer.vocabulary"] = v


def _drop_merges(meta):
    meta["tokenizer.merges"] = meta["tokenizer.merges"][:-5]


def _bos(meta):
    meta["tokenizer.bos_token_id"] = 1


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("edit,what", [(_swap_tokens, "vocab"), (_drop_merges, "merges"),
                                       (_bos, "bos_token_id")])
def test_tokenizer_defects(family, edit, what):
    b = _apr_with_tokenizer_edit(family, edit)
    for a in ("hf", "gguf"):
        r = compare(clean(family, a), b)
        assert r.diagnosis.cls == R.TOKENIZER and r.diagnosis.keys[0] == what, r.diagnosis.line
        assert set(r.diagnosis.keys) <= {what, "encoding"}, r.diagnosis.keys
        assert r.diagnosis.line.startswith("DIAGNOSIS: TOKENIZER — ")
        assert r.logits.agree


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _template(text):
    def edit(meta):
        meta["tokenizer.chat_template"] = text
    return edit


@pytest.mark.parametrize("family", sorted(MODELS))
def test_tokenizer_behaviour_and_chat_template(family):
    """The pre-tokenizer changed (same vocabulary, other splits): the probe strings encode
    differently; the chat template's end-of-turn token changed: named with the first
    differing rendered line; a text-only template change that renders alike is no defect."""
    a = _apr_with_tokenizer_edit(family, _template(TEMPLATE))
    def other_pre(meta):
        _template(TEMPLATE)(meta)
        meta["tokenizer.pre_type"] = "gpt-2" if meta.get("tokenizer.pre_type") == "qwen2" else "qwen2"
    b = _apr_with_tokenizer_edit(family, other_pre)
    r = compare(a, b)
    assert r.diagnosis.cls == R.TOKENIZER and "encoding" in r.diagnosis.keys, r.diagnosis.line
    enc = next(t for t in r.tokenizer if t.what == "encoding")
    assert "probe strings encode differently" in enc.message
    c = _apr_with_tokenizer_edit(family, _template(TEMPLATE.replace("<|im_end|>", "<|eot|>")))
    r = compare(a, c)
    assert r.diagnosis.keys == ["chat_template"], r.diagnosis.line
    assert "renders differently from line 2" in r.diagnosis.message, r.diagnosis.message
    d = _apr_with_tokenizer_edit(family, _template("{# ChatML #}" + TEMPLATE))
    r = compare(a, d)
    assert r.equivalent, r.diagnosis.line
    assert any(t.what == "chat_template" and t.defect is None for t in r.tokenizer)
    e = _apr_with_tokenizer_edit(family, _template(None))
    assert compare(a, e).diagnosis.keys == ["chat_template"]


def _add_eos(meta):
    meta["tokenizer.add_eos_token"] = True


def _unspecial(meta):
    types = list(meta["tokenizer.token_type"])
    k = next(i for i, t in enumerate(types) if t == 3)         # a control token made plain
    types[k] = 1
    meta["tokenizer.token_type"] = types


@pytest.mark.parametrize("edit,what", [(_add_eos, "add_eos_token"), (_unspecial, "special_tokens")])
def test_eos_flag_and_special_tokens(edit, what):
    """add_eos_token set on one side (double EOS in every encoded prompt), a special token made
    plain: named, across APR, HF and GGUF."""
    b = _apr_with_tokenizer_edit("qwen2", edit)
    for a in ("hf", "gguf", "apr"):
        r = compare(clean("qwen2", a), b)
        assert r.diagnosis.cls == R.TOKENIZER and what in r.diagnosis.keys, r.diagnosis.line
    # the flag survives conversion: APR -> GGUF -> HF keeps it
    from apr.convert import convert
    g = fresh(".gguf")
    convert(b, g)
    h = fresh("")
    convert(g, h)
    assert compare(b, h).diagnosis.cls != R.TOKENIZER or what != "add_eos_token"


def test_gguf_without_pre_tokenizer_is_named():
    g = clean("qwen2", "gguf")
    with open_model(g) as v:
        kv = dict(v.metadata)
    assert kv.get("tokenizer.ggml.pre")
    bare = rewrite_gguf(g, fresh(".gguf"), {"tokenizer.ggml.pre": None})
    r = compare(clean("qwen2", "hf"), bare)
    assert r.diagnosis.cls == R.TOKENIZER and "pre_type" in r.diagnosis.keys, r.diagnosis.line
    assert "no tokenizer.ggml.pre" in r.diagnosis.message


def test_gguf_token_count_must_match_embedding_rows():
    g = clean("llama", "gguf")
    with open_model(g) as v:
        tokens = v.metadata["tokenizer.ggml.tokens"]
        types = v.metadata["tokenizer.ggml.token_type"]
    short = rewrite_gguf(g, fresh(".gguf"), {"tokenizer.ggml.tokens": tokens[:400],
                                             "tokenizer.ggml.token_type": types[:400]})
    r = compare(clean("llama", "hf"), short)
    assert r.diagnosis.cls == R.TOKENIZER and r.diagnosis.keys == ["token_count"], r.diagnosis.line
    assert "400 tokens but 448 embedding rows" in r.diagnosis.message
    # the padded GGUF tokenizer (pads up to the embedding rows) is equivalent to HF's 400 tokens
    assert compare(clean("llama", "hf"), g).equivalent


# --------------------------------------------------------------------------- relations between tensors

def _same_shape_pairs(family: str) -> list[tuple[str, str]]:
    t = hf_tensors(family)
    order = list(t)
    pairs = []
    for i, x in enumerate(order):
        for y in order[i + 1:]:
            if t[x].shape == t[y].shape and x != EMBED and LM_HEAD not in (x, y):
                pairs.append((x, y))
    return pairs


@given(FAMILIES, st.sampled_from(F32_KINDS), st.integers(0, 10 ** 6), st.sampled_from(["apr", "hf", "gguf"]))
@SETTINGS
def test_swapped(family, a_kind, pick, b_fmt):
    """Any two tensors of the same shape exchanged (gate <-> up, q <-> o, two layers' norms,
    k <-> v, ...): SWAPPED, naming both."""
    pairs = _same_shape_pairs(family)
    x, y = pairs[pick % len(pairs)]
    t = hf_tensors(family)
    t[x], t[y] = t[y], t[x]
    report = check(a_kind, Case(family, b_fmt, t, R.SWAPPED, x))
    assert f"{x} <-> {y}" in report.diagnosis.line


@given(FAMILIES, st.sampled_from(F32_KINDS), st.sampled_from(["apr", "hf", "gguf"]))
@SETTINGS
def test_layers_reordered(family, a_kind, b_fmt):
    """Every tensor of layer 0 is layer 1's and back: one permutation, printed as one."""
    t = hf_tensors(family)
    for name in [n for n in t if n.startswith("model.layers.0.")]:
        other = name.replace("model.layers.0.", "model.layers.1.")
        t[name], t[other] = t[other], t[name]
    report = check(a_kind, Case(family, b_fmt, t, R.LAYERS_REORDERED, None))
    assert "in the order [1, 0]" in report.diagnosis.line, report.diagnosis.line


@given(FAMILIES, st.sampled_from(F32_KINDS), st.integers(0, 10 ** 6), st.sampled_from(["apr", "hf", "gguf"]))
@SETTINGS
def test_moved(family, a_kind, pick, b_fmt):
    """B's X is a copy of A's Y (Y still in place): MOVED, naming both."""
    pairs = _same_shape_pairs(family)
    x, y = pairs[pick % len(pairs)]
    t = hf_tensors(family)
    t[x] = t[y].copy()
    report = check(a_kind, Case(family, b_fmt, t, R.MOVED, x))
    assert f"B's {x} is A's {y}" in report.diagnosis.line, report.diagnosis.line


@given(FAMILIES, A_KINDS, LAYERS, st.sampled_from(NORMS + ("norm",)),
       st.sampled_from(["all ones", "zeroed", "A + 1", "A - 1"]), st.sampled_from(["apr", "hf", "gguf"]))
@SETTINGS
def test_norm_vector_changed(family, a_kind, which, suffix, pattern, b_fmt):
    """A norm weight set to ones, zeroed, or off by exactly one (Gemma's (1 + w) folded twice
    or not at all): VALUES CHANGED with the pattern, never noise, between lossless files."""
    name = "model.norm.weight" if suffix == "norm" else layer_name(layer_index(family, which), suffix)
    t = hf_tensors(family)
    w = t[name]
    t[name] = {"all ones": np.ones_like(w), "zeroed": np.zeros_like(w),
               "A + 1": w + 1, "A - 1": w - 1}[pattern].astype(np.float32)
    report = check(a_kind, Case(family, b_fmt, t, R.VALUES_CHANGED, name))
    assert f"B is {pattern}" in report.diagnosis.line, report.diagnosis.line


@given(st.sampled_from(F32_KINDS), LAYERS, st.sampled_from(["q_proj", "k_proj", "v_proj"]),
       st.sampled_from(["apr", "hf"]))
@SETTINGS
def test_bias_dropped(a_kind, which, proj, b_fmt):
    name = layer_name(layer_index("qwen2", which), f"self_attn.{proj}.bias")
    t = hf_tensors("qwen2")
    del t[name]
    check(a_kind, Case("qwen2", b_fmt, t, R.MISSING, name, runs=False))
