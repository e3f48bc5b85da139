"""The single-token decode step with decode weights (`Model._step_forward`, which
`forward_step` takes for one sequence and one new token on the CPU) against the general path:
the logits of `Model.forward` on the whole sequence, position by position, for every family
flag the general path honors (GQA, biases, q/k norms, sliding windows, soft-caps, post norms,
Gemma's norm offset and embedding scale, fused q/k/v, both rotary orders, RoPE scaling, a
RoPE of the sliding layers' own); and every other step (a batch, a prompt, no decode
weights) is left to the general path.

Parameters are random and non-negligible (norm weights near 1, biases of size 0.3), so a flag
the lean step dropped would change the logits. Relative error = max|a - b| / max|b|.
"""
from __future__ import annotations

import numpy as np
import pytest

from apr import rope
from apr.config import ModelConfig
from apr.names import FULL_ATTENTION, ROPE_ADJACENT, SLIDING_ATTENTION
from ref.model import Model

VOCAB, PROMPT, T = 61, 3, 14          # 11 single-token steps, past every window below
S, F = SLIDING_ATTENTION, FULL_ATTENTION


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def config(family: str, **kw) -> ModelConfig:
    base = dict(hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, intermediate_size=40,
                vocab_size=VOCAB, max_position_embeddings=32, rms_norm_eps=1e-6)
    return ModelConfig(family, **{**base, **kw})


CONFIGS = {
    "llama-gqa3-untied": config("llama"),
    "llama-mha-biases-mlp-bias": config("llama", num_kv_heads=6, attention_bias=True, mlp_bias=True),
    "llama-adjacent-rope-llama3": config("llama", rope_type=ROPE_ADJACENT, rope_scaling=rope.from_dict(
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 6}, "test")),
    "qwen2-gqa6-tied-biases-window": config("qwen2", num_kv_heads=1, attention_bias=True,
                                            tie_word_embeddings=True, rope_theta=1e6,
                                            layer_types=(S, F, S), sliding_window=4),
    "qwen3-qk-norm-head-dim-yarn": config("qwen3", head_dim=12, rope_theta=1e6,
                                          rope_scaling=rope.from_dict(
                                              {"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 6}, "test")),
    "qwen3-qk-norm-window": config("qwen3", head_dim=16, layer_types=(F, S, S), sliding_window=5),
    "mistral-window-wide-mlp": config("mistral", layer_types=(S, S, S), sliding_window=3,
                                     intermediate_size=80),
    "gemma2-softcaps-post-norms": config(
        "gemma2", head_dim=16, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
        attn_logit_softcapping=0.5, final_logit_softcapping=1.5, query_pre_attn_scalar=24,
        layer_types=(S, F, S), sliding_window=4),
    "gemma3-qk-norm-local-rope": config(
        "gemma3", head_dim=16, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
        final_logit_softcapping=30.0, layer_types=(S, S, F), sliding_window=4, rope_theta=1e6,
        rope_local_theta=1e4),
    "phi3-fused-window": config("phi3", layer_types=(S, S, S), sliding_window=6),
}


def random_model(cfg: ModelConfig, dtype, seed: int = 0) -> Model:
    """Every parameter random: norm weights near 1 as the family multiplies by them, biases of
    size 0.3, matrices of size O(1/sqrt(fan_in)), embedding rows N(0, 0.5^2)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in cfg.tensor_shapes().items():
        noise = rng.standard_normal(shape)
        if name.endswith("norm.weight"):
            params[name] = 1.0 - cfg.norm_offset + 0.2 * noise
        elif name.endswith(".bias"):
            params[name] = 0.3 * noise
        elif name.endswith("embed_tokens.weight"):
            params[name] = 0.5 * noise
        else:
            params[name] = noise * 1.5 / shape[-1] ** 0.5
    return Model(cfg, params, dtype=dtype)


def decode(model: Model, ids: np.ndarray, weights, prompt: int = PROMPT) -> np.ndarray:
    """forward_step over ``ids``: the first ``prompt`` positions at once, then one at a time."""
    cache = model.new_kv_cache(ids.shape[0], ids.shape[1])
    steps = [model.forward_step(ids[:, :prompt], cache, weights=weights)]
    steps += [model.forward_step(ids[:, t:t + 1], cache, weights=weights)
              for t in range(prompt, ids.shape[1])]
    assert cache.length == ids.shape[1]
    return np.concatenate(steps, axis=1)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_single_token_steps_equal_forward(name, dtype, tol, monkeypatch):
    cfg = CONFIGS[name]
    model = random_model(cfg, dtype)
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, T))
    full = model.forward(ids)
    lean = []
    step = Model._step_forward
    monkeypatch.setattr(Model, "_step_forward", lambda self, *a: lean.append(1) or step(self, *a))
    got = decode(model, ids, model.decode_weights())
    assert len(lean) == T - PROMPT                  # every single-token step took the lean path
    assert got.dtype == dtype
    assert rel_err(got, full) <= tol, name
    # the general path's steps, for the same cache contents
    assert rel_err(decode(model, ids, None), full) <= tol


def test_decode_weights_keep_the_hf_layout_of_the_projections_that_narrow():
    """A projection with more inputs than outputs (the MLP's down projection when the MLP is
    wider than the model, an attention output wider than the model) is held as the .T view of
    an HF-layout copy, the others as C-contiguous transposed copies; both are x @ W^T + b, and
    the value tests above run both layouts (the wide-MLP and the qwen3/gemma configs)."""
    cfg = CONFIGS["mistral-window-wide-mlp"]
    model = random_model(cfg, np.float32)
    weights = model.decode_weights()
    seen = set()
    for i, layer in enumerate(weights.layers):
        for kind, (wt, _) in layer.items():
            n_in, n_out = wt.shape
            narrows = n_in > n_out
            seen.add(narrows)
            assert (wt.T.flags.c_contiguous if narrows else wt.flags.c_contiguous), (i, kind)
            assert not np.shares_memory(wt, model.params[f"model.layers.{i}.mlp.down_proj.weight"])
        np.testing.assert_array_equal(layer["ffn_down"][0].T, model.params[f"model.layers.{i}.mlp.down_proj.weight"])
    assert seen == {True, False}


@pytest.mark.parametrize("name", ["qwen2-gqa6-tied-biases-window", "gemma2-softcaps-post-norms"])
def test_other_steps_take_the_general_path(name, monkeypatch):
    """A batch of two, a prompt (T > 1) and steps without decode weights never reach the lean
    step, and give forward's logits."""
    model = random_model(CONFIGS[name], np.float64)

    def refuse(*_):
        raise AssertionError("the lean step was taken")
    monkeypatch.setattr(Model, "_step_forward", refuse)
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, T))
    full = model.forward(ids)
    weights = model.decode_weights()
    assert rel_err(decode(model, ids, weights), full) <= 1e-12                  # batch 2
    assert rel_err(decode(model, ids[:1], None), full[:1]) <= 1e-12            # no weights
    cache = model.new_kv_cache(1, T)                                           # T > 1 only
    got = [model.forward_step(ids[:1, t:t + 2], cache, weights=weights) for t in range(0, T, 2)]
    assert rel_err(np.concatenate(got, axis=1), full[:1]) <= 1e-12
    # single-token steps with weights, when the config has a field the lean step does not know
    from ref import model as model_mod
    monkeypatch.setattr(model_mod, "LEAN_STEP_COVERS_CONFIG", False)
    assert rel_err(decode(model, ids[:1], weights), full[:1]) <= 1e-12


def test_a_config_field_the_lean_step_does_not_know_sends_steps_to_the_general_path():
    """The lean step covers the config and family fields of `LEAN_STEP_FIELDS`; a field added
    to either (a new flag) turns it off until it is implemented there."""
    import dataclasses
    from apr.names import Family
    from ref import model as model_mod
    now = {f.name for cls in (ModelConfig, Family) for f in dataclasses.fields(cls)}
    assert model_mod.LEAN_STEP_COVERS_CONFIG and now == model_mod.LEAN_STEP_FIELDS
    grown = dataclasses.make_dataclass("Grown", [("partial_rotary_factor", float, 1.0)],
                                       bases=(Family,), frozen=True)
    assert not {f.name for f in dataclasses.fields(grown)} <= model_mod.LEAN_STEP_FIELDS


def test_lean_step_writes_the_cache_as_the_general_path():
    """The keys and values the lean step stores are those of the general path (so the two can
    follow each other in one generation)."""
    model = random_model(CONFIGS["qwen3-qk-norm-window"], np.float64)
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, T))
    caches = []
    for weights in (model.decode_weights(), None):
        cache = model.new_kv_cache(1, T)
        model.forward_step(ids[:, :PROMPT], cache, weights=weights)
        for t in range(PROMPT, T):
            model.forward_step(ids[:, t:t + 1], cache, weights=weights)
        caches.append(cache)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        assert rel_err(a, b) <= 1e-12


def test_rope_rows_grow_with_the_positions():
    """The rotary rows kept in the decode weights are built for the positions a cache needs and
    built again for a longer one: the same decode weights serve a short and then a longer
    generation, and every row is `_rope`'s of its position."""
    model = random_model(CONFIGS["gemma3-qk-norm-local-rope"], np.float64)  # two RoPEs
    weights = model.decode_weights()
    for n in (T, 3 * T):
        ids = np.random.default_rng(n).integers(0, VOCAB, (1, n))
        assert rel_err(decode(model, ids, weights), model.forward(ids)) <= 1e-12
        assert len(weights.rope_rows[0][0]) == n          # the capacity (under 256 positions)
    rows = model._step_rope(weights, 300, 1000)
    assert len(rows[0][0]) == 600
    for i, (cos, sin) in enumerate(model._rope(299, 1)):
        assert np.array_equal(rows[i][0][299], cos[0, weights.rope_pair])
        assert np.array_equal(rows[i][1][299], sin[0, weights.rope_pair] * weights.rope_sign)
