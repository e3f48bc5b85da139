"""The NCCL path (`ref.parallel.NcclCollectives`) on the CPU, with stand-ins for ``cupy`` and
``cupy.cuda.nccl`` (in tests/mpi_worker.py) under mpirun -n 2: the unique id is made once, on
rank 0, and every rank's communicator is built from it; each rank selects the GPU numbered by
its rank on the host; the all-reduce, reduce-scatter and all-gather calls pass the buffers'
pointers, counts, data types, the sum and the current stream as NCCL wants them, and give
MPI's results; ZeRO-1 steps through them equal the plain ones. Nothing here has run on a GPU.
In-process: the one-line refusals (no CuPy, too few GPUs, a dtype NCCL is not given here)."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from apr.errors import UnsupportedError
from ref import parallel
from test_zero import worker


def test_nccl_plumbing_under_two_ranks(tmp_path):
    worker("nccl", 2, tmp_path)
    rec = [json.loads((tmp_path / f"nccl-rank{r}.json").read_text()) for r in range(2)]
    made = rec[0]["init_calls"][0]
    assert made[0] == "get_unique_id" and len(made[1]) == 128
    assert not any(c[0] == "get_unique_id" for c in rec[1]["init_calls"])
    uid = made[1]
    for r in range(2):
        assert rec[r]["init_calls"][-1] == ["NcclCommunicator", 2, uid, r]
        assert rec[r]["devices_used"] == [rec[r]["local_rank"]] == [r]   # one host: rank = GPU
    f32, f64, total = 7, 8, 0       # the stand-in's constants
    for r in range(2):
        calls, buffers, res = rec[r]["calls"], rec[r]["buffers"], rec[r]["results"]
        assert [c[0] for c in calls] == ["allReduce", "reduceScatter", "allGather"] * 2
        for call, (key, code) in zip(calls[0::3], (("float32", f32), ("float64", f64))):
            ptr, size = buffers[f"allreduce_{key}"]
            assert call[1:] == [ptr, ptr, size, code, total, 4242]       # in place, stream
        for call, (key, code) in zip(calls[1::3], (("float32", f32), ("float64", f64))):
            ptr, size = buffers[f"reduce_scatter_{key}"]
            assert call[1] == ptr and call[2] != ptr and call[3:] == [size // 2, code, total, 4242]
        for call, (key, code) in zip(calls[2::3], (("float32", f32), ("float64", f64))):
            ptr, size = buffers[f"allgather_{key}"]
            assert call[1] == ptr and call[3:] == [size, code, 4242]
        for key in ("float32", "float64"):
            assert res[f"allreduce_{key}"] == [3.0 * i for i in range(10)]   # 1x + 2x
            block = np.arange(6) * 2 + 100                                  # rank 0 + rank 1
            assert res[f"reduce_scatter_{key}"] == block[3 * r:3 * r + 3].tolist()
            assert res[f"allgather_{key}"] == [0.0, 0.0, 1.0, 1.0]
    ranks = [dict(np.load(tmp_path / f"nccl-zero-rank{r}.npz")) for r in range(2)]
    for k in ranks[0]:
        if k.startswith("zero/"):
            assert ranks[1][k].tobytes() == ranks[0][k].tobytes(), k
            np.testing.assert_allclose(ranks[0][k], ranks[0]["plain/" + k[5:]], rtol=1e-12)


class _Comm:
    """One rank of a world of ``size`` (a stand-in for an MPI communicator)."""

    def __init__(self, rank=0, size=2):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def allgather(self, x):
        return [x] * self.size

    def bcast(self, x, root=0):
        return x


def _cupy(devices):
    return SimpleNamespace(cuda=SimpleNamespace(
        runtime=SimpleNamespace(getDeviceCount=lambda: devices),
        Device=lambda i: SimpleNamespace(use=lambda: None)))


def test_more_ranks_on_a_host_than_gpus_is_refused():
    nccl = SimpleNamespace(get_unique_id=lambda: pytest.fail("no id before the GPU check"))
    with pytest.raises(UnsupportedError, match=r"rank 1 is rank 1 on its host, which has 1 GPU"):
        parallel.NcclCollectives(_Comm(rank=1), 1, nccl, _cupy(1))


def test_a_dtype_without_nccl_type_is_refused():
    made = SimpleNamespace(get_unique_id=lambda: (1,), NcclCommunicator=lambda *a: a,
                           NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_SUM=0)
    coll = parallel.NcclCollectives(_Comm(), 0, made, _cupy(2))
    with pytest.raises(UnsupportedError, match="float16"):
        coll._dtype(np.zeros(2, np.float16))


def test_no_cupy_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)          # import cupy raises ImportError
    with pytest.raises(UnsupportedError) as e:
        parallel.import_nccl()
    assert "cupy.cuda.nccl" in str(e.value) and "\n" not in str(e.value)
