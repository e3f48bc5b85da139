"""Rotary position embedding variants, as data, and the one function that turns them into
inverse frequencies.

A `RopeScaling` is what a config says beyond ``rope_theta``: transformers' ``rope_parameters``
(``rope_scaling`` in older files) without the theta. `inverse_frequencies` computes, as
transformers' rope initialisation functions do, the per-pair inverse frequencies and the
attention factor that multiplies cos and sin. llama.cpp expresses the same things by its
``rope.scaling.*`` keys, and a llama3-scaled model by a ``rope_freqs.weight`` tensor of
per-pair divisors: `llama_cpp_freq_factors` computes that tensor, and a model read from such a
GGUF carries the divisors themselves (type ``freq_factors``).

Supported: ``default``, ``linear``, ``llama3``, ``yarn``, and ``freq_factors`` (the GGUF
form). Every other type that transformers accepts (``dynamic``, ``longrope``, ...) is refused
with one error naming it: ``dynamic`` changes the frequencies with the length of the sequence
seen so far, so a logit depends on more than the tokens before it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import numpy as np

from .errors import ConfigError, UnsupportedError
from .untrusted import Values, describe

SUPPORTED = ("default", "linear", "llama3", "yarn")
FREQ_FACTORS = "freq_factors"      # llama.cpp's rope_freqs.weight: one divisor per pair


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling (``type`` and the parameters it reads; the others stay None)."""
    type: str
    factor: Optional[float] = None                       # linear, llama3, yarn
    original_max_position_embeddings: Optional[int] = None   # llama3, yarn
    low_freq_factor: Optional[float] = None              # llama3
    high_freq_factor: Optional[float] = None             # llama3
    attention_factor: Optional[float] = None             # yarn
    beta_fast: Optional[float] = None                    # yarn (default 32)
    beta_slow: Optional[float] = None                    # yarn (default 1)
    mscale: Optional[float] = None                       # yarn
    mscale_all_dim: Optional[float] = None               # yarn
    truncate: Optional[bool] = None                      # yarn (default true)
    freq_factors: Optional[tuple[float, ...]] = None     # freq_factors: one per rotary pair

    def to_dict(self) -> dict[str, Any]:
        """transformers' spelling (``rope_type`` and the parameters that are set)."""
        d: dict[str, Any] = {"rope_type": self.type}
        for f in fields(self)[1:]:
            v = getattr(self, f.name)
            if v is not None:
                d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items()
                         if k != "freq_factors") + (
            f", {len(self.freq_factors)} factors" if self.freq_factors else "")


# parameters each type reads (besides rope_type/type and rope_theta), and which are required
_PARAMS = {
    "default": ((), ()),
    "linear": (("factor",), ("factor",)),
    "llama3": (("factor", "original_max_position_embeddings", "low_freq_factor",
                "high_freq_factor"),
               ("factor", "original_max_position_embeddings", "low_freq_factor",
                "high_freq_factor")),
    "yarn": (("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "truncate"),
             ("factor", "original_max_position_embeddings")),
    FREQ_FACTORS: (("freq_factors",), ("freq_factors",)),
}
_KINDS = {"factor": float, "original_max_position_embeddings": int, "low_freq_factor": float,
          "high_freq_factor": float, "attention_factor": float, "beta_fast": float,
          "beta_slow": float, "mscale": float, "mscale_all_dim": float, "truncate": bool,
          "freq_factors": list}
# keys of a rope_parameters object that say nothing about the frequencies
_INERT = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def from_dict(d: Mapping[str, Any], where: str, max_position_embeddings: int | None = None,
              hf: bool = False) -> Optional[RopeScaling]:
    """A RopeScaling from a ``rope_parameters`` / ``rope_scaling`` object (None for plain
    rotary). A type outside `SUPPORTED` (and, from a config.json (``hf``), our own
    ``freq_factors``, which transformers does not know), a key the type does not read, or a
    value of the wrong type or range is one error naming it."""
    v = Values(d, where)
    kind = v.get("rope_type", str) or v.get("type", str) or "default"
    if kind not in _PARAMS or (hf and kind == FREQ_FACTORS):
        raise UnsupportedError(f"{where}: rope_type {kind!r} is not supported (supported: "
                               f"{', '.join(SUPPORTED)})")
    known, required = _PARAMS[kind]
    for key, value in d.items():
        if key not in known and key not in _INERT and value is not None:
            raise UnsupportedError(f"{where}: {key} = {describe(value)} is not supported with "
                                   f"rope_type {kind!r}")
    prf = v.get("partial_rotary_factor", float)
    if prf is not None and prf != 1.0:
        raise UnsupportedError(f"{where}: partial_rotary_factor = {prf} (partial rotary) is not "
                               "supported")
    vals: dict[str, Any] = {}
    for key in known:
        value = v.items(key, float) if key == "freq_factors" else v.get(key, _KINDS[key])
        if value is not None:
            vals[key] = value
    if kind in ("llama3", "yarn") and "original_max_position_embeddings" not in vals \
            and max_position_embeddings:      # transformers' default: the context length
        vals["original_max_position_embeddings"] = max_position_embeddings
    missing = [k for k in required if k not in vals]
    if missing:
        raise ConfigError(f"{where}: rope_type {kind!r} needs {', '.join(missing)}")
    if kind == "default":
        return None
    if "freq_factors" in vals:
        vals["freq_factors"] = tuple(float(x) for x in vals["freq_factors"])
    scaling = RopeScaling(type=kind, **vals)
    check(scaling, where)
    return scaling


def check(s: RopeScaling, where: str) -> None:
    """Ranges: factors positive, llama3's low < high, yarn's betas ordered."""
    def positive(name: str) -> None:
        x = getattr(s, name)
        if x is not None and not (x > 0 and math.isfinite(x)):
            raise ConfigError(f"{where}: rope {name} = {x!r} must be a positive number")
    for name in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor",
                 "beta_fast", "beta_slow", "original_max_position_embeddings"):
        positive(name)
    if s.type == "llama3" and not s.low_freq_factor < s.high_freq_factor:
        raise ConfigError(f"{where}: rope low_freq_factor {s.low_freq_factor} must be below "
                          f"high_freq_factor {s.high_freq_factor}")
    if s.freq_factors is not None:
        if not all(f > 0 and math.isfinite(f) for f in s.freq_factors):
            raise ConfigError(f"{where}: rope frequency factors must be positive numbers")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling]
                        ) -> tuple[np.ndarray, float]:
    """(inv_freq (head_dim/2,) float64, attention_factor): the angle of pair i at position p
    is p * inv_freq[i], and cos/sin are multiplied by attention_factor."""
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    s = scaling
    if s is None:
        return base, 1.0
    if s.type == "linear":
        return base / s.factor, 1.0
    if s.type == FREQ_FACTORS:
        if len(s.freq_factors) != head_dim // 2:
            raise ConfigError(f"rope frequency factors: {len(s.freq_factors)} given, head_dim "
                              f"{head_dim} has {head_dim // 2} rotary pairs")
        return base / np.asarray(s.freq_factors, dtype=np.float64), 1.0
    if s.type == "llama3":
        return base / llama3_divisors(base, s), 1.0
    if s.type == "yarn":
        return _yarn(head_dim, theta, s)
    raise UnsupportedError(f"rope_type {s.type!r} is not supported")


def llama3_divisors(base: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Per pair, what llama3 scaling divides the plain inverse frequency by: 1 for short
    wavelengths, ``factor`` for long ones, a smooth blend between."""
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / base
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    medium = 1.0 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, s.factor, medium))


def _yarn(head_dim: int, theta: float, s: RopeScaling) -> tuple[np.ndarray, float]:
    """YaRN as transformers computes it: interpolate the long wavelengths, keep the short
    ones, ramp linearly between the correction dimensions; attention factor from mscale."""
    factor = s.factor
    attention = s.attention_factor
    if attention is None:
        if s.mscale and s.mscale_all_dim:
            attention = _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)
    fast = 32.0 if s.beta_fast is None else s.beta_fast
    slow = 1.0 if s.beta_slow is None else s.beta_slow
    old = s.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    pos_freqs = theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


def llama_cpp_freq_factors(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """The ``rope_freqs.weight`` llama.cpp applies for this scaling (float32 divisors)."""
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if s.type == "llama3":
        return llama3_divisors(base, s).astype(np.float32)
    if s.type == FREQ_FACTORS:
        return np.asarray(s.freq_factors, dtype=np.float32)
    raise UnsupportedError(f"rope_type {s.type!r} has no frequency-factor form")
