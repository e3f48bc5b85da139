"""Value statistics and the tolerance each storage dtype allows.

Tolerances are relative L2 errors, |b - a| / |a|, measured on N(0, 0.02) weights encoded
and decoded with `apr.dtypes` (F16 2e-4, BF16 1.7e-3, Q8_0 5.4e-3, APR_Q8 1.2e-2 on a
Qwen2-0.5B FFN matrix and growing slowly with the tensor's size, Q6_K 1.9e-2, Q4_K 8e-2,
APR_Q4 9.8e-2) with headroom. A pair is allowed the sum of its two dtypes' tolerances: two
roundings of the same source can err in opposite directions.

Quantizers with one scale per tensor or per block (APR_Q8, Q8_0, APR_Q4, Q4_0) also have a
hard bound that does not depend on the distribution: no value moves by more than half a
step, a fixed fraction of the largest |value|. A tensor with outliers (one scale stretched
by a value 50x the RMS) can exceed the L2 tolerance and still be exact rounding; the bound
recognizes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from apr.dtypes import DTYPES, decode, encode
from apr.errors import AprError

from .report import PairStats

REL_L2_TOLERANCE: dict[str, float] = {
    "F64": 1e-12,
    "F32": 1e-6,
    "F16": 1e-3,
    "BF16": 6e-3,
    "Q8_0": 1.5e-2,
    "APR_Q8": 4e-2,
    "Q6_K": 5e-2,
    "Q4_K": 0.15,
    "Q4_0": 0.15,
    "APR_Q4": 0.2,
    # measured on files written by llama.cpp's own quantizer (bench/quant_tolerance.py, see
    # docs/quantization.md): about 1.6x the largest rel L2 on heavy-tailed weights
    "Q4_1": 0.15, "Q5_0": 0.1, "Q5_1": 0.075, "Q5_K": 0.075, "Q3_K": 0.3, "Q2_K": 0.55,
    "IQ4_NL": 0.15, "IQ4_XS": 0.15, "IQ3_S": 0.33, "MXFP4": 0.21, "TQ1_0": 1.0, "TQ2_0": 1.0,
}
INTEGER_TOLERANCE = 0.0
# Largest |b - a| per unit of max |value|: half a quantization step (8-bit: max/127 per step,
# APR_Q4: max/7, Q4_0: max/8), or a plain float's relative rounding.
MAX_ERROR_FRACTION: dict[str, float] = {
    "APR_Q8": 1 / 254, "Q8_0": 1 / 254, "APR_Q4": 1 / 14, "Q4_0": 1 / 16,
    "F16": 2 ** -11, "BF16": 2 ** -8, "F32": 2 ** -24, "F64": 0.0,
}
BLOCK_QUANTIZERS = ("APR_Q8", "Q8_0", "APR_Q4", "Q4_0")
# Quantization noise is claimed only where a side was stored (or, before an up-cast, held) in a
# lossy dtype, and only up to this multiple of the pair's tolerance; any other difference is a
# change of values.
NOISE_FACTOR = 2.0
LOSSLESS_TOLERANCE = 1e-6     # F32 and F64: storage that rounds nothing a model holds


def dtype_tolerance(dtype_name: str) -> float:
    return REL_L2_TOLERANCE.get(dtype_name, INTEGER_TOLERANCE)


def pair_tolerance(dtype_a: str, dtype_b: str) -> float:
    return dtype_tolerance(dtype_a) + dtype_tolerance(dtype_b)


def within_rounding(stats: PairStats, dtype_a: str, dtype_b: str) -> bool:
    """Equal within the two dtypes' rounding: by relative L2, or, where a block quantizer is
    involved, by the bound on the largest error."""
    if unmeasured(dtype_a) or unmeasured(dtype_b):
        return stats.identical
    if stats.rel_l2 <= pair_tolerance(dtype_a, dtype_b):
        return True
    if not {dtype_a, dtype_b} & set(BLOCK_QUANTIZERS):
        return False
    fractions = [MAX_ERROR_FRACTION.get(d) for d in (dtype_a, dtype_b)]
    if None in fractions:
        return False
    return stats.max_abs <= sum(fractions) * stats.max_value * (1 + 1e-6)


def lossy(dtype_name: str | None) -> bool:
    """Whether storing in this dtype rounds an F32 weight (F16, BF16, every quantizer)."""
    if dtype_name is None:
        return False
    return dtype_tolerance(dtype_name) > LOSSLESS_TOLERANCE or unmeasured(dtype_name)


def unmeasured(dtype_name: str | None) -> bool:
    """A quantized dtype every command reads but whose rounding no measurement here bounds
    (llama.cpp writes the 1- and 2-bit IQ types only with an importance matrix): a pair
    holding it is never called rounding, only noise."""
    dt = DTYPES.get(dtype_name or "")
    return dt is not None and dt.quantized and dtype_name not in REL_L2_TOLERANCE


def lossiest(*dtype_names: str) -> str:
    """The dtype with the largest tolerance (named in 'within X rounding')."""
    return max(dtype_names, key=dtype_tolerance)


@dataclass
class Moments:
    """Running sums over aligned blocks of A and B, enough for every `PairStats` field."""
    n: int = 0
    sum_abs: float = 0.0
    sum_dd: float = 0.0
    sum_aa: float = 0.0
    sum_bb: float = 0.0
    sum_ab: float = 0.0
    max_abs: float = 0.0
    max_value: float = 0.0
    identical: bool = True

    nonfinite_a: int = 0
    nonfinite_b: int = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.float64 if a.dtype == np.float64 else np.float32).reshape(-1)
        b = np.asarray(b, dtype=a.dtype).reshape(-1)
        if a.size == 0:
            return
        self.identical = self.identical and bool(np.array_equal(a, b, equal_nan=True))
        fa, fb = np.isfinite(a), np.isfinite(b)
        if not (fa.all() and fb.all()):        # statistics over the elements finite on both sides
            self.nonfinite_a += int(a.size - np.count_nonzero(fa))
            self.nonfinite_b += int(b.size - np.count_nonzero(fb))
            both = fa & fb
            a, b = a[both], b[both]
            if a.size == 0:
                return
        sums = _sums(a, b)
        if not all(map(math.isfinite, sums)):   # float32 sums overflowed: the block in float64
            sums = _sums(a.astype(np.float64), b.astype(np.float64))
        d_abs, d_max, v_max, dd, aa, bb, ab = sums
        self.n += a.size
        self.max_abs = max(self.max_abs, d_max)
        self.max_value = max(self.max_value, v_max)
        self.sum_abs += d_abs
        self.sum_dd += dd
        self.sum_aa += aa
        self.sum_bb += bb
        self.sum_ab += ab

    def stats(self) -> PairStats:
        if self.n == 0:
            return PairStats(identical=self.identical, nonfinite_a=self.nonfinite_a,
                             nonfinite_b=self.nonfinite_b)
        na, nb = math.sqrt(self.sum_aa), math.sqrt(self.sum_bb)
        norm = max(na, nb)
        rel = math.sqrt(self.sum_dd) / norm if norm > 0 else 0.0
        cosine = self.sum_ab / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        scale = self.sum_ab / self.sum_aa if self.sum_aa > 0 else 1.0
        if self.identical:
            rel = 0.0
        return PairStats(max_abs=self.max_abs, mean_abs=self.sum_abs / self.n,
                         rmse=math.sqrt(self.sum_dd / self.n), cosine=cosine, rel_l2=rel,
                         scale=scale, max_value=self.max_value, identical=self.identical,
                         nonfinite_a=self.nonfinite_a, nonfinite_b=self.nonfinite_b)


def _sums(a: np.ndarray, b: np.ndarray) -> tuple[float, ...]:
    """sum |d|, max |d|, max |value|, <d, d>, <a, a>, <b, b>, <a, b> for d = b - a."""
    with np.errstate(over="ignore", invalid="ignore"):
        d = b - a
        ad = np.abs(d)
        return (float(ad.sum(dtype=np.float64)), float(ad.max()),
                max(float(np.abs(a).max()), float(np.abs(b).max())),
                float(np.dot(d, d)), float(np.dot(a, a)), float(np.dot(b, b)), float(np.dot(a, b)))


def pair_stats(a: np.ndarray, b: np.ndarray) -> PairStats:
    m = Moments()
    m.add(a, b)
    return m.stats()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """|b - a| / max(|a|, |b|) (0 for two zero arrays; infinite when a side holds inf or nan
    that the other does not hold at the same place)."""
    a = np.asarray(a).reshape(-1)
    b = np.asarray(b).reshape(-1)
    if a.dtype != np.float64:
        a, b = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
    fa, fb = np.isfinite(a), np.isfinite(b)
    if not (fa.all() and fb.all()):
        if not (np.array_equal(fa, fb) and np.array_equal(a[~fa], b[~fb], equal_nan=True)):
            return math.inf
        a, b = a[fa], b[fb]
    d_abs, d_max, v_max, dd, aa, bb, ab = _sums(a.astype(np.float64), b.astype(np.float64)) \
        if a.size else (0.0,) * 7
    norm = math.sqrt(max(aa, bb))
    return math.sqrt(dd) / norm if norm > 0 else 0.0


def rounded_as(x: np.ndarray, dtype_name: str) -> np.ndarray | None:
    """x rounded to ``dtype_name`` as a writer rounds it (F16/BF16: to nearest even; a block
    type: encoded and decoded), or None where that dtype cannot hold x's shape or has no
    encoder here."""
    dt = DTYPES.get(dtype_name)
    if dt is None:
        return None
    try:
        return decode(encode(x, dt), dt, x.shape)
    except (AprError, ValueError):
        return None
