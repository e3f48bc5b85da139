"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

Every op in `ref.ops` takes the array module from its inputs (`array_module(x)`), so the
same code runs on either. A `Backend` is what a caller picks once (from ``--device``) to put
arrays where the model lives and to bring results back.

``--device cuda`` without a usable GPU is an error, never a silent CPU run; ``--device auto``
picks CUDA when usable, else the CPU, and says which (and why) in ``Backend.description``.
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

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


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's controller of the BLAS libraries loaded in this process (NumPy's
    among them, loaded with it)."""
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController().select(user_api="blas")


def blas_threads_settable() -> bool:
    """Whether `single_threaded_blas` can limit the BLAS that NumPy uses (threadpoolctl
    knows OpenBLAS, MKL and BLIS, the BLAS of NumPy's wheels among them)."""
    return bool(_blas_controller().lib_controllers)


def blas_threads() -> int:
    """The number of threads NumPy's BLAS runs a product on now (1 where no BLAS is known):
    the cores a CPU step may use, as the environment (OPENBLAS_NUM_THREADS, ...) left it."""
    return max((lib.num_threads for lib in _blas_controller().lib_controllers), default=1)


class _BlasLimit:
    """The uses of `single_threaded_blas` in progress and threadpoolctl's limiter they share."""
    lock = threading.Lock()
    users = 0
    limiter: Any = None


@contextmanager
def single_threaded_blas():
    """For its duration, every BLAS in the process runs each product in the calling thread
    alone (the setting is process-wide: OpenBLAS has no per-thread one that holds); the
    first use to begin sets it, the last one to end puts the thread counts back, so nested
    and concurrent uses are safe."""
    with _BlasLimit.lock:
        if _BlasLimit.users == 0:
            _BlasLimit.limiter = _blas_controller().limit(limits=1)
        _BlasLimit.users += 1
    try:
        yield
    finally:
        with _BlasLimit.lock:
            _BlasLimit.users -= 1
            if _BlasLimit.users == 0:
                _BlasLimit.limiter.restore_original_limits()
                _BlasLimit.limiter = None


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
