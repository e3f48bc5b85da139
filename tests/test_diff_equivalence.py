"""No false alarms: every clean conversion pair (APR / HF / GGUF x F32 / F16 / BF16 / Q8_0),
K-quantized APRs, a lone .safetensors file, and the GGUF that llama.cpp's own converter
writes from an HF directory all diagnose `equivalent`; large tensors compared block by block
give the same findings as whole ones."""
from __future__ import annotations

import itertools
import json

import gguf
import numpy as np
import pytest

import diff.reader
from apr.container import AprFile, tensor_source, write_apr
from apr.convert import convert
from apr.dtypes import dtype_by_name
from apr.gguf_io import GgufTensor, write_gguf
from apr.model import open_model
from apr.tokenizer import from_gguf_fields
from diff import compare
from diff import report as R
from oracles import llama_cpp_convert, make_hf_model
from test_diff_helpers import CLEAN_KINDS, MODELS, clean, fresh, hf_tensors, write_variant

PAIRS = [(f, a, b) for f in sorted(MODELS) for a, b in itertools.combinations(sorted(CLEAN_KINDS), 2)]


def assert_equivalent(report: R.DiffReport) -> None:
    assert report.equivalent, (report.diagnosis.line, [t.message for t in report.defects])
    assert report.diagnosis.line.startswith("DIAGNOSIS: equivalent — ")
    assert report.logits.ran and report.logits.agree, report.logits.message


@pytest.mark.parametrize("family,a,b", PAIRS, ids=[f"{f}-{a}-{b}" for f, a, b in PAIRS])
def test_clean_conversion_pairs_are_equivalent(family, a, b):
    report = compare(clean(family, a), clean(family, b))
    assert_equivalent(report)
    dtypes = {CLEAN_KINDS[k][1] for k in (a, b)}
    if dtypes == {None}:
        assert "all" in report.diagnosis.message and "identical" in report.diagnosis.message
    elif len(dtypes) == 2:
        assert "rounding" in report.diagnosis.message


def test_equivalent_line_names_the_rounding_dtype():
    r = compare(clean("llama", "hf"), clean("llama", "gguf-f16"))
    assert r.diagnosis.message.startswith("equivalent — max |Δ| ")
    assert "within F16 rounding" in r.diagnosis.message
    rounding = [t for t in r.tensors if t.relation == R.ROUNDING]
    assert rounding and all(t.dtype_b == "F16" for t in rounding)
    assert all(0 < t.stats.rel_l2 <= t.tolerance for t in rounding)
    # llama's GGUF rotary order is undone, not reported: Q/K are merely rounded
    assert next(t for t in r.tensors if t.name.endswith("layers.0.self_attn.k_proj.weight")).relation == R.ROUNDING


@pytest.mark.parametrize("dtype", ["Q4_K", "Q6_K", "APR_Q4"])
def test_k_quantized_apr_is_equivalent(dtype, tmp_path):
    """Rows of 256 so that K-quants can hold every matrix."""
    hf = make_hf_model(tmp_path / "hf", "llama", hidden=256, layers=1, heads=4, kv_heads=2,
                       ffn=256, vocab=448, seed=5)
    convert(hf, tmp_path / "f32.apr")
    with AprFile.open(tmp_path / "f32.apr") as f:
        meta = dict(f.metadata)
        sources = [tensor_source(n, f.array(n), dtype_by_name(dtype) if len(e.shape) == 2 else None)
                   for n, e in f.tensors.items()]
    write_apr(tmp_path / "q.apr", meta, sources)
    report = compare(hf, tmp_path / "q.apr")
    assert_equivalent(report)
    assert f"within {dtype} rounding" in report.diagnosis.message
    worst = max(t.stats.rel_l2 for t in report.tensors if t.stats)
    assert worst > 1e-3                   # really quantized, and still within tolerance


def test_lone_safetensors_file(tmp_path):
    """A .safetensors file beside its config.json is a full model; alone it holds tensors
    only (no logits, no tokenizer), and the tensors still compare equal."""
    st = clean("qwen2", "hf") / "model.safetensors"
    assert_equivalent(compare(st, clean("qwen2", "apr")))
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(st.read_bytes())
    r = compare(lone, clean("qwen2", "gguf-f16"))
    assert r.equivalent, r.diagnosis.line
    assert not r.logits.ran and "no model architecture" in r.logits.note


def test_blockwise_reading_matches_whole_reading(monkeypatch):
    """Large tensors are read in row blocks; force that on small ones (every dtype, the
    APR_Q8 scale header, GGUF llama order) and get the same statistics."""
    pairs = [("llama", "hf", "apr-q8_0"), ("llama", "gguf-q8_0", "apr-bf16"), ("qwen2", "gguf-f16", "apr-f16"),
             ("qwen2", "hf-bf16", "gguf")]
    whole = [compare(clean(f, a), clean(f, b), logits=False) for f, a, b in pairs]
    monkeypatch.setattr(diff.reader, "BLOCK_VALUES", 1000)
    blocked = [compare(clean(f, a), clean(f, b), logits=False) for f, a, b in pairs]
    for w, b in zip(whole, blocked):
        assert b.equivalent
        for tw, tb in zip(w.tensors, b.tensors):
            assert tw.name == tb.name and tw.relation == tb.relation
            if tw.stats:
                assert tb.stats.max_abs == tw.stats.max_abs
                assert tb.stats.rel_l2 == pytest.approx(tw.stats.rel_l2, rel=1e-4, abs=1e-12)


def test_blockwise_reading_finds_defects(monkeypatch):
    monkeypatch.setattr(diff.reader, "BLOCK_VALUES", 1000)
    t = hf_tensors("llama")
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"] * np.float32(2)
    r = compare(clean("llama", "apr-f16"), write_variant("apr", "llama", t, dtype="F16"))
    assert r.diagnosis.line.startswith("DIAGNOSIS: SCALED — model.embed_tokens.weight")


def test_llama_cpp_converter_gguf_is_equivalent_to_its_hf_source(llama_cpp_src, tmp_path):
    """convert_hf_to_gguf.py permutes llama's Q/K rows; diff undoes it and reports nothing.
    GPT-2's tokenizer (50257 tokens, one the converter knows) padded to 50304 rows."""
    tok = from_gguf_fields(gguf.GGUFReader(llama_cpp_src / "models" / "ggml-vocab-gpt-2.gguf"))
    rows = tok.vocab_size + (-tok.vocab_size % 64)
    hf = make_hf_model(tmp_path / "hf", "llama", hidden=32, layers=2, heads=4, kv_heads=2, ffn=64,
                       vocab=rows, tokenizer=False, rope_theta=5e5, seed=7)
    for name in ("config.json", "generation_config.json"):   # the tokenizer's ids, as a real
        doc = json.loads((hf / name).read_text())             # checkpoint states them
        (hf / name).write_text(json.dumps({**doc, "bos_token_id": tok.bos_token_id,
                                           "eos_token_id": tok.eos_token_id}))
    out = llama_cpp_convert(llama_cpp_src, hf, tmp_path / "llama-cpp.gguf", tok)
    report = compare(hf, out)
    assert_equivalent(report)
    assert report.diagnosis.message.startswith("equivalent — all 21 tensors identical")
    assert report.tokenizer == [] and report.config == []
    assert any("adjacent-pair rotary order" in n for n in report.notes)
    assert report.logits.max_abs < 1e-12
    # and the same file with one Q tensor left in HF order is caught
    bad = fresh(".gguf")
    _gguf_unpermute_q(out, bad)
    r = compare(hf, bad)
    assert r.diagnosis.line.startswith("DIAGNOSIS: LAYOUT rotary-permuted — model.layers.1.self_attn.q_proj.weight")


def _gguf_unpermute_q(src, dst) -> None:
    """A copy of a llama GGUF whose blk.1.attn_q.weight is stored in HF order (unpermuted)."""
    with open_model(src) as v:
        kv = [(k, val, None) for k, val in v.metadata.items()]
        tensors = []
        for t in v.tensors.values():
            data = (lambda t=t: t.numpy(np.float32, order="hf")) \
                if t.source_name == "blk.1.attn_q.weight" else (lambda t=t: np.array(t.raw()))
            tensors.append(GgufTensor(t.source_name, t.dtype, t.shape, data, t.nbytes))
        write_gguf(dst, v.metadata["general.architecture"], kv, tensors)
