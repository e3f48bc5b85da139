"""ModelConfig as HF config.json spells it: `from_hf_config` reads transformers' keys (both
RoPE spellings, each family's sliding-window keys and defaults), `to_hf_config` writes them.
`apr.config.ModelConfig`'s methods of the same names call these with the config (``config``),
or, to read one, its class (``cls``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

from .config_keys import check_closed_world, check_sizes, gemma_pattern, mistral_window
from .errors import AprError, ConfigError, UnsupportedError
from .names import (ACTIVATIONS, FAMILIES, FULL_ATTENTION, HF_CONFIG_KEYS, HF_DEFAULT_ONLY,
                    HF_INERT_KEYS, HF_MODELED_KEYS, ROPE_HALVES, SLIDING_ATTENTION, family_from_any)
from . import rope as rope_mod
from .rope import RopeScaling
from .untrusted import Values, check_value


def from_hf_config(cls, cfg: Any, where: str = "config.json",
                   ignore: Iterable[str] | None = None):
    """From a config.json object. Every key is modeled, inert or refused (see
    `apr.names`); ``ignore`` (default: the keys of `ignoring_keys`) names keys to skip."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    v = Values(cfg, where)
    archs = v.get("architectures", list, default=[]) or []
    arch0 = archs[0] if archs and isinstance(archs[0], str) else None
    model_type = v.get("model_type", str, default=None)
    fam = family_from_any(arch0) or family_from_any(model_type)
    if arch0 and model_type and family_from_any(model_type) not in (None, fam):
        raise ConfigError(f"{where}: architectures {arch0!r} and model_type {model_type!r} name "
                          "different families")
    if fam is None:
        name = arch0 or model_type
        raise UnsupportedError(f"{where}: architecture {name!r} is not supported "
                               f"(supported: {', '.join(f.hf_architecture for f in FAMILIES.values())})")
    default_only = dict(HF_DEFAULT_ONLY)
    if not FAMILIES[fam].attention_bias_option:     # Phi-3's config says attention_bias:
        default_only["attention_bias"] = FAMILIES[fam].attention_bias   # false; its class
    check_closed_world(cfg, where, modeled=set(HF_CONFIG_KEYS.values()) | HF_MODELED_KEYS[fam]
                       | {"architectures", "model_type"},       # has no biases to switch
                       inert=HF_INERT_KEYS, default_only=default_only, ignore=ignore)
    vals: dict[str, Any] = {}
    for fld, key in HF_CONFIG_KEYS.items():
        kind = bool if fld == "tie_word_embeddings" else float if fld in ("rope_theta", "rms_norm_eps") else int
        value = v.get(key, kind, default=None)
        if value is not None:
            vals[fld] = value
    missing = [HF_CONFIG_KEYS[k] for k in ("hidden_size", "num_layers", "num_heads",
                                           "intermediate_size", "vocab_size") if k not in vals]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    check_sizes(vals, where)
    vals.setdefault("num_kv_heads", vals["num_heads"])
    if FAMILIES[fam].local_rope:
        theta, vals["rope_scaling"], vals["rope_local_theta"], vals["rope_local_scaling"] = \
            _gemma3_rope(cfg, v, where, vals.get("max_position_embeddings"))
    else:
        theta, vals["rope_scaling"] = _rope(cfg, v, where, vals.get("max_position_embeddings"))
    orig = v.get("original_max_position_embeddings", int, default=None)
    scaling = vals["rope_scaling"]
    if orig and scaling is not None and scaling.original_max_position_embeddings is not None:
        # Phi-3 keeps the pretraining context beside rope_parameters; transformers uses it
        vals["rope_scaling"] = dataclasses.replace(scaling, original_max_position_embeddings=orig)
    if theta is not None:
        if "rope_theta" in vals and vals["rope_theta"] != theta:
            raise ConfigError(f"{where}: rope_theta {vals['rope_theta']} and rope_parameters "
                              f"rope_theta {theta} disagree")
        vals["rope_theta"] = theta
    family = FAMILIES[fam]
    vals["hidden_act"] = v.get(family.hf_act_key, str, default=family.default_act)
    if vals["hidden_act"] not in ACTIVATIONS:
        raise UnsupportedError(f"{where}: {family.hf_act_key}={vals['hidden_act']!r} is not "
                               f"supported (supported: {', '.join(ACTIVATIONS)})")
    if family.hf_act_key != "hidden_act":
        other = v.get("hidden_act", str, default=None)
        if other is not None and other != vals["hidden_act"]:
            raise UnsupportedError(f"{where}: hidden_act {other!r} and {family.hf_act_key} "
                                   f"{vals['hidden_act']!r} disagree ({family.hf_architecture} "
                                   f"runs {family.hf_act_key})")
    if "head_dim" not in vals and family.default_head_dim:
        vals["head_dim"] = family.default_head_dim
    if family.softcap_option:
        vals["final_logit_softcapping"] = v.get("final_logit_softcapping", float, default=None)
        if family.attn_softcap:
            vals["attn_logit_softcapping"] = v.get("attn_logit_softcapping", float, default=None)
    if family.query_scalar_option:
        vals["query_pre_attn_scalar"] = v.get("query_pre_attn_scalar", float,
                                              default=vals.get("head_dim"))
    vals["attention_bias"] = (v.get("attention_bias", bool, default=False)
                              if family.attention_bias_option else family.attention_bias)
    if family.mlp_bias_option:
        vals["mlp_bias"] = v.get("mlp_bias", bool, default=False)
    if family.sliding_all_layers:
        mistral_window(v, vals, family.default_window)
    elif family.post_norms:
        _gemma_windows(v, vals, where, family.window_pattern)
    elif family.sliding_window_option:
        _qwen2_windows(v, vals, where)
    if "pad_token_id" not in cfg:           # absent, not null: the config class's default
        vals["pad_token_id"] = family.default_pad
    pad = vals.get("pad_token_id")
    if pad is not None and -vals["vocab_size"] <= pad < 0:
        vals["pad_token_id"] = pad + vals["vocab_size"]   # as nn.Embedding counts it
    vals.setdefault("tie_word_embeddings", family.default_tied)
    vals.setdefault("rope_theta", 10000.0)
    vals.setdefault("rms_norm_eps", 1e-6)
    try:
        return cls(family=fam, rope_type=ROPE_HALVES, **vals)
    except AprError as e:
        raise type(e)(f"{where}: {e}") from None


def to_hf_config(config, torch_dtype: str = "float32") -> dict[str, Any]:
    """config.json for transformers (HF rotary order is assumed: convert data first).
    Every modeled value is written as this config holds it."""
    fam = FAMILIES[config.family]
    d: dict[str, Any] = {"architectures": [fam.hf_architecture], "model_type": fam.hf_model_type}
    for fld, key in HF_CONFIG_KEYS.items():
        d[key] = getattr(config, fld)
    del d["rope_theta"]
    d[fam.hf_act_key] = config.hidden_act
    d["attention_dropout"] = 0.0
    if fam.softcap_option:
        d["attn_logit_softcapping"] = config.attn_logit_softcapping
        d["final_logit_softcapping"] = config.final_logit_softcapping
    if fam.query_scalar_option:       # an int in transformers' config class
        x = config.query_pre_attn_scalar or config.head_dim
        d["query_pre_attn_scalar"] = int(x) if float(x).is_integer() else x
    d["initializer_range"] = 0.02
    d["use_cache"] = True
    d["torch_dtype"] = d["dtype"] = torch_dtype
    if config.rope_scaling is not None and config.rope_scaling.type == rope_mod.FREQ_FACTORS:
        raise UnsupportedError("config.json cannot hold per-frequency RoPE factors (a GGUF's "
                               "rope_freqs.weight without its llama3 parameters)")
    d["rope_parameters"] = {"rope_theta": config.rope_theta, "rope_type": "default",
                            **(config.rope_scaling.to_dict() if config.rope_scaling else {})}
    if fam.local_rope:
        d["rope_parameters"] = {
            FULL_ATTENTION: d["rope_parameters"],
            SLIDING_ATTENTION: {"rope_theta": config.rope_local_theta or config.rope_theta,
                                "rope_type": "default",
                                **(config.rope_local_scaling.to_dict() if config.rope_local_scaling
                                   else {})}}
    if fam.attention_bias_option:
        d["attention_bias"] = config.attention_bias
    elif config.attention_bias != fam.attention_bias:
        raise UnsupportedError(f"{fam.hf_architecture} has attention_bias={fam.attention_bias} "
                               "fixed; this config cannot be written for it")
    if fam.mlp_bias_option:
        d["mlp_bias"] = config.mlp_bias
    elif config.mlp_bias:
        raise UnsupportedError(f"{fam.hf_architecture} has no MLP biases; this config cannot "
                               "be written for it")
    if fam.pretraining_tp:
        d["pretraining_tp"] = 1
    if config.layer_types and not fam.sliding_window_option:
        raise UnsupportedError(f"{fam.hf_architecture} has no sliding-window attention")
    if fam.sliding_all_layers:
        d["sliding_window"] = config.sliding_window or None
        if "original_max_position_embeddings" in HF_MODELED_KEYS[config.family]:
            s = config.rope_scaling
            d["original_max_position_embeddings"] = (
                s.original_max_position_embeddings if s and s.original_max_position_embeddings
                else config.max_position_embeddings)
    elif fam.post_norms:
        d["sliding_window"] = config.sliding_window or 4096
        d["layer_types"] = list(config.layer_types) or [FULL_ATTENTION] * config.num_layers
    elif fam.sliding_window_option:
        d["use_sliding_window"] = bool(config.layer_types)
        d["sliding_window"] = config.sliding_window or None
        d["layer_types"] = list(config.layer_types) or [FULL_ATTENTION] * config.num_layers
        first = config.layer_types.index(SLIDING_ATTENTION) if config.layer_types else config.num_layers
        d["max_window_layers"] = first
    return d


def _rope(cfg: Mapping[str, Any], v: Values, where: str, max_pos: int | None
          ) -> tuple[float | None, RopeScaling | None]:
    """(rope_theta, scaling) from rope_parameters / rope_scaling (transformers' two spellings;
    when both are given they must agree). A type the reference does not compute is refused."""
    theta, found = None, []
    for key in ("rope_parameters", "rope_scaling"):
        rp = v.get(key, dict, default=None)
        if not rp:
            continue
        found.append((key, rope_mod.from_dict(rp, f"{where}: {key}", max_pos, hf=True)))
        t = Values(rp, f"{where}: {key}").get("rope_theta", float)
        if t is not None:
            theta = t
    if len(found) == 2 and found[0][1] != found[1][1]:
        raise ConfigError(f"{where}: rope_parameters and rope_scaling disagree")
    return theta, (found[0][1] if found else None)


def _qwen2_windows(v: Values, vals: dict[str, Any], where: str) -> None:
    """Qwen2's sliding window: layer_types, or layers from max_window_layers on slide when
    use_sliding_window is set (transformers' Qwen2Config)."""
    n = vals["num_layers"]
    use = v.get("use_sliding_window", bool, default=False)
    size = v.get("sliding_window", int, default=4096)
    window = size if use else None
    types = v.get("layer_types", list, default=None)
    if types is None:
        first = v.get("max_window_layers", int, default=28)
        first = 28 if first is None else first
        types = [SLIDING_ATTENTION if window is not None and i >= first else FULL_ATTENTION
                 for i in range(n)]
    types = [check_value(t, str, "layer_types[]", where) for t in types]
    if SLIDING_ATTENTION in types and window is None:
        raise UnsupportedError(f"{where}: layer_types has sliding-attention layers but "
                               f"use_sliding_window={use} and sliding_window={size} give no window")
    vals["layer_types"] = tuple(types)
    vals["sliding_window"] = window or 0


def _gemma3_rope(cfg: Mapping[str, Any], v: Values, where: str, max_pos: int | None):
    """Gemma 3's two RoPEs: (theta, scaling) of the full-attention layers and of the sliding
    ones, from rope_parameters nested by layer type, or the older rope_theta /
    rope_local_base_freq / rope_scaling keys (transformers' defaults 1e6 and 1e4)."""
    rp = v.get("rope_parameters", dict, default=None) or {}
    nested = {k: rp[k] for k in (FULL_ATTENTION, SLIDING_ATTENTION) if k in rp}
    if rp and set(rp) - {FULL_ATTENTION, SLIDING_ATTENTION}:
        raise UnsupportedError(f"{where}: rope_parameters must be nested by layer type "
                               f"({FULL_ATTENTION}, {SLIDING_ATTENTION}) for Gemma 3")
    out = []
    for kind, theta_key, default in ((FULL_ATTENTION, "rope_theta", 1e6),
                                     (SLIDING_ATTENTION, "rope_local_base_freq", 1e4)):
        part = nested.get(kind)
        if part is None:
            part = dict(v.get("rope_scaling", dict, default=None) or {}) if kind == FULL_ATTENTION else {}
        elif not isinstance(part, Mapping):
            raise ConfigError(f"{where}: rope_parameters[{kind!r}] is not an object")
        pv = Values(part, f"{where}: rope_parameters[{kind!r}]")
        theta = pv.get("rope_theta", float) or v.get(theta_key, float, default=None) or default
        out += [theta, rope_mod.from_dict(part, f"{where}: rope_parameters[{kind!r}]", max_pos,
                                          hf=True)]
    return out[0], out[1], out[2], out[3]


def _gemma_windows(v: Values, vals: dict[str, Any], where: str, pattern: int) -> None:
    """Gemma: layer_types, by default every ``pattern``-th layer full and the others sliding
    (Gemma 2: 2, Gemma 3: 6, or its sliding_window_pattern), with sliding_window."""
    n = vals["num_layers"]
    size = v.get("sliding_window", int, default=4096)
    types = v.get("layer_types", list, default=None)
    if types is None:
        given = v.get("sliding_window_pattern", int, default=None)
        if given is not None and given < 1:
            raise ConfigError(f"{where}: sliding_window_pattern = {given} must be at least 1")
        types = list(gemma_pattern(n, given or pattern))
    types = [check_value(t, str, "layer_types[]", where) for t in types]
    if SLIDING_ATTENTION in types and not size:
        raise UnsupportedError(f"{where}: layer_types has sliding-attention layers but "
                               f"sliding_window is {size!r}")
    vals["layer_types"] = tuple(types)
    vals["sliding_window"] = size or 0
