"""ModelConfig as llama.cpp's GGUF key/values spell it: `from_gguf_kv` reads them,
`to_gguf_kv` writes them (with the rope_freqs.weight tensor of `gguf_rope_freqs`), and
`gguf_refusals` and `gguf_changes` say what llama.cpp cannot hold or computes differently.
`apr.config.ModelConfig`'s methods of the same names call these with the config (``config``),
or, to read one, its class (``cls``).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from .config_keys import check_closed_world, check_sizes, gemma_pattern, mistral_window
from .errors import AprError, ConfigError, UnsupportedError
from .names import (EMBED, FAMILIES, FULL_ATTENTION, GGUF_ATTN_SOFTCAP_KEY, GGUF_CONFIG_KEYS,
                    GGUF_DEFAULT_ONLY, GGUF_FINAL_SOFTCAP_KEY, GGUF_INERT_KEYS, GGUF_INERT_PREFIXES,
                    GGUF_KEY_LENGTH_KEY, GGUF_ROPE_BASE_SWA_KEY, GGUF_ROPE_DIM_KEY, GGUF_ROPE_FREQS,
                    GGUF_ROPE_SCALING_FACTOR, GGUF_ROPE_SCALING_TYPE, GGUF_SLIDING_PATTERN_KEY,
                    GGUF_SLIDING_WINDOW_KEY, GGUF_VALUE_LENGTH_KEY, GGUF_VOCAB_SIZE_KEY, LM_HEAD,
                    ROPE_ADJACENT, ROPE_HALVES, SLIDING_ATTENTION, family_of_gguf_arch)
from . import rope as rope_mod
from .rope import RopeScaling
from .untrusted import Values, describe

# RoPE types a GGUF holds the way llama.cpp reads them (keys, or rope_freqs.weight)
GGUF_ROPE_TYPES = ("linear", "llama3", rope_mod.FREQ_FACTORS)


def from_gguf_kv(cls, kv: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                 where: str = "GGUF", ignore: Iterable[str] | None = None,
                 rope_freqs: Sequence[float] | None = None):
    """From GGUF key/values and the tensor shapes (by HF name). The stored rotary order
    follows the family's llama.cpp convention; the vocabulary size is the embedding's row
    count; tied embeddings are inferred from a missing output.weight, biases from the
    bias tensors present; ``rope_freqs``: the values of a rope_freqs.weight tensor
    (llama.cpp's per-pair RoPE divisors), if the file has one."""
    v = Values(kv, where)
    arch = v.get("general.architecture", str)
    fam = family_of_gguf_arch(arch)
    if fam is None:
        raise UnsupportedError(f"{where}: general.architecture {arch!r} is not supported "
                               f"(supported: {', '.join(sorted({f.gguf_arch for f in FAMILIES.values()}))})")
    a = {"arch": arch}
    modeled = {k.format(**a) for k in (*GGUF_CONFIG_KEYS.values(), GGUF_ROPE_DIM_KEY, GGUF_KEY_LENGTH_KEY,
                                       GGUF_VALUE_LENGTH_KEY, GGUF_VOCAB_SIZE_KEY,
                                       GGUF_ROPE_SCALING_TYPE, GGUF_ROPE_SCALING_FACTOR)}
    if FAMILIES[fam].post_norms:
        modeled |= {k.format(**a) for k in (GGUF_SLIDING_WINDOW_KEY, GGUF_SLIDING_PATTERN_KEY,
                                            GGUF_FINAL_SOFTCAP_KEY, GGUF_ROPE_BASE_SWA_KEY)}
        if FAMILIES[fam].attn_softcap:
            modeled.add(GGUF_ATTN_SOFTCAP_KEY.format(**a))
    elif FAMILIES[fam].sliding_all_layers:      # phi3: the window of every layer
        modeled.add(GGUF_SLIDING_WINDOW_KEY.format(**a))
    check_closed_world(kv, where, modeled=modeled, inert={k.format(**a) for k in GGUF_INERT_KEYS},
                       default_only={k.format(**a): d for k, d in GGUF_DEFAULT_ONLY.items()},
                       inert_prefixes=GGUF_INERT_PREFIXES, ignore=ignore)
    vals: dict[str, Any] = {}
    for fld, key in GGUF_CONFIG_KEYS.items():
        k = key.format(**a)
        value = v.get(k, float if fld in ("rope_theta", "rms_norm_eps") else int)
        if value is not None:
            vals[fld] = value
    missing = [GGUF_CONFIG_KEYS[f].format(**a) for f in
               ("hidden_size", "num_layers", "num_heads", "intermediate_size") if f not in vals]
    if missing:
        raise ConfigError(f"{where}: missing keys {', '.join(missing)}")
    check_sizes(vals, where)
    vals.setdefault("num_kv_heads", vals["num_heads"])
    klen = v.get(GGUF_KEY_LENGTH_KEY.format(**a), int)
    if klen:
        vals["head_dim"] = klen
    head_dim = vals.get("head_dim") or (vals["hidden_size"] // vals["num_heads"] if vals["num_heads"] else 0)
    for key in (GGUF_ROPE_DIM_KEY, GGUF_VALUE_LENGTH_KEY):
        dim = v.get(key.format(**a), int)
        if dim is not None and dim != head_dim:
            what = "partial rotary" if key == GGUF_ROPE_DIM_KEY else "a value head size other than the key's"
            raise UnsupportedError(f"{where}: {what} ({key.format(**a)}={dim}, head_dim={head_dim}) "
                                   "is not supported")
    emb = shapes.get(EMBED)
    if not emb:
        raise ConfigError(f"{where}: no token_embd.weight tensor")
    vals["vocab_size"] = int(emb[0])
    vocab_key = v.get(GGUF_VOCAB_SIZE_KEY.format(**a), int)
    if vocab_key is not None and vocab_key != vals["vocab_size"]:
        raise ConfigError(f"{where}: {GGUF_VOCAB_SIZE_KEY.format(**a)}={vocab_key} but token_embd.weight "
                          f"has {vals['vocab_size']} rows")
    vals.setdefault("rope_theta", 10000.0)
    vals.setdefault("rms_norm_eps", 1e-5)
    vals["rope_scaling"] = _gguf_rope(v, a, rope_freqs, where)
    family = FAMILIES[fam]
    vals["hidden_act"] = family.default_act
    if family.local_rope:               # llama.cpp's gemma3: a final cap where the key
        vals["rope_local_theta"] = v.get(GGUF_ROPE_BASE_SWA_KEY.format(**a), float) or 10000.0
        cap = v.get(GGUF_FINAL_SOFTCAP_KEY.format(**a), float)    # says one (0: none)
        vals["final_logit_softcapping"] = cap or None
    elif family.softcap_option:         # llama.cpp's gemma2 always caps (defaults 50, 30)
        vals["attn_logit_softcapping"] = v.get(GGUF_ATTN_SOFTCAP_KEY.format(**a), float) or 50.0
        vals["final_logit_softcapping"] = v.get(GGUF_FINAL_SOFTCAP_KEY.format(**a), float) or 30.0
    if family.post_norms:
        _gguf_gemma_windows(v, a, vals, fam, where)
    elif family.sliding_all_layers:     # phi3: llama.cpp's converter writes the model's
        window = v.get(GGUF_SLIDING_WINDOW_KEY.format(**a), int)   # window (0: none)
        if window is not None and window < 0:
            raise ConfigError(f"{where}: {GGUF_SLIDING_WINDOW_KEY.format(**a)} = {window}")
        mistral_window(Values({"sliding_window": window or None}, where), vals, None)
    has_bias = any(n.endswith("self_attn.q_proj.bias") for n in shapes)
    mlp_bias = any(n.endswith("mlp.gate_proj.bias") for n in shapes)
    try:
        config = cls(family=fam,
                     rope_type=ROPE_ADJACENT if FAMILIES[fam].gguf_rope_permuted else ROPE_HALVES,
                     tie_word_embeddings=LM_HEAD not in shapes,
                     attention_bias=has_bias, mlp_bias=mlp_bias, **vals)
        if family.query_scalar_option:      # derived only from a validated config
            config = config.replace(query_pre_attn_scalar=float(_llama_cpp_query_scalar(
                fam, config.num_layers, config.hidden_size, config.num_heads, config.head_dim)))
        return config
    except AprError as e:
        raise type(e)(f"{where}: {e}") from None


def gguf_refusals(config) -> list[str]:
    """What of this config a GGUF cannot hold for llama.cpp: a computation its
    architecture does not have, or a tensor it would refuse to load (empty: it runs the
    model exactly, or with the changes `gguf_changes` lists)."""
    fam = FAMILIES[config.family]
    out = []
    if config.hidden_act != fam.default_act:
        out.append(f"hidden_act={config.hidden_act!r} (llama.cpp's {fam.gguf_arch} runs "
                   f"{fam.default_act} only)")
    if gguf_rope_freqs(config) is not None and fam.gguf_arch != "llama":
        out.append(f"{config.rope_scaling.type} RoPE scaling (llama.cpp's {fam.gguf_arch} does "
                   f"not load {GGUF_ROPE_FREQS}, the per-pair divisors it needs, and refuses "
                   "a file that has it)")
    if fam.post_norms:
        want = _llama_cpp_query_scalar(config.family, config.num_layers, config.hidden_size,
                                       config.num_heads, config.head_dim)
        if (config.query_pre_attn_scalar or config.head_dim) != want:
            out.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} (llama.cpp's "
                       f"{fam.gguf_arch} scales by 1/sqrt({want}))")
        if not fam.local_rope and (config.attn_logit_softcapping is None
                                   or config.final_logit_softcapping is None):
            out.append(f"no soft-capping (llama.cpp's {fam.gguf_arch} always caps)")
        if fam.local_rope and config.rope_local_scaling is not None:
            out.append(f"a scaled RoPE in the sliding layers (llama.cpp's {fam.gguf_arch} "
                       "scales the global layers' only)")
    if config.mlp_bias and not fam.gguf_mlp_bias:
        out.append(f"mlp_bias (llama.cpp's {fam.gguf_arch} has no MLP biases)")
    if not fam.gguf_free_head_dim and config.head_dim * config.num_heads != config.hidden_size:
        out.append(f"head_dim x num_heads ({config.head_dim} x {config.num_heads}) != hidden_size "
                   f"{config.hidden_size} (llama.cpp's {fam.gguf_arch} needs them equal)")
    if config.attention_bias and not fam.gguf_attention_bias:
        out.append(f"attention_bias (llama.cpp's {fam.gguf_arch} has no attention biases)")
    if config.rope_scaling is not None and config.rope_scaling.type not in GGUF_ROPE_TYPES:
        out.append(f"rope_type {config.rope_scaling.type!r} (this tool writes only "
                   f"{', '.join(GGUF_ROPE_TYPES)} RoPE to GGUF)")
    return out


def gguf_changes(config) -> list[str]:
    """What llama.cpp computes differently from this config, which a GGUF export may
    still write as a listed change (refused unless allowed): a sliding window that
    llama.cpp's llama and qwen2/qwen3 do not apply and its phi3 reads but disables."""
    fam = FAMILIES[config.family]
    if not config.layer_types or fam.post_norms:
        return []
    how = ("reads the window but does not apply it" if fam.sliding_all_layers and not fam.gguf_family
           else "has no sliding window")
    return [f"changes the attention: the model slides a window of {config.sliding_window} "
            f"tokens, llama.cpp's {fam.gguf_arch} {how} and attends to all positions "
            f"(identical up to {config.sliding_window} tokens of context)"]


def to_gguf_kv(config) -> dict[str, Any]:
    """Architecture keys for llama.cpp (general.architecture and the {arch}.* keys).
    A config llama.cpp cannot express is refused (see `gguf_refusals`)."""
    refusals = gguf_refusals(config)
    if refusals:
        raise UnsupportedError("GGUF cannot hold this model exactly: " + "; ".join(refusals))
    arch = FAMILIES[config.family].gguf_arch
    kv: dict[str, Any] = {"general.architecture": arch}
    for fld, key in GGUF_CONFIG_KEYS.items():
        kv[key.format(arch=arch)] = getattr(config, fld)
    kv[GGUF_ROPE_DIM_KEY.format(arch=arch)] = config.head_dim
    kv[GGUF_VOCAB_SIZE_KEY.format(arch=arch)] = config.vocab_size  # needed when no tokenizer
    if config.head_dim * config.num_heads != config.hidden_size:
        kv[GGUF_KEY_LENGTH_KEY.format(arch=arch)] = config.head_dim
        kv[GGUF_VALUE_LENGTH_KEY.format(arch=arch)] = config.head_dim
    if config.rope_scaling is not None and config.rope_scaling.type == "linear":
        kv[GGUF_ROPE_SCALING_TYPE.format(arch=arch)] = "linear"
        kv[GGUF_ROPE_SCALING_FACTOR.format(arch=arch)] = config.rope_scaling.factor
    fam = FAMILIES[config.family]
    if fam.post_norms and (config.layer_types or not fam.local_rope):
        # gemma3 without a sliding layer: no window key (llama.cpp then slides nowhere)
        kv[GGUF_SLIDING_WINDOW_KEY.format(arch=arch)] = config.sliding_window or 4096
        types = config.layer_types or (FULL_ATTENTION,) * config.num_layers
        if types != gemma_pattern(config.num_layers, fam.window_pattern):
            kv[GGUF_SLIDING_PATTERN_KEY.format(arch=arch)] = [t == SLIDING_ATTENTION for t in types]
    if fam.sliding_all_layers and not fam.gguf_family:
        # phi3: the model's window, as llama.cpp's converter writes it (which llama.cpp reads
        # and does not apply: `gguf_changes`)
        kv[GGUF_SLIDING_WINDOW_KEY.format(arch=arch)] = config.sliding_window
    if fam.softcap_option and not fam.local_rope:
        kv[GGUF_ATTN_SOFTCAP_KEY.format(arch=arch)] = config.attn_logit_softcapping
        kv[GGUF_FINAL_SOFTCAP_KEY.format(arch=arch)] = config.final_logit_softcapping
    if fam.local_rope and config.final_logit_softcapping is not None:
        kv[GGUF_FINAL_SOFTCAP_KEY.format(arch=arch)] = config.final_logit_softcapping
    if fam.local_rope:
        kv[GGUF_ROPE_BASE_SWA_KEY.format(arch=arch)] = config.rope_local_theta or config.rope_theta
    return kv


def gguf_rope_freqs(config):
    """The rope_freqs.weight tensor llama.cpp needs for this RoPE (float32 divisors per
    rotary pair), or None when the keys say it all."""
    s = config.rope_scaling
    if s is None or s.type not in ("llama3", rope_mod.FREQ_FACTORS):
        return None
    return rope_mod.llama_cpp_freq_factors(config.head_dim, config.rope_theta, s)


def _gguf_rope(v: Values, a: dict[str, str], rope_freqs: Sequence[float] | None,
               where: str) -> RopeScaling | None:
    """llama.cpp's RoPE scaling: rope.scaling.type linear with its factor, or per-pair
    divisors in a rope_freqs.weight tensor (llama3); never both."""
    kind = v.get(GGUF_ROPE_SCALING_TYPE.format(**a), str) or "none"
    factor = v.get(GGUF_ROPE_SCALING_FACTOR.format(**a), float)
    if kind not in ("none", "linear"):
        raise UnsupportedError(f"{where}: {GGUF_ROPE_SCALING_TYPE.format(**a)} = {kind!r} is not "
                               "supported (only none, linear, and llama3 factors in rope_freqs.weight)")
    if rope_freqs is not None:
        if kind != "none" or factor not in (None, 1.0):
            raise ConfigError(f"{where}: rope_freqs.weight and {GGUF_ROPE_SCALING_TYPE.format(**a)} = "
                              f"{kind!r} (factor {factor}) both scale RoPE; the file contradicts itself")
        return rope_mod.from_dict({"rope_type": rope_mod.FREQ_FACTORS,
                                   "freq_factors": list(rope_freqs)}, where)
    if kind == "linear":
        if factor is None:
            raise ConfigError(f"{where}: {GGUF_ROPE_SCALING_TYPE.format(**a)} linear without "
                              f"{GGUF_ROPE_SCALING_FACTOR.format(**a)}")
        return None if factor == 1.0 else RopeScaling("linear", factor=factor)
    if factor not in (None, 1.0):
        raise UnsupportedError(f"{where}: {GGUF_ROPE_SCALING_FACTOR.format(**a)} = {factor} without "
                               "a scaling type")
    return None


def _gguf_gemma_windows(v: Values, a: dict[str, str], vals: dict[str, Any], fam: str,
                        where: str) -> None:
    """The sliding layers of llama.cpp's gemma2/gemma3: sliding_window_pattern (a bool per
    layer, or n: every n-th layer full; default 2 and 6) with sliding_window (gemma2: 4096
    when absent; gemma3: no sliding layer at all when absent or 0)."""
    family = FAMILIES[fam]
    window = v.get(GGUF_SLIDING_WINDOW_KEY.format(**a), int)
    if family.local_rope and not window:
        vals["layer_types"], vals["sliding_window"] = (), 0
        return
    key = GGUF_SLIDING_PATTERN_KEY.format(**a)
    pattern = v.data.get(key)
    n = vals["num_layers"]
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n or not all(isinstance(x, bool) for x in pattern):
            raise ConfigError(f"{where}: {key} must hold one bool per layer ({n}), got "
                              f"{describe(pattern)}")
        types = tuple(SLIDING_ATTENTION if x else FULL_ATTENTION for x in pattern)
    else:
        pattern = v.get(key, int)
        if pattern is not None and pattern < 1:
            raise ConfigError(f"{where}: {key} = {pattern} must be at least 1")
        types = gemma_pattern(n, pattern or family.window_pattern)
    vals["layer_types"] = types
    vals["sliding_window"] = window or 4096


_LLAMA_CPP_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _llama_cpp_query_scalar(family: str, num_layers: int, hidden: int, heads: int,
                            head_dim: int) -> int:
    """The query scale llama.cpp's gemma2/gemma3 use, 1/sqrt(this): hidden/heads for the 27B
    model (known by its layer count), head_dim otherwise (llama.cpp reads no
    query_pre_attn_scalar key)."""
    return hidden // heads if num_layers == _LLAMA_CPP_27B_LAYERS.get(family) else head_dim
