"""ModelConfig: the one object every shape in this project is derived from: its fields, the
properties derived from them, validation, the tensor shapes it implies, and presets.

It is read from and written to each format's own spelling through the key maps in `apr.names`,
by one module a format: `apr.config_hf` (HF config.json), `apr.config_apr` (APR metadata) and
`apr.config_gguf` (GGUF key/values), with what they share in `apr.config_keys`; ModelConfig's
from_*/to_* methods hand over to them. Nothing else parses those keys.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from . import config_apr, config_gguf, config_hf
# the key checks keep their names here too (apr.console imports ignoring_keys from apr.config)
from .config_keys import SIZE_LIMITS, check_closed_world, ignoring_keys  # noqa: F401
from .errors import ConfigError, UnsupportedError
from .names import (ACTIVATIONS, EMBED, FAMILIES, FULL_ATTENTION, LM_HEAD, ROPE_ADJACENT,
                    ROPE_HALVES, SLIDING_ATTENTION, kinds_for)
from . import rope as rope_mod
from .rope import RopeScaling


# Bounds far above any model shipped, checked before a shape is used to loop or allocate
# (a layer count of 10^8 from a hostile file would otherwise loop for minutes).

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
        """From a config.json object (`apr.config_hf.from_hf_config`)."""
        return config_hf.from_hf_config(cls, cfg, where, ignore)

    def to_hf_config(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """config.json for transformers (`apr.config_hf.to_hf_config`)."""
        return config_hf.to_hf_config(self, torch_dtype)

    # ------------------------------------------------------------------ APR metadata
    @classmethod
    def from_apr_metadata(cls, meta: Mapping[str, Any], where: str = "APR metadata",
                          ignore: Iterable[str] | None = None) -> "ModelConfig":
        """From APR metadata (`apr.config_apr.from_apr_metadata`)."""
        return config_apr.from_apr_metadata(cls, meta, where, ignore)

    def to_apr_metadata(self) -> dict[str, Any]:
        """The APR metadata keys (`apr.config_apr.to_apr_metadata`)."""
        return config_apr.to_apr_metadata(self)

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf_kv(cls, kv: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                     where: str = "GGUF", ignore: Iterable[str] | None = None,
                     rope_freqs: Sequence[float] | None = None) -> "ModelConfig":
        """From GGUF key/values and tensor shapes (`apr.config_gguf.from_gguf_kv`)."""
        return config_gguf.from_gguf_kv(cls, kv, shapes, where, ignore, rope_freqs)

    def gguf_refusals(self) -> list[str]:
        """What a GGUF cannot hold for llama.cpp (`apr.config_gguf.gguf_refusals`)."""
        return config_gguf.gguf_refusals(self)

    def gguf_changes(self) -> list[str]:
        """What llama.cpp computes differently (`apr.config_gguf.gguf_changes`)."""
        return config_gguf.gguf_changes(self)

    def to_gguf_kv(self) -> dict[str, Any]:
        """Architecture keys for llama.cpp (`apr.config_gguf.to_gguf_kv`)."""
        return config_gguf.to_gguf_kv(self)

    def gguf_rope_freqs(self):
        """The rope_freqs.weight tensor llama.cpp needs (`apr.config_gguf.gguf_rope_freqs`)."""
        return config_gguf.gguf_rope_freqs(self)


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
