"""A GGUF written by llama.cpp's own converter (convert_hf_to_gguf.py, from the
llama-cpp-python source distribution) converts to APR with tensors equal to the HF
originals: llama's rotary permutation is understood and undone, nothing else changes."""
from __future__ import annotations


import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from apr import open_model
from apr.convert import convert
from apr.tokenizer import from_gguf_fields
from oracles import llama_cpp_convert, make_hf_model


@pytest.mark.parametrize("family,vocab_file", [("llama", "ggml-vocab-llama-bpe.gguf"),
                                               ("qwen2", "ggml-vocab-qwen2.gguf")])
def test_llama_cpp_converter_output_matches_hf(family, vocab_file, llama_cpp_src, tmp_path):
    tok = from_gguf_fields(gguf.GGUFReader(llama_cpp_src / "models" / vocab_file))
    rows = tok.vocab_size + (-tok.vocab_size % 64)
    hf = make_hf_model(tmp_path / "hf", family, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64,
                       vocab=rows, tied=(family == "qwen2"), tokenizer=False,
                       rope_theta=1e6 if family == "qwen2" else 5e5)
    out = llama_cpp_convert(llama_cpp_src, hf, tmp_path / "llama-cpp.gguf", tok)

    convert(out, tmp_path / "m.apr")
    state = load_file(str(hf / "model.safetensors"))
    with open_model(out) as g:
        assert g.config.family == family and g.config.vocab_size == rows
        assert g.config.rope_theta == (1e6 if family == "qwen2" else 5e5)
    with open_model(tmp_path / "m.apr") as v:
        assert v.config.rope_type == "halves" and v.config.tie_word_embeddings is (family == "qwen2")
        assert v.tokenizer.vocab[:tok.vocab_size] == tok.vocab
        for name, want in state.items():
            got = v.tensors[name].raw()
            assert got.shape == want.shape and np.array_equal(got, want), name
