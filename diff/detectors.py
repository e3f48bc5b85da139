"""How B's tensor relates to A's, decided from the values alone.

`DETECTORS` is a table of small functions tried in order on a `Pair`; the first that
recognizes the pair names its relation. Names only label: the head counts a rotary
detector tries come from the configs, but a permutation is reported only when the values
show it. Values are compared in HF order (`TensorRef.numpy(order="hf")`), so a format's
known layout (GGUF llama's rotary order) is already undone; the rotary detector also looks
at a side's stored order to say what its writer did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from apr.layout import adjacent_to_halves, halves_to_adjacent
from apr.model import TensorRef

from . import report as R
from .reader import whole
from .values import (NOISE_FACTOR, lossiest, lossy, pair_stats, rel_l2, rounded_as, unmeasured,
                     within_rounding)

SHUFFLE_FULL_ROWS = 4096      # match every row up to this many rows, else a sample
SHUFFLE_SAMPLE = 1024
SHUFFLE_MATCHED = 0.95        # fraction of (sampled) rows of B found among A's rows
PROBE_COLUMNS = 8             # columns compared first, before a full comparison
PROBE_LIMIT = 0.3             # rel L2 of the probe above which rows cannot match
SCALED_MIN_COSINE = 0.99      # candidates for B = s × A
CHANGED_LIMIT = 0.3           # rel L2 up to which B's values are A's, changed (else unrelated)


@dataclass
class Relation:
    relation: str
    defect: str | None
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pair:
    """One tensor in A and in B, with what the detectors need; values are read on demand."""
    name: str
    ref_a: TensorRef
    ref_b: TensorRef
    tol: float
    stats: R.PairStats | None                 # None when the shapes differ
    head_counts: tuple[int, ...] = ()         # head counts of both configs (num_heads, kv)
    expected_heads: int | None = None         # heads this tensor's rows permute with, if Q/K
    head_field: str | None = None             # "num_heads" / "num_kv_heads"
    expected_shape: tuple[int, ...] | None = None   # what the config implies
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def _get(self, key: str, ref: TensorRef, order: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = whole(ref, order)
        return self._cache[key]

    def a(self) -> np.ndarray:
        return self._get("a", self.ref_a, "hf")

    def b(self) -> np.ndarray:
        return self._get("b", self.ref_b, "hf")

    def a_stored(self) -> np.ndarray:
        return self._get("a_stored", self.ref_a, "stored")

    def b_stored(self) -> np.ndarray:
        return self._get("b_stored", self.ref_b, "stored")

    @property
    def same_shape(self) -> bool:
        return tuple(self.ref_a.shape) == tuple(self.ref_b.shape)

    def equal(self, x: np.ndarray, y: np.ndarray) -> bool:
        """x and y (views of A and of B) equal within the two dtypes' rounding."""
        return x.shape == y.shape and within_rounding(pair_stats(x, y), self.ref_a.precision,
                                                      self.ref_b.precision)

    @property
    def dtype_label(self) -> str:
        return lossiest(self.ref_a.precision, self.ref_b.precision)

    def release(self) -> None:
        self._cache.clear()


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# --------------------------------------------------------------------------- detectors

def detect_identical(p: Pair) -> Relation | None:
    if p.stats is not None and p.stats.identical:
        return Relation(R.IDENTICAL, None, "identical")
    return None


def detect_nonfinite(p: Pair) -> Relation | None:
    """A side holds inf or nan (the statistics of the other detectors are over the elements
    finite on both sides, so nothing else may be claimed)."""
    s = p.stats
    if s is None or not (s.nonfinite_a or s.nonfinite_b):
        return None
    n = p.ref_a.numel
    return Relation("non-finite", R.NONFINITE,
                    f"inf/nan values: B {s.nonfinite_b} of {n}, A {s.nonfinite_a} of {n}",
                    {"nonfinite_a": s.nonfinite_a, "nonfinite_b": s.nonfinite_b})


def detect_rounding(p: Pair) -> Relation | None:
    s = p.stats
    if s is None or not within_rounding(s, p.ref_a.precision, p.ref_b.precision):
        return None
    how = (f"rel L2 {_fmt(s.rel_l2)} <= {_fmt(p.tol)}" if s.rel_l2 <= p.tol
           else f"max |Δ| {_fmt(s.max_abs)} within half a quantization step")
    return Relation(R.ROUNDING, None, f"within {p.dtype_label} rounding ({how})")


ROUNDED_TO = ("BF16", "F16")      # roundings recognized from the values, whatever the storage
ROUNDED_PROBE = 4096              # values compared first, before the whole tensor


def _rounding_of(p: Pair) -> tuple[str, str] | None:
    """(side, dtype) when one side's values are exactly the other's rounded to BF16 or F16,
    or requantized to the dtype that side stores: ("B", "BF16") for B = A rounded to BF16."""
    targets = {"B": list(ROUNDED_TO), "A": list(ROUNDED_TO)}
    for side, ref in (("B", p.ref_b), ("A", p.ref_a)):
        if ref.dtype.quantized or ref.origin_dtype is not None:
            targets[side].append((ref.origin_dtype or ref.dtype).name)
    a, b = p.a(), p.b()
    for side, src, dst in (("B", a, b), ("A", b, a)):
        probe_src, probe_dst = src.reshape(-1)[:ROUNDED_PROBE], dst.reshape(-1)[:ROUNDED_PROBE]
        for name in dict.fromkeys(targets[side]):
            if name in ROUNDED_TO:
                head = rounded_as(probe_src, name)
                if head is None or not np.array_equal(head, probe_dst):
                    continue
            whole_rounded = rounded_as(src, name)
            if whole_rounded is not None and np.array_equal(whole_rounded, dst):
                return side, name
    return None


def detect_rounded_to(p: Pair) -> Relation | None:
    """One side's values are exactly the other's rounded to BF16 / F16 (or requantized to
    the type its storage says), whatever dtype stores them: a llama.cpp GGUF of a BF16
    copy keeps its norms F32, holding BF16 values. Rounding, not a change."""
    s = p.stats
    if s is None or s.identical or s.nonfinite_a or s.nonfinite_b or s.rel_l2 > CHANGED_LIMIT:
        return None
    found = _rounding_of(p)
    if found is None:
        return None
    side, name = found
    other = "A" if side == "B" else "B"
    return Relation(R.ROUNDING, None, f"{side} is {other} rounded to {name} (every value; "
                    f"rel L2 {_fmt(s.rel_l2)})", {"rounded_to": name, "rounded_side": side})


def _config_note(p: Pair, shape: tuple[int, ...]) -> str:
    if p.expected_shape is None or tuple(p.expected_shape) == shape:
        return ""
    return f"; the config implies {list(p.expected_shape)}"


def detect_transposed(p: Pair) -> Relation | None:
    """B holds A's transpose: with the reversed shape, or (non-square) bytes of the
    transpose under A's shape."""
    sa, sb = tuple(p.ref_a.shape), tuple(p.ref_b.shape)
    if len(sa) != 2 or math.prod(sa) != math.prod(sb):
        return None
    a = p.a()
    if sb == sa[::-1] and p.equal(a.T, p.b()):
        square = sa[0] == sa[1]
        msg = "B holds the transpose of A" + (" (square)" if square else
                                                f" (shape {list(sb)} instead of {list(sa)}"
                                                f"{_config_note(p, sb)})")
        return Relation("transposed", R.TRANSPOSED, msg, {"shape_kept": square})
    if sb == sa and sa[0] != sa[1] and p.equal(a.T, p.b().reshape(sa[::-1])):
        return Relation("transposed", R.TRANSPOSED,
                        f"B holds the bytes of A's transpose under A's shape {list(sa)}",
                        {"shape_kept": True})
    return None


def detect_padded(p: Pair) -> Relation | None:
    """Same trailing dimensions, a different row count, and the common rows equal."""
    sa, sb = tuple(p.ref_a.shape), tuple(p.ref_b.shape)
    if len(sa) != len(sb) or not sa or sa[1:] != sb[1:] or sa[0] == sb[0]:
        return None
    n = min(sa[0], sb[0])
    if not p.equal(p.a()[:n], p.b()[:n]):
        return None
    extra = (p.b() if sb[0] > n else p.a())[n:]
    zero = not np.any(extra)
    how = "padded" if sb[0] > sa[0] else "truncated"
    msg = (f"B has {sb[0]} rows, A {sa[0]}: the first {n} are equal, B is {how} "
           f"by {abs(sb[0] - sa[0])} rows" + (" (zeros)" if zero else ""))
    return Relation(how, R.PADDING, msg, {"rows_a": sa[0], "rows_b": sb[0], "extra_rows_zero": zero})


def _rotary_perm(rows: int, heads: int, transform: str, times: int) -> np.ndarray:
    fn = halves_to_adjacent if transform == "halves_to_adjacent" else adjacent_to_halves
    perm = np.arange(rows)
    for _ in range(times):
        perm = fn(perm, heads)
    return perm


def _head_candidates(p: Pair, rows: int) -> list[int]:
    """The configs' head counts first, then every other count that splits the rows into
    heads of at least 4 rows (an even number)."""
    valid = [h for h in range(1, rows // 4 + 1) if rows % h == 0 and (rows // h) % 2 == 0]
    first = [h for h in p.head_counts if h in valid]
    return list(dict.fromkeys(first + valid))


def _rows_match(p: Pair, x: np.ndarray, y: np.ndarray, perm: np.ndarray) -> bool:
    """y == x[perm] (rows), probing a few columns before the full comparison."""
    if x.ndim > 1 and x.shape[1] > PROBE_COLUMNS:
        if rel_l2(x[perm, :PROBE_COLUMNS], y[:, :PROBE_COLUMNS]) > PROBE_LIMIT:
            return False
    return p.equal(x[perm], y)


def _rotary_views(p: Pair) -> list[tuple[str, Callable[[], np.ndarray], Callable[[], np.ndarray]]]:
    """(view, A values, B values): B's stored rows first where B stores a permutation, then
    both in HF order, then A's stored rows against B's in HF order."""
    views = []
    if p.ref_b.rotary_heads:
        views.append(("stored_b", p.a, p.b_stored))
    views.append(("hf", p.a, p.b))
    if p.ref_a.rotary_heads:
        views.append(("stored_a", p.a_stored, p.b))
    return views


def _not_permuted(p: Pair) -> Relation | None:
    """B's format stores llama.cpp's adjacent-pair order (a llama GGUF) but its stored rows
    equal A's in HF order: its writer never permuted them. (A is the reference: where the
    values allow a story that blames B, B is named.)"""
    if p.ref_b.rotary_heads and p.equal(p.a(), p.b_stored()):
        msg = ("B stores rows not permuted: its stored rows are A's in HF order, but its format "
               f"holds them in llama.cpp's adjacent-pair order ({p.ref_b.rotary_heads} heads), so "
               "reading it permutes them the other way")
        return Relation("rotary-permuted", R.ROTARY, msg,
                        {"view": "stored_b", "transform": None, "heads": p.ref_b.rotary_heads,
                         "times": 0, "not_permuted": "B", "expected_heads": p.expected_heads})
    return None


def _heads_note(p: Pair, heads: int, view: str) -> str:
    stored = {"stored_b": p.ref_b.rotary_heads, "stored_a": p.ref_a.rotary_heads}.get(view)
    expected = stored or p.expected_heads
    if expected and heads != expected and p.head_field:
        return f"; {p.head_field} is {expected}"
    return ""


def _rotary_message(p: Pair, view: str, transform: str, heads: int, times: int) -> str:
    arrow = "halves→adjacent" if transform == "halves_to_adjacent" else "adjacent→halves"
    twice = " twice" if times == 2 else ""
    if view == "stored_a":      # A's stored (llama.cpp order) rows, taken to B's
        return (f"B's rows (in HF order) are A's stored rows (llama.cpp's order) rotary-permuted"
                f"{twice} ({arrow}) with {heads} heads" + _heads_note(p, heads, view))
    where = {"stored_b": "B stores rows", "hf": "B's rows (in HF order) are"}[view]
    return f"{where} rotary-permuted{twice} ({arrow}) with {heads} heads" + _heads_note(p, heads, view)


def detect_rotary(p: Pair) -> Relation | None:
    """B's rows are A's in the other rotary order (halves <-> adjacent pairs), permuted with
    some head count, or permuted twice; or a side that should store llama.cpp's order holds
    the other side's rows unpermuted. The message names the side that holds the other order."""
    if not p.same_shape or not p.ref_a.shape:
        return None
    rows = int(p.ref_a.shape[0])
    if (found := _not_permuted(p)) is not None:
        return found
    for view, get_a, get_b in _rotary_views(p):
        x, y = get_a(), get_b()
        if view != "hf" and p.equal(x, y):
            continue            # the stored rows equal A's: nothing was permuted there
        for heads in _head_candidates(p, rows):
            for times in (1, 2):
                for transform in ("halves_to_adjacent", "adjacent_to_halves"):
                    perm = _rotary_perm(rows, heads, transform, times)
                    if np.array_equal(perm, np.arange(rows)):
                        continue
                    if _rows_match(p, x, y, perm):
                        return Relation("rotary-permuted", R.ROTARY,
                                        _rotary_message(p, view, transform, heads, times),
                                        {"view": view, "transform": transform, "heads": heads,
                                         "times": times, "expected_heads": p.expected_heads})
    return None


def detect_scaled(p: Pair) -> Relation | None:
    """B = s × A: collinear values (|cosine| near 1), refit and checked on the full arrays."""
    st = p.stats
    if st is None or abs(st.cosine) < SCALED_MIN_COSINE:
        return None
    a, b = p.a().reshape(-1).astype(np.float64), p.b().reshape(-1).astype(np.float64)
    aa = float(np.dot(a, a))
    if aa == 0:
        return None
    s = float(np.dot(a, b)) / aa
    if abs(s - 1) <= NOISE_FACTOR * p.tol or not p.equal((s * a).astype(np.float32), b.astype(np.float32)):
        return None
    return Relation("scaled", R.SCALED, f"B = {s:.4g} × A", {"scale": s})


def _row_norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def _nearest_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each row of b, the index of the nearest row of a in a random 16-d projection."""
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((a.shape[1], min(16, a.shape[1]))).astype(np.float32)
    pa, pb = a @ proj, b @ proj
    na = np.einsum("ij,ij->i", pa, pa)
    out = np.empty(b.shape[0], np.int64)
    for s in range(0, b.shape[0], 256):
        chunk = pb[s:s + 256]
        d = na[None, :] - 2 * chunk @ pa.T
        out[s:s + 256] = d.argmin(axis=1)
    return out


def _rows_close(x: np.ndarray, y: np.ndarray, tol: float) -> np.ndarray:
    nx, ny = _row_norms(x), _row_norms(y)
    err = _row_norms(x - y)
    scale = np.maximum(nx, ny)
    return np.where(scale > 0, err <= tol * np.maximum(scale, 1e-30), True)


def detect_shuffled(p: Pair) -> Relation | None:
    """Every (sampled) row of B is some row of A, and some sit at other indices."""
    if not p.same_shape or len(p.ref_a.shape) != 2 or p.ref_a.shape[0] < 2:
        return None
    a, b = p.a(), p.b()
    rows = a.shape[0]
    idx = np.arange(rows) if rows <= SHUFFLE_FULL_ROWS else \
        np.sort(np.random.default_rng(0).choice(rows, SHUFFLE_SAMPLE, replace=False))
    row_tol = 3 * p.tol + 1e-6
    match = _nearest_rows(a, b[idx])
    found = _rows_close(a[match], b[idx], row_tol)
    in_place = _rows_close(a[idx], b[idx], row_tol)
    moved = int(np.sum(found & ~in_place))
    if found.mean() < SHUFFLE_MATCHED or moved < 2:
        return None
    sampled = "" if len(idx) == rows else f" (of {len(idx)} sampled)"
    return Relation("shuffled", R.SHUFFLED,
                    f"B's rows are A's rows in another order: {moved} rows moved{sampled}",
                    {"moved": moved, "checked": int(len(idx)), "rows": rows})


def detect_noise(p: Pair) -> Relation | None:
    """Quantization noise, claimed only where a side was stored in a lossy dtype (or held one
    before an up-cast) and the difference stays within NOISE_FACTOR x that storage's
    tolerance: never from the size of the difference alone."""
    s = p.stats
    lossy_sides = [d for d in (p.ref_a.precision, p.ref_b.precision) if lossy(d)]
    blind = [d for d in lossy_sides if unmeasured(d)]
    if s is not None and blind and s.rel_l2 <= CHANGED_LIMIT * 3:
        return Relation("noise", R.NOISE,
                        f"stored in {blind[0]}, whose rounding no measurement here bounds: "
                        f"rel L2 {_fmt(s.rel_l2)}, cosine {s.cosine:.4f} (equivalence cannot be "
                        "claimed)", {"rel_l2": s.rel_l2, "unmeasured": blind[0]})
    if s is None or not lossy_sides or s.rel_l2 > NOISE_FACTOR * p.tol:
        return None
    return Relation("noise", R.NOISE,
                    f"values differ beyond {p.dtype_label} rounding: rel L2 {_fmt(s.rel_l2)} > "
                    f"{_fmt(p.tol)} (but within {NOISE_FACTOR:g}x), cosine {s.cosine:.4f}",
                    {"rel_l2": s.rel_l2})


def vector_pattern(a: np.ndarray, b: np.ndarray) -> str | None:
    """How vector B was made from vector A, when it is one of the changes conversion scripts
    make: all ones, zeroed, a constant, A + 1 or A - 1 (a norm's (1 + w) folded once too
    often or not at all)."""
    if a.ndim != 1 or a.size == 0:
        return None
    if not np.any(b):
        return "zeroed"
    d = (b.astype(np.float64) - a.astype(np.float64))
    tol = 1e-6 * max(1.0, float(np.abs(a).max()))
    for off in (1.0, -1.0):
        if np.all(np.abs(d - off) <= tol + 1e-3 * abs(off)):
            return f"A {'+' if off > 0 else '-'} 1 (offset by exactly {off:+g})"
    if np.all(b == b[0]):
        return "all ones" if b[0] == 1 else f"a constant {float(b[0]):.4g}"
    return None


def detect_changed(p: Pair) -> Relation | None:
    """B's values are A's, changed: between lossless copies any difference beyond rounding
    (with the pattern, for a vector), or beyond a lossy side's noise bound while B still
    follows A (rel L2 <= CHANGED_LIMIT)."""
    s = p.stats
    if s is None:
        return None
    pattern = vector_pattern(p.a(), p.b()) if len(p.ref_a.shape) == 1 else None
    if pattern is None and s.rel_l2 > CHANGED_LIMIT:
        return None
    stored = "both stored lossless" if not any(lossy(d) for d in (p.ref_a.precision, p.ref_b.precision)) \
        else f"beyond {p.dtype_label} rounding"
    what = f"B is {pattern}; " if pattern else ""
    return Relation("changed", R.VALUES_CHANGED,
                    f"{what}rel L2 {_fmt(s.rel_l2)}, cosine {s.cosine:.4f} ({stored}, "
                    f"tolerance {_fmt(p.tol)})",
                    {"rel_l2": s.rel_l2, "cosine": s.cosine, "pattern": pattern})


def detect_unrelated(p: Pair) -> Relation:
    if p.same_shape:
        s = p.stats
        return Relation("unrelated", R.UNRELATED,
                        f"values unrelated: rel L2 {_fmt(s.rel_l2)}, cosine {s.cosine:.3f}",
                        {"rel_l2": s.rel_l2, "cosine": s.cosine})
    return Relation("shape", R.SHAPE,
                    f"shapes differ: A {list(p.ref_a.shape)}, B {list(p.ref_b.shape)}", {})


DETECTORS: tuple[Callable[[Pair], Relation | None], ...] = (
    detect_identical,
    detect_nonfinite,
    detect_rounding,
    detect_rounded_to,
    detect_transposed,
    detect_padded,
    detect_rotary,
    detect_scaled,
    detect_shuffled,
    detect_noise,
    detect_changed,
    detect_unrelated,
)


def classify(p: Pair) -> Relation:
    """The first relation a detector recognizes (`detect_unrelated` always does)."""
    for detect in DETECTORS:
        rel = detect(p)
        if rel is not None:
            return rel
    raise AssertionError("detect_unrelated returns a relation")
