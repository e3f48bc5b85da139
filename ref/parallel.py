"""Data-parallel training over MPI (Open MPI through mpi4py), as llm.c does it: every rank
holds the whole model, reads its own shard of each global batch, and the gradients are
averaged over the ranks before the (identical) optimizer step.

`world()` is the single process unless the run was started by ``mpirun`` (its environment
says how many processes it started); then mpi4py is required and its COMM_WORLD is used.
Nothing here is a protocol of our own: the all-reduce, broadcast and gather are MPI's.

The gradients are all-reduced in buckets (contiguous float buffers of up to
``BUCKET_BYTES``), in the order of the parameters. A rank that dies makes ``mpirun`` end the
others (Open MPI's default), so no rank waits forever for a dead one.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Optional

import numpy as np

from apr.errors import AprError, UnsupportedError

BUCKET_BYTES = 32 << 20          # 32 MiB per all-reduce
_LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


class World:
    """The processes of one run: this one alone (size 1), or the ranks of an MPI job."""

    def __init__(self, comm: Any = None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and talks to the user."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def mean_(self, arrays: list[np.ndarray], to_host: Callable = np.asarray,
              to_device: Callable = lambda a: a) -> list[np.ndarray]:
        """The element-wise mean of ``arrays`` over the ranks, in buckets; returns the averaged
        arrays (on the device they came from)."""
        if self.size == 1:
            return arrays
        from mpi4py import MPI
        out: list[Any] = [None] * len(arrays)
        i = 0
        while i < len(arrays):
            j, nbytes = i, 0
            while j < len(arrays) and (j == i or nbytes + arrays[j].nbytes <= BUCKET_BYTES):
                nbytes += arrays[j].nbytes
                j += 1
            host = [np.asarray(to_host(a)) for a in arrays[i:j]]
            flat = np.concatenate([h.reshape(-1) for h in host])
            self.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            flat /= self.size
            k = 0
            for n, h in enumerate(host):
                out[i + n] = to_device(flat[k:k + h.size].reshape(h.shape))
                k += h.size
            i = j
        return out

    def mean(self, value: float) -> float:
        if self.size == 1:
            return value
        return float(self.comm.allreduce(value)) / self.size

    def bcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj if self.size == 1 else self.comm.bcast(obj, root=0)

    def check_same(self, digest: str, what: str) -> None:
        """Every rank must hold the same ``digest``; otherwise a ParallelError naming the
        ranks that differ from rank 0."""
        if self.size == 1:
            return
        digests = self.comm.allgather(digest)
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise ParallelError(f"{what}: ranks {bad} differ from rank 0 (the replicas drifted "
                                "apart; the run stopped)")


class ParallelError(AprError):
    """The ranks of a data-parallel run disagree."""


def launched_by_mpi() -> bool:
    """An MPI launcher started more than one process (it says so in the environment)."""
    return any(os.environ.get(v, "").isdigit() and int(os.environ[v]) > 1 for v in _LAUNCH_VARS)


_WORLD: Optional[World] = None


def world() -> World:
    """This process's world: MPI's COMM_WORLD when started by mpirun with more than one
    process, else the single process."""
    global _WORLD
    if _WORLD is None:
        if not launched_by_mpi():
            _WORLD = World()
        else:
            try:
                from mpi4py import MPI
            except ImportError:
                raise UnsupportedError("started by mpirun, but mpi4py is not installed: "
                                       "pip install 'apr-ref[mpi]'") from None
            _WORLD = World(MPI.COMM_WORLD)
    return _WORLD


def params_digest(params: dict[str, Any], to_host: Callable = np.asarray) -> str:
    """A digest of every parameter's bytes, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(to_host(params[name])).tobytes())
    return h.hexdigest()
