"""Data-parallel training over MPI (Open MPI through mpi4py), as llm.c does it: every rank
holds the whole model, reads its own shard of each global batch, and the gradients are
averaged over the ranks before the (identical) optimizer step; or, with ZeRO-1
(`ref.zero`), each rank updates its own shard of the parameters and the ranks exchange the
updated shards.

`world()` is the single process unless the run was started by ``mpirun`` (its environment
says how many processes it started); then mpi4py is required and its COMM_WORLD is used.
Nothing here is a protocol of our own: every exchange is one collective of MPI or NCCL.

The gradient and parameter buffers move through `Collectives`, of which there are two:
`MpiCollectives` (NumPy buffers in host memory, MPI's collectives; the CPU path) and
`NcclCollectives` (CuPy buffers on this rank's GPU, NCCL through ``cupy.cuda.nccl``; one GPU
per rank, chosen by the rank's index on its host; NCCL's unique id is made on rank 0 and
broadcast over MPI). Small control messages (losses, norms, digests, errors) always go over
MPI. The NCCL implementation has been tested only with a stand-in for the ``nccl`` module
(`tests/test_nccl.py`), never on a GPU.

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
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


class MpiCollectives:
    """The collectives on NumPy buffers in host memory, through MPI. Every buffer is a
    contiguous 1-D float array; a reduce-scatter's input and an all-gather's output hold
    ``size`` equal blocks (the equal-count forms of Reduce_scatter and Allgatherv: NCCL's
    reduce-scatter and all-gather take one count, and both implementations share a layout)."""

    xp = np

    def __init__(self, comm: Any):
        self.comm = comm
        self.size = comm.Get_size()

    def allreduce_sum_(self, buf: np.ndarray) -> None:
        """``buf`` <- the element-wise sum of every rank's ``buf``."""
        from mpi4py import MPI
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def reduce_scatter_sum(self, buf: np.ndarray) -> np.ndarray:
        """Block ``rank`` of the element-wise sum of every rank's ``buf``."""
        from mpi4py import MPI
        out = np.empty(buf.size // self.size, dtype=buf.dtype)
        self.comm.Reduce_scatter_block(buf, out, op=MPI.SUM)
        return out

    def allgather(self, block: np.ndarray) -> np.ndarray:
        """Every rank's ``block``, in rank order, in one buffer."""
        out = np.empty(block.size * self.size, dtype=block.dtype)
        self.comm.Allgather(block, out)
        return out


class NcclCollectives:
    """The same collectives on CuPy buffers on this rank's GPU, through NCCL (``nccl`` is
    ``cupy.cuda.nccl``, ``cupy`` the CuPy module; both are parameters so that a test can put
    stand-ins there). Before the communicator is made, this rank's GPU is selected: the
    device numbered ``local_rank``, the rank's index among the ranks on its host."""

    def __init__(self, comm: Any, local_rank: int, nccl: Any, cupy: Any):
        self.nccl, self.xp = nccl, cupy
        self.size, rank = comm.Get_size(), comm.Get_rank()
        problem = None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:   # no driver, no device
            count, problem = 0, f"no usable GPU on rank {rank} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        if problem is None and local_rank >= count:
            problem = (f"rank {rank} is rank {local_rank} on its host, which has {count} GPU(s): "
                       f"start at most {count} rank(s) per host (one GPU each)")
        # every rank learns of any rank's problem, so that none waits for the others below
        problem = next((p for p in comm.allgather(problem) if p), None)
        if problem:
            raise UnsupportedError(problem)
        cupy.cuda.Device(local_rank).use()
        self.device = local_rank
        uid = nccl.get_unique_id() if rank == 0 else None
        uid = comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, uid, rank)

    def _dtype(self, a: Any) -> int:
        kind = {np.dtype(np.float32): self.nccl.NCCL_FLOAT32,
                np.dtype(np.float64): self.nccl.NCCL_FLOAT64}.get(np.dtype(a.dtype))
        if kind is None:
            raise UnsupportedError(f"NCCL collectives on {a.dtype} buffers are not implemented")
        return kind

    def _stream(self) -> int:
        return self.xp.cuda.get_current_stream().ptr

    def allreduce_sum_(self, buf: Any) -> None:
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf),
                            self.nccl.NCCL_SUM, self._stream())

    def reduce_scatter_sum(self, buf: Any) -> Any:
        out = self.xp.empty(buf.size // self.size, dtype=buf.dtype)
        self.comm.reduceScatter(buf.data.ptr, out.data.ptr, out.size, self._dtype(buf),
                                self.nccl.NCCL_SUM, self._stream())
        return out

    def allgather(self, block: Any) -> Any:
        out = self.xp.empty(block.size * self.size, dtype=block.dtype)
        self.comm.allGather(block.data.ptr, out.data.ptr, block.size, self._dtype(block),
                            self._stream())
        return out


def import_nccl() -> tuple[Any, Any]:
    """(cupy.cuda.nccl, cupy), or UnsupportedError saying in one line why not."""
    try:
        import cupy
        from cupy.cuda import nccl
    except Exception as e:   # ImportError, or a CUDA/NCCL library that fails to load
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsupportedError(f"NCCL through CuPy (cupy.cuda.nccl) is not available ({msg})") from None
    if not getattr(nccl, "available", True):
        raise UnsupportedError("NCCL through CuPy (cupy.cuda.nccl) is not available (this CuPy "
                               "was built without NCCL)")
    return nccl, cupy


class World:
    """The processes of one run: this one alone (size 1), or the ranks of an MPI job."""

    def __init__(self, comm: Any = None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.collectives: Any = MpiCollectives(comm) if comm is not None else None

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and talks to the user."""
        return self.rank == 0

    def local_rank(self) -> int:
        """This rank's index among the ranks on its host (MPI's shared-memory split)."""
        from mpi4py import MPI
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.Get_rank()
        finally:
            node.Free()

    def use_nccl(self, nccl: Any = None, cupy: Any = None) -> None:
        """Move the gradient and parameter collectives to NCCL on this rank's GPU (the
        modules are imported when not given; UnsupportedError when they cannot be)."""
        if nccl is None or cupy is None:
            nccl, cupy = import_nccl()
        self.collectives = NcclCollectives(self.comm, self.local_rank(), nccl, cupy)

    # ------------------------------------------------------------------ collectives
    def mean_(self, arrays: list[Any]) -> list[Any]:
        """The element-wise mean of ``arrays`` over the ranks, in buckets; returns the averaged
        arrays (in the array module of the collectives: NumPy for MPI, CuPy for NCCL)."""
        if self.size == 1:
            return arrays
        xp = self.collectives.xp
        out: list[Any] = [None] * len(arrays)
        i = 0
        while i < len(arrays):
            j, nbytes = i, 0
            while j < len(arrays) and (j == i or nbytes + arrays[j].nbytes <= BUCKET_BYTES):
                nbytes += arrays[j].nbytes
                j += 1
            flat = xp.concatenate([xp.asarray(a).reshape(-1) for a in arrays[i:j]])
            self.collectives.allreduce_sum_(flat)
            flat /= self.size
            k = 0
            for n, a in enumerate(arrays[i:j]):
                out[i + n] = flat[k:k + a.size].reshape(a.shape)
                k += a.size
            i = j
        return out

    def sum(self, value: float) -> float:
        """The sum of a number over the ranks (over MPI)."""
        return value if self.size == 1 else float(self.comm.allreduce(value))

    def mean(self, value: float) -> float:
        return self.sum(value) / self.size

    def bcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj if self.size == 1 else self.comm.bcast(obj, root=0)

    def gather_blocks(self, block: np.ndarray) -> Optional[np.ndarray]:
        """Every rank's equal-sized host ``block``, in rank order, on rank 0 (None on the
        others): MPI's Gather, into host memory, whichever collectives the gradients use."""
        if self.size == 1:
            return block
        out = np.empty(block.size * self.size, dtype=block.dtype) if self.main else None
        self.comm.Gather(np.ascontiguousarray(block), out, root=0)
        return out

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

    def abort(self, code: int) -> None:
        """End every rank of the job now (MPI_Abort)."""
        if self.comm is not None:
            self.comm.Abort(code)


class ParallelError(AprError):
    """The ranks of a data-parallel run disagree."""


def launch_rank() -> int:
    """This process's rank as the MPI launcher's environment gives it (0 when not launched
    by one); readable before MPI is initialized."""
    for v in _RANK_VARS:
        if os.environ.get(v, "").isdigit():
            return int(os.environ[v])
    return 0


def current_world() -> Optional[World]:
    """The world if `world()` has made it, else None (makes nothing)."""
    return _WORLD


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
