"""ZeRO stage 1 (``pretrain --zero 1`` under mpirun): the AdamW state (m and v) is split
across the ranks instead of repeated on each.

The layout (`ShardLayout`): every parameter flattened and laid end to end in the model's
parameter order, padded with zeros to ``ranks`` equal blocks; block r is rank r's shard. A
shard may begin or end inside a parameter, so each rank's part of a parameter is a slice of
its flattened elements (a view: the update happens in the model's own arrays).

One step (`ShardedAdamW`):

1. reduce-scatter of the gradients: rank r receives block r of the sum over the ranks, and
   divides by the number of ranks. A reduce-scatter moves half the bytes of an all-reduce
   (which is a reduce-scatter followed by an all-gather), and the all-gather that follows
   here carries the updated parameters instead of the gradients: the traffic of a step is
   that of plain data parallelism, while an all-reduce and then slicing would add the
   parameter all-gather on top.
2. the global gradient norm: the squares summed over this rank's block, then over the ranks;
   clipping scales every block by the same factor, as `ref.optim.clip_grad_norm` would.
3. AdamW on this rank's slices of the parameters (its own m and v only); the update is
   element-wise, so the result is that of the whole-model update, element for element.
4. all-gather of the updated blocks into every rank's parameters: the replicas stay
   identical (checked by the replica digests like any run).

Checkpoints hold the whole state in the format of a run without ZeRO: every rank sends its
blocks of m and v to rank 0 (MPI's Gather, in host memory), which writes them; a resume with
or without ``--zero`` and with any number of ranks takes each rank's slices from the whole
tensors of the file.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .backend import array_module
from .optim import EXP_AVG, EXP_AVG_SQ, AdamW, AdamWConfig, decays, scale_to_norm
from .parallel import World

Array = Any  # numpy.ndarray or cupy.ndarray


def _flat(a: Array) -> Array:
    """``a`` as a 1-D view of its elements (never a copy: updates must reach ``a``)."""
    if not a.flags.c_contiguous:
        raise ValueError("a parameter that is not C-contiguous cannot be sharded")
    return a.reshape(-1)


def _to_host(a: Array) -> np.ndarray:
    return np.asarray(a) if array_module(a) is np else a.get()


class ShardLayout:
    """Where each rank's shard lies in the flattened parameters (see the module notes)."""

    def __init__(self, params: Mapping[str, Array], ranks: int, rank: int):
        self.names = list(params)
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.sizes = {n: int(p.size) for n, p in params.items()}
        self.offsets: dict[str, int] = {}
        total = 0
        for n in self.names:
            self.offsets[n] = total
            total += self.sizes[n]
        self.total, self.ranks = total, ranks
        self.block = -(-total // ranks)                    # elements per shard, padded
        lo, hi = rank * self.block, min((rank + 1) * self.block, total)
        # (name, start, stop): this rank's elements of each parameter it has a part of
        self.pieces: list[tuple[str, int, int]] = []
        for n in self.names:
            a, b = max(lo, self.offsets[n]), min(hi, self.offsets[n] + self.sizes[n])
            if a < b:
                self.pieces.append((n, a - self.offsets[n], b - self.offsets[n]))

    def flatten(self, arrays: Mapping[str, Array], xp: Any) -> Array:
        """All of ``arrays`` in one padded buffer of ``ranks`` blocks (a copy, in ``xp``)."""
        parts = [xp.asarray(arrays[n]).reshape(-1) for n in self.names]
        pad = self.block * self.ranks - self.total
        if pad:
            parts.append(xp.zeros(pad, dtype=parts[0].dtype))
        return xp.concatenate(parts)

    def views(self, arrays: Mapping[str, Array]) -> dict[str, Array]:
        """This rank's slices of ``arrays`` (views into them)."""
        return {n: _flat(arrays[n])[a:b] for n, a, b in self.pieces}

    def split(self, block: Array) -> dict[str, Array]:
        """This rank's block cut into its slices of each parameter (views into ``block``)."""
        out, k = {}, 0
        for n, a, b in self.pieces:
            out[n] = block[k:k + b - a]
            k += b - a
        return out

    def join(self, pieces: Mapping[str, Array], xp: Any, dtype: Any) -> Array:
        """The inverse of `split`: this rank's slices in one block, zero-padded."""
        parts = [pieces[n].reshape(-1) for n, _, _ in self.pieces]
        used = sum(b - a for _, a, b in self.pieces)
        if used < self.block:
            parts.append(xp.zeros(self.block - used, dtype=dtype))
        return xp.concatenate(parts)

    def unflatten(self, flat: Array) -> dict[str, Array]:
        """The whole parameters' arrays from a buffer of every block (views into it)."""
        return {n: flat[self.offsets[n]:self.offsets[n] + self.sizes[n]].reshape(self.shapes[n])
                for n in self.names}


class ShardedAdamW:
    """AdamW with its state sharded across the ranks (ZeRO-1; see the module notes). Its
    ``step`` updates this rank's slices only; `gather_params` then makes every rank's
    parameters whole. `state_tensors` is collective: every rank calls it, rank 0 gets the
    whole state (the others an empty dict)."""

    def __init__(self, params: Mapping[str, Array], config: AdamWConfig, world: World):
        self.world, self.config = world, config
        self.layout = ShardLayout(params, world.size, world.rank)
        first = next(iter(params.values()))
        self.xp, self.dtype = array_module(first), first.dtype
        self.adamw = AdamW(self.layout.views(params), config)
        for n, _, _ in self.layout.pieces:          # decay follows the whole parameter's shape
            self.adamw.decay[n] = decays(n, self.layout.shapes[n])

    @property
    def step_count(self) -> int:
        return self.adamw.step_count

    def reduce_grads(self, grads: Mapping[str, Array]) -> dict[str, Array]:
        """This rank's slices of the mean gradient over the ranks (a reduce-scatter)."""
        coll = self.world.collectives
        block = coll.reduce_scatter_sum(self.layout.flatten(grads, coll.xp))
        block /= self.world.size
        return self.layout.split(block)

    def clip(self, grads: Mapping[str, Array], max_norm: float) -> float:
        """Clip this rank's gradient slices by the global norm (over every rank's slices);
        returns that norm."""
        local = 0.0
        for g in grads.values():
            xp = array_module(g)
            local += float(xp.sum(xp.square(g), dtype=xp.float64))
        norm = math.sqrt(self.world.sum(local))
        scale_to_norm(grads, norm, max_norm)
        return norm

    def step(self, params: Mapping[str, Array], grads: Mapping[str, Array], lr: float) -> None:
        """AdamW on this rank's slices of ``params`` (in place) with its gradient slices."""
        self.adamw.step(self.layout.views(params), grads, lr)

    def gather_params(self, params: dict[str, Array]) -> None:
        """Every rank's updated slices into every rank's ``params`` (an all-gather)."""
        coll = self.world.collectives
        block = self.layout.join(self.layout.views(params), coll.xp, self.dtype)
        whole = self.layout.unflatten(coll.allgather(block))
        for n, p in params.items():
            p[...] = whole[n]

    def state_tensors(self) -> dict[str, np.ndarray]:
        """The whole state, named as `AdamW.state_tensors` names it, on rank 0 (host
        arrays); an empty dict on the other ranks. Every rank must call it."""
        out: dict[str, np.ndarray] = {}
        for kind, store in ((EXP_AVG, self.adamw.exp_avg), (EXP_AVG_SQ, self.adamw.exp_avg_sq)):
            block = _to_host(self.layout.join(store, self.xp, self.dtype))
            whole = self.world.gather_blocks(block)
            if whole is not None:
                out.update({f"{kind}.{n}": a for n, a in self.layout.unflatten(whole).items()})
        return out

    def load_state(self, tensors: Mapping[str, Array], step_count: int) -> None:
        """Restore from the whole state (`state_tensors` output of a run with or without
        ZeRO, with any number of ranks): this rank takes its slices."""
        pieces: dict[str, Array] = {}
        for kind in (EXP_AVG, EXP_AVG_SQ):
            for n in self.layout.names:
                key = f"{kind}.{n}"
                if key not in tensors:
                    raise KeyError(key)
                if tuple(tensors[key].shape) != self.layout.shapes[n]:
                    raise ValueError(f"{key}: shape {tuple(tensors[key].shape)}, the parameter "
                                     f"has {self.layout.shapes[n]}")
            for n, a, b in self.layout.pieces:
                pieces[f"{kind}.{n}"] = np.asarray(tensors[f"{kind}.{n}"]).reshape(-1)[a:b]
        self.adamw.load_state(pieces, step_count)

    def local_state_nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.adamw.state_tensors().values())


def optimizer_state_nbytes(optimizer: Any) -> int:
    """Bytes of optimizer state this rank holds (m and v; its shard under ZeRO)."""
    if isinstance(optimizer, ShardedAdamW):
        return optimizer.local_state_nbytes()
    return sum(int(a.nbytes) for a in optimizer.state_tensors().values())


def make_optimizer(params: Mapping[str, Array], config: AdamWConfig, world: World,
                   zero: int) -> Any:
    """AdamW, or with ``zero`` = 1 and more than one rank, the sharded AdamW."""
    if zero and world.size > 1:
        return ShardedAdamW(params, config, world)
    return AdamW(params, config)


