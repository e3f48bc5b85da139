"""The whole reference model against transformers' LlamaForCausalLM / Qwen2ForCausalLM built
from small random configs (GQA ratios 1, 2 and 7; tied and untied; with and without q/k/v
biases; rope base 1e4 and 1e6), with the torch model's weights copied into our params.

Float64 oracle: transformers deliberately computes three things in float32 even in a
``.double()`` model (RMSNorm upcasts to float32, eager attention's softmax uses
``dtype=torch.float32``, and the rotary angles are formed in float32), which alone puts
~1e-7 between the two. For the float64 comparisons (fixture ``hf_exact64``) those three
spots are patched with the same formulas evaluated in the input dtype; nothing else of
transformers is changed. The float32 comparison uses transformers unpatched.

Relative error = max|a - b| / max|b|.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from apr.config import ModelConfig
from apr.errors import AprError, ConfigError
from apr.names import ROPE_ADJACENT
from ref.generate import generate, sample_token
from ref.model import EMBED, LM_HEAD, Model
from tests.oracles import hf_inv_freq64, randomize_params

B, T = 2, 12


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------- float64 transformers

def _rmsnorm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _gemma_rmsnorm_in_input_dtype(self, x):
    """Gemma's RMSNorm, x / rms(x) * (1 + w), in the input dtype (transformers: float32)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def _rotary_in_float64(self, x, position_ids, layer_type=None):
    """transformers' rotary forward with the inverse frequencies of `hf_inv_freq64` (the same
    formulas in float64) and transformers' own attention scaling (per layer type in Gemma 3)."""
    inv_freq = hf_inv_freq64(self.config, layer_type)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = getattr(self, f"{layer_type}_attention_scaling") if layer_type else self.attention_scaling
    return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def _eager_attention_in_input_dtype(module, query, key, value, attention_mask, scaling=None,
                                    dropout=0.0, softcap=None, **kwargs):
    """transformers' eager_attention_forward with the softmax in the query's dtype (Gemma 2's
    soft-cap included)."""
    key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None
                                                          else module.head_dim ** -0.5)
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


HF_MODULES = ((modeling_llama, "Llama"), (modeling_qwen2, "Qwen2"), (modeling_qwen3, "Qwen3"),
              (modeling_mistral, "Mistral"), (modeling_gemma2, "Gemma2"), (modeling_phi3, "Phi3"),
              (modeling_gemma3, "Gemma3"))
GEMMA_MODULES = {modeling_gemma2, modeling_gemma3}


@pytest.fixture
def hf_exact64(monkeypatch):
    for mod, prefix in HF_MODULES:
        monkeypatch.setattr(getattr(mod, prefix + "RMSNorm"), "forward",
                            _gemma_rmsnorm_in_input_dtype if mod in GEMMA_MODULES
                            else _rmsnorm_in_input_dtype)
        monkeypatch.setattr(getattr(mod, prefix + "RotaryEmbedding"), "forward", _rotary_in_float64)
        monkeypatch.setattr(mod, "eager_attention_forward", _eager_attention_in_input_dtype)


# --------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    id: str
    family: str
    hidden: int
    heads: int
    kv_heads: int
    tied: bool
    bias: bool
    theta: float


CASES = [
    Case("llama-mha-untied-nobias-1e4", "llama", 32, 4, 4, False, False, 1e4),   # ratio 1
    Case("llama-gqa2-tied-bias-1e6", "llama", 32, 4, 2, True, True, 1e6),        # ratio 2
    Case("qwen2-gqa7-tied-1e6", "qwen2", 56, 7, 1, True, True, 1e6),             # ratio 7
    Case("qwen2-gqa7-untied-1e4", "qwen2", 112, 14, 2, False, True, 1e4),        # ratio 7
]
VOCAB, FFN, LAYERS, EPS = 97, 72, 2, 1e-6
O_BIAS = "model.layers.0.self_attn.o_proj.bias"


def our_config(case: Case) -> ModelConfig:
    return ModelConfig(case.family, case.hidden, LAYERS, case.heads, case.kv_heads, FFN, VOCAB,
                       max_position_embeddings=64, rope_theta=case.theta, rms_norm_eps=EPS,
                       tie_word_embeddings=case.tied, attention_bias=case.bias)


def build_hf(case: Case, seed: int = 0) -> torch.nn.Module:
    """A float64 transformers model with every parameter random (norm weights near 1,
    biases and matrices of size O(1/sqrt(fan_in)) so that no layer is negligible)."""
    kw = dict(vocab_size=VOCAB, hidden_size=case.hidden, intermediate_size=FFN,
              num_hidden_layers=LAYERS, num_attention_heads=case.heads,
              num_key_value_heads=case.kv_heads, rope_theta=case.theta, rms_norm_eps=EPS,
              max_position_embeddings=64, tie_word_embeddings=case.tied,
              attn_implementation="eager")
    if case.family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=case.bias, **kw))
    else:
        assert case.bias, "Qwen2 always has q/k/v biases"
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    assert model.config.rope_parameters["rope_theta"] == case.theta
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == case.tied
    randomize_params(model, seed)
    return model.double().eval()


def params_of(hf: torch.nn.Module, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our params from the torch model; every torch parameter must be used (none dropped)."""
    sd = hf.state_dict()
    names = config.tensor_shapes()
    dropped = set(dict(hf.named_parameters())) - set(names)
    assert not dropped, f"torch parameters without a place in the config: {sorted(dropped)}"
    return {name: sd[name].detach().numpy().copy() for name in names}


def make_ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (B, T))


def make_targets(ids: np.ndarray, seed: int = 1) -> np.ndarray:
    """Labels shifted as a causal LM does (targets[t] = labels[t + 1]), the last position and
    a few random ones ignored."""
    labels = ids.copy()
    labels[np.random.default_rng(seed).random(ids.shape) < 0.2] = -100
    return np.concatenate([labels[:, 1:], np.full((ids.shape[0], 1), -100)], axis=1)


def hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.fixture(params=CASES, ids=lambda c: c.id)
def case(request) -> Case:
    return request.param


# --------------------------------------------------------------------------- logits

def test_logits_float64(case, hf_exact64):
    cfg, hf = our_config(case), build_hf(case)
    model = Model(cfg, params_of(hf, cfg), dtype=np.float64)
    ids = make_ids()
    ours, ref = model.forward(ids), hf_logits(hf, ids)
    assert ours.shape == (B, T, VOCAB) and ours.dtype == np.float64
    assert rel_err(ours, ref) <= 1e-10


def test_logits_float32_against_stock_transformers(case):
    cfg, hf = our_config(case), build_hf(case)
    hf32 = copy.deepcopy(hf).float()
    model = Model(cfg, params_of(hf32, cfg), dtype=np.float32)
    ids = make_ids(3)
    ours = model.forward(ids)
    assert ours.dtype == np.float32
    assert rel_err(ours, hf_logits(hf32, ids)) <= 1e-4


def test_hidden_states_float64(case, hf_exact64):
    """Embeddings, each decoder layer's output and the final norm's output, against forward
    hooks on the same transformers modules."""
    cfg, hf = our_config(case), build_hf(case)
    model = Model(cfg, params_of(hf, cfg), dtype=np.float64)
    captured: list[torch.Tensor] = []
    modules = [hf.model.embed_tokens, *hf.model.layers, hf.model.norm]

    def hook(_module, _inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        ids = make_ids(4)
        hf_logits(hf, ids)
    finally:
        for h in handles:
            h.remove()
    logits, hidden = model.forward(ids, capture_hidden=True)
    assert len(hidden) == len(captured) == LAYERS + 2
    for i, (ours, ref) in enumerate(zip(hidden, captured)):
        assert rel_err(ours, ref.numpy()) <= 1e-10, f"hidden state {i}"


# --------------------------------------------------------------------------- gradients

def test_loss_and_gradients_float64(case, hf_exact64):
    """Loss and every parameter's gradient against loss.backward() through transformers'
    model: the same mean cross-entropy over the shifted, partly ignored targets."""
    cfg, hf = our_config(case), build_hf(case)
    model = Model(cfg, params_of(hf, cfg), dtype=np.float64)
    ids = make_ids(5)
    targets = make_targets(ids)
    logits = hf(input_ids=torch.tensor(ids)).logits
    ref_loss = F.cross_entropy(logits.reshape(-1, VOCAB), torch.tensor(targets).reshape(-1),
                               ignore_index=-100)
    ref_loss.backward()
    hf_params = dict(hf.named_parameters())
    # one call, and the rows in B threads (`loss_and_grads(workers=)`, as pretrain runs it)
    assert B > 1 and model.can_split_rows()
    for workers in (1, B):
        loss, grads = model.loss_and_grads(ids, targets, workers=workers)
        assert abs(loss - ref_loss.item()) <= 1e-12 * abs(ref_loss.item()), workers
        assert abs(model.loss(ids, targets) - loss) <= 1e-14 * abs(loss)
        assert sorted(grads) == sorted(cfg.tensor_shapes())
        assert (LM_HEAD in grads) == (not case.tied)
        for name, g in grads.items():
            ref = hf_params[name].grad.numpy()
            assert g.shape == ref.shape and g.dtype == np.float64
            assert rel_err(g, ref) <= 1e-8, (name, workers)


# --------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 1, 1, 1, 1], [1] * T, [3, 4, 1, 4]])
def test_kv_cache_decoding_equals_full_forward(chunks):
    case = CASES[2]   # GQA 7:1, tied, biases
    cfg, hf = our_config(case), build_hf(case)
    model = Model(cfg, params_of(hf, cfg), dtype=np.float64)
    ids = make_ids(6)
    full = model.forward(ids)
    cache = model.new_kv_cache(B, T)
    steps, start = [], 0
    for n in chunks:
        steps.append(model.forward_step(ids[:, start:start + n], cache))
        start += n
    assert start == T and cache.length == T
    assert rel_err(np.concatenate(steps, axis=1), full) <= 1e-12
    with pytest.raises(AprError, match="capacity"):
        model.forward_step(ids[:, :1], cache)


def test_kv_cache_last_only_and_float32():
    case = CASES[1]
    cfg, hf = our_config(case), build_hf(case)
    model = Model(cfg, params_of(hf, cfg), dtype=np.float32)
    ids = make_ids(7)
    full = model.forward(ids)
    cache = model.new_kv_cache(B, T + 4)
    first = model.forward_step(ids[:, :8], cache, last_only=True)
    assert first.shape == (B, 1, VOCAB) and first.dtype == np.float32
    rest = [model.forward_step(ids[:, t:t + 1], cache) for t in range(8, T)]
    assert rel_err(np.concatenate([first] + rest, axis=1), full[:, 7:]) <= 1e-5
    # the same through the decode weights (float32); another model's are refused
    weights = model.decode_weights()
    cache = model.new_kv_cache(B, T + 4)
    first = model.forward_step(ids[:, :8], cache, last_only=True, weights=weights)
    rest = [model.forward_step(ids[:, t:t + 1], cache, weights=weights) for t in range(8, T)]
    assert rel_err(np.concatenate([first] + rest, axis=1), full[:, 7:]) <= 1e-5
    other = Model(cfg, params_of(hf, cfg), dtype=np.float32)
    with pytest.raises(AprError, match="another model"):
        other.forward_step(ids[:, :1], other.new_kv_cache(B, T), weights=weights)


def test_lean_decode_steps_equal_transformers_logits(case, hf_exact64):
    """One sequence, one token a step through the decode weights (`Model._step_forward`,
    what `generate` runs), against transformers' logits of the whole sequence in float64.
    FFN 72 is wider than the model in three cases (the down projection kept in the HF
    layout) and narrower in the fourth (transposed)."""
    cfg, hf = our_config(case), build_hf(case)
    model = Model(cfg, params_of(hf, cfg), dtype=np.float64)
    ids = make_ids(8)[:1]
    weights = model.decode_weights()
    down = weights.layers[0]["ffn_down"][0]
    assert down.T.flags.c_contiguous == (FFN > case.hidden)
    cache = model.new_kv_cache(1, T)
    steps = [model.forward_step(ids[:, :2], cache, weights=weights)]
    steps += [model.forward_step(ids[:, t:t + 1], cache, weights=weights) for t in range(2, T)]
    assert rel_err(np.concatenate(steps, axis=1), hf_logits(hf, ids)) <= 1e-10


# --------------------------------------------------------------------------- rotary order

def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K permutation: HF halves order -> adjacent-pair order, per head."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_adjacent(params: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = dict(params)
    for name in params:
        for proj, n in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
            if f"self_attn.{proj}." in name:
                out[name] = permute_rows(params[name], n)
    return out


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=lambda c: c.id)
def test_adjacent_rope_on_permuted_qk_gives_hf_logits(case, hf_exact64):
    cfg, hf = our_config(case), build_hf(case)
    params = params_of(hf, cfg)
    adjacent = to_adjacent(params, cfg)
    ids = make_ids(8)
    ref = hf_logits(hf, ids)
    model = Model(cfg.replace(rope_type=ROPE_ADJACENT), adjacent, dtype=np.float64)
    assert rel_err(model.forward(ids), ref) <= 1e-10
    # the permuted rows under the halves rotary are wrong by O(1): the check can fail
    wrong = Model(cfg, adjacent, dtype=np.float64)
    assert rel_err(wrong.forward(ids), ref) > 1e-3
    # gradients of the permuted model are the permuted gradients
    targets = make_targets(ids)
    _, g_halves = Model(cfg, params, dtype=np.float64).loss_and_grads(ids, targets)
    _, g_adj = model.loss_and_grads(ids, targets)
    for name, g in to_adjacent(g_halves, cfg).items():
        assert rel_err(g_adj[name], g) <= 1e-10, name


# --------------------------------------------------------------------------- parameters

def test_tied_params_with_lm_head_entry():
    case = CASES[2]
    cfg, hf = our_config(case), build_hf(case)
    full_sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert LM_HEAD in full_sd                       # HF lists the shared tensor twice
    model = Model(cfg, full_sd, dtype=np.float64)   # accepted: equal to the embedding
    assert LM_HEAD not in model.params and model.lm_head is model.params[EMBED]
    bad = dict(full_sd)
    bad[LM_HEAD] = bad[LM_HEAD] + 1.0
    with pytest.raises(ConfigError, match="differs"):
        Model(cfg, bad)


def test_llama_o_proj_bias_is_never_dropped(hf_exact64):
    """transformers' Llama with attention_bias=True has q/k/v AND o_proj biases; the config
    lists all four and the full state dict runs exactly."""
    case = CASES[1]
    cfg = our_config(case)
    kw = dict(vocab_size=VOCAB, hidden_size=case.hidden, intermediate_size=FFN,
              num_hidden_layers=LAYERS, num_attention_heads=case.heads,
              num_key_value_heads=case.kv_heads, rope_theta=case.theta, rms_norm_eps=EPS,
              tie_word_embeddings=False, attention_bias=True, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    cfg = cfg.replace(tie_word_embeddings=False)
    assert O_BIAS in cfg.tensor_shapes()
    model = Model(cfg, sd, dtype=np.float64)
    ids = make_ids(9)
    assert rel_err(model.forward(ids), hf_logits(hf, ids)) <= 1e-10
    del sd[O_BIAS]
    with pytest.raises(ConfigError, match="missing .*o_proj.bias"):
        Model(cfg, sd, dtype=np.float64)


def test_params_are_checked_against_config():
    cfg = our_config(CASES[0])
    params = Model.init_random(cfg, seed=0, dtype=np.float64).params
    missing = {k: v for k, v in params.items() if k != "model.norm.weight"}
    with pytest.raises(ConfigError, match="missing 1 .*model.norm.weight"):
        Model(cfg, missing)
    with pytest.raises(ConfigError, match="unexpected 1"):
        Model(cfg, {**params, "model.extra.weight": np.zeros(3)})
    transposed = dict(params)
    name = "model.layers.0.mlp.down_proj.weight"
    transposed[name] = params[name].T
    with pytest.raises(ConfigError, match="down_proj"):
        Model(cfg, transposed)
    model = Model(cfg, params)
    with pytest.raises(AprError, match="out of range"):
        model.forward(np.array([[0, VOCAB]]))
    with pytest.raises(AprError, match="batch, T"):
        model.forward(np.array([1, 2, 3]))


def test_init_random():
    cfg = our_config(CASES[1])
    a = Model.init_random(cfg, seed=7)
    b = Model.init_random(cfg, seed=7)
    c = Model.init_random(cfg, seed=8)
    assert sorted(a.params) == sorted(cfg.tensor_shapes())
    for name, shape in cfg.tensor_shapes().items():
        p = a.params[name]
        assert p.shape == shape and p.dtype == np.float32
        np.testing.assert_array_equal(p, b.params[name])
        if name.endswith("norm.weight"):
            assert np.all(p == 1)
        elif name.endswith(".bias"):
            assert np.all(p == 0)
        else:
            assert abs(p.std() - 0.02) < 0.005 and not np.array_equal(p, c.params[name])
    loss, grads = a.loss_and_grads(make_ids(), make_targets(make_ids()))
    assert abs(loss - np.log(VOCAB)) < 0.1     # near-uniform predictions at init
    assert LM_HEAD not in grads and all(g.dtype == np.float32 for g in grads.values())
    # a padding row starts at zero, as nn.Embedding(padding_idx) makes it; the rest is unchanged
    p = Model.init_random(cfg.replace(pad_token_id=3), seed=7)
    assert not p.params[EMBED][3].any() and a.params[EMBED][3].any()
    np.testing.assert_array_equal(np.delete(p.params[EMBED], 3, 0), np.delete(a.params[EMBED], 3, 0))


# --------------------------------------------------------------------------- generation

def greedy_by_full_forward(model: Model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(model.forward(np.array([ids]))[0, -1])))
    return ids[len(prompt):]


def test_greedy_generation_matches_full_forward():
    case = CASES[3]
    cfg, hf = our_config(case), build_hf(case)
    model = Model(cfg, params_of(hf, cfg), dtype=np.float64)
    prompt = [5, 17, 3, 80, 41]
    result = generate(model, prompt, 10)
    assert result.new_ids == greedy_by_full_forward(model, prompt, 10)
    assert result.stop_reason == "max_new_tokens" and result.ids == prompt + result.new_ids
    assert result.prefill_seconds > 0 and len(result.decode_seconds) == 9
    assert result.decode_tokens_per_second > 0
    # stops at (and includes) an eos id
    eos = result.new_ids[3]
    stopped = generate(model, prompt, 10, eos_ids=[eos, 10**6])
    first = result.new_ids.index(eos)
    assert stopped.new_ids == result.new_ids[:first + 1] and stopped.stop_reason == "eos"
    # top-k 1 and a tiny top-p are greedy whatever the temperature and seed
    assert generate(model, prompt, 6, temperature=1.5, top_k=1, seed=3).new_ids == result.new_ids[:6]
    assert generate(model, prompt, 6, temperature=1.5, top_p=1e-9, seed=4).new_ids == result.new_ids[:6]


def test_long_generation_reads_the_decode_layout_and_decodes_alike(monkeypatch):
    """From DECODE_LAYOUT_MIN_TOKENS new tokens on, generate reads the weights in the decode
    layout (built once per call); the tokens are the full forward's either way, and under
    bf16 products (which that layout does not round) it is never used."""
    from ref import generate as gen
    case = CASES[3]
    cfg, hf = our_config(case), build_hf(case)
    model = Model(cfg, params_of(hf, cfg), dtype=np.float64)
    built = []
    real = model.decode_weights
    monkeypatch.setattr(model, "decode_weights", lambda: built.append(1) or real())
    prompt = [5, 17, 3, 80, 41]
    n = gen.DECODE_LAYOUT_MIN_TOKENS
    short = generate(model, prompt, n - 1)
    assert built == []
    long = generate(model, prompt, n)
    assert built == [1] and long.setup_seconds > 0
    assert long.new_ids[:n - 1] == short.new_ids
    assert long.new_ids[-8:] == greedy_by_full_forward(model, prompt + long.new_ids[:-8], 8)
    model.matmul = "bf16"
    generate(model, prompt, n)
    assert built == [1]


def test_sampling_is_seeded_and_distributed():
    case = CASES[0]
    cfg, hf = our_config(case), build_hf(case)
    model = Model(cfg, params_of(hf, cfg), dtype=np.float64)
    a = generate(model, [1, 2, 3], 8, temperature=1.0, seed=11)
    b = generate(model, [1, 2, 3], 8, temperature=1.0, seed=11)
    c = generate(model, [1, 2, 3], 8, temperature=1.0, seed=12)
    assert a.new_ids == b.new_ids and a.new_ids != c.new_ids

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    n = 20000

    def freq(**kw):
        draws = np.array([sample_token(logits, rng, **kw) for _ in range(n)])
        return np.bincount(draws, minlength=4) / n

    np.testing.assert_allclose(freq(temperature=1.0), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    np.testing.assert_allclose(freq(temperature=1.0, top_k=2), [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_allclose(freq(temperature=1.0, top_p=0.7), [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_allclose(freq(temperature=1.0, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0],
                               atol=0.015)
    hot = freq(temperature=100.0)
    assert np.all(np.abs(hot - 0.25) < 0.02)
    assert sample_token(logits, rng, temperature=0.0) == 0
    with pytest.raises(AprError):
        generate(model, [1], 3, temperature=-1.0)
    with pytest.raises(AprError):
        generate(model, [1], 3, temperature=1.0, top_p=0.0)
