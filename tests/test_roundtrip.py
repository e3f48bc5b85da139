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
