"""What a user would be misled by: a file that cannot run called equivalent, generation
settings not compared, a fused tensor's unequal parts swapped, the wrong side blamed for a
rotary order, a confirmed config key also called unexplained, logits that "agree" on a
quantized file built from a changed source, and rounding recognized by dtype only. Every B
here is made by transformers' classes or llama.cpp's converter and quantizer."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from apr import llamacpp
from apr.convert import convert
from diff import compare
from diff import report as R
from oracles import copy_dir, hf_logits, llama_cpp_convert, make_hf_model, scaled_copy


def run_diff(a, b):
    """Through the real CLI group: (exit code, last line)."""
    r = CliRunner().invoke(cli.main, ["diff", str(a), str(b)])
    return r.exit_code, r.output.strip().splitlines()[-1]


def edit_config(src, dst, **changes):
    """A copy of an HF directory with config.json keys changed (None: removed)."""
    copy_dir(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# --------------------------------------------------------------------------- a side that cannot run

def test_a_side_that_cannot_run_is_never_equivalent(tmp_path):
    """A tied Qwen2 (no lm_head stored) whose config was changed to untied: every tensor
    present is identical, but transformers gives B a freshly initialized head."""
    a = make_hf_model(tmp_path / "a", "qwen2", tied=True, rope_theta=1e6, seed=3)
    b = edit_config(a, tmp_path / "b", tie_word_embeddings=False)
    ids = [1, 5, 9, 40, 77, 120, 300, 8]
    top1 = np.mean(hf_logits(a, ids).argmax(-1) == hf_logits(b, ids).argmax(-1))
    assert top1 < 0.5                                 # the oracle: B really is another model
    r = compare(a, b)
    assert r.diagnosis.cls == R.MISSING and r.diagnosis.tensors == ["lm_head.weight"], r.diagnosis.line
    assert "B cannot be run" in r.diagnosis.message
    code, last = run_diff(a, b)
    assert code == 1 and last.startswith("DIAGNOSIS: MISSING — lm_head.weight"), last
    # the same with the logits off: still a finding
    assert not compare(a, b, logits=False).equivalent


# --------------------------------------------------------------------------- fused parts

def phi3_dir(path, seed=2):
    """A Phi-3 with GQA (q 64 rows, k and v 32 each) saved by transformers."""
    import torch
    import transformers
    from oracles import randomize_params
    torch.manual_seed(seed)
    cfg = transformers.Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, rms_norm_eps=1e-5, sliding_window=None,
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=None)
    model = transformers.Phi3ForCausalLM(cfg)
    randomize_params(model, seed)
    model.save_pretrained(path)
    return path


def test_fused_parts_of_unequal_sizes_are_a_swap(tmp_path):
    """Every order of q (64 rows), k and v (32 each) in qkv_proj is named as that order."""
    import itertools

    from safetensors.numpy import load_file, save_file
    a = phi3_dir(tmp_path / "a")
    sd = load_file(str(a / "model.safetensors"))
    name = "model.layers.1.self_attn.qkv_proj.weight"
    w = sd[name]
    parts = {"q": w[:64], "k": w[64:96], "v": w[96:]}
    for n, order in enumerate(p for p in itertools.permutations("qkv") if p != ("q", "k", "v")):
        b = copy_dir(a, tmp_path / f"b{n}")
        save_file({**sd, name: np.concatenate([parts[p] for p in order])},
                  str(b / "model.safetensors"), metadata={"format": "pt"})
        r = compare(a, b)
        assert r.diagnosis.line.startswith(f"DIAGNOSIS: SWAPPED — {name} parts {'/'.join(order)}"), \
            r.diagnosis.line


# --------------------------------------------------------------------------- rotary: the side

@pytest.fixture(scope="module")
def llama_cpp_llama(llama_cpp_src, tmp_path_factory):
    """An HF Llama and the GGUF llama.cpp's converter writes from it (Q/K permuted)."""
    import gguf

    from apr.tokenizer import from_gguf_fields
    d = tmp_path_factory.mktemp("llama-cpp")
    tok = from_gguf_fields(gguf.GGUFReader(llama_cpp_src / "models" / "ggml-vocab-gpt-2.gguf"))
    rows = tok.vocab_size + (-tok.vocab_size % 64)
    hf = make_hf_model(d / "hf", "llama", hidden=32, layers=2, heads=4, kv_heads=2, ffn=64,
                       vocab=rows, tokenizer=False, rope_theta=5e5, seed=7)
    for name in ("config.json", "generation_config.json"):     # the tokenizer's ids
        doc = json.loads((hf / name).read_text())
        (hf / name).write_text(json.dumps({**doc, "bos_token_id": tok.bos_token_id,
                                           "eos_token_id": tok.eos_token_id}))
    return hf, llama_cpp_convert(llama_cpp_src, hf, d / "llama-cpp.gguf", tok)


def test_rotary_message_names_the_unpermuted_side(llama_cpp_llama, tmp_path):
    """A llama GGUF whose attn_q was written without llama.cpp's permutation (through the gguf
    library's writer): the side that holds it is named, and "not permuted" said."""
    from apr.layout import adjacent_to_halves
    from oracles import gguf_library_copy
    hf, good = llama_cpp_llama
    bad = gguf_library_copy(good, tmp_path / "bad.gguf", tensors=lambda name, data: (
        adjacent_to_halves(data, 4) if name == "blk.1.attn_q.weight" else data))
    q = "model.layers.1.self_attn.q_proj.weight"
    for a in (good, hf):
        r = compare(a, bad, logits=False)
        assert r.diagnosis.line.startswith(f"DIAGNOSIS: LAYOUT rotary-permuted — {q}: B stores "
                                           "rows not permuted"), r.diagnosis.line
    # the other way round, A the reference: B (the good file) holds the other order, relative
    # to A, and is named; never "A stores ... twice"
    r = compare(bad, good, logits=False)
    assert f"{q}: B stores rows rotary-permuted (" in r.diagnosis.line, r.diagnosis.line


# --------------------------------------------------------------------------- confirmation

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 12, "rope_theta": 5e5}


def llama_dir(path, seed=4, **extra):
    """A small Llama saved by transformers (random, non-negligible weights)."""
    import torch
    import transformers
    from oracles import randomize_params
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **extra)
    model = transformers.LlamaForCausalLM(cfg)
    randomize_params(model, seed)
    model.save_pretrained(path)
    return path


def test_a_config_key_the_logits_confirm_is_not_also_unexplained(tmp_path):
    """llama3 rope_scaling dropped from B's config.json: CONFIG rope_scaling, confirmed by
    re-running B with A's value, and no LOGITS class beside it."""
    a = llama_dir(tmp_path / "a", rope_parameters=dict(LLAMA3_ROPE))
    b = edit_config(a, tmp_path / "b", rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    r = compare(a, b)
    assert r.diagnosis.line.startswith("DIAGNOSIS: CONFIG — rope_scaling"), r.diagnosis.line
    assert r.logits.confirmed and r.logits.culprit_config == ["rope_scaling"], r.logits.message
    assert "LOGITS" not in r.diagnosis.line and "explains it" not in r.diagnosis.line


# --------------------------------------------------------------------------- rounding by value

def test_rounding_is_recognized_from_the_values(llama_cpp_llama, llama_cpp_src, tmp_path):
    """An F32 model against llama.cpp's BF16 GGUF of transformers' BF16 copy: the norms are
    stored F32 there, holding BF16-rounded values: "B is A rounded to BF16", equivalent."""
    import torch
    import transformers
    hf, _ = llama_cpp_llama
    half = tmp_path / "bf16"
    transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).save_pretrained(half)
    for f in hf.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            (half / f.name).write_bytes(f.read_bytes())
    out = llama_cpp_convert(llama_cpp_src, half, tmp_path / "bf16.gguf", outtype="bf16")
    r = compare(hf, out)
    norm = next(t for t in r.tensors if t.name == "model.layers.0.input_layernorm.weight")
    assert norm.dtype_b == "F32" and norm.relation == R.ROUNDING, norm.message
    assert norm.message.startswith("B is A rounded to BF16"), norm.message
    assert r.equivalent and "within BF16 rounding" in r.diagnosis.line, r.diagnosis.line
    # and the other way round: A holds the rounded values
    r = compare(out, hf, logits=False)
    assert r.equivalent, r.diagnosis.line
    assert next(t for t in r.tensors if t.name == norm.name).message.startswith("A is B rounded to BF16")


# --------------------------------------------------------------------------- generation settings

def test_generation_settings_are_compared(tmp_path, llama_cpp_llama):
    """config.json's eos_token_id alone changed, generation_config.json's eos list changed,
    a GGUF eot id added: GENERATION, exit 1; a sampling default changed: a note, equivalent."""
    from oracles import gguf_library_copy
    a = llama_dir(tmp_path / "a")
    assert json.loads((a / "generation_config.json").read_text())["eos_token_id"] == 2
    b = edit_config(a, tmp_path / "b", eos_token_id=4)
    r = compare(a, b)
    assert r.diagnosis.cls == R.GENERATION and r.diagnosis.keys == ["eos_token_id"], r.diagnosis.line
    assert "B also stops at 4 (config.json eos_token_id)" in r.diagnosis.message
    assert run_diff(a, b)[0] == 1
    c = copy_dir(a, tmp_path / "c")
    gen = json.loads((c / "generation_config.json").read_text())
    (c / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 7]}))
    r = compare(a, c)
    assert r.diagnosis.cls == R.GENERATION and "7 (generation_config.json" in r.diagnosis.message
    d = copy_dir(a, tmp_path / "d")
    (d / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.6, "do_sample": True}))
    e = copy_dir(a, tmp_path / "e")
    (e / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.9, "do_sample": True}))
    r = compare(d, e)
    assert r.equivalent, r.diagnosis.line
    assert any("temperature: A 0.6" in n and "B 0.9" in n for n in r.notes), r.notes
    # llama.cpp's converter output, with an end-of-turn id it does not have
    hf, good = llama_cpp_llama
    eot = gguf_library_copy(good, tmp_path / "eot.gguf", extra={"tokenizer.ggml.eot_token_id": 11})
    r = compare(good, eot, logits=False)
    assert r.diagnosis.cls == R.GENERATION and "11 (tokenizer.ggml.eot_token_id)" in r.diagnosis.message
    assert compare(hf, good).equivalent


# --------------------------------------------------------------------------- measured logit bounds

def test_logits_of_a_quantized_file_from_a_changed_source_do_not_agree(tmp_path):
    """llama.cpp's Q8_0 of a source whose attn_v was scaled by 1.1, against the float model:
    its KL is beyond twice that of the control (A's weights rounded as B stores them, run on
    the same tokens), so the logits do not agree, and the tensor check names the scaled
    tensor; llama.cpp's clean Q8_0 agrees, its KL within a few percent of the control's; both
    lines print KL and top-1 agreement against the control's."""
    a = make_hf_model(tmp_path / "a", "llama", hidden=256, ffn=512, seed=5)
    v = "model.layers.1.self_attn.v_proj.weight"
    b = scaled_copy(a, tmp_path / "b", v, 1.1)
    convert(a, tmp_path / "a.gguf")
    convert(b, tmp_path / "b.gguf")
    clean = llamacpp.quantize(tmp_path / "a.gguf", tmp_path / "a-q8.gguf", "Q8_0")
    scaled = llamacpp.quantize(tmp_path / "b.gguf", tmp_path / "b-q8.gguf", "Q8_0")
    r = compare(a, clean)
    assert r.equivalent and r.logits.agree, r.diagnosis.line
    assert r.logits.control == "A rounded as B stores it", r.logits.message
    assert abs(r.logits.kl_mean / r.logits.control_kl - 1) < 0.1, r.logits.message
    assert "logits KL" in r.diagnosis.line and "top-1" in r.diagnosis.line
    r = compare(a, scaled)
    assert not r.logits.agree and r.logits.kl_mean > r.logits.kl_tolerance, r.logits.message
    assert r.logits.control == "A rounded as B stores it", r.logits.message
    assert r.diagnosis.line.startswith(f"DIAGNOSIS: SCALED — {v}: B = 1.1 × A"), r.diagnosis.line
    assert "KL" in r.logits.message and "top-1" in r.logits.message
    assert v in r.logits.message, r.logits.message        # the divergence is laid at its door


def test_the_control_is_the_lossy_sides_rounding_of_the_other(tmp_path):
    """A Q8_0 GGUF as A and the float model as B: the control is B's weights rounded as A
    stores them, and llama.cpp's honest Q8_0 agrees either way round."""
    a = make_hf_model(tmp_path / "a", "llama", hidden=256, ffn=512, seed=6)
    convert(a, tmp_path / "a.gguf")
    q8 = llamacpp.quantize(tmp_path / "a.gguf", tmp_path / "a-q8.gguf", "Q8_0")
    r = compare(q8, a)
    assert r.equivalent and r.logits.agree, r.diagnosis.line
    assert r.logits.control == "B rounded as A stores it", r.logits.message
    assert 0 < r.logits.control_kl and r.logits.kl_mean <= 2 * r.logits.control_kl
