"""ModelConfig as APR metadata spells it: `from_apr_metadata` reads the architecture keys
(and their aliases) and the custom keys of the computation, `to_apr_metadata` writes them.
`apr.config.ModelConfig`'s methods of the same names call these with the config (``config``),
or, to read one, its class (``cls``).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .config_keys import check_closed_world
from .errors import AprError, ConfigError, UnsupportedError
from .names import (APR_INERT_KEYS, APR_INERT_PREFIXES, APR_KEY_ALIASES, APR_KNOWN_KEYS,
                    APR_MODELED_KEYS, APR_ROPE_TYPE, APR_ROPE_TYPE_INV, ATTENTION_BIAS_KEY,
                    FAMILIES, PAD_KEY, ROPE_HALVES, TIED_KEY, family_from_any)
from . import rope as rope_mod
from .rope import RopeScaling
from .untrusted import Values, check_value


def from_apr_metadata(cls, meta: Mapping[str, Any], where: str = "APR metadata",
                      ignore: Iterable[str] | None = None):
    v = Values(meta, where)

    def get(key: str, kind: type):
        for k in (key, *APR_KEY_ALIASES.get(key, ())):
            if k in meta:
                return v.get(k, kind)
        return None

    arch_keys = set(APR_KNOWN_KEYS[APR_KNOWN_KEYS.index("architecture"):])
    for aliases in APR_KEY_ALIASES.values():
        arch_keys.update(aliases)
    check_closed_world(meta, where, modeled=arch_keys | {TIED_KEY, ATTENTION_BIAS_KEY, *APR_MODELED_KEYS},
                       inert=APR_INERT_KEYS, inert_prefixes=APR_INERT_PREFIXES, ignore=ignore)
    names_given = [v.get(k, str) for k in ("architecture", "hf_architecture", "hf_model_type")]
    fam = next((f for f in map(family_from_any, names_given) if f), None)
    if fam is None:
        name = names_given[0] or names_given[1]
        if name is None:
            raise ConfigError(f"{where}: no 'architecture' key; the file does not say what model it holds")
        raise UnsupportedError(f"{where}: architecture {name!r} is not supported "
                               f"(supported: {', '.join(FAMILIES)})")
    required = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if get(k, int) is None]
    if missing:
        raise ConfigError(f"{where}: missing architecture keys {', '.join(missing)}")
    rope_code = get("rope_type", int)
    if rope_code is None:
        rope_type = ROPE_HALVES
    elif rope_code in APR_ROPE_TYPE_INV:
        rope_type = APR_ROPE_TYPE_INV[rope_code]
    else:
        raise ConfigError(f"{where}: rope_type={rope_code!r} (expected 0 or 2)")
    bias = v.get(ATTENTION_BIAS_KEY, bool)
    theta, eps = get("rope_theta", float), get("rms_norm_eps", float)
    vals = dict(
        family=fam,
        hidden_size=get("hidden_size", int), num_layers=get("num_layers", int),
        num_heads=get("num_heads", int), num_kv_heads=get("num_kv_heads", int) or get("num_heads", int),
        intermediate_size=get("intermediate_size", int), vocab_size=get("vocab_size", int),
        head_dim=get("head_dim", int) or 0,
        max_position_embeddings=get("max_position_embeddings", int) or 2048,
        rope_theta=10000.0 if theta is None else theta, rope_type=rope_type,
        rms_norm_eps=1e-6 if eps is None else eps,
        tie_word_embeddings=bool(v.get(TIED_KEY, bool, default=False)),
        attention_bias=FAMILIES[fam].attention_bias if bias is None else bias,
        hidden_act=v.get("hidden_act", str) or FAMILIES[fam].default_act,
        mlp_bias=bool(v.get("mlp_bias", bool, default=False)),
        sliding_window=v.get("sliding_window", int, default=0) or 0,
        layer_types=tuple(check_value(t, str, "layer_types[]", where)
                          for t in v.get("layer_types", list, default=()) or ()),
        rope_scaling=_apr_rope(v, where, get("max_position_embeddings", int)),
        attn_logit_softcapping=v.get("attn_logit_softcapping", float),
        final_logit_softcapping=v.get("final_logit_softcapping", float),
        query_pre_attn_scalar=v.get("query_pre_attn_scalar", float),
        rope_local_theta=v.get("rope_local_theta", float),
        rope_local_scaling=_apr_rope(v, where, get("max_position_embeddings", int),
                                     key="rope_local_scaling"),
        pad_token_id=v.get(PAD_KEY, int),
    )
    try:
        return cls(**vals)
    except AprError as e:
        raise type(e)(f"{where}: {e}") from None


def to_apr_metadata(config) -> dict[str, Any]:
    """The architecture keys, canonical spellings only (see APR-FORMAT.md); the custom
    keys of the computation only where they differ from the default."""
    fam = FAMILIES[config.family]
    meta = {
        "architecture": fam.name,
        "hf_architecture": fam.hf_architecture,
        "hf_model_type": fam.hf_model_type,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "vocab_size": config.vocab_size,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_type": APR_ROPE_TYPE[config.rope_type],
        "rms_norm_eps": config.rms_norm_eps,
        "head_dim": config.head_dim,
        # custom keys
        TIED_KEY: config.tie_word_embeddings,
        ATTENTION_BIAS_KEY: config.attention_bias,
        PAD_KEY: config.pad_token_id,         # null stated too: "no padding row", not unknown
    }
    if config.hidden_act != FAMILIES[config.family].default_act:
        meta["hidden_act"] = config.hidden_act
    if config.mlp_bias:
        meta["mlp_bias"] = True
    if config.layer_types:
        meta["sliding_window"] = config.sliding_window
        meta["layer_types"] = list(config.layer_types)
    if config.rope_scaling is not None:
        meta["rope_scaling"] = config.rope_scaling.to_dict()
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                "rope_local_theta"):
        if getattr(config, key) is not None:
            meta[key] = getattr(config, key)
    if config.rope_local_scaling is not None:
        meta["rope_local_scaling"] = config.rope_local_scaling.to_dict()
    return meta


def _apr_rope(v: Values, where: str, max_pos: int | None, key: str = "rope_scaling"
              ) -> RopeScaling | None:
    """The custom key rope_scaling (or rope_local_scaling): transformers' rope_parameters
    spelling, without theta."""
    rp = v.get(key, dict, default=None)
    return rope_mod.from_dict(rp, f"{where}: {key}", max_pos) if rp else None
