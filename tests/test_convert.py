"""Conversions against their real consumers: transformers loads our HF directories,
llama.cpp loads and runs our GGUF, and the tensors survive every round trip."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from apr import open_model
from apr.container import AprFile
from apr.convert import convert
from apr.errors import AprError, ConfigError, OutputExistsError, UnsupportedError
from apr.layout import halves_to_adjacent
from oracles import hf_logits, llama_cpp_logits, make_hf_model

IDS = [1, 5, 17, 42, 99, 300, 7, 250, 3, 401, 12, 77]

MODELS = {
    # GQA 4/2, untied, rope base 1e4, no bias
    "llama": dict(family="llama", heads=4, kv_heads=2, tied=False, rope_theta=1e4, eps=1e-5),
    # biases, tied, rope base 1e6
    "qwen2": dict(family="qwen2", heads=4, kv_heads=2, tied=True, rope_theta=1e6, eps=1e-6),
    # llama with q/k/v/o biases, tied, GQA 4/1
    "llama-bias": dict(family="llama", heads=4, kv_heads=1, tied=True, bias=True, rope_theta=1e4),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param) / "hf"
    make_hf_model(d, **MODELS[request.param])
    return request.param, d


def hf_state(d) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(d / "model.safetensors"))


def test_hf_to_apr_metadata_and_tensors(hf_model, tmp_path):
    key, d = hf_model
    family = MODELS[key]["family"]
    apr_path = tmp_path / "m.apr"
    convert(d, apr_path)
    with AprFile.open(apr_path) as f:
        assert f.verify_footer()
        meta = f.metadata
        assert f.flags & 0x0400 and f.flags & 0x0200
        for field in ("architecture", "hf_architecture", "hidden_size", "num_layers", "num_heads",
                    "num_kv_heads", "vocab_size", "intermediate_size", "max_position_embeddings",
                    "rope_theta", "rope_type", "rms_norm_eps", "head_dim"):
            assert field in meta, field
        for alias in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            assert alias not in meta
        assert meta["architecture"] == family
        assert meta["rope_type"] == 2
        assert meta["rope_theta"] == MODELS[key]["rope_theta"]
        assert len(meta["tokenizer.vocabulary"]) == 400 and meta["vocab_size"] == 448
        assert "lm_head.weight" in f.tensors          # aprender convention, tied or not
        assert meta["tied_embeddings"] is MODELS[key]["tied"]
        state = hf_state(d)
        for name, ref in state.items():
            assert np.array_equal(f.raw(name), ref), name     # never transposed or reordered
        if MODELS[key]["tied"]:
            assert np.array_equal(f.raw("lm_head.weight"), state["model.embed_tokens.weight"])


def test_hf_apr_hf_logits_identical(hf_model, tmp_path):
    key, d = hf_model
    convert(d, tmp_path / "m.apr")
    convert(tmp_path / "m.apr", tmp_path / "back")
    assert np.array_equal(hf_logits(tmp_path / "back", IDS), hf_logits(d, IDS))
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is MODELS[key]["tied"]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "back")
    orig = AutoTokenizer.from_pretrained(d)
    text = "def f(x):\n    return x * 2  # héllo\n"
    assert tok.encode(text) == orig.encode(text)


def test_hf_apr_gguf_llama_cpp_logits(hf_model, tmp_path):
    key, d = hf_model
    family = MODELS[key]["family"]
    convert(d, tmp_path / "m.apr")
    convert(tmp_path / "m.apr", tmp_path / "m.gguf")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.architecture"] == family
    for field in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                  "attention.head_count", "attention.head_count_kv",
                  "attention.layer_norm_rms_epsilon", "rope.freq_base"):
        assert f"{family}.{field}" in kv, field
    assert kv[f"{family}.rope.freq_base"] == pytest.approx(MODELS[key]["rope_theta"])
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == 448 and len(set(tokens)) == 448
    names = {t.name: t for t in r.tensors}
    assert ("output.weight" in names) is (not MODELS[key]["tied"])
    assert not any("inv_freq" in n or n.startswith("__training__") for n in names)
    for n, t in names.items():
        if len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, n
    # Q/K rows permuted for llama (K with the KV-head count), untouched for qwen2
    state = hf_state(d)
    q = np.asarray(names["blk.0.attn_q.weight"].data)
    k = np.asarray(names["blk.0.attn_k.weight"].data)
    hq, hk = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    if family == "llama":
        kv_heads = MODELS[key]["kv_heads"]
        assert np.array_equal(q, halves_to_adjacent(hq, 4)) and np.array_equal(k, halves_to_adjacent(hk, kv_heads))
    else:
        assert np.array_equal(q, hq) and np.array_equal(k, hk)
    got = llama_cpp_logits(tmp_path / "m.gguf", IDS, tmp_path)
    want = hf_logits(d, IDS)
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("dtype,tol", [("f16", 2e-2), ("bf16", 1e-1), ("q8_0", 1e-1)])
def test_gguf_dtypes_run_in_llama_cpp(dtype, tol, tmp_path_factory, tmp_path):
    d = make_hf_model(tmp_path / "hf", **MODELS["llama"])
    convert(d, tmp_path / f"m.{dtype}.gguf", dtype=dtype)
    r = gguf.GGUFReader(tmp_path / f"m.{dtype}.gguf")
    want_type = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert r.get_tensor(1).tensor_type.name in (want_type, "F32")
    assert any(t.tensor_type.name == want_type for t in r.tensors)
    got = llama_cpp_logits(tmp_path / f"m.{dtype}.gguf", IDS, tmp_path)
    want = hf_logits(d, IDS)
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    # and back to APR: dequantized values within the dtype's rounding of the originals
    convert(tmp_path / f"m.{dtype}.gguf", tmp_path / "back.apr")
    with open_model(tmp_path / "back.apr") as v:
        state = hf_state(d)
        w = state["model.layers.1.mlp.down_proj.weight"]
        got_w = v.tensors["model.layers.1.mlp.down_proj.weight"].numpy()
        assert np.linalg.norm(got_w - w) / np.linalg.norm(w) < {"f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2}[dtype]


def test_gguf_to_apr_undoes_llama_permutation_bit_exact(hf_model, tmp_path):
    key, d = hf_model
    family = MODELS[key]["family"]
    convert(d, tmp_path / "m.gguf")
    convert(tmp_path / "m.gguf", tmp_path / "m.apr")
    state = hf_state(d)
    with open_model(tmp_path / "m.apr") as v:
        assert v.config.rope_type == "halves"
        for name, ref in state.items():
            assert np.array_equal(v.tensors[name].raw(), ref), name
    with open_model(tmp_path / "m.gguf") as g:
        assert g.config.rope_type == ("adjacent" if family == "llama" else "halves")
        q = g.tensors["model.layers.1.self_attn.q_proj.weight"]
        assert np.array_equal(q.numpy(order="hf"), state["model.layers.1.self_attn.q_proj.weight"])


def test_f16_hf_copies_bytes(tmp_path):
    d = make_hf_model(tmp_path / "hf", dtype=torch.float16, **MODELS["qwen2"])
    convert(d, tmp_path / "m.apr")
    convert(tmp_path / "m.apr", tmp_path / "m.gguf")
    convert(tmp_path / "m.gguf", tmp_path / "m2.apr")
    state = hf_state(d)
    with open_model(tmp_path / "m2.apr") as v:
        for name, ref in state.items():
            t = v.tensors[name]
            if ref.ndim == 2:
                assert t.dtype.name == "F16" and np.array_equal(t.raw(), ref), name


def test_refuses_overwrite_and_unknown_architecture(tmp_path):
    d = make_hf_model(tmp_path / "hf", **MODELS["qwen2"])
    out = tmp_path / "m.apr"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--force"):
        convert(d, out)
    assert out.read_bytes() == b"precious"
    convert(d, out, force=True)
    assert out.read_bytes()[:4] == b"APR\x00"
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="GPTNeoXForCausalLM"):
        convert(d, tmp_path / "x.apr")
    assert not (tmp_path / "x.apr").exists()


def test_tokenizer_longer_than_embedding_is_refused(tmp_path):
    d = make_hf_model(tmp_path / "hf", vocab=320, **{k: v for k, v in MODELS["llama"].items()})
    with pytest.raises(ConfigError, match="400"):
        convert(d, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_missing_tokenizer_needs_consent(tmp_path):
    d = make_hf_model(tmp_path / "hf", tokenizer=False, **MODELS["llama"])
    with pytest.raises(AprError, match="no tokenizer"):
        convert(d, tmp_path / "m.apr")
    convert(d, tmp_path / "m.apr", allow_no_tokenizer=True)
    with open_model(tmp_path / "m.apr") as v:
        assert v.tokenizer is None and v.config.family == "llama"
    convert(tmp_path / "m.apr", tmp_path / "m.gguf", allow_no_tokenizer=True)
    got = llama_cpp_logits(tmp_path / "m.gguf", IDS, tmp_path)   # llama.cpp still loads it
    assert np.abs(got - hf_logits(d, IDS)).max() <= 1e-4


def test_head_dim_other_than_hidden_over_heads(tmp_path):
    """llama.cpp's llama honours attention.key_length; its qwen2 cannot express it: refused."""
    d = make_hf_model(tmp_path / "llama", "llama", head_dim=32, heads=4, kv_heads=2)
    convert(d, tmp_path / "l.gguf")
    with open_model(tmp_path / "l.gguf") as g:
        assert g.config.head_dim == 32 and g.config.hidden_size == 64
    got = llama_cpp_logits(tmp_path / "l.gguf", IDS, tmp_path)
    assert np.abs(got - hf_logits(d, IDS)).max() <= 1e-4
    q = make_hf_model(tmp_path / "qwen2", "qwen2", head_dim=32, heads=4, kv_heads=2)
    convert(q, tmp_path / "q.apr")
    with pytest.raises(UnsupportedError, match="head_dim x num_heads"):
        convert(tmp_path / "q.apr", tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


def test_the_padding_row_is_carried_as_transformers_reads_it(tmp_path):
    """pad_token_id is the embedding's padding_idx in transformers (gradients, not logits).
    HF -> APR -> HF keeps the config's value, null included, also when the tokenizer pads with
    some token; a GGUF holds no config pad, so its export states the tokenizer's padding id."""
    import transformers
    d = make_hf_model(tmp_path / "hf", "qwen2", tied=True, vocab=448)
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    tok_pad = sorted(vocab.items(), key=lambda kv: kv[1])[9]       # (token, id 9)
    tok_cfg["pad_token"] = tok_pad[0]
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = json.loads((d / "config.json").read_text())
    for pad in (None, 7, -1):
        cfg["pad_token_id"] = pad
        (d / "config.json").write_text(json.dumps(cfg))
        want = None if pad is None else pad % 448
        apr, back = tmp_path / f"m{pad}.apr", tmp_path / f"back{pad}"
        convert(d, apr)
        view = open_model(apr)
        assert view.config.pad_token_id == want and view.tokenizer.padding_token_id == tok_pad[1]
        view.close()
        convert(apr, back)
        assert json.loads((back / "config.json").read_text())["pad_token_id"] == want
        m = transformers.AutoModelForCausalLM.from_pretrained(back)
        assert m.model.embed_tokens.padding_idx == want
    gguf_path, from_gguf = tmp_path / "m.gguf", tmp_path / "from_gguf"
    convert(apr, gguf_path)
    view = open_model(gguf_path)
    assert view.config.pad_token_id is None and view.tokenizer.padding_token_id == tok_pad[1]
    view.close()
    convert(gguf_path, from_gguf)
    assert json.loads((from_gguf / "config.json").read_text())["pad_token_id"] == tok_pad[1]


def test_pad_token_id_defaults_and_refusals():
    from apr.config import ModelConfig
    base = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=40, max_position_embeddings=64)
    gemma = dict(base, architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=100,
                 head_dim=8)
    assert ModelConfig.from_hf_config(gemma).pad_token_id == 0                # class default
    phi3 = dict(base, architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=32064)
    assert ModelConfig.from_hf_config(phi3).pad_token_id == 32000
    assert transformers_padding_idx("Phi3Config", **dict(phi3, vocab_size=32064)) == 32000
    with pytest.raises(ConfigError, match="pad_token_id=32000 is outside the vocabulary"):
        ModelConfig.from_hf_config(dict(phi3, vocab_size=500))                # as transformers
    llama = dict(base, architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=100)
    assert ModelConfig.from_hf_config(llama).pad_token_id is None
    assert ModelConfig.from_hf_config(dict(llama, pad_token_id=-1)).pad_token_id == 99
    assert transformers_padding_idx("LlamaConfig", **dict(llama, pad_token_id=-1)) == 99
    for bad in (100, -101, True, "3", 2.0):
        with pytest.raises(AprError, match="pad_token_id"):
            ModelConfig.from_hf_config(dict(llama, pad_token_id=bad))
    cfg = ModelConfig.from_hf_config(dict(llama, pad_token_id=5))
    meta = cfg.to_apr_metadata()
    assert ModelConfig.from_apr_metadata(meta).pad_token_id == 5
    meta["pad_token_id"] = None
    assert ModelConfig.from_apr_metadata(meta).pad_token_id is None
    del meta["pad_token_id"]                                 # an APR written before the key
    assert ModelConfig.from_apr_metadata(meta).pad_token_id is None


def transformers_padding_idx(config_class: str, **kw) -> int | None:
    import transformers
    kw = {k: v for k, v in kw.items() if k not in ("architectures", "model_type")}
    cfg = getattr(transformers, config_class)(**kw)
    return torch.nn.Embedding(cfg.vocab_size, 4, cfg.pad_token_id).padding_idx
