"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

Every op in `ref.ops` takes the array module from its inputs (`array_module(x)`), so the
same code runs on either. A `Backend` is what a caller picks once (from ``--device``) to put
arrays where the model lives and to bring results back.

``--device cuda`` without a usable GPU is an error, never a silent CPU run; ``--device auto``
picks CUDA when usable, else the CPU, and says which (and why) in ``Backend.description``.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Optional

import numpy as np

from apr.errors import AprError

DEVICES = ("cpu", "cuda", "auto")
DEFAULT_DTYPE = np.float32     # training and inference
CHECK_DTYPE = np.float64       # gradient checks and comparisons against oracles


def array_module(x: Any) -> ModuleType:
    """The array module (numpy or cupy) that owns ``x``; numpy for anything not a CuPy array."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return np


def scatter_add_rows(target: Any, index: Any, rows: Any) -> None:
    """In place: ``target[index[i]] += rows[i]`` for every i, accumulating repeated indices
    (a plain ``target[index] += rows`` keeps only one of the repeats)."""
    xp = array_module(target)
    if xp is np:
        np.add.at(target, index, rows)
    else:
        import cupyx
        cupyx.scatter_add(target, index, rows)


# (get, set) of the number of threads, as OpenBLAS and the scipy-openblas builds NumPy's
# wheels carry (64-bit and 32-bit integer variants) name them
_OPENBLAS_THREAD_CALLS = (("openblas_get_num_threads", "openblas_set_num_threads"),
                          ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                          ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"))
_BLAS_THREADS: Optional[list] = None     # see `_openblas_thread_calls`
_BLAS_LOCK = threading.Lock()


def _openblas_thread_calls() -> list:
    """(get, set) of the number of threads of every OpenBLAS loaded in this process (NumPy's
    among them), found by name in /proc/self/maps. Empty where there is none (another BLAS,
    a system without /proc)."""
    global _BLAS_THREADS
    if _BLAS_THREADS is None:
        import ctypes
        found, paths = [], []
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    path = line.rstrip("\n").split(None, 5)[-1]
                    if "openblas" in os.path.basename(path).lower() and path not in paths:
                        paths.append(path)
        except OSError:
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for get_name, set_name in _OPENBLAS_THREAD_CALLS:
                get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
                if get is not None and set_ is not None:
                    get.argtypes, get.restype = [], ctypes.c_int
                    set_.argtypes, set_.restype = [ctypes.c_int], None
                    found.append((get, set_))
                    break
        _BLAS_THREADS = found
    return _BLAS_THREADS


def blas_threads_settable() -> bool:
    """Whether `single_threaded_blas` can limit the BLAS that NumPy uses: True where NumPy's
    BLAS is an OpenBLAS (what NumPy's wheels carry)."""
    return bool(_openblas_thread_calls())


_BLAS_HELD: list = [0, []]       # uses of `single_threaded_blas` in progress, thread counts before


@contextmanager
def single_threaded_blas():
    """For its duration, every OpenBLAS in the process runs each product in the calling
    thread alone (the setting is process-wide: OpenBLAS has no per-thread one that holds);
    the first use to begin sets it, the last one to end puts the thread counts back, so
    nested and concurrent uses are safe."""
    calls = _openblas_thread_calls()
    with _BLAS_LOCK:
        if _BLAS_HELD[0] == 0:
            _BLAS_HELD[1] = [get() for get, _ in calls]
            for _, set_ in calls:
                set_(1)
        _BLAS_HELD[0] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_HELD[0] -= 1
            if _BLAS_HELD[0] == 0:
                for (_, set_), n in zip(calls, _BLAS_HELD[1]):
                    set_(n)


def erf(x: Any) -> Any:
    """The error function, elementwise, on either backend (SciPy's / CuPy's special)."""
    if array_module(x) is np:
        from scipy.special import erf as _erf
    else:
        from cupyx.scipy.special import erf as _erf
    return _erf(x)


@dataclass(frozen=True)
class Backend:
    """Where the arrays live. ``name`` is "cpu" or "cuda" (what was actually chosen);
    ``description`` says so in words (with the GPU name, or why ``auto`` chose the CPU)."""
    name: str
    xp: ModuleType
    description: str

    @property
    def is_gpu(self) -> bool:
        return self.name == "cuda"

    def to_device(self, a: Any, dtype: Any = None) -> Any:
        """``a`` (NumPy array, CuPy array or nested list) as an array of this backend,
        converted to ``dtype`` when given (no copy when nothing changes)."""
        if self.xp is np:
            a = array_module(a).asnumpy(a) if array_module(a) is not np else a
            return np.asarray(a, dtype=dtype)
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        """``a`` as a NumPy array on the host (a device-to-host copy on the GPU)."""
        if array_module(a) is np:
            return np.asarray(a)
        return a.get()

    def synchronize(self) -> None:
        """Wait for queued GPU work (for honest timings); nothing to do on the CPU."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()


def cpu_backend() -> Backend:
    return Backend("cpu", np, f"cpu (NumPy {np.__version__})")


def _cuda_backend() -> Backend:
    """CuPy on the current GPU (GPU 0 unless a data-parallel rank selected its own), after
    checking that a kernel really runs there.
    Raises AprError naming the reason when there is no usable GPU."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CUDA library that fails to load
        raise AprError(f"--device cuda: no usable GPU (cupy is not importable: {e})") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            raise RuntimeError("no CUDA device found")
        probe = cupy.arange(4, dtype=cupy.float32)
        if float((probe * 2).sum()) != 12.0:
            raise RuntimeError("a test kernel gave a wrong result")
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)  # the selected one
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except AprError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AprError(f"--device cuda: no usable GPU ({msg})") from None
    return Backend("cuda", cupy, f"cuda ({gpu}, CuPy {cupy.__version__})")


def get_backend(device: str = "auto") -> Backend:
    """The backend for ``--device``: "cpu", "cuda" (error when no GPU is usable) or "auto"."""
    if device == "cpu":
        return cpu_backend()
    if device == "cuda":
        return _cuda_backend()
    if device == "auto":
        try:
            return _cuda_backend()
        except AprError as e:
            why = str(e).split("no usable GPU", 1)[-1].strip()
            return Backend("cpu", np, f"cpu (NumPy {np.__version__}; auto: no usable GPU {why})")
    raise AprError(f"--device {device!r}: unknown device (expected one of {', '.join(DEVICES)})")
