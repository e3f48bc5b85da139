"""GGUFs written by llama.cpp's own quantizer (llama_model_quantize, through
llama-cpp-python) from our F32 export: every command reads each, `diff` against the F32 source
says equivalent (within the measured per-type rounding, docs/quantization.md), our logits on
the quantized file are as close to llama.cpp's on that file as either is to the F32 model, and
a change of values in a quantized file is still found."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from apr import llamacpp, open_model
from apr.convert import convert
from ref.load import load_model
from tests.oracles import gguf_library_copy, make_hf_model

FTYPES = ("Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q2_K", "IQ4_NL", "Q3_K_M", "Q5_1")
IDS = [1, 17, 42, 99, 3, 250, 7, 61, 300, 12, 8, 77]


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    hf = make_hf_model(d / "hf", "llama", hidden=256, layers=2, heads=4, kv_heads=2, ffn=512,
                       vocab=448, rope_theta=1e4, eps=1e-5, seed=5)
    convert(hf, d / "f32.gguf")
    return hf, d / "f32.gguf"


def logits_of(path) -> np.ndarray:
    model, view = load_model(path, dtype=np.float64)
    view.close()
    return model.forward(np.array([IDS]))[0]


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("ftype", FTYPES)
def test_llama_cpp_quantized_file(ftype, f32, tmp_path):
    hf, src = f32
    q = llamacpp.quantize(src, tmp_path / f"{ftype}.gguf", ftype)
    with open_model(q) as v:
        stored = {r.dtype.name for r in v.tensors.values()}
    assert stored - {"F32"}, f"{ftype}: llama.cpp stored nothing quantized"
    runner = CliRunner()
    r = runner.invoke(cli.main, ["inspect", str(q), "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli.main, ["diff", str(src), str(q)])
    assert r.exit_code == 0 and "DIAGNOSIS: equivalent" in r.output, r.output[-1500:]
    r = runner.invoke(cli.main, ["diff", str(hf), str(q)])
    assert r.exit_code == 0 and "DIAGNOSIS: equivalent" in r.output, r.output[-1500:]
    # our logits on the quantized file against llama.cpp's on it and both against F32
    ours = logits_of(q)
    theirs = llamacpp.llama_cpp_logits(q, IDS)
    exact = logits_of(src)
    assert rel(ours, theirs) <= max(0.03, 1.5 * rel(theirs, exact)), \
        (ftype, rel(ours, theirs), rel(theirs, exact), rel(ours, exact))
    # to APR (dequantized exactly, and said so) and back to an equivalent diff
    r = runner.invoke(cli.main, ["convert", str(q), "-o", str(tmp_path / "q.apr")])
    assert r.exit_code == 0, r.output
    with open_model(tmp_path / "q.apr") as v:
        recorded = v.metadata.get("dequantized_from") or {}
        kept = {r.dtype.name for r in v.tensors.values()}
        # APR holds Q4_K and Q6_K as they are; every other block type is decoded exactly
        assert set(recorded.values()) == stored - {"F32", "Q4_K", "Q6_K"}, (recorded, stored)
        assert kept <= {"F32", "Q4_K", "Q6_K"}, kept
    r = runner.invoke(cli.main, ["diff", str(q), str(tmp_path / "q.apr")])
    assert r.exit_code == 0 and "DIAGNOSIS: equivalent" in r.output, r.output[-1500:]


def test_a_change_in_a_quantized_file_is_found(f32, tmp_path):
    """Q4_K_M file vs the same quantization of a model whose one norm weight is all ones:
    VALUES CHANGED naming the norm (lossless norms, so no noise can be claimed there)."""
    hf, src = f32
    q = llamacpp.quantize(src, tmp_path / "a.gguf", "Q4_K_M")
    with open_model(q) as v:
        norm = v.tensors["model.layers.1.input_layernorm.weight"]
        assert norm.dtype.name == "F32"
    gguf_library_copy(q, tmp_path / "b.gguf", tensors=lambda name, data: (
        np.ones_like(data) if name == "blk.1.attn_norm.weight" else data))
    out = CliRunner().invoke(cli.main, ["diff", str(q), str(tmp_path / "b.gguf")])
    assert out.exit_code == 1, out.output
    last = out.output.strip().splitlines()[-1]
    assert last.startswith("DIAGNOSIS: VALUES CHANGED — model.layers.1.input_layernorm.weight: B is all ones"), last
