"""The families beyond Llama/Qwen2 and the RoPE variants, against transformers' own classes.

Configs are drawn by Hypothesis: family (Llama, Qwen2, Qwen3, Mistral), GQA ratio 1, 2, 3 or 7,
tied or untied, RoPE default / linear / llama3 / yarn with positions past
``original_max_position_embeddings``, Qwen3 with head_dim != hidden / heads, Mistral with a
sliding window shorter than the sequence. For each: our config is read from transformers'
config (the real reader), the weights copied, and float64 logits and every hidden state
(<= 1e-10 relative), the loss and every gradient (<= 1e-8) and KV-cache decoding compared.

The float64 oracle patches transformers' rotary forward to form the same inverse frequencies
in float64 (`tests.oracles.hf_inv_freq64`); `test_float64_rope_formulas_are_transformers`
checks those formulas against transformers' own float32 functions.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import cli
from apr import rope
from apr.config import ModelConfig, PRESETS
from apr.errors import AprError
from ref.model import Model
from tests.oracles import copy_dir, hf_inv_freq64, randomize_params
from tests.test_model_vs_hf import hf_exact64, rel_err  # noqa: F401  (fixture)

CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
}
VOCAB, T, B = 83, 21, 2
ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 12},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 12},
    "yarn-mscale": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 10,
                    "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16.0},
}


def hf_model(family: str, ratio: int, kv_heads: int, tied: bool, rope_name: str,
             head_dim: int | None, window: int | None, theta: float, seed: int,
             extra: dict | None = None):
    cfg_cls, model_cls = CLASSES[family]
    heads = ratio * kv_heads
    kw = dict(vocab_size=VOCAB, hidden_size=8 * heads, intermediate_size=40,
              num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=64, tie_word_embeddings=tied, rms_norm_eps=1e-5,
              rope_parameters={"rope_theta": theta, **ROPES[rope_name]},
              attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if head_dim:
        kw["head_dim"] = head_dim
    if family in ("mistral", "phi3"):
        kw["sliding_window"] = window
    if family == "qwen3" and window:
        kw.update(use_sliding_window=True, sliding_window=window, max_window_layers=1)
    if family in ("gemma2", "gemma3"):
        kw.update(head_dim=head_dim or 8, sliding_window=window or 4096)
    if family == "gemma3":         # a RoPE per layer type; the scaled one on the global layers
        kw["rope_parameters"] = {"full_attention": kw["rope_parameters"],
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}
        kw["layer_types"] = ["sliding_attention", "full_attention"]
    kw.update(extra or {})
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw))
    randomize_params(model, seed)
    model = model.double().eval()
    scale = getattr(model.model.embed_tokens, "embed_scale", None)
    if scale is not None:   # as from_pretrained(dtype=float64) makes it: sqrt(hidden) in float64
        scale.fill_(model.config.hidden_size ** 0.5)
    return model


def ours_for(hf) -> Model:
    config = ModelConfig.from_hf_config(json.loads(hf.config.to_json_string()), "transformers")
    sd = hf.state_dict()
    names = config.tensor_shapes()
    dropped = set(dict(hf.named_parameters())) - set(names)
    assert not dropped, f"torch parameters without a place in the config: {sorted(dropped)}"
    return Model(config, {n: sd[n].detach().numpy().copy() for n in names}, dtype=np.float64)


@st.composite
def family_cases(draw):
    family = draw(st.sampled_from(sorted(CLASSES)))
    # Phi3Config accepts no RoPE scaling but longrope (refused here)
    rope_name = draw(st.sampled_from(["default"] if family == "phi3" else sorted(ROPES)))
    ratio = draw(st.sampled_from([1, 2, 3, 7]))
    kv_heads = draw(st.sampled_from([1, 2])) if ratio < 7 else 1
    tied = draw(st.booleans())
    head_dim = draw(st.sampled_from([6, 12, 16])) if family in ("qwen3", "gemma2", "gemma3") else None
    window = draw(st.sampled_from([None, 4, 7])) if family in ("mistral", "qwen3", "gemma2", "gemma3", "phi3") else None
    theta = draw(st.sampled_from([100.0, 1e4, 5e5]))
    extra = {}
    if family in ("gemma2", "gemma3"):
        extra = dict(query_pre_attn_scalar=draw(st.sampled_from([head_dim, 24])),
                     attn_logit_softcapping=draw(st.sampled_from([None, 0.5, 50.0])),
                     final_logit_softcapping=draw(st.sampled_from([None, 1.5, 30.0])),
                     hidden_activation=draw(st.sampled_from(["gelu_pytorch_tanh", "gelu"])))
    if draw(st.booleans()):     # a padding row (nn.Embedding's padding_idx) that the ids use
        extra["pad_token_id"] = "used"
    return family, ratio, kv_heads, tied, rope_name, head_dim, window, theta, extra


@settings(max_examples=42, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=family_cases())
def test_family_against_transformers(case, hf_exact64):  # noqa: F811
    family, ratio, kv_heads, tied, rope_name, head_dim, window, theta, extra = case
    ids = np.random.default_rng(ratio).integers(0, VOCAB, (B, T))
    if extra.get("pad_token_id") == "used":
        extra = {**extra, "pad_token_id": int(ids[1, 2])}
    hf = hf_model(*case[:4], rope_name, head_dim, window, theta, seed=len(repr(case)), extra=extra)
    model = ours_for(hf)
    cfg = model.config
    assert cfg.family == family and (cfg.rope_scaling is None) == (rope_name == "default")
    assert cfg.pad_token_id == hf.model.embed_tokens.padding_idx == extra.get("pad_token_id")
    if head_dim:
        assert cfg.head_dim == head_dim
    if window:
        assert any(cfg.window(i) == window for i in range(cfg.num_layers))

    # logits and every hidden state
    captured = []
    modules = [hf.model.embed_tokens, *hf.model.layers, hf.model.norm]
    handles = [m.register_forward_hook(
        lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).detach()))
        for m in modules]
    try:
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    finally:
        for h in handles:
            h.remove()
    logits, hidden = model.forward(ids, capture_hidden=True)
    assert rel_err(logits, ref) <= 1e-10, case
    for i, (a, b) in enumerate(zip(hidden, captured)):
        assert rel_err(a, b.numpy()) <= 1e-10, (case, i)

    # loss and every gradient
    targets = np.concatenate([ids[:, 1:], np.full((B, 1), -100)], axis=1)
    loss, grads = model.loss_and_grads(ids, targets)
    out = hf(input_ids=torch.tensor(ids)).logits
    ref_loss = F.cross_entropy(out.reshape(-1, VOCAB), torch.tensor(targets).reshape(-1),
                               ignore_index=-100)
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
    params = dict(hf.named_parameters())
    assert sorted(grads) == sorted(cfg.tensor_shapes())
    for name, g in grads.items():
        assert rel_err(g, params[name].grad.numpy()) <= 1e-8, (case, name)

    # KV-cache decoding (past the window and past the original context) = full forward
    cache = model.new_kv_cache(B, T)
    steps = [model.forward_step(ids[:, :5], cache)]
    steps += [model.forward_step(ids[:, t:t + 1], cache) for t in range(5, T)]
    assert rel_err(np.concatenate(steps, axis=1), logits) <= 1e-12
    # the same with the decode weights (transposed; q/k/v and gate/up as one product each)
    weights = model.decode_weights()
    cache = model.new_kv_cache(B, T)
    steps = [model.forward_step(ids[:, :5], cache, weights=weights)]
    steps += [model.forward_step(ids[:, t:t + 1], cache, weights=weights) for t in range(5, T)]
    assert rel_err(np.concatenate(steps, axis=1), logits) <= 1e-12


@pytest.mark.parametrize("name", sorted(ROPES))
def test_float64_rope_formulas_are_transformers(name):
    """The float64 transcription of the oracle = transformers' own function (float32), and
    ours = the transcription; the attention factor is transformers' value."""
    for theta, head_dim in ((1e4, 16), (5e5, 64), (1e6, 128)):
        cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                       head_dim=head_dim, max_position_embeddings=64,
                                       rope_parameters={"rope_theta": theta, **ROPES[name]})
        kind = cfg.rope_parameters["rope_type"]
        fn = ROPE_INIT_FUNCTIONS.get(kind)
        hf_inv, hf_factor = (fn(cfg, None) if fn else
                             (1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim), 1.0))
        ref = hf_inv_freq64(cfg).numpy()
        np.testing.assert_allclose(ref, hf_inv.double().numpy(), rtol=2e-6)
        scaling = rope.from_dict(ROPES[name], "test", 64)
        inv, factor = rope.inverse_frequencies(head_dim, theta, scaling)
        np.testing.assert_allclose(inv, ref, rtol=1e-13)
        assert factor == pytest.approx(hf_factor, rel=1e-12)


def test_llama_cpp_freq_factors_are_the_llama3_divisors():
    s = PRESETS["llama-3.2-1b"].rope_scaling
    base, _ = rope.inverse_frequencies(64, 500000.0, None)
    inv, _ = rope.inverse_frequencies(64, 500000.0, s)
    factors = rope.llama_cpp_freq_factors(64, 500000.0, s)
    np.testing.assert_allclose(base / factors, inv, rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == 32.0


@pytest.mark.parametrize("rp,word", [
    ({"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "longrope"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": "x"}, "beta_fast"),
    ({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}, "low_freq_factor"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 8192}, "low_freq_factor"),
    ({"rope_type": "yarn", "factor": 2.0}, "original_max_position_embeddings"),
    ({"rope_type": "freq_factors", "freq_factors": [1.0, 2.0, 4.0, 8.0]}, "freq_factors"),
])
def test_unsupported_rope_is_one_error_naming_it(tmp_path, rp, word):
    d = tmp_path / "m"
    d.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24,
           "vocab_size": 32, "rope_parameters": {"rope_theta": 1e4, **rp}}
    (d / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli.main, ["inspect", str(d)])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert word in lines[0], lines[0]


def test_refusals_of_the_families():
    with pytest.raises(AprError, match="attention_bias"):
        ModelConfig("mistral", 32, 1, 4, 2, 40, 64, attention_bias=True)
    with pytest.raises(AprError, match="every layer"):
        ModelConfig("mistral", 32, 2, 4, 2, 40, 64, sliding_window=4,
                    layer_types=("full_attention", "sliding_attention"))
    with pytest.raises(AprError, match="rotary pairs"):
        ModelConfig("llama", 32, 1, 4, 2, 40, 64,
                    rope_scaling=rope.RopeScaling(rope.FREQ_FACTORS, freq_factors=(1.0, 2.0)))
    yarn = ModelConfig("qwen3", 32, 1, 4, 2, 40, 64,
                       rope_scaling=rope.from_dict(ROPES["yarn"], "t", 64))
    assert any("yarn" in r for r in yarn.gguf_refusals())
    assert any("attention_bias" in r for r in yarn.replace(attention_bias=True).gguf_refusals())


@pytest.mark.parametrize("what", ["gate/up", "k/v", "q/k"])
def test_diff_names_swapped_fused_parts(what, tmp_path):
    """Phi-3's fused tensors with their parts in another order: SWAPPED, naming the tensor
    and the order found."""
    from safetensors.numpy import load_file, save_file
    hf = hf_model("phi3", 1 if what == "q/k" else 2, 2, False, "default", None, None, 1e4, seed=2)
    a = tmp_path / "a"
    hf.float().save_pretrained(a)
    b = copy_dir(a, tmp_path / "b")
    sd = load_file(str(b / "model.safetensors"))
    cfg = ours_for(hf).config
    if what == "gate/up":
        name = "model.layers.1.mlp.gate_up_proj.weight"
        w, f = sd[name], cfg.intermediate_size
        sd[name] = np.concatenate([w[f:], w[:f]])
        order = "up/gate"
    else:
        name = "model.layers.0.self_attn.qkv_proj.weight"
        w, q, kv = sd[name], cfg.q_size, cfg.kv_size
        parts = {"q": w[:q], "k": w[q:q + kv], "v": w[q + kv:]}
        order = "q/v/k" if what == "k/v" else "k/q/v"
        sd[name] = np.concatenate([parts[p] for p in order.split("/")])
    save_file(sd, str(b / "model.safetensors"), metadata={"format": "pt"})
    r = CliRunner().invoke(cli.main, ["diff", str(a), str(b)])
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"DIAGNOSIS: SWAPPED — {name} parts {order}"), last


def test_diff_names_a_missing_soft_cap(tmp_path):
    """The same Gemma 2 weights with final_logit_softcapping dropped from config.json: CONFIG,
    naming the key (confirmed by the logits)."""
    hf = hf_model("gemma2", 2, 2, True, "default", 8, None, 1e4, seed=3,
                  extra=dict(final_logit_softcapping=2.0, query_pre_attn_scalar=8))
    a = tmp_path / "a"
    hf.float().save_pretrained(a)
    b = copy_dir(a, tmp_path / "b")
    cfg = json.loads((b / "config.json").read_text())
    cfg["final_logit_softcapping"] = None
    (b / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli.main, ["diff", str(a), str(b)])
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("DIAGNOSIS: CONFIG") and "final_logit_softcapping" in last, last


def test_gemma_window_pattern_from_a_file_is_checked(tmp_path):
    """sliding_window_pattern (Gemma 3's older key) divides the layer index: 0 or less is one
    error naming it, not a crash."""
    for bad in (0, -6):
        d = tmp_path / str(bad)
        d.mkdir()
        (d / "config.json").write_text(json.dumps({
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 8,
            "intermediate_size": 24, "vocab_size": 32, "sliding_window_pattern": bad}))
        r = CliRunner().invoke(cli.main, ["inspect", str(d)])
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and "sliding_window_pattern" in lines[0], r.output
