"""Property tests: random models of random shapes and dtypes survive APR -> GGUF -> APR and
APR -> HF -> APR with every value equal bit for bit (a 1-D tensor that GGUF keeps in F32
comes back as the same numbers in F32)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from apr import ModelConfig, open_model
from apr.container import TensorSource, write_apr
from apr.convert import convert
from apr.dtypes import dtype_by_name, encode
from apr.tokenizer import from_hf_tokenizer_json, to_apr_metadata
from oracles import tokenizer_json


@st.composite
def models(draw):
    family = draw(st.sampled_from(["llama", "qwen2"]))
    kv = draw(st.integers(1, 2))
    heads = kv * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    # llama.cpp's qwen2 cannot express head_dim != hidden / heads (the converter refuses it)
    hidden = heads * head_dim if family == "qwen2" else draw(st.sampled_from([8, 12, 16]))
    cfg = ModelConfig(
        family=family, hidden_size=hidden, num_layers=draw(st.integers(1, 2)),
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        intermediate_size=draw(st.sampled_from([8, 20])), vocab_size=400 + draw(st.integers(0, 40)),
        rope_theta=draw(st.sampled_from([1e4, 1e6])), tie_word_embeddings=draw(st.booleans()),
        attention_bias=draw(st.booleans()) if family == "llama" else True)
    dtype = draw(st.sampled_from(["F32", "F16", "BF16"]))
    return cfg, dtype, draw(st.integers(0, 2**31 - 1))


def write_model(path: Path, cfg: ModelConfig, dtype: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dt = dtype_by_name(dtype)
    arrays = {n: encode(rng.standard_normal(s).astype(np.float32), dt)
              for n, s in cfg.tensor_shapes(include_lm_head=True).items()}
    if cfg.tie_word_embeddings:
        arrays["lm_head.weight"] = arrays["model.embed_tokens.weight"]
    meta = {"model_type": cfg.family, "name": "random", **cfg.to_apr_metadata(),
            **to_apr_metadata(from_hf_tokenizer_json(tokenizer_json()))}
    write_apr(path, meta, [TensorSource(n, dt, a.shape, (lambda a=a: a)) for n, a in arrays.items()])
    return arrays


def assert_same_values(path: Path, arrays: dict[str, np.ndarray], cfg: ModelConfig) -> None:
    with open_model(path) as v:
        assert v.config == cfg
        assert set(v.tensors) == set(arrays)
        for name, want in arrays.items():
            t = v.tensors[name]
            got = t.raw()
            if got.dtype != want.dtype:      # only 1-D tensors may be widened to F32
                assert want.ndim == 1 and t.dtype.name == "F32", name
                got = got.astype(want.dtype)
            assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_apr_gguf_apr_and_apr_hf_apr(model):
    cfg, dtype, seed = model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arrays = write_model(tmp / "a.apr", cfg, dtype, seed)
        convert(tmp / "a.apr", tmp / "b.gguf")
        convert(tmp / "b.gguf", tmp / "c.apr")
        assert_same_values(tmp / "c.apr", arrays, cfg)
        convert(tmp / "a.apr", tmp / "hf")
        convert(tmp / "hf", tmp / "d.apr")
        assert_same_values(tmp / "d.apr", arrays, cfg)
        with open_model(tmp / "d.apr") as a, open_model(tmp / "a.apr") as b:
            assert a.tokenizer.vocab == b.tokenizer.vocab and a.tokenizer.merges == b.tokenizer.merges


# --------------------------------------------------------------------------- bare tensors

BLOCK = {"Q4_K": 256, "Q6_K": 256, "APR_Q4": 32}
GGUF_KEEPS = {"F32", "F16", "BF16", "F64", "I32", "I64", "I8", "Q4_K", "Q6_K"}
ST_KEEPS = {"F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8"}
NAME_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))


@st.composite
def tensor_sets(draw):
    names = draw(st.lists(st.text(NAME_CHARS, min_size=1, max_size=12), min_size=1, max_size=4,
                          unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8",
                                      "Q4_K", "Q6_K", "APR_Q4", "APR_Q8"]))
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=4)))
        if dtype in BLOCK:                        # rows must hold whole blocks
            shape = (*shape[:-1], BLOCK[dtype]) if shape else (BLOCK[dtype],)
        rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
        values = rng.standard_normal(shape) * 50
        if dtype in ("I8", "U8"):
            values = np.clip(values.round(), 0 if dtype == "U8" else -128, 127)
        elif dtype[0] == "I":
            values = values.round()
        out[name] = (dtype, encode(values, dtype_by_name(dtype)), shape)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_sets())
def test_bare_tensors_through_gguf_and_safetensors(tensors):
    """Every dtype, 0-4 dims, non-square, unicode names: APR -> GGUF -> APR and
    APR -> .safetensors -> APR keep names, shapes and bytes wherever the middle format has the
    dtype, and the values (in F32) wherever it does not."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_apr(tmp / "a.apr", {"model_type": "tensors", "name": "bare"},
                  [TensorSource(n, dtype_by_name(d), s, (lambda a=a: a)) for n, (d, a, s) in tensors.items()])
        with open_model(tmp / "a.apr") as a:
            want = {n: (t.dtype.name, t.raw().tobytes(), t.numpy()) for n, t in a.tensors.items()}
        for middle, keeps in ((tmp / "b.gguf", GGUF_KEEPS), (tmp / "b.safetensors", ST_KEEPS)):
            convert(tmp / "a.apr", middle, force=True)
            convert(middle, tmp / "c.apr", force=True)
            with open_model(tmp / "c.apr") as c:
                assert set(c.tensors) == set(want)
                for name, (dtype, raw, values) in want.items():
                    t = c.tensors[name]
                    assert t.shape == tensors[name][2]
                    if dtype in keeps:
                        assert t.dtype.name == dtype and t.raw().tobytes() == raw, (middle, name)
                    else:
                        assert t.dtype.name == "F32" and np.array_equal(t.numpy(), values), (middle, name)
