"""ModelConfig: the one object every shape in this project is derived from.

It is read from and written to each format's own spelling (HF config.json, APR metadata,
GGUF key/values) through the key maps in `apr.names`; nothing else parses those keys.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .errors import AprError, ConfigError, UnsupportedError
from .names import (ACTIVATIONS, APR_INERT_KEYS, APR_INERT_PREFIXES, APR_KEY_ALIASES,
                    APR_KNOWN_KEYS, APR_MODELED_KEYS, APR_ROPE_TYPE, APR_ROPE_TYPE_INV,
                    ATTENTION_BIAS_KEY, EMBED, FAMILIES, FULL_ATTENTION, GGUF_CONFIG_KEYS,
                    GGUF_DEFAULT_ONLY, GGUF_INERT_KEYS, GGUF_INERT_PREFIXES, GGUF_KEY_LENGTH_KEY,
                    GGUF_ATTN_SOFTCAP_KEY, GGUF_FINAL_SOFTCAP_KEY, GGUF_ROPE_BASE_SWA_KEY, GGUF_ROPE_DIM_KEY,
                    GGUF_ROPE_SCALING_FACTOR, GGUF_ROPE_SCALING_TYPE, GGUF_SLIDING_PATTERN_KEY,
                    GGUF_SLIDING_WINDOW_KEY, GGUF_ROPE_FREQS,
                    GGUF_VALUE_LENGTH_KEY, GGUF_VOCAB_SIZE_KEY, HF_CONFIG_KEYS,
                    HF_DEFAULT_ONLY, HF_INERT_KEYS, HF_MODELED_KEYS, ROPE_ADJACENT, ROPE_HALVES,
                    LM_HEAD, PAD_KEY, SLIDING_ATTENTION, TIED_KEY, family_from_any, kinds_for,
                    family_of_gguf_arch)
from . import rope as rope_mod
from .rope import RopeScaling
from .untrusted import Values, check_value, describe

# keys the user said to skip (--ignore-key): see `ignoring_keys`
_IGNORED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("ignored_keys",
                                                                         default=frozenset())


@contextlib.contextmanager
def ignoring_keys(keys: Iterable[str]) -> Iterator[None]:
    """Within the block, unknown or default-only config keys named here are skipped instead of
    refused (the CLI's --ignore-key)."""
    token = _IGNORED.set(frozenset(keys))
    try:
        yield
    finally:
        _IGNORED.reset(token)


def check_closed_world(data: Mapping[str, Any], where: str, modeled: Iterable[str],
                       inert: Iterable[str] = (), default_only: Mapping[str, Any] | None = None,
                       inert_prefixes: tuple[str, ...] = (), ignore: Iterable[str] | None = None) -> None:
    """Refuse every key of ``data`` that is not modeled, inert, or default-only at its
    default, unless it is ignored. One error names the key and its value."""
    modeled, inert = set(modeled), set(inert)
    default_only = default_only or {}
    ignored = set(_IGNORED.get() if ignore is None else ignore)
    for key, value in data.items():
        if key in modeled or key in inert or key.startswith(inert_prefixes) or key in ignored:
            continue
        hint = f"; pass --ignore-key {key} if you know it does not change the logits"
        if key in default_only:
            default = default_only[key]
            if value == default or (default is None and (value in (None, {}, []) or value is False)):
                continue
            raise UnsupportedError(f"{where}: {key} = {describe(value)} is not supported "
                                   f"(only {default!r}){hint}")
        raise UnsupportedError(f"{where}: unknown key {key!r} (= {describe(value)}): the reference "
                               f"does not know whether it changes the computation{hint}")


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


def _apr_rope(v: Values, where: str, max_pos: int | None, key: str = "rope_scaling"
              ) -> RopeScaling | None:
    """The custom key rope_scaling (or rope_local_scaling): transformers' rope_parameters
    spelling, without theta."""
    rp = v.get(key, dict, default=None)
    return rope_mod.from_dict(rp, f"{where}: {key}", max_pos) if rp else None


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
        types = list(_gemma_pattern(n, given or pattern))
    types = [check_value(t, str, "layer_types[]", where) for t in types]
    if SLIDING_ATTENTION in types and not size:
        raise UnsupportedError(f"{where}: layer_types has sliding-attention layers but "
                               f"sliding_window is {size!r}")
    vals["layer_types"] = tuple(types)
    vals["sliding_window"] = size or 0


def _gemma_pattern(num_layers: int, pattern: int) -> tuple[str, ...]:
    """Gemma's layer types: every ``pattern``-th layer full, the others sliding (Gemma 2: 2,
    Gemma 3: 6; transformers' default and llama.cpp's)."""
    return tuple(SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION
                 for i in range(num_layers))


_LLAMA_CPP_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _llama_cpp_query_scalar(family: str, num_layers: int, hidden: int, heads: int,
                            head_dim: int) -> int:
    """The query scale llama.cpp's gemma2/gemma3 use, 1/sqrt(this): hidden/heads for the 27B
    model (known by its layer count), head_dim otherwise (llama.cpp reads no
    query_pre_attn_scalar key)."""
    return hidden // heads if num_layers == _LLAMA_CPP_27B_LAYERS.get(family) else head_dim


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
        types = _gemma_pattern(n, pattern or family.window_pattern)
    vals["layer_types"] = types
    vals["sliding_window"] = window or 4096


def _mistral_window(v: Values, vals: dict[str, Any], default: int | None) -> None:
    """Mistral's (and Phi-3's) sliding_window (null: none) applies to every layer."""
    size = v.get("sliding_window", int, default=default)
    vals["layer_types"] = (SLIDING_ATTENTION,) * vals["num_layers"] if size else ()
    vals["sliding_window"] = size or 0


# Bounds far above any model shipped, checked before a shape is used to loop or allocate
# (a layer count of 10^8 from a hostile file would otherwise loop for minutes).
SIZE_LIMITS = {"hidden_size": 1 << 20, "num_layers": 4096, "num_heads": 1 << 16, "num_kv_heads": 1 << 16,
               "intermediate_size": 1 << 22, "vocab_size": 1 << 24, "head_dim": 1 << 16,
               "max_position_embeddings": 1 << 31}


@dataclass(frozen=True)
class Mismatch:
    """One way a set of tensors differs from what a config implies."""
    kind: str                                  # "missing", "shape", "unexpected", "tied"
    name: str
    found: tuple[int, ...] | None = None       # the shape there (None: absent)
    expected: tuple[int, ...] | None = None    # the shape the config implies

    def __str__(self) -> str:
        return {
            "missing": f"tensor {self.name} is missing (the config implies it)",
            "shape": f"tensor {self.name} has shape {list(self.found or ())}, the config implies "
                     f"{list(self.expected or ())}",
            "unexpected": f"tensor {self.name!r} is not one the config implies",
            "tied": f"the config declares tied embeddings but {self.name} differs from the "
                    "embedding (it is run untied, with the stored lm_head, as transformers does)",
        }[self.kind]


@dataclass(frozen=True)
class ModelConfig:
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0                     # 0: hidden_size // num_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = ROPE_HALVES          # order of the Q/K rows as stored
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"              # the gated MLP's activation (transformers' names)
    mlp_bias: bool = False                # gate/up/down projections carry biases
    sliding_window: int = 0               # window of the sliding-attention layers (0: none)
    layer_types: tuple[str, ...] = ()     # per layer full/sliding attention; (): all full
    rope_scaling: RopeScaling | None = None   # RoPE beyond rope_theta (apr.rope); None: plain
    attn_logit_softcapping: float | None = None   # scores -> c tanh(scores / c) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> c tanh(logits / c) (Gemma 2)
    query_pre_attn_scalar: float | None = None    # attention scale 1/sqrt(this); None: head_dim
    rope_local_theta: float | None = None         # RoPE of the sliding layers, where they have
    rope_local_scaling: RopeScaling | None = None  # their own (Gemma 3); None: rope_theta's
    # the embedding row that training never updates (transformers: nn.Embedding's padding_idx
    # from config.pad_token_id); changes gradients only, never logits. None: no such row
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for key in ("rope_scaling", "rope_local_scaling"):
            if isinstance(getattr(self, key), Mapping):      # as to_dict() wrote it
                object.__setattr__(self, key, rope_mod.from_dict(getattr(self, key), key))
        if self.layer_types and SLIDING_ATTENTION not in self.layer_types:
            object.__setattr__(self, "layer_types", ())      # all full: one spelling
        if not self.layer_types:
            object.__setattr__(self, "sliding_window", 0)
        if self.family not in FAMILIES:
            raise UnsupportedError(
                f"architecture {self.family!r} is not supported (supported: {', '.join(FAMILIES)})")
        if not self.head_dim and self.num_heads:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def hf_architecture(self) -> str:
        return FAMILIES[self.family].hf_architecture

    @property
    def qk_norm(self) -> bool:
        """q and k are RMS-normalized per head before rotary (Qwen3)."""
        return FAMILIES[self.family].qk_norm

    @property
    def norm_offset(self) -> float:
        """RMSNorm multiplies by (norm_offset + w): 1 in Gemma, 0 elsewhere."""
        return FAMILIES[self.family].norm_offset

    @property
    def post_norms(self) -> bool:
        return FAMILIES[self.family].post_norms

    @property
    def embed_scale(self) -> float:
        """What the embedding rows are multiplied by: sqrt(hidden_size) in Gemma (the model
        rounds it to its compute dtype, as transformers does in the dtype it loads a model
        in); 1 elsewhere."""
        if not FAMILIES[self.family].embed_scale:
            return 1.0
        return math.sqrt(self.hidden_size)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def output_bias(self) -> bool:
        """o_proj has a bias (attention_bias in a family whose o_proj follows it)."""
        return self.attention_bias and FAMILIES[self.family].output_bias

    @property
    def untied(self) -> bool:
        return not self.tie_word_embeddings

    @property
    def computes_as(self) -> str:
        """The family whose computation this is (a Mistral without its window is a Llama)."""
        fam = FAMILIES[self.family]
        return fam.gguf_family if fam.gguf_family and not self.layer_types else self.family

    def inverse_frequencies(self, sliding: bool = False):
        """(inv_freq per rotary pair, attention factor) of this config's RoPE (apr.rope); with
        ``sliding``, of the sliding layers' (Gemma 3 gives them their own)."""
        if sliding and self.rope_local_theta is not None:
            return rope_mod.inverse_frequencies(self.head_dim, self.rope_local_theta,
                                                self.rope_local_scaling)
        return rope_mod.inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)

    def rope_of(self, layer: int) -> tuple[float, RopeScaling | None]:
        """(theta, scaling) of layer ``layer``'s rotary embedding."""
        if self.rope_local_theta is not None and self.window(layer):
            return self.rope_local_theta, self.rope_local_scaling
        return self.rope_theta, self.rope_scaling

    @property
    def fused(self) -> bool:
        """q/k/v in one matrix and gate/up in another (Phi-3)."""
        return FAMILIES[self.family].fused

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def gate_up_size(self) -> int:
        return 2 * self.intermediate_size

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def window(self, layer: int) -> int:
        """The sliding window of layer ``layer``'s attention (0: full causal attention)."""
        if self.layer_types and self.layer_types[layer] == SLIDING_ATTENTION:
            return self.sliding_window
        return 0

    def replace(self, **changes) -> "ModelConfig":
        """A copy with fields changed. A head_dim that was derived (hidden_size // num_heads)
        is derived again when either of those changes, unless head_dim is given too."""
        derived = self.head_dim * self.num_heads == self.hidden_size
        if derived and "head_dim" not in changes and {"hidden_size", "num_heads"} & set(changes):
            changes["head_dim"] = 0
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hf_architecture"] = self.hf_architecture
        d["rope_scaling"] = self.rope_scaling.to_dict() if self.rope_scaling else None
        d["rope_local_scaling"] = self.rope_local_scaling.to_dict() if self.rope_local_scaling else None
        d["qk_norm"] = self.qk_norm
        return d

    def validate(self) -> None:
        bad = []
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad.append(f"{name}={v!r} must be a positive integer")
        if bad:
            raise ConfigError("; ".join(bad))
        for name, limit in SIZE_LIMITS.items():
            v = getattr(self, name)
            if v > limit:
                bad.append(f"{name}={v} is implausible (more than {limit})")
        if bad:
            raise ConfigError("; ".join(bad))
        pad = self.pad_token_id
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool)
                                or not 0 <= pad < self.vocab_size):
            raise ConfigError(f"pad_token_id={pad!r} is outside the vocabulary [0, {self.vocab_size}) "
                              "(transformers refuses such a padding row too)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} is odd; rotary embedding needs pairs")
        if self.rope_type not in (ROPE_HALVES, ROPE_ADJACENT):
            raise ConfigError(f"rope_type={self.rope_type!r} (expected {ROPE_HALVES!r} "
                              f"or {ROPE_ADJACENT!r})")
        if not (self.rope_theta > 0):
            raise ConfigError(f"rope_theta={self.rope_theta!r} must be positive")
        if not (0 < self.rms_norm_eps < 1):
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps!r} must be in (0, 1)")
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedError(f"hidden_act={self.hidden_act!r} is not supported "
                                   f"(supported: {', '.join(ACTIVATIONS)})")
        fam = FAMILIES[self.family]
        if self.mlp_bias and not fam.mlp_bias_option:
            raise UnsupportedError(f"{fam.hf_architecture} has no MLP biases (mlp_bias)")
        if self.layer_types and not fam.sliding_window_option:
            raise UnsupportedError(f"{fam.hf_architecture} has no sliding-window attention")
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            x = getattr(self, name)
            if x is None:
                continue
            if name == "query_pre_attn_scalar" and not fam.query_scalar_option or \
                    name == "final_logit_softcapping" and not fam.softcap_option or \
                    name == "attn_logit_softcapping" and not fam.attn_softcap:
                raise UnsupportedError(f"{fam.hf_architecture} has no {name}")
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < 1e9:
                raise ConfigError(f"{name}={x!r} must be a positive number")
        if self.attention_bias != fam.attention_bias and not fam.attention_bias_option:
            raise UnsupportedError(f"{fam.hf_architecture} has attention_bias={fam.attention_bias} "
                                   "fixed")
        if fam.sliding_all_layers and self.layer_types and \
                set(self.layer_types) != {SLIDING_ATTENTION}:
            raise UnsupportedError(f"{fam.hf_architecture} slides the window in every layer or in "
                                   f"none, not per layer ({list(self.layer_types)})")
        if (self.rope_local_theta is not None or self.rope_local_scaling is not None) \
                and not fam.local_rope:
            raise UnsupportedError(f"{fam.hf_architecture} has no separate RoPE for sliding layers")
        if self.rope_local_theta is not None and not (self.rope_local_theta > 0):
            raise ConfigError(f"rope_local_theta={self.rope_local_theta!r} must be positive")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, RopeScaling):
                raise ConfigError(f"rope_scaling={self.rope_scaling!r} is not a RoPE scaling")
            rope_mod.check(self.rope_scaling, "rope_scaling")
            ff = self.rope_scaling.freq_factors
            if ff is not None and len(ff) != self.head_dim // 2:
                raise ConfigError(f"{len(ff)} RoPE frequency factors for head_dim {self.head_dim} "
                                  f"({self.head_dim // 2} rotary pairs)")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers or \
                    set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}:
                raise ConfigError(f"layer_types must list {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r} "
                                  f"for each of the {self.num_layers} layers, got {list(self.layer_types)!r}")
            if not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool) \
                    or self.sliding_window <= 0:
                raise ConfigError(f"sliding_window={self.sliding_window!r} must be a positive integer "
                                  "when a layer uses sliding-window attention")

    # ------------------------------------------------------------------ tensors
    def mismatches(self, shapes: Mapping[str, Sequence[int]]) -> list[Mismatch]:
        """Every way tensors of these shapes (by canonical name) differ from what this config
        implies: missing ones, wrong shapes, names it does not imply. A stored lm_head.weight
        is optional with tied embeddings (and must then have the embedding's shape)."""
        expected = self.tensor_shapes(include_lm_head=True)
        out = []
        for name, shape in expected.items():
            if name not in shapes:
                if not (name == LM_HEAD and self.tie_word_embeddings):
                    out.append(Mismatch("missing", name, None, shape))
            elif tuple(shapes[name]) != shape:
                out.append(Mismatch("shape", name, tuple(shapes[name]), shape))
        out += [Mismatch("unexpected", n, tuple(shapes[n])) for n in shapes if n not in expected]
        return out

    def tensor_shapes(self, include_lm_head: bool | None = None) -> dict[str, tuple[int, ...]]:
        """Every parameter the config implies, by canonical HF name, with its HF shape, in the
        order of the tensor-kind table (`apr.names.TENSOR_KINDS`), layer by layer.
        lm_head.weight is included unless the embeddings are tied (or as asked)."""
        def has(kind) -> bool:
            if kind.hf == LM_HEAD and include_lm_head is not None:
                return include_lm_head
            return not kind.when or bool(getattr(self, kind.when))

        def shape(kind) -> tuple[int, ...]:
            return tuple(getattr(self, d) for d in kind.shape)

        kinds = [k for k in kinds_for(self.family).values() if has(k)]
        shapes: dict[str, tuple[int, ...]] = {}
        for k in kinds:
            if k.hf == EMBED:
                shapes[k.hf] = shape(k)
        for i in range(self.num_layers):
            for k in kinds:
                if k.per_layer:
                    shapes[k.hf.format(i=i)] = shape(k)
        for k in kinds:
            if not k.per_layer and k.hf != EMBED:
                shapes[k.hf] = shape(k)
        return shapes

    def param_count(self) -> int:
        n = 0
        for shape in self.tensor_shapes().values():
            k = 1
            for d in shape:
                k *= d
            n += k
        return n

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, cfg: Any, where: str = "config.json",
                       ignore: Iterable[str] | None = None) -> "ModelConfig":
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
            _mistral_window(v, vals, family.default_window)
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

    def to_hf_config(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """config.json for transformers (HF rotary order is assumed: convert data first).
        Every modeled value is written as this config holds it."""
        fam = FAMILIES[self.family]
        d: dict[str, Any] = {"architectures": [fam.hf_architecture], "model_type": fam.hf_model_type}
        for fld, key in HF_CONFIG_KEYS.items():
            d[key] = getattr(self, fld)
        del d["rope_theta"]
        d[fam.hf_act_key] = self.hidden_act
        d["attention_dropout"] = 0.0
        if fam.softcap_option:
            d["attn_logit_softcapping"] = self.attn_logit_softcapping
            d["final_logit_softcapping"] = self.final_logit_softcapping
        if fam.query_scalar_option:       # an int in transformers' config class
            x = self.query_pre_attn_scalar or self.head_dim
            d["query_pre_attn_scalar"] = int(x) if float(x).is_integer() else x
        d["initializer_range"] = 0.02
        d["use_cache"] = True
        d["torch_dtype"] = d["dtype"] = torch_dtype
        if self.rope_scaling is not None and self.rope_scaling.type == rope_mod.FREQ_FACTORS:
            raise UnsupportedError("config.json cannot hold per-frequency RoPE factors (a GGUF's "
                                   "rope_freqs.weight without its llama3 parameters)")
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default",
                                **(self.rope_scaling.to_dict() if self.rope_scaling else {})}
        if fam.local_rope:
            d["rope_parameters"] = {
                FULL_ATTENTION: d["rope_parameters"],
                SLIDING_ATTENTION: {"rope_theta": self.rope_local_theta or self.rope_theta,
                                    "rope_type": "default",
                                    **(self.rope_local_scaling.to_dict() if self.rope_local_scaling
                                       else {})}}
        if fam.attention_bias_option:
            d["attention_bias"] = self.attention_bias
        elif self.attention_bias != fam.attention_bias:
            raise UnsupportedError(f"{fam.hf_architecture} has attention_bias={fam.attention_bias} "
                                   "fixed; this config cannot be written for it")
        if fam.mlp_bias_option:
            d["mlp_bias"] = self.mlp_bias
        elif self.mlp_bias:
            raise UnsupportedError(f"{fam.hf_architecture} has no MLP biases; this config cannot "
                                   "be written for it")
        if fam.pretraining_tp:
            d["pretraining_tp"] = 1
        if self.layer_types and not fam.sliding_window_option:
            raise UnsupportedError(f"{fam.hf_architecture} has no sliding-window attention")
        if fam.sliding_all_layers:
            d["sliding_window"] = self.sliding_window or None
            if "original_max_position_embeddings" in HF_MODELED_KEYS[self.family]:
                s = self.rope_scaling
                d["original_max_position_embeddings"] = (
                    s.original_max_position_embeddings if s and s.original_max_position_embeddings
                    else self.max_position_embeddings)
        elif fam.post_norms:
            d["sliding_window"] = self.sliding_window or 4096
            d["layer_types"] = list(self.layer_types) or [FULL_ATTENTION] * self.num_layers
        elif fam.sliding_window_option:
            d["use_sliding_window"] = bool(self.layer_types)
            d["sliding_window"] = self.sliding_window or None
            d["layer_types"] = list(self.layer_types) or [FULL_ATTENTION] * self.num_layers
            first = self.layer_types.index(SLIDING_ATTENTION) if self.layer_types else self.num_layers
            d["max_window_layers"] = first
        return d

    # ------------------------------------------------------------------ APR metadata
    @classmethod
    def from_apr_metadata(cls, meta: Mapping[str, Any], where: str = "APR metadata",
                          ignore: Iterable[str] | None = None) -> "ModelConfig":
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

    def to_apr_metadata(self) -> dict[str, Any]:
        """The architecture keys, canonical spellings only (see APR-FORMAT.md); the custom
        keys of the computation only where they differ from the default."""
        fam = FAMILIES[self.family]
        meta = {
            "architecture": fam.name,
            "hf_architecture": fam.hf_architecture,
            "hf_model_type": fam.hf_model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_type": APR_ROPE_TYPE[self.rope_type],
            "rms_norm_eps": self.rms_norm_eps,
            "head_dim": self.head_dim,
            # custom keys
            TIED_KEY: self.tie_word_embeddings,
            ATTENTION_BIAS_KEY: self.attention_bias,
            PAD_KEY: self.pad_token_id,         # null stated too: "no padding row", not unknown
        }
        if self.hidden_act != FAMILIES[self.family].default_act:
            meta["hidden_act"] = self.hidden_act
        if self.mlp_bias:
            meta["mlp_bias"] = True
        if self.layer_types:
            meta["sliding_window"] = self.sliding_window
            meta["layer_types"] = list(self.layer_types)
        if self.rope_scaling is not None:
            meta["rope_scaling"] = self.rope_scaling.to_dict()
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                    "rope_local_theta"):
            if getattr(self, key) is not None:
                meta[key] = getattr(self, key)
        if self.rope_local_scaling is not None:
            meta["rope_local_scaling"] = self.rope_local_scaling.to_dict()
        return meta

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf_kv(cls, kv: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                     where: str = "GGUF", ignore: Iterable[str] | None = None,
                     rope_freqs: Sequence[float] | None = None) -> "ModelConfig":
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
            _mistral_window(Values({"sliding_window": window or None}, where), vals, None)
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

    def gguf_refusals(self) -> list[str]:
        """What of this config a GGUF cannot hold for llama.cpp: a computation its
        architecture does not have, or a tensor it would refuse to load (empty: it runs the
        model exactly, or with the changes `gguf_changes` lists)."""
        fam = FAMILIES[self.family]
        out = []
        if self.hidden_act != fam.default_act:
            out.append(f"hidden_act={self.hidden_act!r} (llama.cpp's {fam.gguf_arch} runs "
                       f"{fam.default_act} only)")
        if self.gguf_rope_freqs() is not None and fam.gguf_arch != "llama":
            out.append(f"{self.rope_scaling.type} RoPE scaling (llama.cpp's {fam.gguf_arch} does "
                       f"not load {GGUF_ROPE_FREQS}, the per-pair divisors it needs, and refuses "
                       "a file that has it)")
        if fam.post_norms:
            want = _llama_cpp_query_scalar(self.family, self.num_layers, self.hidden_size,
                                           self.num_heads, self.head_dim)
            if (self.query_pre_attn_scalar or self.head_dim) != want:
                out.append(f"query_pre_attn_scalar {self.query_pre_attn_scalar} (llama.cpp's "
                           f"{fam.gguf_arch} scales by 1/sqrt({want}))")
            if not fam.local_rope and (self.attn_logit_softcapping is None
                                       or self.final_logit_softcapping is None):
                out.append(f"no soft-capping (llama.cpp's {fam.gguf_arch} always caps)")
            if fam.local_rope and self.rope_local_scaling is not None:
                out.append(f"a scaled RoPE in the sliding layers (llama.cpp's {fam.gguf_arch} "
                           "scales the global layers' only)")
        if self.mlp_bias and not fam.gguf_mlp_bias:
            out.append(f"mlp_bias (llama.cpp's {fam.gguf_arch} has no MLP biases)")
        if not fam.gguf_free_head_dim and self.head_dim * self.num_heads != self.hidden_size:
            out.append(f"head_dim x num_heads ({self.head_dim} x {self.num_heads}) != hidden_size "
                       f"{self.hidden_size} (llama.cpp's {fam.gguf_arch} needs them equal)")
        if self.attention_bias and not fam.gguf_attention_bias:
            out.append(f"attention_bias (llama.cpp's {fam.gguf_arch} has no attention biases)")
        if self.rope_scaling is not None and self.rope_scaling.type not in GGUF_ROPE_TYPES:
            out.append(f"rope_type {self.rope_scaling.type!r} (this tool writes only "
                       f"{', '.join(GGUF_ROPE_TYPES)} RoPE to GGUF)")
        return out

    def gguf_changes(self) -> list[str]:
        """What llama.cpp computes differently from this config, which a GGUF export may
        still write as a listed change (refused unless allowed): a sliding window that
        llama.cpp's llama and qwen2/qwen3 do not apply and its phi3 reads but disables."""
        fam = FAMILIES[self.family]
        if not self.layer_types or fam.post_norms:
            return []
        how = ("reads the window but does not apply it" if fam.sliding_all_layers and not fam.gguf_family
               else "has no sliding window")
        return [f"changes the attention: the model slides a window of {self.sliding_window} "
                f"tokens, llama.cpp's {fam.gguf_arch} {how} and attends to all positions "
                f"(identical up to {self.sliding_window} tokens of context)"]

    def to_gguf_kv(self) -> dict[str, Any]:
        """Architecture keys for llama.cpp (general.architecture and the {arch}.* keys).
        A config llama.cpp cannot express is refused (see `gguf_refusals`)."""
        refusals = self.gguf_refusals()
        if refusals:
            raise UnsupportedError("GGUF cannot hold this model exactly: " + "; ".join(refusals))
        arch = FAMILIES[self.family].gguf_arch
        kv: dict[str, Any] = {"general.architecture": arch}
        for fld, key in GGUF_CONFIG_KEYS.items():
            kv[key.format(arch=arch)] = getattr(self, fld)
        kv[GGUF_ROPE_DIM_KEY.format(arch=arch)] = self.head_dim
        kv[GGUF_VOCAB_SIZE_KEY.format(arch=arch)] = self.vocab_size  # needed when no tokenizer
        if self.head_dim * self.num_heads != self.hidden_size:
            kv[GGUF_KEY_LENGTH_KEY.format(arch=arch)] = self.head_dim
            kv[GGUF_VALUE_LENGTH_KEY.format(arch=arch)] = self.head_dim
        if self.rope_scaling is not None and self.rope_scaling.type == "linear":
            kv[GGUF_ROPE_SCALING_TYPE.format(arch=arch)] = "linear"
            kv[GGUF_ROPE_SCALING_FACTOR.format(arch=arch)] = self.rope_scaling.factor
        fam = FAMILIES[self.family]
        if fam.post_norms and (self.layer_types or not fam.local_rope):
            # gemma3 without a sliding layer: no window key (llama.cpp then slides nowhere)
            kv[GGUF_SLIDING_WINDOW_KEY.format(arch=arch)] = self.sliding_window or 4096
            types = self.layer_types or (FULL_ATTENTION,) * self.num_layers
            if types != _gemma_pattern(self.num_layers, fam.window_pattern):
                kv[GGUF_SLIDING_PATTERN_KEY.format(arch=arch)] = [t == SLIDING_ATTENTION for t in types]
        if fam.sliding_all_layers and not fam.gguf_family:
            # phi3: the model's window, as llama.cpp's converter writes it (which llama.cpp reads
            # and does not apply: `gguf_changes`)
            kv[GGUF_SLIDING_WINDOW_KEY.format(arch=arch)] = self.sliding_window
        if fam.softcap_option and not fam.local_rope:
            kv[GGUF_ATTN_SOFTCAP_KEY.format(arch=arch)] = self.attn_logit_softcapping
            kv[GGUF_FINAL_SOFTCAP_KEY.format(arch=arch)] = self.final_logit_softcapping
        if fam.local_rope and self.final_logit_softcapping is not None:
            kv[GGUF_FINAL_SOFTCAP_KEY.format(arch=arch)] = self.final_logit_softcapping
        if fam.local_rope:
            kv[GGUF_ROPE_BASE_SWA_KEY.format(arch=arch)] = self.rope_local_theta or self.rope_theta
        return kv

    def gguf_rope_freqs(self):
        """The rope_freqs.weight tensor llama.cpp needs for this RoPE (float32 divisors per
        rotary pair), or None when the keys say it all."""
        s = self.rope_scaling
        if s is None or s.type not in ("llama3", rope_mod.FREQ_FACTORS):
            return None
        return rope_mod.llama_cpp_freq_factors(self.head_dim, self.rope_theta, s)


# RoPE types a GGUF holds the way llama.cpp reads them (keys, or rope_freqs.weight)
GGUF_ROPE_TYPES = ("linear", "llama3", rope_mod.FREQ_FACTORS)

# --------------------------------------------------------------------------- presets

PRESETS: dict[str, ModelConfig] = {
    "llama-370m": ModelConfig("llama", 1024, 24, 16, 4, 2816, 50257, rope_theta=1e4,
                              rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2-0.5b": ModelConfig("qwen2", 896, 24, 14, 2, 4864, 151936, rope_theta=1e6,
                              max_position_embeddings=32768, rms_norm_eps=1e-6,
                              tie_word_embeddings=True, attention_bias=True),
    "qwen2-1.5b": ModelConfig("qwen2", 1536, 28, 12, 2, 8960, 151936, rope_theta=1e6,
                              max_position_embeddings=32768, rms_norm_eps=1e-6,
                              tie_word_embeddings=True, attention_bias=True),
    "qwen2-7b": ModelConfig("qwen2", 3584, 28, 28, 4, 18944, 152064, rope_theta=1e6,
                            max_position_embeddings=32768, rms_norm_eps=1e-6,
                            tie_word_embeddings=False, attention_bias=True),
    # the shapes of real checkpoints' config.json files
    "llama-3.2-1b": ModelConfig("llama", 2048, 16, 32, 8, 8192, 128256, head_dim=64,
                                max_position_embeddings=131072, rope_theta=500000.0,
                                rms_norm_eps=1e-5, tie_word_embeddings=True,
                                rope_scaling=RopeScaling("llama3", factor=32.0,
                                                         original_max_position_embeddings=8192,
                                                         low_freq_factor=1.0,
                                                         high_freq_factor=4.0)),
    "qwen3-0.6b": ModelConfig("qwen3", 1024, 28, 16, 8, 3072, 151936, head_dim=128,
                              max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                              tie_word_embeddings=True),
    "mistral-7b": ModelConfig("mistral", 4096, 32, 32, 8, 14336, 32768, head_dim=128,
                              max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5),
    # small presets for tests and the demo
    "llama-tiny": ModelConfig("llama", 64, 2, 4, 2, 160, 512, max_position_embeddings=256,
                              rms_norm_eps=1e-5),
    "qwen2-tiny": ModelConfig("qwen2", 64, 2, 4, 2, 160, 512, max_position_embeddings=256,
                              rope_theta=1e6, tie_word_embeddings=True, attention_bias=True),
    "qwen2-25m": ModelConfig("qwen2", 512, 6, 8, 2, 1408, 8192, max_position_embeddings=1024,
                             rope_theta=1e6, tie_word_embeddings=True, attention_bias=True),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
