"""Relations between tensors, not only within a pair: a tensor of B that no relation to A's
tensor of the same name explains is looked for among A's other tensors of its shape.

    SWAPPED             B's X is A's Y and B's Y is A's X (gate_proj <-> up_proj, q <-> k)
    LAYERS REORDERED    every tensor of B's layer i is A's layer p(i), for a permutation p
                        of the layer indices (printed as one)
    MOVED               B's X is A's Y (and nothing else explains it)

A candidate is checked cheaply first (the first row, or the first values, in HF order), then
over all its values with the pair's rounding tolerance. Only findings that are defects of a
same-position kind (VALUES CHANGED, UNRELATED, quantization noise, SHAPE) are candidates, at
most `MAX_UNEXPLAINED` of them, so a diff of two unrelated models stays cheap.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from apr import names
from apr.model import ModelView, TensorRef

from . import report as R
from .reader import BlockReader, row_layout, rows_per_block
from .values import pair_stats, rel_l2, within_rounding

UNEXPLAINED = (R.VALUES_CHANGED, R.UNRELATED, R.NOISE, R.SHAPE, R.SCALED, R.SHUFFLED)
MAX_UNEXPLAINED = 256          # findings re-examined at most
PROBE_VALUES = 4096            # values in a fingerprint
PROBE_LIMIT = 0.3              # rel L2 of fingerprints above which tensors cannot match


@dataclass
class Source:
    """B's tensor ``name`` holds A's tensor ``source``."""
    name: str
    source: str
    finding: R.TensorFinding


class Fingerprints:
    """The first values (HF order) of tensors, read once each."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str], np.ndarray] = {}

    def of(self, side: int, ref: TensorRef) -> np.ndarray:
        key = (side, ref.name)
        if key not in self._cache:
            self._cache[key] = _probe(ref)
        return self._cache[key]


def _probe(ref: TensorRef) -> np.ndarray:
    """Up to PROBE_VALUES values from the start of the tensor in HF order: whole rows of a
    tensor whose rows can be cut and that is stored in HF order, else the whole tensor."""
    if ref.numel > PROBE_VALUES and not ref.rotary_heads and row_layout(ref) is not None:
        with BlockReader() as rd:
            rows = min(int(ref.shape[0]), max(1, rows_per_block(ref, PROBE_VALUES)))
            _, _, block = next(rd.value_blocks(ref, rows))
            return np.array(block, dtype=np.float32).reshape(-1)[:PROBE_VALUES]
    return ref.numpy(np.float32, order="hf").reshape(-1)[:PROBE_VALUES]


def _holds(a: TensorRef, b: TensorRef, fp: Fingerprints) -> bool:
    """Whether B's tensor ``b`` holds the values of A's tensor ``a`` (same shape)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    pa, pb = fp.of(0, a), fp.of(1, b)
    if pa.shape != pb.shape or rel_l2(pa, pb) > PROBE_LIMIT:
        return False
    stats = pair_stats(a.numpy(np.float32, order="hf"), b.numpy(np.float32, order="hf"))
    return within_rounding(stats, a.precision, b.precision)


def find_sources(va: ModelView, vb: ModelView, findings: list[R.TensorFinding]) -> list[Source]:
    """For each unexplained finding, the tensor of A whose values B's tensor holds."""
    todo = [f for f in findings if f.defect in UNEXPLAINED and f.name in vb.tensors
            and f.name in va.tensors][:MAX_UNEXPLAINED]
    if not todo:
        return []
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for n, r in va.tensors.items():
        by_shape.setdefault(tuple(r.shape), []).append(n)
    wanted = {f.name for f in todo}
    fp = Fingerprints()
    out = []
    for f in todo:
        rb = vb.tensors[f.name]
        # likely sources first: the other unexplained tensors, then the rest of the shape
        candidates = sorted((n for n in by_shape.get(tuple(rb.shape), []) if n != f.name),
                            key=lambda n: (n not in wanted, n))
        for n in candidates:
            if _holds(va.tensors[n], rb, fp):
                out.append(Source(f.name, n, f))
                break
    return out


def _layer_permutation(sources: list[Source], findings: list[R.TensorFinding]
                       ) -> dict[int, int] | None:
    """{B's layer: A's layer} when every source maps a tensor of layer i to the same kind of
    tensor in one layer p(i), consistently, p permutes the layers it moves, and every tensor
    of a moved layer that differs from A's same-named one is among the sources (a single
    kind exchanged between two layers is a swap, not a reordering)."""
    perm: dict[int, int] = {}
    for s in sources:
        kb, ka = names.kind_of(s.name), names.kind_of(s.source)
        if kb is None or ka is None or kb[0] is not ka[0] or kb[1] is None or ka[1] is None:
            return None
        if perm.setdefault(kb[1], ka[1]) != ka[1]:
            return None
    if len(perm) < 2 or sorted(perm) != sorted(perm.values()):
        return None
    explained = {s.name for s in sources}
    for f in findings:
        if names.layer_of(f.name) in perm and f.defect and f.name not in explained:
            return None
    kinds = {names.kind_of(s.name)[0].kind for s in sources}
    if len(kinds) < 2:
        return None
    return perm


def fused_parts(name: str, config) -> list[tuple[str, int]] | None:
    """(part, rows) of a fused tensor in row order (Phi-3's qkv_proj: q, k, v; gate_up_proj:
    gate, up), or None for a tensor that is not fused."""
    found = names.kind_of(name, config.family) if config is not None else None
    if found is None:
        return None
    if found[0].kind == "attn_qkv.weight":
        return [("q", config.q_size), ("k", config.kv_size), ("v", config.kv_size)]
    if found[0].kind == "ffn_up.weight" and config.fused:
        return [("gate", config.intermediate_size), ("up", config.intermediate_size)]
    return None


def _fused_swap(f: R.TensorFinding, ra: TensorRef, rb: TensorRef, config) -> bool:
    """B's fused tensor holds A's parts in another order (q/k/v, or gate/up exchanged): every
    permutation of the parts, whatever their sizes (with GQA, q has more rows than k and v)."""
    parts = fused_parts(f.name, config)
    if parts is None or tuple(ra.shape) != tuple(rb.shape):
        return False
    a, b = ra.numpy(np.float32, order="hf"), rb.numpy(np.float32, order="hf")
    starts, row = {}, 0
    for part, rows in parts:
        starts[part], row = (row, rows), row + rows
    for order in itertools.permutations([p for p, _ in parts]):
        if list(order) == [p for p, _ in parts]:
            continue
        moved = np.concatenate([a[starts[p][0]:starts[p][0] + starts[p][1]] for p in order])
        if within_rounding(pair_stats(moved, b), ra.precision, rb.precision):
            f.relation, f.defect = "fused-parts-swapped", R.SWAPPED
            f.message = (f"B's fused {f.name} holds A's parts in the order "
                         f"{', '.join(order)} (expected {', '.join(p for p, _ in parts)})")
            f.detail = {**f.detail, "order": list(order), "with": f.name}
            return True
    return False


def apply(va: ModelView, vb: ModelView, findings: list[R.TensorFinding]) -> None:
    """Re-explain the findings that a relation to another tensor explains, in place."""
    config = va.config or vb.config
    for f in findings:
        if f.defect in UNEXPLAINED and f.name in va.tensors and f.name in vb.tensors:
            _fused_swap(f, va.tensors[f.name], vb.tensors[f.name], config)
    sources = find_sources(va, vb, findings)
    if not sources:
        return
    perm = _layer_permutation(sources, findings)
    if perm is not None:
        moved = ", ".join(f"B layer {i} = A layer {j}" for i, j in sorted(perm.items()))
        layers = vb.config.num_layers if vb.config else max(perm) + 1
        order = [perm.get(i, i) for i in range(layers)]
        for s in sources:
            _set(s, "layers-reordered", R.LAYERS_REORDERED,
                 f"B's layers are A's in the order {order}: {moved}", {"permutation": perm})
        return
    source_of = {s.name: s.source for s in sources}
    for s in sources:
        if source_of.get(s.source) == s.name:
            _set(s, "swapped", R.SWAPPED, f"{s.name} <-> {s.source}: B's {s.name} is A's "
                 f"{s.source} and B's {s.source} is A's {s.name}", {"with": s.source})
        else:
            _set(s, "moved", R.MOVED, f"B's {s.name} is A's {s.source}", {"source": s.source})


def _set(s: Source, relation: str, defect: str, message: str, detail: dict) -> None:
    f = s.finding
    f.relation, f.defect = relation, defect
    f.message = message
    f.detail = {**f.detail, **detail}
