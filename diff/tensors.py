"""Tensor by tensor: align the two views by canonical name, stream each pair's values,
classify the pairs that are not equal within rounding, and handle tied embeddings.

Tied embeddings: a side "ties" when its config says so (or, without a config, when it has
no lm_head). Its effective output projection is then its embedding. An APR that ties stores
lm_head as a copy of the embedding (aprender's convention): equivalent to a GGUF or HF
model without lm_head, as long as the copy really equals the embedding.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from apr import names
from apr.model import ModelView, TensorRef, equal_bytes

from . import report as R
from .detectors import Pair, classify
from .reader import BlockReader, block_rows_for, blockwise
from .values import Moments, pair_tolerance

EMBED, LM_HEAD = names.EMBED, names.LM_HEAD


@dataclass
class Readers:
    """One block reader per side, so that a block of A and a block of B can coexist, and
    answers about equal bytes worked out ahead (`diff.ahead.BytesAhead`), if any."""
    a: BlockReader = field(default_factory=BlockReader)
    b: BlockReader = field(default_factory=BlockReader)
    ahead: Any = None

    def raw_pairs(self, ra: TensorRef, rb: TensorRef) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stored bytes of A's and B's tensor, row block by row block."""
        rows = block_rows_for(ra, rb)
        for (_, _, x), (_, _, y) in zip(self.a.raw_blocks(ra, rows), self.b.raw_blocks(rb, rows)):
            yield x, y

    def value_pairs(self, ra: TensorRef, rb: TensorRef) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """float32 values of A's and B's tensor, row block by row block."""
        rows = block_rows_for(ra, rb)
        for (_, _, x), (_, _, y) in zip(self.a.value_blocks(ra, rows), self.b.value_blocks(rb, rows)):
            yield x, y

    def close(self) -> None:
        self.a.close()
        self.b.close()


# --------------------------------------------------------------------------- streaming

def same_storage(ra: TensorRef, rb: TensorRef) -> bool:
    """Same dtype, shape and stored row order: equal bytes mean identical values."""
    return (ra.dtype.name == rb.dtype.name and tuple(ra.shape) == tuple(rb.shape)
            and ra.nbytes == rb.nbytes and (ra.rotary_heads or 0) == (rb.rotary_heads or 0)
            and ra.offset == rb.offset)


def bytes_equal(ra: TensorRef, rb: TensorRef, rd: Readers) -> bool:
    """Whether the stored bytes of two tensors are equal: as compared ahead, else read block
    by block."""
    known = rd.ahead.equal(ra, rb) if rd.ahead is not None else None
    if known is not None:
        return known
    if blockwise(ra) and blockwise(rb):
        return all(equal_bytes(x, y) for x, y in rd.raw_pairs(ra, rb))
    return equal_bytes(rd.a.read_bytes(ra, 0, ra.nbytes), rd.b.read_bytes(rb, 0, rb.nbytes))


def value_stats(ra: TensorRef, rb: TensorRef, rd: Readers) -> R.PairStats:
    """Statistics of B against A (same shape), in HF row order; block by block when large."""
    if same_storage(ra, rb) and bytes_equal(ra, rb, rd):
        return R.PairStats()
    m = Moments()
    if blockwise(ra) and blockwise(rb):
        for x, y in rd.value_pairs(ra, rb):
            m.add(x, y)
    else:
        m.add(ra.numpy(np.float32, order="hf"), rb.numpy(np.float32, order="hf"))
    return m.stats()


# --------------------------------------------------------------------------- one pair

@dataclass
class Context:
    """What every pair needs from the two views."""
    head_counts: tuple[int, ...]
    expected_shapes: dict[str, tuple[int, ...]]
    head_fields: dict[str, int]                 # config field -> head count (A's config)
    norm_offset: float = 0.0                    # norms multiply by (offset + w) (Gemma: 1)


def make_context(va: ModelView, vb: ModelView) -> Context:
    heads: list[int] = []
    fields: dict[str, int] = {}
    for cfg in (va.config, vb.config):
        if cfg is not None:
            heads += [cfg.num_heads, cfg.num_kv_heads]
            fields.setdefault("num_heads", cfg.num_heads)
            fields.setdefault("num_kv_heads", cfg.num_kv_heads)
    cfg = va.config or vb.config
    shapes = cfg.tensor_shapes(include_lm_head=True) if cfg else {}
    return Context(tuple(dict.fromkeys(heads)), shapes, fields, cfg.norm_offset if cfg else 0.0)


def effective(ref: TensorRef, name: str, ctx: Context) -> TensorRef:
    """A Gemma norm weight as the model multiplies by it, offset + w: the domain in which
    llama.cpp stores it (1 + w), so a fold compares exactly and a missing one shows as +-1."""
    if not ctx.norm_offset or not names.is_norm(name):
        return ref
    return dataclasses.replace(ref, offset=ref.offset - ctx.norm_offset)


def _finding(name: str, ra: TensorRef, rb: TensorRef, rel, tol: float, stats) -> R.TensorFinding:
    return R.TensorFinding(name=name, relation=rel.relation, defect=rel.defect, message=rel.message,
                           dtype_a=ra.dtype.name, dtype_b=rb.dtype.name,
                           shape_a=list(ra.shape), shape_b=list(rb.shape), tolerance=tol,
                           stats=stats, detail=rel.detail, precision_a=ra.precision,
                           precision_b=rb.precision)


def compare_pair(name: str, ra: TensorRef, rb: TensorRef, ctx: Context, rd: Readers) -> R.TensorFinding:
    """Classify B's tensor against A's (both in HF order)."""
    tol = pair_tolerance(ra.precision, rb.precision)
    stats = value_stats(ra, rb, rd) if tuple(ra.shape) == tuple(rb.shape) else None
    field = names.rotary_head_field(name)
    pair = Pair(name, ra, rb, tol, stats, head_counts=ctx.head_counts,
                expected_heads=ctx.head_fields.get(field) if field else None, head_field=field,
                expected_shape=ctx.expected_shapes.get(name))
    try:
        rel = classify(pair)
    finally:
        pair.release()
    return _finding(name, ra, rb, rel, tol, stats)


# --------------------------------------------------------------------------- tied embeddings

def ties(view: ModelView) -> bool:
    """Whether the view's output projection is its embedding."""
    if view.config is not None:
        return bool(view.declared_tied)     # as the file says (the model may run untied)
    return LM_HEAD not in view.tensors and EMBED in view.tensors


def _tied_consistency(side: str, view: ModelView, ctx: Context, rd: Readers) -> R.TensorFinding | None:
    """A side that ties but stores an lm_head: the copy must equal its embedding."""
    head, emb = view.tensors.get(LM_HEAD), view.tensors.get(EMBED)
    if head is None or emb is None or view.info.get("tied_copy_equal"):   # open_model compared them
        return None
    f = compare_pair(LM_HEAD, emb, head, ctx, rd)
    if f.defect is None:
        return None
    f.relation, f.defect = "tied", R.TIED
    f.message = (f"{side} declares tied embeddings but its lm_head.weight is not a copy of its "
                 f"embedding ({f.message})")
    return f


def _tied_across(tied_side: str, tied: ModelView, other: ModelView, ctx: Context,
                 rd: Readers, a_is_tied: bool) -> R.TensorFinding | None:
    """One side ties, the other has its own lm_head: benign if that lm_head equals the tied
    side's embedding, else a TIED defect."""
    emb, head = tied.tensors.get(EMBED), other.tensors.get(LM_HEAD)
    if emb is None or head is None:
        return None
    ra, rb = (emb, head) if a_is_tied else (head, emb)
    f = compare_pair(LM_HEAD, ra, rb, ctx, rd)
    other_side = "B" if a_is_tied else "A"
    if f.defect is None:
        f.relation, f.message = R.TIED_COPY, (f"{tied_side} ties lm_head to the embedding; "
                                              f"{other_side}'s lm_head.weight is an equal copy ({f.message})")
        return f
    f.relation, f.defect = "tied", R.TIED
    f.message = (f"{tied_side} ties lm_head to the embedding, {other_side} has its own "
                 f"lm_head.weight that differs from it ({f.message})")
    return f


def compare_lm_head(va: ModelView, vb: ModelView, ctx: Context, rd: Readers) -> list[R.TensorFinding]:
    """lm_head.weight under every combination of tied and untied sides."""
    ta, tb = ties(va), ties(vb)
    ha, hb = va.tensors.get(LM_HEAD), vb.tensors.get(LM_HEAD)
    if not ta and not tb:
        if ha is not None and hb is not None:
            return [compare_pair(LM_HEAD, ha, hb, ctx, rd)]
        return [missing_or_extra(LM_HEAD, ha, hb)] if (ha or hb) else []
    out = [f for f in (_tied_consistency("A", va, ctx, rd) if ta else None,
                       _tied_consistency("B", vb, ctx, rd) if tb else None) if f is not None]
    if ta and not tb:
        out.append(_tied_across("A", va, vb, ctx, rd, a_is_tied=True))
    elif tb and not ta:
        out.append(_tied_across("B", vb, va, ctx, rd, a_is_tied=False))
    elif not out and (ha is not None or hb is not None):
        copies = " and ".join(s for s, h in (("A", ha), ("B", hb)) if h is not None)
        out.append(R.TensorFinding(LM_HEAD, R.TIED_COPY, None,
                                   f"both tie lm_head to the embedding; {copies} stores it as an "
                                   "equal copy of the embedding",
                                   dtype_a=ha.dtype.name if ha else None,
                                   dtype_b=hb.dtype.name if hb else None,
                                   shape_a=list(ha.shape) if ha else None,
                                   shape_b=list(hb.shape) if hb else None))
    return [f for f in out if f is not None]


# --------------------------------------------------------------------------- alignment

def missing_or_extra(name: str, ra: TensorRef | None, rb: TensorRef | None) -> R.TensorFinding:
    if rb is None:
        return R.TensorFinding(name, "missing", R.MISSING, "in A, not in B",
                               dtype_a=ra.dtype.name, shape_a=list(ra.shape))
    return R.TensorFinding(name, "extra", R.EXTRA, "in B, not in A",
                           dtype_b=rb.dtype.name, shape_b=list(rb.shape))


def model_order(name: str) -> tuple:
    """Model order: embedding, layers by index, final norm, lm_head, anything else."""
    layer = names.layer_of(name)
    if name == EMBED:
        return (0, 0, name)
    if layer is not None:
        return (1, layer, name)
    if name == names.FINAL_NORM:
        return (2, 0, name)
    if name == LM_HEAD:
        return (3, 0, name)
    return (4, 0, name)


def aligned_names(va: ModelView, vb: ModelView) -> list[str]:
    """Every canonical name in A or B except lm_head (handled by `compare_lm_head`)."""
    union = set(va.tensors) | set(vb.tensors)
    union.discard(LM_HEAD)
    return sorted(union, key=model_order)


def tensor_bytes(va: ModelView, vb: ModelView) -> int:
    return sum(r.nbytes for r in va.tensors.values()) + sum(r.nbytes for r in vb.tensors.values())


def compare_tensors(va: ModelView, vb: ModelView, tick: Callable[[int], None] = lambda n: None,
                    ahead: Any = None) -> Iterator[R.TensorFinding]:
    """Findings for every aligned name, streamed one tensor at a time, then lm_head; `ahead`
    answers byte comparisons worked out in advance (`diff.ahead.BytesAhead`)."""
    ctx = make_context(va, vb)
    rd = Readers(ahead=ahead)
    try:
        for name in aligned_names(va, vb):
            ra, rb = va.tensors.get(name), vb.tensors.get(name)
            if ra is None or rb is None:
                yield missing_or_extra(name, ra, rb)
            else:
                yield compare_pair(name, effective(ra, name, ctx), effective(rb, name, ctx), ctx, rd)
            tick((ra.nbytes if ra else 0) + (rb.nbytes if rb else 0))
        yield from compare_lm_head(va, vb, ctx, rd)
        tick(sum(v.tensors[LM_HEAD].nbytes for v in (va, vb) if LM_HEAD in v.tensors))
    finally:
        rd.close()


def matches(name: str, pattern: str | None) -> bool:
    return pattern is None or re.search(pattern, name) is not None
