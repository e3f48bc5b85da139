"""Run under mpirun by tests/test_zero.py and tests/test_nccl.py (not a test module itself):

    mpirun -n N python tests/mpi_worker.py zero OUT_DIR
    mpirun -n N python tests/mpi_worker.py nccl OUT_DIR

``zero``: a few AdamW steps on a small parameter set (shapes that the shards cut through),
each rank with its own gradients, three ways in one process: the plain data-parallel step
(all-reduce, clip, AdamW), ZeRO-1 (`ref.zero.ShardedAdamW`), and ZeRO-1 resumed halfway from
the gathered state. Every rank writes its parameters; rank 0 also the gathered state.

``nccl``: `ref.parallel.NcclCollectives` with stand-ins for ``cupy`` and ``cupy.cuda.nccl``:
the stand-in communicator records every call and does what NCCL would through MPI on the
buffers the pointers point at, so that both the calls and their results can be checked.
Every rank writes what was called and what came out, and the ZeRO steps above run through it.
"""
from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from mpi4py import MPI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ref.optim import AdamW, AdamWConfig, clip_grad_norm  # noqa: E402
from ref.parallel import World  # noqa: E402
from ref.zero import ShardedAdamW  # noqa: E402

SHAPES = {"model.embed_tokens.weight": (13, 7), "model.layers.0.input_layernorm.weight": (7,),
          "model.layers.0.self_attn.q_proj.weight": (7, 7), "model.layers.0.self_attn.q_proj.bias": (7,),
          "model.norm.weight": (7,)}
STEPS, MAX_NORM = 6, 0.5
CONFIG = AdamWConfig(weight_decay=0.1)


def initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def grads(rank: int, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * step + rank)
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def plain(w: World) -> dict[str, np.ndarray]:
    params = initial()
    opt = AdamW(params, CONFIG)
    for step in range(1, STEPS + 1):
        g = grads(w.rank, step)
        names = list(g)
        g = dict(zip(names, w.mean_([g[n] for n in names])))
        clip_grad_norm(g, MAX_NORM)
        opt.step(params, g, 1e-2)
    return params


def zero(w: World, steps=range(1, STEPS + 1), params=None, opt=None):
    params = initial() if params is None else params
    opt = ShardedAdamW(params, CONFIG, w) if opt is None else opt
    for step in steps:
        g = opt.reduce_grads(grads(w.rank, step))
        opt.clip(g, MAX_NORM)
        opt.step(params, g, 1e-2)
        opt.gather_params(params)
    return params, opt


def run_zero(w: World, out: Path, tag: str = "") -> None:
    ref = plain(w)
    params, opt = zero(w)
    state = opt.state_tensors()
    # halfway: the gathered state of a plain run's optimizer, loaded into a fresh ZeRO one
    half = initial()
    p_opt = AdamW(half, CONFIG)
    for step in range(1, STEPS // 2 + 1):
        g = grads(w.rank, step)
        names = list(g)
        g = dict(zip(names, w.mean_([g[n] for n in names])))
        clip_grad_norm(g, MAX_NORM)
        p_opt.step(half, g, 1e-2)
    resumed_opt = ShardedAdamW(half, CONFIG, w)
    resumed_opt.load_state(p_opt.state_tensors(), p_opt.step_count)
    resumed, _ = zero(w, range(STEPS // 2 + 1, STEPS + 1), half, resumed_opt)
    arrays = {f"plain/{n}": a for n, a in ref.items()}
    arrays.update({f"zero/{n}": a for n, a in params.items()})
    arrays.update({f"resumed/{n}": a for n, a in resumed.items()})
    if w.main:
        full = AdamW(initial(), CONFIG)      # the plain run's state, for comparison
        p = initial()
        for step in range(1, STEPS + 1):
            gs = [grads(r, step) for r in range(w.size)]
            g = {n: sum(x[n] for x in gs) / w.size for n in SHAPES}
            clip_grad_norm(g, MAX_NORM)
            full.step(p, g, 1e-2)
        arrays.update({f"state/{n}": a for n, a in state.items()})
        arrays.update({f"serial_state/{n}": a for n, a in full.state_tensors().items()})
        arrays.update({f"serial/{n}": a for n, a in p.items()})
    else:
        assert state == {}, "the gathered state reached a rank other than 0"
    np.savez(out / f"{tag}zero-rank{w.rank}.npz", **arrays)
    (out / f"{tag}zero-rank{w.rank}.json").write_text(json.dumps(
        {"pieces": opt.layout.pieces, "block": opt.layout.block,
         "state_bytes": opt.local_state_nbytes()}))


# --------------------------------------------------------------------------- NCCL stand-ins

class DeviceArray(np.ndarray):
    """A host array that answers ``.data.ptr`` as a CuPy array does."""

    @property
    def data(self):  # type: ignore[override]
        return SimpleNamespace(ptr=self.ctypes.data)


def _dev(a) -> DeviceArray:
    return np.ascontiguousarray(a).view(DeviceArray)


class FakeCupy:
    def __init__(self, devices: int):
        self.used: list[int] = []
        used = self.used

        class Device:
            def __init__(self, i):
                self.id = i

            def use(self):
                used.append(self.id)

        self.cuda = SimpleNamespace(runtime=SimpleNamespace(getDeviceCount=lambda: devices),
                                    Device=Device,
                                    get_current_stream=lambda: SimpleNamespace(ptr=4242))

    def empty(self, n, dtype):
        return _dev(np.empty(n, dtype=dtype))

    def zeros(self, n, dtype):
        return _dev(np.zeros(n, dtype=dtype))

    def asarray(self, a):
        return _dev(a)

    def concatenate(self, parts):
        return _dev(np.concatenate([np.asarray(p) for p in parts]))


class FakeNccl:
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    _CTYPES = {7: ctypes.c_float, 8: ctypes.c_double}

    def __init__(self):
        self.calls: list[list] = []
        nccl = self

        class NcclCommunicator:
            def __init__(self, ndev, uid, rank):
                nccl.calls.append(["NcclCommunicator", ndev, list(uid), rank])

            def allReduce(self, send, recv, count, dtype, op, stream):
                nccl.calls.append(["allReduce", send, recv, count, dtype, op, stream])
                src = nccl.view(send, count, dtype).copy()
                MPI.COMM_WORLD.Allreduce(src, nccl.view(recv, count, dtype), op=MPI.SUM)

            def reduceScatter(self, send, recv, count, dtype, op, stream):
                nccl.calls.append(["reduceScatter", send, recv, count, dtype, op, stream])
                size = MPI.COMM_WORLD.Get_size()
                MPI.COMM_WORLD.Reduce_scatter_block(nccl.view(send, count * size, dtype),
                                                    nccl.view(recv, count, dtype), op=MPI.SUM)

            def allGather(self, send, recv, count, dtype, stream):
                nccl.calls.append(["allGather", send, recv, count, dtype, stream])
                size = MPI.COMM_WORLD.Get_size()
                MPI.COMM_WORLD.Allgather(nccl.view(send, count, dtype),
                                         nccl.view(recv, count * size, dtype))

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        uid = tuple(int(b) for b in np.random.default_rng().integers(0, 256, 128))
        self.calls.append(["get_unique_id", list(uid)])
        return uid

    def view(self, ptr, count, dtype):
        """The buffer at ``ptr`` as a NumPy array (what NCCL would read and write)."""
        return np.ctypeslib.as_array((self._CTYPES[dtype] * count).from_address(ptr))


def run_nccl(w: World, out: Path) -> None:
    nccl, cupy = FakeNccl(), FakeCupy(devices=w.size)
    w.use_nccl(nccl=nccl, cupy=cupy)
    init_calls = list(nccl.calls)
    nccl.calls.clear()
    results, buffers = {}, {}
    for dtype in (np.float32, np.float64):
        key = np.dtype(dtype).name
        x = _dev(np.arange(10, dtype=dtype) * (w.rank + 1))
        buffers[f"allreduce_{key}"] = [x.ctypes.data, x.size]
        w.collectives.allreduce_sum_(x)
        results[f"allreduce_{key}"] = x.tolist()
        y = _dev(np.arange(3 * w.size, dtype=dtype) + 100 * w.rank)
        buffers[f"reduce_scatter_{key}"] = [y.ctypes.data, y.size]
        results[f"reduce_scatter_{key}"] = w.collectives.reduce_scatter_sum(y).tolist()
        z = _dev(np.full(2, w.rank, dtype=dtype))
        buffers[f"allgather_{key}"] = [z.ctypes.data, z.size]
        results[f"allgather_{key}"] = w.collectives.allgather(z).tolist()
    collective_calls = list(nccl.calls)
    (out / f"nccl-rank{w.rank}.json").write_text(json.dumps({
        "init_calls": init_calls, "devices_used": cupy.used, "calls": collective_calls,
        "buffers": buffers, "results": results, "local_rank": w.local_rank()}))
    run_zero(w, out, tag="nccl-")


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    world = World(MPI.COMM_WORLD)
    {"zero": run_zero, "nccl": run_nccl}[mode](world, out)
