"""ModelConfig: the one object every shape in this project is derived from.

It is read from and written to each format's own spelling (HF config.json, APR metadata,
GGUF key/values) through the key maps in `apr.names`; nothing else parses those keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError, UnsupportedError
from .names import (APR_KEY_ALIASES, APR_ROPE_TYPE, APR_ROPE_TYPE_INV, ATTENTION_BIAS_KEY,
                    FAMILIES, GGUF_CONFIG_KEYS, GGUF_KEY_LENGTH_KEY, GGUF_ROPE_DIM_KEY, GGUF_VOCAB_SIZE_KEY,
                    HF_CONFIG_KEYS, ROPE_ADJACENT, ROPE_HALVES, TIED_KEY, family_from_any)


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

    def __post_init__(self):
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
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

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

    # ------------------------------------------------------------------ tensors
    def tensor_shapes(self, include_lm_head: bool | None = None) -> dict[str, tuple[int, ...]]:
        """Every parameter the config implies, by canonical HF name, with its HF shape.
        lm_head.weight is included unless the embeddings are tied (or as asked)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_proj.weight"] = (self.q_size, h)
            shapes[p + "self_attn.k_proj.weight"] = (self.kv_size, h)
            shapes[p + "self_attn.v_proj.weight"] = (self.kv_size, h)
            if self.attention_bias:
                shapes[p + "self_attn.q_proj.bias"] = (self.q_size,)
                shapes[p + "self_attn.k_proj.bias"] = (self.kv_size,)
                shapes[p + "self_attn.v_proj.bias"] = (self.kv_size,)
            shapes[p + "self_attn.o_proj.weight"] = (h, self.q_size)
            if self.attention_bias and FAMILIES[self.family].output_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "mlp.gate_proj.weight"] = (f, h)
            shapes[p + "mlp.up_proj.weight"] = (f, h)
            shapes[p + "mlp.down_proj.weight"] = (h, f)
        shapes["model.norm.weight"] = (h,)
        if include_lm_head if include_lm_head is not None else not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, h)
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
    def from_hf_config(cls, cfg: Mapping[str, Any], where: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        fam = family_from_any(archs[0] if archs else None) or family_from_any(cfg.get("model_type"))
        if fam is None:
            name = (archs[0] if archs else None) or cfg.get("model_type")
            raise UnsupportedError(f"{where}: architecture {name!r} is not supported "
                                   f"(supported: {', '.join(f.hf_architecture for f in FAMILIES.values())})")
        vals: dict[str, Any] = {}
        for fld, key in HF_CONFIG_KEYS.items():
            if cfg.get(key) is not None:
                vals[fld] = cfg[key]
        missing = [HF_CONFIG_KEYS[k] for k in ("hidden_size", "num_layers", "num_heads",
                                               "intermediate_size", "vocab_size") if k not in vals]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        vals.setdefault("num_kv_heads", vals["num_heads"])
        for key in ("rope_scaling", "rope_parameters"):
            rs = cfg.get(key)
            if rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
                raise UnsupportedError(f"{where}: {key} {rs!r} is not supported "
                                       "(only plain rotary embeddings)")
        if "rope_theta" not in vals:
            rp = cfg.get("rope_parameters") or {}
            if rp.get("rope_theta") is not None:
                vals["rope_theta"] = rp["rope_theta"]
        bias = cfg.get("attention_bias")
        vals["attention_bias"] = FAMILIES[fam].attention_bias if bias is None else bool(bias)
        vals.setdefault("tie_word_embeddings", False)
        vals["rope_theta"] = float(vals.get("rope_theta", 10000.0))
        vals["rms_norm_eps"] = float(vals.get("rms_norm_eps", 1e-6))
        return cls(family=fam, rope_type=ROPE_HALVES, **vals)

    def to_hf_config(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """config.json for transformers (HF rotary order is assumed: convert data first)."""
        fam = FAMILIES[self.family]
        d: dict[str, Any] = {"architectures": [fam.hf_architecture], "model_type": fam.hf_model_type}
        for fld, key in HF_CONFIG_KEYS.items():
            d[key] = getattr(self, fld)
        d["hidden_act"] = "silu"
        d["attention_bias"] = self.attention_bias
        d["attention_dropout"] = 0.0
        d["initializer_range"] = 0.02
        d["use_cache"] = True
        d["torch_dtype"] = d["dtype"] = torch_dtype
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.family == "llama":
            d["mlp_bias"] = False
            d["pretraining_tp"] = 1
        if self.family == "qwen2":
            d["use_sliding_window"] = False
            d["sliding_window"] = None
            d["max_window_layers"] = self.num_layers
        return d

    # ------------------------------------------------------------------ APR metadata
    @classmethod
    def from_apr_metadata(cls, meta: Mapping[str, Any], where: str = "APR metadata") -> "ModelConfig":
        def get(key: str):
            if key in meta:
                return meta[key]
            for alias in APR_KEY_ALIASES.get(key, ()):
                if alias in meta:
                    return meta[alias]
            return None

        fam = family_from_any(meta.get("architecture")) or family_from_any(meta.get("hf_architecture")) \
            or family_from_any(meta.get("hf_model_type"))
        if fam is None:
            name = meta.get("architecture") or meta.get("hf_architecture")
            if name is None:
                raise ConfigError(f"{where}: no 'architecture' key; the file does not say what model it holds")
            raise UnsupportedError(f"{where}: architecture {name!r} is not supported "
                                   f"(supported: {', '.join(FAMILIES)})")
        required = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size")
        missing = [k for k in required if get(k) is None]
        if missing:
            raise ConfigError(f"{where}: missing architecture keys {', '.join(missing)}")
        rope_code = get("rope_type")
        if rope_code is None:
            rope_type = ROPE_HALVES
        elif rope_code in APR_ROPE_TYPE_INV:
            rope_type = APR_ROPE_TYPE_INV[rope_code]
        else:
            raise ConfigError(f"{where}: rope_type={rope_code!r} (expected 0 or 2)")
        bias = meta.get(ATTENTION_BIAS_KEY)
        vals = dict(
            family=fam,
            hidden_size=get("hidden_size"), num_layers=get("num_layers"),
            num_heads=get("num_heads"), num_kv_heads=get("num_kv_heads") or get("num_heads"),
            intermediate_size=get("intermediate_size"), vocab_size=get("vocab_size"),
            head_dim=get("head_dim") or 0,
            max_position_embeddings=get("max_position_embeddings") or 2048,
            rope_theta=float(get("rope_theta") or 10000.0), rope_type=rope_type,
            rms_norm_eps=float(get("rms_norm_eps") or 1e-6),
            tie_word_embeddings=bool(meta.get(TIED_KEY, False)),
            attention_bias=FAMILIES[fam].attention_bias if bias is None else bool(bias),
        )
        try:
            return cls(**vals)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_apr_metadata(self) -> dict[str, Any]:
        """The architecture keys, canonical spellings only (see APR-FORMAT.md)."""
        fam = FAMILIES[self.family]
        return {
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
        }

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf_kv(cls, kv: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                     where: str = "GGUF") -> "ModelConfig":
        """From GGUF key/values and the tensor shapes (by HF name). The stored rotary order
        follows the family's llama.cpp convention; the vocabulary size is the embedding's row
        count; tied embeddings are inferred from a missing output.weight."""
        arch = kv.get("general.architecture")
        fam = family_from_any(arch)
        if fam is None or FAMILIES[fam].gguf_arch != arch:
            raise UnsupportedError(f"{where}: general.architecture {arch!r} is not supported "
                                   f"(supported: {', '.join(f.gguf_arch for f in FAMILIES.values())})")
        vals: dict[str, Any] = {}
        for fld, key in GGUF_CONFIG_KEYS.items():
            k = key.format(arch=arch)
            if k in kv:
                vals[fld] = kv[k]
        missing = [GGUF_CONFIG_KEYS[f].format(arch=arch) for f in
                   ("hidden_size", "num_layers", "num_heads", "intermediate_size") if f not in vals]
        if missing:
            raise ConfigError(f"{where}: missing keys {', '.join(missing)}")
        vals.setdefault("num_kv_heads", vals["num_heads"])
        klen = kv.get(GGUF_KEY_LENGTH_KEY.format(arch=arch))
        if klen:
            vals["head_dim"] = int(klen)
        rope_dim = kv.get(GGUF_ROPE_DIM_KEY.format(arch=arch))
        head_dim = vals.get("head_dim") or vals["hidden_size"] // vals["num_heads"]
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise UnsupportedError(f"{where}: partial rotary ({GGUF_ROPE_DIM_KEY.format(arch=arch)}"
                                   f"={rope_dim}, head_dim={head_dim}) is not supported")
        emb = shapes.get("model.embed_tokens.weight")
        if not emb:
            raise ConfigError(f"{where}: no token_embd.weight tensor")
        vals["vocab_size"] = int(emb[0])
        vals["rope_theta"] = float(vals.get("rope_theta", 10000.0))
        vals["rms_norm_eps"] = float(vals.get("rms_norm_eps", 1e-5))
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                  "max_position_embeddings"):
            if k in vals:
                vals[k] = int(vals[k])
        has_bias = any(n.endswith("self_attn.q_proj.bias") for n in shapes)
        return cls(family=fam,
                   rope_type=ROPE_ADJACENT if FAMILIES[fam].gguf_rope_permuted else ROPE_HALVES,
                   tie_word_embeddings="lm_head.weight" not in shapes,
                   attention_bias=has_bias, **vals)

    def to_gguf_kv(self) -> dict[str, Any]:
        """Architecture keys for llama.cpp (general.architecture and the {arch}.* keys)."""
        arch = FAMILIES[self.family].gguf_arch
        kv: dict[str, Any] = {"general.architecture": arch}
        for fld, key in GGUF_CONFIG_KEYS.items():
            kv[key.format(arch=arch)] = getattr(self, fld)
        kv[GGUF_ROPE_DIM_KEY.format(arch=arch)] = self.head_dim
        kv[GGUF_VOCAB_SIZE_KEY.format(arch=arch)] = self.vocab_size  # needed when no tokenizer
        if self.head_dim * self.num_heads != self.hidden_size:
            kv[GGUF_KEY_LENGTH_KEY.format(arch=arch)] = self.head_dim
            kv["{arch}.attention.value_length".format(arch=arch)] = self.head_dim
        return kv


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
