"""Fused CuPy kernels for the ops whose cost on a GPU is memory traffic, each beside a
plain-array reference that computes the same thing the same way.

Op (forward / backward)        kernel                              replaces
-----------------------------  ----------------------------------  --------------------------
rmsnorm                        RawKernel, one block per row        ops.rmsnorm_*
rotary embedding               ElementwiseKernel (both pair orders) ops.rope_*
SwiGLU (silu gate)             ElementwiseKernel                   ops.gated_mlp_* for silu
softmax cross-entropy          RawKernel per row, in place         ops.cross_entropy_*
AdamW step                     ElementwiseKernel, in place         the loop body of optim.AdamW
bf16 rounding (ref.precision)  ElementwiseKernel                    five array passes
bf16 products (ref.precision)  cuBLAS with TF32 tensor cores       a float32 GEMM (SIMT)
causal GQA attention           RawKernels, online softmax, no      ops.attention_* (opt-in:
                               (T, S) scores kept (flash-style)    APR_REF_ATTENTION=fused)

A fused op runs its kernel only when the arrays are CuPy arrays of float32 (laid out as the
kernel needs) and the kernel passed its self-check: at first use the kernel and the reference
run on a small random input on the GPU and must agree (relative 1e-4); if they do not, or the
kernel fails to compile or launch, a warning says so once and the reference runs from then
on. NumPy arrays always take the reference, so the CPU runs the same math as the kernels and
the CPU test suite checks that math against `ref.ops` and `ref.optim`; the GPU tests
(tests/gpu) check the kernels against the references.

The forward functions return the same caches as `ref.ops`, so a kernel forward and a
reference backward (or the other way round) fit together. The cross-entropy kernel consumes
its logits: the buffer is overwritten by the probabilities and then by the gradient, so the
vocabulary-wide array exists once (the model does not use logits after the loss).

``APR_REF_KERNELS=0`` in the environment turns every kernel off (the plain `ref.ops` path on
the GPU too).
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import ml_dtypes
import numpy as np

from . import ops
from .backend import array_module

Array = Any

RTOL, ATOL = 1e-4, 1e-5          # kernel against reference in the self-check (float32)


def _host(a: Any) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a)


def _flat(x: Any) -> list:
    """The arrays in a (nested) tuple/list, in order; non-arrays dropped."""
    if isinstance(x, (tuple, list)):
        return [a for item in x for a in _flat(item)]
    return [x] if hasattr(x, "shape") else []


def _f32(*arrays: Any) -> bool:
    return all(a.dtype == np.float32 for a in arrays)


class Fused:
    """One op: ``reference`` (array code, NumPy or CuPy) and ``kernel`` (CuPy only), the
    same signature. ``sample(xp, seed)`` makes the self-check's arguments; ``eligible(*args)``
    says whether the kernel handles these arrays; ``outputs(args, result)`` lists what to
    compare (by default everything the call returns)."""

    def __init__(self, name: str, reference: Callable, kernel: Callable,
                 sample: Callable[[Any, int], tuple], eligible: Callable[..., bool] = lambda *a: True,
                 outputs: Optional[Callable[[tuple, Any], list]] = None):
        self.name, self.reference, self.kernel = name, reference, kernel
        self.sample, self.eligible = sample, eligible
        self.outputs = outputs or (lambda args, result: _flat(result))
        self.ok: Optional[bool] = None          # None: not checked yet
        self.failure: Optional[str] = None

    def __call__(self, *args: Any) -> Any:
        xp = array_module(args[0])
        if xp is np or not enabled() or not self.eligible(*args):
            return self.reference(*args)
        if self.ok is None:
            self.ok = self.self_check(xp)
        return (self.kernel if self.ok else self.reference)(*args)

    def self_check(self, xp: Any) -> bool:
        """Kernel and reference on the same small random input; False (and one warning)
        when the kernel raises or differs by more than RTOL / ATOL."""
        try:
            ref_args, ker_args = self.sample(xp, 0), self.sample(xp, 0)
            want = [_host(a) for a in self.outputs(ref_args, self.reference(*ref_args))]
            got = [_host(a) for a in self.outputs(ker_args, self.kernel(*ker_args))]
            if len(got) != len(want):
                raise AssertionError(f"{len(got)} outputs, the reference gives {len(want)}")
            for i, (g, w) in enumerate(zip(got, want)):
                if g.shape != w.shape:
                    raise AssertionError(f"output {i}: shape {g.shape}, reference {w.shape}")
                bad = ~np.isclose(g, w, rtol=RTOL, atol=ATOL)
                if bad.any():
                    raise AssertionError(f"output {i}: {int(bad.sum())} of {g.size} values differ "
                                         f"(max abs difference {float(np.max(np.abs(g - w))):.3g})")
        except Exception as e:                 # noqa: BLE001 - a broken kernel must not stop a run
            self.failure = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            warnings.warn(f"{self.name} kernel: self-check failed ({self.failure}); "
                          "the array-code reference runs instead", RuntimeWarning, stacklevel=3)
            return False
        return True


def enabled() -> bool:
    return os.environ.get("APR_REF_KERNELS", "1") != "0"


# --------------------------------------------------------------------------- CUDA sources

_REDUCE = r"""
#define NEG_INF __int_as_float(0xff800000)   // no math headers under NVRTC
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
// every thread of the block gets the result; blockDim.x is a multiple of 32 (at most 1024)
__device__ float block_sum(float v, float* buf) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? buf[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) buf[32] = v;
    }
    __syncthreads();
    return buf[32];
}
__device__ float block_max(float v, float* buf) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? buf[lane] : NEG_INF;
        v = warp_max(v);
        if (lane == 0) buf[32] = v;
    }
    __syncthreads();
    return buf[32];
}
"""

RMSNORM_SOURCE = _REDUCE + r"""
extern "C" __global__ void rmsnorm_fwd(const float* x, const float* w, float* y, float* xhat,
                                       float* rstd, const int C, const float eps) {
    __shared__ float buf[33];
    const size_t row = blockIdx.x;
    const float* xr = x + row * C;
    float s = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) { float v = xr[i]; s += v * v; }
    s = block_sum(s, buf);
    const float r = rsqrtf(s / C + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float h = xr[i] * r;
        xhat[row * C + i] = h;
        y[row * C + i] = h * w[i];
    }
}

extern "C" __global__ void rmsnorm_bwd(const float* dy, const float* xhat, const float* w,
                                       const float* rstd, float* dx, const int C) {
    __shared__ float buf[33];
    const size_t row = blockIdx.x;
    const float* d = dy + row * C;
    const float* h = xhat + row * C;
    float s = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) s += d[i] * w[i] * h[i];
    const float mean = block_sum(s, buf) / C;
    const float r = rstd[row];
    for (int i = threadIdx.x; i < C; i += blockDim.x) dx[row * C + i] = r * (d[i] * w[i] - h[i] * mean);
}
"""

CROSS_ENTROPY_SOURCE = _REDUCE + r"""
// One block per row of z (N, V), in place: z becomes softmax(z). loss[row] is
// logsumexp(z) - z[t] for t = target[row] >= 0, and 0 for an ignored row (t < 0).
extern "C" __global__ void cross_entropy_fwd(float* z, const long long* target, float* loss,
                                             const long long V) {
    __shared__ float buf[33];
    float* zr = z + blockIdx.x * V;
    float m = NEG_INF;
    for (long long i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, zr[i]);
    m = block_max(m, buf);
    float s = 0.0f;
    for (long long i = threadIdx.x; i < V; i += blockDim.x) s += expf(zr[i] - m);
    s = block_sum(s, buf);
    const long long t = target[blockIdx.x];
    if (threadIdx.x == 0) loss[blockIdx.x] = t >= 0 ? logf(s) + m - zr[t] : 0.0f;
    __syncthreads();                       // zr[t] is read before it is overwritten
    const float inv = 1.0f / s;
    for (long long i = threadIdx.x; i < V; i += blockDim.x) zr[i] = expf(zr[i] - m) * inv;
}
"""

ROPE_OP = r"""
    const long long d = i % n_d, t = (i / n_d) % n_t, h = n_d / 2;
    long long j, ia, ib; bool first;
    if (halves) { j = d % h; first = d < h; ia = i - d + j; ib = ia + h; }
    else        { j = d / 2; first = (d % 2) == 0; ia = i - d + 2 * j; ib = ia + 1; }
    const float c = cos_t[t * h + j], s = sign * sin_t[t * h + j];
    const float a = x[ia], b = x[ib];
    y = first ? a * c - b * s : a * s + b * c;
"""

SWIGLU_FWD_OP = "float s = 1.0f / (1.0f + expf(-g)); y = g * s * u;"
SWIGLU_BWD_OP = ("float s = 1.0f / (1.0f + expf(-g)); du = dy * g * s; "
                 "dg = dy * u * s * (1.0f + g * (1.0f - s));")

CROSS_ENTROPY_BWD_OP = r"""
    const long long r = i / V, c = i % V;
    p = p * a[r] - (c == t[r] ? w[r] : 0.0f);
"""

ADAMW_OP = r"""
    const float mm = b1 * m + (1.0f - b1) * g;
    const float vv = b2 * v + (1.0f - b2) * g * g;
    m = mm;
    v = vv;
    p = p * decay - step_size * (mm / (sqrtf(vv) / sqrt_bc2 + eps));
"""

_BLOCK = 256
_compiled: dict[str, Any] = {}


def _kernel(cp: Any, key: str, make: Callable[[], Any]) -> Any:
    if key not in _compiled:
        _compiled[key] = make()
    return _compiled[key]


def _raw(cp: Any, source: str, name: str) -> Any:
    return _kernel(cp, name, lambda: cp.RawKernel(source, name))


def _threads(width: int) -> int:
    """Threads per row block: a multiple of 32, up to _BLOCK."""
    return min(_BLOCK, max(32, (width + 31) // 32 * 32))


# --------------------------------------------------------------------------- rmsnorm

def rmsnorm_forward_reference(x: Array, weight: Array, eps: float) -> tuple[Array, tuple]:
    """Per row: s = sum(x^2), rstd = 1 / sqrt(s / C + eps), x_hat = x rstd, y = x_hat w."""
    xp = array_module(x)
    c = x.shape[-1]
    rstd = 1.0 / xp.sqrt((x * x).sum(axis=-1, keepdims=True) / c + eps)
    x_hat = x * rstd
    return x_hat * weight, (x_hat, rstd.astype(x.dtype, copy=False), weight)


def rmsnorm_backward_reference(dout: Array, cache: tuple) -> tuple[Array, Array]:
    """Per row: mean = sum(dy w x_hat) / C, dx = rstd (dy w - x_hat mean);
    dw = sum over rows of dy x_hat."""
    x_hat, rstd, weight = cache
    c = x_hat.shape[-1]
    g = dout * weight
    mean = (g * x_hat).sum(axis=-1, keepdims=True) / c
    dx = rstd * (g - x_hat * mean)
    return dx, (dout.reshape(-1, c) * x_hat.reshape(-1, c)).sum(axis=0)


def _rmsnorm_forward_kernel(x: Array, weight: Array, eps: float) -> tuple[Array, tuple]:
    cp = array_module(x)
    xc = cp.ascontiguousarray(x)
    c = xc.shape[-1]
    rows = xc.size // c
    y, x_hat = cp.empty_like(xc), cp.empty_like(xc)
    rstd = cp.empty(xc.shape[:-1] + (1,), dtype=cp.float32)
    _raw(cp, RMSNORM_SOURCE, "rmsnorm_fwd")(
        (rows,), (_threads(c),), (xc, cp.ascontiguousarray(weight), y, x_hat, rstd, np.int32(c),
                                  np.float32(eps)))
    return y, (x_hat, rstd, weight)


def _dot_rows(cp: Any) -> Any:
    """sum over axis 0 of a * b without the product array."""
    return _kernel(cp, "dot_rows", lambda: cp.ReductionKernel(
        "T a, T b", "T y", "a * b", "a + b", "y = a", "0", "dot_rows"))


def _rmsnorm_backward_kernel(dout: Array, cache: tuple) -> tuple[Array, Array]:
    x_hat, rstd, weight = cache
    cp = array_module(dout)
    d, x_hat = cp.ascontiguousarray(dout), cp.ascontiguousarray(x_hat)
    c = d.shape[-1]
    rows = d.size // c
    dx = cp.empty_like(d)
    _raw(cp, RMSNORM_SOURCE, "rmsnorm_bwd")(
        (rows,), (_threads(c),), (d, x_hat, cp.ascontiguousarray(weight),
                                  cp.ascontiguousarray(rstd), dx, np.int32(c)))
    dw = _dot_rows(cp)(d.reshape(rows, c), x_hat.reshape(rows, c), axis=0)
    return dx, dw


def _rmsnorm_sample(xp: Any, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    return (xp.asarray(rng.standard_normal((3, 5, 200), dtype=np.float32)),
            xp.asarray(rng.standard_normal(200, dtype=np.float32)), 1e-6)


def _rmsnorm_bwd_sample(xp: Any, seed: int) -> tuple:
    x, w, eps = _rmsnorm_sample(xp, seed)
    _, cache = rmsnorm_forward_reference(x, w, eps)
    dy = xp.asarray(np.random.default_rng(seed + 1).standard_normal(x.shape, dtype=np.float32))
    return dy, cache


rmsnorm_forward = Fused("rmsnorm forward", rmsnorm_forward_reference, _rmsnorm_forward_kernel,
                        _rmsnorm_sample, lambda x, w, eps: _f32(x, w))
rmsnorm_backward = Fused("rmsnorm backward", rmsnorm_backward_reference, _rmsnorm_backward_kernel,
                         _rmsnorm_bwd_sample, lambda d, c: _f32(d, *c))


# --------------------------------------------------------------------------- rotary

def _rope_reference(x: Array, cos: Array, sin: Array, rope_type: str, sign: float) -> Array:
    """Output position d of every row takes the pair (a, b) it belongs to, by index:
    "halves": pair j = d mod D/2 is (x[j], x[j + D/2]), d < D/2 is the first member;
    "adjacent": pair j = d div 2 is (x[2j], x[2j+1]), even d is the first member;
    first member a cos - b sin, second a sin + b cos (sin negated for the backward)."""
    xp = array_module(x)
    d_ = x.shape[-1]
    half = d_ // 2
    d = np.arange(d_)
    if rope_type == ops.ROPE_HALVES:
        j, first, ia, ib = d % half, d < half, d % half, d % half + half
    elif rope_type == ops.ROPE_ADJACENT:
        j, first, ia, ib = d // 2, d % 2 == 0, d // 2 * 2, d // 2 * 2 + 1
    else:
        raise ValueError(f"rope_type={rope_type!r}")
    c, s = cos[:, j], sign * sin[:, j]
    a, b = x[..., ia], x[..., ib]
    return xp.where(xp.asarray(first), a * c - b * s, a * s + b * c)


def rope_forward_reference(x: Array, cos: Array, sin: Array, rope_type: str) -> tuple[Array, tuple]:
    return _rope_reference(x, cos, sin, rope_type, 1.0), (cos, sin, rope_type)


def rope_backward_reference(dout: Array, cache: tuple) -> Array:
    """The rotation by the opposite angle."""
    cos, sin, rope_type = cache
    return _rope_reference(dout, cos, sin, rope_type, -1.0)


def _rope_kernel_apply(x: Array, cos: Array, sin: Array, rope_type: str, sign: float) -> Array:
    cp = array_module(x)
    xc = cp.ascontiguousarray(x)
    kern = _kernel(cp, "rope", lambda: cp.ElementwiseKernel(
        "raw float32 x, raw float32 cos_t, raw float32 sin_t, int64 n_t, int64 n_d, bool halves, "
        "float32 sign", "float32 y", ROPE_OP, "apr_rope"))
    y = cp.empty_like(xc)
    kern(xc, cp.ascontiguousarray(cos), cp.ascontiguousarray(sin), np.int64(xc.shape[-2]),
         np.int64(xc.shape[-1]), rope_type == ops.ROPE_HALVES, np.float32(sign), y)
    return y


def _rope_forward_kernel(x, cos, sin, rope_type):
    if rope_type not in (ops.ROPE_HALVES, ops.ROPE_ADJACENT):
        raise ValueError(f"rope_type={rope_type!r}")
    return _rope_kernel_apply(x, cos, sin, rope_type, 1.0), (cos, sin, rope_type)


def _rope_backward_kernel(dout, cache):
    cos, sin, rope_type = cache
    return _rope_kernel_apply(dout, cos, sin, rope_type, -1.0)


def _rope_sample(xp: Any, seed: int, rope_type: str = ops.ROPE_HALVES) -> tuple:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 7, 16), dtype=np.float32)
    ang = rng.uniform(-3, 3, (7, 8))
    return (xp.asarray(x).transpose(0, 2, 1, 3).copy().transpose(0, 2, 1, 3), xp.asarray(np.cos(ang).astype(np.float32)),
            xp.asarray(np.sin(ang).astype(np.float32)), rope_type)


def _rope_check_both(kernel_fn: Callable, backward: bool) -> Callable:
    """The self-check runs both pair orders (the sample's rope_type is "halves"; the
    adjacent order is checked by a second call inside)."""
    def run(*args):
        if backward:
            dout, (cos, sin, _) = args
            return (kernel_fn(dout, (cos, sin, ops.ROPE_HALVES)),
                    kernel_fn(dout, (cos, sin, ops.ROPE_ADJACENT)))
        x, cos, sin, _ = args
        return (kernel_fn(x, cos, sin, ops.ROPE_HALVES)[0],
                kernel_fn(x, cos, sin, ops.ROPE_ADJACENT)[0])
    return run


class _RopeFused(Fused):
    def __init__(self, *args, backward: bool, **kw):
        super().__init__(*args, **kw)
        self.backward = backward

    def self_check(self, xp: Any) -> bool:
        ref, ker = self.reference, self.kernel
        self.reference = _rope_check_both(ref, self.backward)
        self.kernel = _rope_check_both(ker, self.backward)
        try:
            return super().self_check(xp)
        finally:
            self.reference, self.kernel = ref, ker


def _rope_bwd_sample(xp: Any, seed: int) -> tuple:
    x, cos, sin, rt = _rope_sample(xp, seed)
    return x, (cos, sin, rt)


rope_forward = _RopeFused("rotary forward", rope_forward_reference, _rope_forward_kernel,
                          _rope_sample, lambda x, c, s, rt: _f32(x, c, s), backward=False)
rope_backward = _RopeFused("rotary backward", rope_backward_reference, _rope_backward_kernel,
                           _rope_bwd_sample, lambda d, cache: _f32(d, cache[0], cache[1]),
                           backward=True)


# --------------------------------------------------------------------------- SwiGLU

SWIGLU_ACTS = ("silu", "swish")


def _sig(g: Array) -> Array:
    xp = array_module(g)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + xp.exp(-g))


def swiglu_forward_reference(gate: Array, up: Array, act: str = "silu") -> tuple[Array, tuple]:
    """y = g sigma(g) u,  sigma(g) = 1 / (1 + exp(-g))."""
    if act not in SWIGLU_ACTS:
        return ops.gated_mlp_forward(gate, up, act)
    return gate * _sig(gate) * up, (gate, up, ops.ACTIVATIONS[act], None)


def swiglu_backward_reference(dout: Array, cache: tuple) -> tuple[Array, Array]:
    """du = dy g sigma(g);  dg = dy u sigma(g) (1 + g (1 - sigma(g)))."""
    gate, up, act = cache[:3]               # the cache of `ops.gated_mlp_forward`'s form
    if act is not ops.ACTIVATIONS["silu"] or cache[3] is not None:
        return ops.gated_mlp_backward(dout, cache)
    s = _sig(gate)
    return dout * up * s * (1.0 + gate * (1.0 - s)), dout * gate * s


def _swiglu_forward_kernel(gate, up, act="silu"):
    cp = array_module(gate)
    kern = _kernel(cp, "swiglu_fwd", lambda: cp.ElementwiseKernel(
        "float32 g, float32 u", "float32 y", SWIGLU_FWD_OP, "apr_swiglu_fwd"))
    return kern(gate, up), (gate, up, ops.ACTIVATIONS[act], None)


def _swiglu_backward_kernel(dout, cache):
    gate, up = cache[:2]
    cp = array_module(dout)
    kern = _kernel(cp, "swiglu_bwd", lambda: cp.ElementwiseKernel(
        "float32 dy, float32 g, float32 u", "float32 dg, float32 du", SWIGLU_BWD_OP,
        "apr_swiglu_bwd"))
    return kern(dout, gate, up)


def _swiglu_sample(xp: Any, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((4, 6, 50), dtype=np.float32) * 4
    return xp.asarray(g), xp.asarray(rng.standard_normal(g.shape, dtype=np.float32)), "silu"


def _swiglu_bwd_sample(xp: Any, seed: int) -> tuple:
    g, u, act = _swiglu_sample(xp, seed)
    dy = xp.asarray(np.random.default_rng(seed + 1).standard_normal(g.shape, dtype=np.float32))
    return dy, (g, u, ops.ACTIVATIONS[act], None)


swiglu_forward = Fused("SwiGLU forward", swiglu_forward_reference, _swiglu_forward_kernel,
                       _swiglu_sample, lambda g, u, act="silu": act in SWIGLU_ACTS and _f32(g, u))
swiglu_backward = Fused("SwiGLU backward", swiglu_backward_reference, _swiglu_backward_kernel,
                        _swiglu_bwd_sample,
                        lambda d, c: c[2] is ops.ACTIVATIONS["silu"] and _f32(d, c[0], c[1]))


# --------------------------------------------------------------------------- cross-entropy

def cross_entropy_forward_reference(logits: Array, targets: Array,
                                    ignore_index: int = ops.IGNORE_INDEX,
                                    overwrite: bool = False) -> tuple[Array, tuple]:
    """Per row r: m = max z, s = sum exp(z - m), loss_r = log s + m - z[t_r] (0 when
    ignored), p = exp(z - m) / s; loss = sum loss_r / kept rows. The cache is
    (p, safe targets, weight = keep / count, shape, scale = 1), the form of
    `ops.cross_entropy_forward`'s with the rows already normalized (as the kernel does in
    the same pass). ``overwrite`` is `ops`' signature: the kernel always writes p over its
    logits, this reference never does."""
    xp = array_module(logits)
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab)
    t, keep, count = ops.cross_entropy_targets(logits, targets, ignore_index)
    safe_t = xp.where(keep, t, 0)
    m = z.max(axis=-1, keepdims=True)
    e = xp.exp(z - m)
    s = e.sum(axis=-1, keepdims=True)
    rows = xp.arange(z.shape[0])
    loss_rows = (xp.log(s[:, 0]) + m[:, 0] - z[rows, safe_t]) * keep
    loss = loss_rows.sum() / count
    return loss, (e / s, safe_t, keep.astype(logits.dtype) / count, logits.shape,
                  xp.ones(z.shape[0], dtype=logits.dtype))


def cross_entropy_backward_reference(dloss: float, cache: tuple) -> Array:
    """dz = dloss w_r (p scale_r - onehot(t_r))."""
    probs, safe_t, weight, shape, scale = cache
    xp = array_module(probs)
    w = weight * dloss
    onehot = xp.arange(probs.shape[1])[None, :] == safe_t[:, None]
    return (probs * (w * scale)[:, None] - onehot * w[:, None]).reshape(shape)


def _cross_entropy_forward_kernel(logits, targets, ignore_index=ops.IGNORE_INDEX, overwrite=False):
    cp = array_module(logits)
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab)               # contiguous (checked): a view, overwritten
    t, keep, count = ops.cross_entropy_targets(logits, targets, ignore_index)
    t = t.astype(cp.int64, copy=False)
    loss_rows = cp.empty(z.shape[0], dtype=cp.float32)
    _raw(cp, CROSS_ENTROPY_SOURCE, "cross_entropy_fwd")(
        (z.shape[0],), (_BLOCK,), (z, cp.where(keep, t, -1), loss_rows, np.int64(vocab)))
    loss = loss_rows.sum() / count
    return loss, (z, cp.where(keep, t, 0), keep.astype(cp.float32) / count, logits.shape,
                  cp.ones(z.shape[0], dtype=cp.float32))


def _cross_entropy_backward_kernel(dloss, cache):
    probs, safe_t, weight, shape, scale = cache
    cp = array_module(probs)
    kern = _kernel(cp, "ce_bwd", lambda: cp.ElementwiseKernel(
        "raw int64 t, raw float32 a, raw float32 w, int64 V", "float32 p", CROSS_ENTROPY_BWD_OP,
        "apr_ce_bwd"))
    w = weight * np.float32(dloss)
    kern(safe_t, w * scale, w, np.int64(probs.shape[1]), probs)
    return probs.reshape(shape)


def _ce_sample(xp: Any, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((2, 5, 1000), dtype=np.float32) * 3
    t = rng.integers(0, 1000, (2, 5))
    t[0, 1] = ops.IGNORE_INDEX
    return xp.asarray(z), xp.asarray(t), ops.IGNORE_INDEX


def _ce_bwd_sample(xp: Any, seed: int) -> tuple:
    # ref.ops' cache: rows left unnormalized, so the check covers the per-row scale too
    _, cache = ops.cross_entropy_forward(*_ce_sample(xp, seed))
    return 1.5, (cache[0].copy(), *cache[1:])


cross_entropy_forward = Fused(
    "cross-entropy forward", cross_entropy_forward_reference, _cross_entropy_forward_kernel,
    _ce_sample, lambda z, t, ii=ops.IGNORE_INDEX, overwrite=False: _f32(z) and z.flags.c_contiguous)
class _CrossEntropyBackward(Fused):
    def __call__(self, dloss: float, cache: tuple) -> Array:
        xp = array_module(cache[0])
        if xp is np or not enabled() or not self.eligible(dloss, cache):
            return self.reference(dloss, cache)
        if self.ok is None:
            self.ok = self.self_check(xp)
        return (self.kernel if self.ok else self.reference)(dloss, cache)


cross_entropy_backward = _CrossEntropyBackward(
    "cross-entropy backward", cross_entropy_backward_reference, _cross_entropy_backward_kernel,
    _ce_bwd_sample, lambda d, c: _f32(c[0], c[2], c[4]) and c[0].flags.c_contiguous)


# --------------------------------------------------------------------------- AdamW

def adamw_reference(p: Array, g: Array, m: Array, v: Array, decay: float, beta1: float,
                    beta2: float, eps: float, step_size: float, sqrt_bc2: float) -> None:
    """In place: m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    p = p decay - step_size m / (sqrt(v) / sqrt_bc2 + eps)   (decay = 1 - lr wd, or 1)."""
    m[...] = beta1 * m + (1.0 - beta1) * g
    v[...] = beta2 * v + (1.0 - beta2) * g * g
    p[...] = p * decay - step_size * (m / (array_module(v).sqrt(v) / sqrt_bc2 + eps))


def _adamw_kernel(p, g, m, v, decay, beta1, beta2, eps, step_size, sqrt_bc2) -> None:
    cp = array_module(p)
    kern = _kernel(cp, "adamw", lambda: cp.ElementwiseKernel(
        "float32 g, float32 decay, float32 b1, float32 b2, float32 eps, float32 step_size, "
        "float32 sqrt_bc2", "float32 p, float32 m, float32 v", ADAMW_OP, "apr_adamw"))
    f = np.float32
    kern(g, f(decay), f(beta1), f(beta2), f(eps), f(step_size), f(sqrt_bc2), p, m, v)


def _adamw_sample(xp: Any, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    p, g = (xp.asarray(rng.standard_normal((30, 40), dtype=np.float32)) for _ in range(2))
    m = xp.asarray(rng.standard_normal((30, 40), dtype=np.float32) * 0.1)
    v = xp.asarray(rng.random((30, 40), dtype=np.float32) * 0.01)
    return p, g, m, v, 1 - 1e-3 * 0.1, 0.9, 0.95, 1e-8, 1e-3 / (1 - 0.9 ** 3), (1 - 0.95 ** 3) ** 0.5


adamw_step = Fused("AdamW", adamw_reference, _adamw_kernel, _adamw_sample,
                   lambda p, g, m, v, *rest: _f32(p, g, m, v) and all(
                       a.flags.c_contiguous for a in (p, g, m, v)),
                   outputs=lambda args, result: [args[0], args[2], args[3]])

# --------------------------------------------------------------------------- bf16 products

BF16_ROUND_OP = r"""
    const unsigned int b = __float_as_uint(x);
    y = (b & 0x7fffffffu) > 0x7f800000u ? x
        : __uint_as_float((b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u);
"""


def round_bf16_array(x: Array) -> Array:
    """`ref.precision.round_bf16` in array code (either backend). On the bits: add 0x7FFF
    plus the lowest kept bit, then clear the low 16 bits; a carry into the exponent is the
    correct rounding up (to the next binade or to infinity). NaN is passed through."""
    xp = array_module(x)
    x = xp.asarray(x, dtype=xp.float32)
    bits = x.view(xp.uint32)
    rounded = (bits + (xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1)))) & xp.uint32(0xFFFF0000)
    return xp.where(xp.isnan(x), x, rounded.view(xp.float32))


_bf16_round_reference = round_bf16_array


def _bf16_round_kernel(x: Array) -> Array:
    cp = array_module(x)
    kern = _kernel(cp, "bf16_round", lambda: cp.ElementwiseKernel(
        "float32 x", "float32 y", BF16_ROUND_OP, "apr_round_bf16"))
    return kern(x)


def _bf16_round_sample(xp: Any, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(4000) * np.exp(rng.uniform(-80, 80, 4000))).astype(np.float32)
    x[:6] = [np.inf, -np.inf, 0.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, np.finfo(np.float32).max]
    return (xp.asarray(x.reshape(40, 100)),)


bf16_round = Fused("bf16 rounding", _bf16_round_reference, _bf16_round_kernel, _bf16_round_sample,
                   lambda x: _f32(x))

def _bf16_matmul_reference(a: Array, b: Array) -> Array:
    """a @ b in float32 (a and b hold bfloat16 values)."""
    return a @ b


@contextmanager
def _tf32(cp: Any) -> Iterator[None]:
    """CuPy's float32 2-D matmuls on TF32 tensor cores (cuBLAS COMPUTE_32F_FAST_TF32) inside
    the block. TF32 keeps 11 significant bits, a bfloat16 value has 8: operands already
    rounded to bfloat16 pass unchanged, so each product is the exact bfloat16 product and
    the sums are float32, as in a bfloat16 GEMM."""
    from cupy._core import _routines_linalg as linalg
    old = linalg.get_compute_type(cp.float32)
    linalg.set_compute_type(cp.float32, linalg.COMPUTE_TYPE_TF32)
    try:
        yield
    finally:
        linalg.set_compute_type(cp.float32, old)


def _bf16_matmul_kernel(a: Array, b: Array) -> Array:
    with _tf32(array_module(a)):
        return a @ b


def _bf16_matmul_sample(xp: Any, seed: int) -> tuple:
    rng = np.random.default_rng(seed)           # operands that are bfloat16 values
    a = rng.standard_normal((300, 500), dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    b = rng.standard_normal((200, 500), dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32).T
    return xp.asarray(a), xp.asarray(b)


bf16_matmul = Fused("bf16 GEMM on TF32 tensor cores", _bf16_matmul_reference, _bf16_matmul_kernel,
                    _bf16_matmul_sample, lambda a, b: _f32(a, b) and a.ndim == b.ndim == 2)


@contextmanager
def bf16_products(x: Array) -> Iterator[None]:
    """Inside the block, float32 2-D matmuls of CuPy arrays run on TF32 tensor cores, if
    the self-check of `bf16_matmul` passed (else, and for NumPy arrays, nothing changes).
    Only for operands rounded to bfloat16 (`ref.precision`), where it is exact."""
    xp = array_module(x)
    if xp is np or not enabled() or x.dtype != np.float32:
        yield
        return
    if bf16_matmul.ok is None:
        bf16_matmul.ok = bf16_matmul.self_check(xp)
    if not bf16_matmul.ok:
        yield
        return
    with _tf32(xp):
        yield


# --------------------------------------------------------------------------- attention

ATTENTION_SOURCE = _REDUCE + r"""
// q, dout, out (B, H, T, D); k, v (B, KH, S, D); lse, dd (B, H, T); contiguous float32.
// Query t sits at position S - T + t and sees keys lo..hi, hi = S - T + t,
// lo = max(0, hi - window + 1) with a sliding window, else 0. D = 32 * nd, nd <= 8.
// One warp per query row (forward, dq) or per key row (dk, dv); 4 warps per block.

extern "C" __global__ void attn_fwd(const float* q, const float* k, const float* v, float* out,
        float* lse, const int B, const int H, const int KH, const int T, const int S,
        const int D, const float scale, const int window) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31, nd = D >> 5;
    if (row >= (long long)B * H * T) return;
    const int t = row % T, h = (row / T) % H;
    const long long b = row / ((long long)T * H);
    const long long kvo = (b * KH + h / (H / KH)) * (long long)S * D;
    float qv[8], acc[8];
    #pragma unroll
    for (int i = 0; i < 8; i++) if (i < nd) { qv[i] = q[row * D + lane + 32 * i] * scale; acc[i] = 0.0f; }
    const int hi = S - T + t, lo = window > 0 ? max(0, hi - window + 1) : 0;
    float m = NEG_INF, l = 0.0f;
    for (int s = lo; s <= hi; s++) {
        const float* ks = k + kvo + (long long)s * D;
        const float* vs = v + kvo + (long long)s * D;
        float dot = 0.0f;
        #pragma unroll
        for (int i = 0; i < 8; i++) if (i < nd) dot += qv[i] * ks[lane + 32 * i];
        dot = warp_sum(dot);
        const float mn = fmaxf(m, dot), corr = expf(m - mn), p = expf(dot - mn);
        l = l * corr + p;
        #pragma unroll
        for (int i = 0; i < 8; i++) if (i < nd) acc[i] = acc[i] * corr + p * vs[lane + 32 * i];
        m = mn;
    }
    const float inv = 1.0f / l;
    #pragma unroll
    for (int i = 0; i < 8; i++) if (i < nd) out[row * D + lane + 32 * i] = acc[i] * inv;
    if (lane == 0) lse[row] = m + logf(l);
}

extern "C" __global__ void attn_bwd_dq(const float* q, const float* k, const float* v,
        const float* out, const float* dout, const float* lse, float* dd, float* dq,
        const int B, const int H, const int KH, const int T, const int S, const int D,
        const float scale, const int window) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31, nd = D >> 5;
    if (row >= (long long)B * H * T) return;
    const int t = row % T, h = (row / T) % H;
    const long long b = row / ((long long)T * H);
    const long long kvo = (b * KH + h / (H / KH)) * (long long)S * D;
    float qv[8], dov[8], acc[8];
    float dsum = 0.0f;
    #pragma unroll
    for (int i = 0; i < 8; i++) if (i < nd) {
        const long long j = row * D + lane + 32 * i;
        qv[i] = q[j] * scale; dov[i] = dout[j]; acc[i] = 0.0f; dsum += dov[i] * out[j];
    }
    dsum = warp_sum(dsum);
    if (lane == 0) dd[row] = dsum;
    const float L = lse[row];
    const int hi = S - T + t, lo = window > 0 ? max(0, hi - window + 1) : 0;
    for (int s = lo; s <= hi; s++) {
        const float* ks = k + kvo + (long long)s * D;
        const float* vs = v + kvo + (long long)s * D;
        float dot = 0.0f, dp = 0.0f;
        #pragma unroll
        for (int i = 0; i < 8; i++) if (i < nd) { dot += qv[i] * ks[lane + 32 * i]; dp += dov[i] * vs[lane + 32 * i]; }
        dot = warp_sum(dot);
        dp = warp_sum(dp);
        const float ds = expf(dot - L) * (dp - dsum);
        #pragma unroll
        for (int i = 0; i < 8; i++) if (i < nd) acc[i] += ds * ks[lane + 32 * i];
    }
    #pragma unroll
    for (int i = 0; i < 8; i++) if (i < nd) dq[row * D + lane + 32 * i] = acc[i] * scale;
}

extern "C" __global__ void attn_bwd_dkv(const float* q, const float* k, const float* v,
        const float* dout, const float* lse, const float* dd, float* dk, float* dv,
        const int B, const int H, const int KH, const int T, const int S, const int D,
        const float scale, const int window) {
    const long long krow = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31, nd = D >> 5, G = H / KH;
    if (krow >= (long long)B * KH * S) return;
    const int s = krow % S, kh = (krow / S) % KH;
    const long long b = krow / ((long long)S * KH);
    float kv[8], vv[8], dka[8], dva[8];
    #pragma unroll
    for (int i = 0; i < 8; i++) if (i < nd) {
        kv[i] = k[krow * D + lane + 32 * i] * scale; vv[i] = v[krow * D + lane + 32 * i];
        dka[i] = 0.0f; dva[i] = 0.0f;
    }
    const int t0 = max(0, s - (S - T));
    const int t1 = window > 0 ? min(T - 1, s - (S - T) + window - 1) : T - 1;
    for (int g = 0; g < G; g++) {
        const long long base = (b * H + (long long)kh * G + g) * T;
        for (int t = t0; t <= t1; t++) {
            const long long row = base + t;
            const float* qr = q + row * D;
            const float* dor = dout + row * D;
            float dot = 0.0f, dp = 0.0f;
            #pragma unroll
            for (int i = 0; i < 8; i++) if (i < nd) { dot += qr[lane + 32 * i] * kv[i]; dp += dor[lane + 32 * i] * vv[i]; }
            dot = warp_sum(dot);
            dp = warp_sum(dp);
            const float p = expf(dot - lse[row]), ds = p * (dp - dd[row]);
            #pragma unroll
            for (int i = 0; i < 8; i++) if (i < nd) {
                dva[i] += p * dor[lane + 32 * i];
                dka[i] += ds * qr[lane + 32 * i];
            }
        }
    }
    #pragma unroll
    for (int i = 0; i < 8; i++) if (i < nd) {
        dk[krow * D + lane + 32 * i] = dka[i] * scale;
        dv[krow * D + lane + 32 * i] = dva[i];
    }
}
"""

FLASH = "flash"      # the first item of the fused attention's cache


def _attention_mask(xp: Any, t: int, s: int, window: int) -> Array:
    """(T, S) boolean: query t (at position S - T + t) sees key s."""
    rel = (s - t) + xp.arange(t)[:, None] - xp.arange(s)[None, :]
    seen = rel >= 0
    if window:
        seen &= rel < window
    return seen


def attention_forward_reference(q: Array, k: Array, v: Array, window: int = 0,
                                scale: Optional[float] = None) -> tuple[Array, tuple]:
    """Causal GQA attention as the kernel computes it: per query row the log-sum-exp
    L = m + log(sum exp(s - m)) of its visible scores s = (q scale) . k, and
    out = sum exp(s - L) v. The cache keeps q, k, v, out and L (no probabilities)."""
    xp = array_module(q)
    b, h, t, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = h // kh
    scale = 1.0 / float(np.sqrt(d)) if scale is None else scale
    scores = ((q * scale).reshape(b, kh, g * t, d) @ k.swapaxes(-1, -2)).reshape(b, kh, g, t, s)
    scores = xp.where(_attention_mask(xp, t, s, window), scores, -xp.inf)
    m = scores.max(axis=-1, keepdims=True)
    lse = m + xp.log(xp.exp(scores - m).sum(axis=-1, keepdims=True))
    p = xp.exp(scores - lse).reshape(b, kh, g * t, s)
    out = (p @ v).reshape(b, h, t, d)
    return out, (FLASH, q, k, v, out, lse.reshape(b, h, t), scale, window)


def attention_backward_reference(dout: Array, cache: tuple) -> tuple[Array, Array, Array]:
    """P = exp(s - L) recomputed; Drow = sum(dout * out); dS = P (dout v^T - Drow);
    dq = dS k scale, dk = dS^T q scale, dv = P^T dout (summed over each K/V head's group)."""
    _, q, k, v, out, lse, scale, window = cache
    xp = array_module(q)
    b, h, t, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = h // kh
    qg = q.reshape(b, kh, g * t, d)
    scores = ((q * scale).reshape(b, kh, g * t, d) @ k.swapaxes(-1, -2)).reshape(b, kh, g, t, s)
    p = xp.where(_attention_mask(xp, t, s, window), xp.exp(scores - lse.reshape(b, kh, g, t, 1)), 0.0)
    p = p.reshape(b, kh, g * t, s)
    dout_g = dout.reshape(b, kh, g * t, d)
    drow = (dout * out).sum(axis=-1).reshape(b, kh, g * t, 1)
    ds = p * (dout_g @ v.swapaxes(-1, -2) - drow)
    dq = (ds @ k).reshape(b, h, t, d) * scale
    dk = (ds.swapaxes(-1, -2) @ qg) * scale
    dv = p.swapaxes(-1, -2) @ dout_g
    return dq, dk, dv


_WARPS = 4


def _attention_dims(q, k):
    b, h, t, d = q.shape
    return b, h, k.shape[1], t, k.shape[2], d


def _attention_forward_kernel(q, k, v, window=0, scale=None):
    cp = array_module(q)
    q, k, v = (cp.ascontiguousarray(a) for a in (q, k, v))
    b, h, kh, t, s, d = _attention_dims(q, k)
    scale = 1.0 / float(np.sqrt(d)) if scale is None else scale
    out = cp.empty_like(q)
    lse = cp.empty((b, h, t), dtype=cp.float32)
    rows = b * h * t
    _raw(cp, ATTENTION_SOURCE, "attn_fwd")(
        ((rows + _WARPS - 1) // _WARPS,), (32 * _WARPS,),
        (q, k, v, out, lse, np.int32(b), np.int32(h), np.int32(kh), np.int32(t), np.int32(s),
         np.int32(d), np.float32(scale), np.int32(window)))
    return out, (FLASH, q, k, v, out, lse, scale, window)


def _attention_backward_kernel(dout, cache):
    _, q, k, v, out, lse, scale, window = cache
    cp = array_module(q)
    dout = cp.ascontiguousarray(dout)
    b, h, kh, t, s, d = _attention_dims(q, k)
    dq, dk, dv = cp.empty_like(q), cp.empty_like(k), cp.empty_like(v)
    dd = cp.empty((b, h, t), dtype=cp.float32)
    dims = (np.int32(b), np.int32(h), np.int32(kh), np.int32(t), np.int32(s), np.int32(d),
            np.float32(scale), np.int32(window))
    rows, krows = b * h * t, b * kh * s
    _raw(cp, ATTENTION_SOURCE, "attn_bwd_dq")(
        ((rows + _WARPS - 1) // _WARPS,), (32 * _WARPS,), (q, k, v, out, dout, lse, dd, dq, *dims))
    _raw(cp, ATTENTION_SOURCE, "attn_bwd_dkv")(
        ((krows + _WARPS - 1) // _WARPS,), (32 * _WARPS,), (q, k, v, dout, lse, dd, dk, dv, *dims))
    return dq, dk, dv


def _attention_sample(xp: Any, seed: int, window: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, 9, 64), dtype=np.float32)
    k = rng.standard_normal((2, 2, 12, 64), dtype=np.float32)       # S > T: a cached prefix
    v = rng.standard_normal((2, 2, 12, 64), dtype=np.float32)
    return xp.asarray(q), xp.asarray(k), xp.asarray(v), window, None


def _attention_bwd_sample(xp: Any, seed: int) -> tuple:
    q, k, v, window, scale = _attention_sample(xp, seed, window=5)
    _, cache = attention_forward_reference(q, k, v, window, scale)
    dout = xp.asarray(np.random.default_rng(seed + 1).standard_normal(q.shape, dtype=np.float32))
    return dout, cache


def _attention_eligible(q, k, v, window=0, scale=None, softcap=None) -> bool:
    d = q.shape[-1]
    return (not softcap and _f32(q, k, v) and d % 32 == 0 and d <= 256
            and q.shape[1] % k.shape[1] == 0)


attention_fused_forward = Fused("attention forward", attention_forward_reference,
                                _attention_forward_kernel, _attention_sample,
                                lambda q, k, v, *rest: _attention_eligible(q, k, v, *rest))
attention_fused_backward = Fused("attention backward", attention_backward_reference,
                                 _attention_backward_kernel, _attention_bwd_sample,
                                 lambda dout, cache: _f32(dout, cache[1]))


def attention_enabled() -> bool:
    """The fused attention is opt-in (APR_REF_ATTENTION=fused) until it has been measured."""
    return os.environ.get("APR_REF_ATTENTION", "") == "fused"


def attention_forward(q: Array, k: Array, v: Array, window: int = 0, scale: Optional[float] = None,
                      softcap: Optional[float] = None) -> tuple[Array, tuple]:
    """`ops.attention_forward`, or (APR_REF_ATTENTION=fused, no soft-cap, float32, head width
    a multiple of 32) the fused attention whose cache holds no probabilities."""
    if not attention_enabled() or not _attention_eligible(q, k, v, window, scale, softcap):
        return ops.attention_forward(q, k, v, window, scale, softcap)
    return attention_fused_forward(q, k, v, window, scale)


def attention_backward(dout: Array, cache: tuple) -> tuple[Array, Array, Array]:
    """The backward that fits the forward's cache."""
    if cache[0] is FLASH:
        return attention_fused_backward(dout, cache)
    return ops.attention_backward(dout, cache)


ALL = (rmsnorm_forward, rmsnorm_backward, rope_forward, rope_backward, swiglu_forward,
       swiglu_backward, cross_entropy_forward, cross_entropy_backward, adamw_step, bf16_round, bf16_matmul,
       attention_fused_forward, attention_fused_backward)


# --------------------------------------------------------------------------- the model's ops

class FusedOps:
    """`ref.ops` with the fused ops in place of their array-code versions (attribute
    lookup falls through to `ref.ops` for everything else)."""
    rmsnorm_forward = staticmethod(rmsnorm_forward)
    rmsnorm_backward = staticmethod(rmsnorm_backward)
    rope_forward = staticmethod(rope_forward)
    rope_backward = staticmethod(rope_backward)
    gated_mlp_forward = staticmethod(swiglu_forward)
    gated_mlp_backward = staticmethod(swiglu_backward)
    cross_entropy_forward = staticmethod(cross_entropy_forward)
    cross_entropy_backward = staticmethod(cross_entropy_backward)
    attention_forward = staticmethod(attention_forward)
    attention_backward = staticmethod(attention_backward)

    def __getattr__(self, name: str) -> Any:
        return getattr(ops, name)


FUSED_OPS = FusedOps()


def ops_for(backend: Any) -> Any:
    """The op set a model on ``backend`` uses: `ref.ops` on the CPU (and with
    APR_REF_KERNELS=0), the fused ops on a GPU."""
    return FUSED_OPS if getattr(backend, "is_gpu", False) and enabled() else ops
