"""Every GGUF key the reader models is applied, on files llama.cpp's own converter wrote.

For each family, an HF model built by transformers with every key that family's GGUF models
set to a value other than its default (Gemma 3's final soft-cap first: read and not applied, it
left logits 7x off without a word) goes through llama.cpp's convert_hf_to_gguf.py. The test
checks that the converter wrote each key at that value, then that our reader's logits for the
GGUF equal transformers' (float64 reference on F32 weights: 1e-5 relative). Each key moves the
logits by far more than that (TOL_EFFECT), so one key read and not applied fails the family.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apr import open_model
from apr.gguf_io import GgufFile
from apr.tokenizer import from_gguf_kv, to_hf_files
from ref.load import model_from_view
from tests.oracles import llama_cpp_convert, randomize_params, train_spm
from tests.test_families import CLASSES

IDS = [5, 17, 3, 60, 2, 9, 33, 41, 8, 12, 70, 1, 44, 19]
BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            pad_token_id=None, attn_implementation="eager")
WINDOW = 5
# family: (config values, {GGUF key (without the architecture): the value llama.cpp's converter
# must write}); the defaults are eps 1e-6 / 1e-5, theta 1e4 (1e6 for Gemma 3's global layers),
# head_dim = hidden / heads, no scaling, no window, no cap
CASES = {
    # llama.cpp's gemma2 scales queries by 1/sqrt(head_dim) (no GGUF key): the query scalar is
    # set equal to head_dim here, as in the published 2B and 9B; caps small enough to bite
    "gemma2": (dict(attn_logit_softcapping=3.0, final_logit_softcapping=4.0, rms_norm_eps=1e-2,
                    head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW),
               {"attn_logit_softcapping": 3.0, "final_logit_softcapping": 4.0,
                "attention.layer_norm_rms_epsilon": 1e-2, "attention.key_length": 16,
                "attention.sliding_window": WINDOW}),
    # six layers: llama.cpp's gemma3 makes every sixth layer global (no GGUF key), as
    # transformers' default layer_types do, so the global rope base applies to one
    "gemma3": (dict(final_logit_softcapping=5.0, rms_norm_eps=1e-2, head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=WINDOW, num_hidden_layers=6,
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 2e5},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
               {"final_logit_softcapping": 5.0, "attention.layer_norm_rms_epsilon": 1e-2,
                "attention.key_length": 16, "attention.sliding_window": WINDOW, "rope.freq_base": 2e5}),
    "llama": (dict(rms_norm_eps=1e-2, head_dim=16,
                   rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 3000.0}),
              {"attention.layer_norm_rms_epsilon": 1e-2, "attention.key_length": 16,
               "rope.scaling.type": "linear", "rope.scaling.factor": 2.5, "rope.freq_base": 3000.0}),
    "mistral": (dict(rms_norm_eps=1e-2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 3000.0}),
                {"attention.layer_norm_rms_epsilon": 1e-2, "attention.key_length": 16, "rope.freq_base": 3000.0}),
    "qwen2": (dict(rms_norm_eps=1e-2, rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 3000.0}),
              {"attention.layer_norm_rms_epsilon": 1e-2, "rope.scaling.type": "linear",
               "rope.scaling.factor": 2.5, "rope.freq_base": 3000.0}),
    "qwen3": (dict(rms_norm_eps=1e-2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 3000.0}),
              {"attention.layer_norm_rms_epsilon": 1e-2, "attention.key_length": 16, "rope.freq_base": 3000.0}),
    "phi3": (dict(rms_norm_eps=1e-2, sliding_window=WINDOW, rope_parameters={"rope_type": "default", "rope_theta": 3000.0}),
             {"attention.layer_norm_rms_epsilon": 1e-2, "attention.sliding_window": WINDOW,
              "rope.freq_base": 3000.0}),
}
TOL = 1e-5   # F32 weights; Gemma norms stored as 1 + w in F32 round (measured 2.0e-6)
TOL_EFFECT = 100 * TOL   # what each key at its default must move the logits by at least


# llama.cpp's own vocabularies, one its converter recognizes for each family
VOCAB_FILES = {"qwen2": "ggml-vocab-qwen2.gguf"}


@functools.cache
def _vocab(path: Path):
    """A llama.cpp vocabulary file's tokenizer, read once per run (the gguf library's reader
    takes half a minute over 128k tokens; ours, a second)."""
    return from_gguf_kv(GgufFile(path).kv)


SPM_FAMILIES = ("gemma2",)
SPM_ROWS = 768               # the embedding rows: the SentencePiece model's 700 pieces, padded


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A Gemma-style SentencePiece model, trained once per module (about a second)."""
    return train_spm(tmp_path_factory.mktemp("spm"), "gemma")


def tokenizer_for(llama_cpp_src, family: str):
    name = VOCAB_FILES.get(family, "ggml-vocab-llama-bpe.gguf")
    return _vocab(llama_cpp_src / "models" / name)


@pytest.mark.parametrize("family", list(CASES))
def test_llama_cpp_converter_keys_are_applied(family, llama_cpp_src, tmp_path, spm_model):
    values, written = CASES[family]
    spm = family in SPM_FAMILIES    # the converter reads its vocabulary from tokenizer.model
    tokenizer = None if spm else tokenizer_for(llama_cpp_src, family)
    cfg_cls, model_cls = CLASSES[family]
    rows = SPM_ROWS if spm else tokenizer.vocab_size + (-tokenizer.vocab_size % 64)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**BASE, "vocab_size": rows, **values})).double()
    randomize_params(model, seed=1)
    model = model.float().eval()
    d = tmp_path / "hf"
    model.save_pretrained(d)
    if spm:
        (d / "tokenizer.model").write_bytes(spm_model.read_bytes())
    else:
        for name, text in to_hf_files(tokenizer).items():
            if name == "tokenizer_config.json" and family == "phi3":   # Phi: GPT-2 BPE or nothing
                text = json.dumps({**json.loads(text), "tokenizer_class": "GPT2Tokenizer"})
            (d / name).write_text(text, encoding="utf-8")
    out = llama_cpp_convert(llama_cpp_src, d, tmp_path / "llama-cpp.gguf")

    kv = GgufFile(out, arrays=False).kv      # the scalar keys (arrays stepped over)
    arch = kv["general.architecture"]
    for key, value in written.items():
        got = kv.get(f"{arch}.{key}")
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, \
            f"{family}: llama.cpp's converter wrote {arch}.{key} = {got!r}, the test needs {value!r}"

    with torch.no_grad():
        want = model.double()(torch.tensor([IDS])).logits[0].numpy()
    with open_model(out) as g:
        got = model_from_view(g, dtype=np.float64).forward(np.array([IDS]))
    got = np.asarray(got[0] if isinstance(got, tuple) else got)[0]
    assert got.shape == want.shape
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert rel < TOL, f"{family}: our reading of llama.cpp's GGUF vs transformers rel {rel:.3g}"
    cap = values.get("final_logit_softcapping")
    if cap:                       # the cap bites: without it the logits leave [-cap, cap]
        assert np.abs(want).max() < cap and np.abs(got).max() < cap


@pytest.mark.parametrize("family", list(CASES))
def test_each_key_moves_the_logits(family):
    """The check above can fail for each key: the same weights with one key at transformers'
    default give logits further than TOL_EFFECT from the case's (keys that set a shape,
    head_dim, excepted: they cannot be read wrong without the tensors failing to fit)."""
    values, _ = CASES[family]
    cfg_cls, model_cls = CLASSES[family]
    base = {**BASE, "vocab_size": 128}

    def logits(cfg_values, state=None):
        torch.manual_seed(0)
        model = model_cls(cfg_cls(**{**base, **cfg_values})).double()
        if state is None:
            randomize_params(model, seed=1)
        else:
            model.load_state_dict(state)
        with torch.no_grad():
            return model(torch.tensor([IDS])).logits[0].numpy(), model.state_dict()

    want, state = logits(values)
    for key in values:
        if key in ("head_dim", "num_hidden_layers"):
            continue
        without = {k: v for k, v in values.items() if k != key}
        moved, _ = logits(without, state)
        rel = float(np.abs(moved - want).max() / np.abs(want).max())
        assert rel > TOL_EFFECT, f"{family}: {key} at its default moves the logits only {rel:.3g}"
