"""ref.kernels on the CPU: every fused op's reference (the math its CUDA kernel implements)
against `ref.ops` / `ref.optim`, the model run through the fused op set, and the dispatch
with a stand-in ``cupy``: a kernel runs only on CuPy float32 arrays after its self-check
passed; a kernel that differs or fails is reported once and the reference runs instead.
The kernels themselves run only on a GPU (tests/gpu)."""
from __future__ import annotations

import sys
import types
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from apr.config import preset
from ref import kernels, ops
from ref.model import Model
from ref.optim import AdamW, AdamWConfig

RNG = np.random.default_rng(0)


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- references = ops

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rmsnorm_reference_equals_ops(dtype):
    x = RNG.standard_normal((3, 4, 5, 24)).astype(dtype).transpose(0, 2, 1, 3)   # a head view
    w = RNG.standard_normal(24).astype(dtype)
    dy = RNG.standard_normal(x.shape).astype(dtype)
    y, cache = kernels.rmsnorm_forward_reference(x, w, 1e-6)
    y0, cache0 = ops.rmsnorm_forward(x, w, 1e-6)
    close(y, y0)
    for a, b in zip(cache, cache0):
        close(a, b)
    for got, want in zip(kernels.rmsnorm_backward_reference(dy, cache), ops.rmsnorm_backward(dy, cache0)):
        close(got, want)
    assert y.dtype == dtype


@pytest.mark.parametrize("rope_type", [ops.ROPE_HALVES, ops.ROPE_ADJACENT])
def test_rope_reference_equals_ops(rope_type):
    x = RNG.standard_normal((2, 3, 7, 16)).astype(np.float32)
    cos, sin = ops.rope_tables(np.arange(7), 16, 10000.0, np.float32)
    y, cache = kernels.rope_forward_reference(x, cos, sin, rope_type)
    y0, cache0 = ops.rope_forward(x, cos, sin, rope_type)
    close(y, y0)
    assert cache == cache0 or all(np.array_equal(a, b) if hasattr(a, "shape") else a == b
                                  for a, b in zip(cache, cache0))
    close(kernels.rope_backward_reference(y, cache), ops.rope_backward(y, cache0))
    close(kernels.rope_backward_reference(y, cache), x, atol=1e-5)        # a rotation: R^T R = 1
    with pytest.raises(ValueError):
        kernels.rope_forward_reference(x, cos, sin, "spiral")


@pytest.mark.parametrize("act", ["silu", "swish", "gelu"])
def test_swiglu_reference_equals_ops(act):
    g = (RNG.standard_normal((4, 9, 33)) * 6).astype(np.float32)
    g[0, 0, :3] = [-120.0, 120.0, 0.0]                    # exp(-g) overflows to inf: sigma = 0
    u = RNG.standard_normal(g.shape).astype(np.float32)
    dy = RNG.standard_normal(g.shape).astype(np.float32)
    y, cache = kernels.swiglu_forward_reference(g, u, act)
    y0, cache0 = ops.gated_mlp_forward(g, u, act)
    close(y, y0, atol=1e-5)    # ops' 0.5 + 0.5 tanh(g/2) cancels for g << 0: absolute agreement
    assert cache[2] is cache0[2]
    for got, want in zip(kernels.swiglu_backward_reference(dy, cache), ops.gated_mlp_backward(dy, cache0)):
        close(got, want, atol=1e-5)    # silu' = s (1 + g (1 - s)) cancels near g = -1.28


def test_cross_entropy_reference_equals_ops():
    z = (RNG.standard_normal((3, 6, 300)) * 5).astype(np.float32)
    t = RNG.integers(0, 300, (3, 6))
    t[1, 2] = t[2, 5] = ops.IGNORE_INDEX
    loss, cache = kernels.cross_entropy_forward_reference(z, t)
    loss0, cache0 = ops.cross_entropy_forward(z, t)
    close(loss, loss0)
    close(cache[0] * cache[4][:, None], cache0[0] * cache0[4][:, None])   # the probabilities
    assert np.all(cache[4] == 1)                # the reference (as the kernel) normalizes
    for a, b in zip(cache[1:3], cache0[1:3]):
        close(a, b)
    assert cache[3] == cache0[3]
    d = kernels.cross_entropy_backward_reference(0.7, cache)
    close(d, ops.cross_entropy_backward(0.7, cache0))
    # either forward's cache fits either backward (a kernel forward, a reference backward)
    close(d, ops.cross_entropy_backward(0.7, kernels.cross_entropy_forward_reference(z, t)[1]))
    close(d, kernels.cross_entropy_backward_reference(0.7, ops.cross_entropy_forward(z, t)[1]))
    assert not d.reshape(-1, 300)[1 * 6 + 2].any()              # an ignored row has no gradient
    for bad, msg in ((np.full_like(t, ops.IGNORE_INDEX), "every target"), (t + 300, "must lie in")):
        with pytest.raises(ValueError, match=msg):
            kernels.cross_entropy_forward_reference(z, bad)


def test_adamw_reference_equals_optim():
    params = {"model.layers.0.mlp.up_proj.weight": RNG.standard_normal((6, 5)).astype(np.float32),
              "model.norm.weight": RNG.standard_normal(5).astype(np.float32)}
    mine = {k: v.copy() for k, v in params.items()}
    cfg = AdamWConfig(weight_decay=0.1)
    opt = AdamW(params, cfg)
    m = {k: np.zeros_like(v) for k, v in mine.items()}
    v = {k: np.zeros_like(x) for k, x in mine.items()}
    for t in range(1, 4):
        grads = {k: RNG.standard_normal(x.shape).astype(np.float32) for k, x in params.items()}
        lr = 1e-2 * t
        opt.step(params, grads, lr)
        for k in mine:
            decay = 1 - lr * cfg.weight_decay if opt.decay[k] else 1.0
            kernels.adamw_reference(mine[k], grads[k], m[k], v[k], decay, cfg.beta1, cfg.beta2,
                                    cfg.eps, lr / (1 - cfg.beta1 ** t), (1 - cfg.beta2 ** t) ** 0.5)
    assert opt.decay["model.layers.0.mlp.up_proj.weight"] and not opt.decay["model.norm.weight"]
    for k in mine:
        close(mine[k], params[k], rtol=1e-6)
        close(m[k], opt.exp_avg[k], rtol=1e-6)
        close(v[k], opt.exp_avg_sq[k], rtol=1e-6)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("s", [9, 12])
def test_attention_reference_equals_ops(window, s):
    """GQA (4 query heads on 2 K/V heads), causal, a sliding window, and S > T (a prefix)."""
    q = RNG.standard_normal((2, 4, 9, 32))
    k, v = RNG.standard_normal((2, 2, s, 32)), RNG.standard_normal((2, 2, s, 32))
    dout = RNG.standard_normal(q.shape)
    out, cache = kernels.attention_forward_reference(q, k, v, window, 0.3)
    out0, cache0 = ops.attention_forward(q, k, v, window, 0.3)
    close(out, out0, rtol=1e-12, atol=1e-12)
    assert cache[0] is kernels.FLASH and cache[5].shape == (2, 4, 9)
    for got, want in zip(kernels.attention_backward_reference(dout, cache), ops.attention_backward(dout, cache0)):
        close(got, want, rtol=1e-12, atol=1e-12)


def test_fused_attention_is_opt_in_and_falls_back_where_it_does_not_apply(monkeypatch):
    q, k, v = (RNG.standard_normal((1, 2, 4, 32)).astype(np.float32) for _ in range(3))
    assert kernels.attention_forward(q, k, v)[1][0] is not kernels.FLASH        # default: ops
    monkeypatch.setenv("APR_REF_ATTENTION", "fused")
    assert kernels.attention_forward(q, k, v)[1][0] is kernels.FLASH
    assert kernels.attention_forward(q, k, v, 0, None, 50.0)[1][0] is not kernels.FLASH   # soft-cap
    q16, k16, v16 = (a[..., :16] for a in (q, k, v))                                     # width 16
    assert kernels.attention_forward(q16, k16, v16)[1][0] is not kernels.FLASH
    for cache in (kernels.attention_forward(q, k, v)[1], ops.attention_forward(q, k, v)[1]):
        dq, dk, dv = kernels.attention_backward(np.ones_like(q), cache)          # each its own
        close(dq, ops.attention_backward(np.ones_like(q), ops.attention_forward(q, k, v)[1])[0],
              rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention", ["ops", "fused"])
@pytest.mark.parametrize("arch", ["llama-tiny", "qwen2-tiny"])
def test_model_through_the_fused_op_set(arch, attention, monkeypatch):
    """The fused op set (references on NumPy) in the whole model: the same loss and gradients
    as ref.ops, so forward and backward caches fit together."""
    monkeypatch.setenv("APR_REF_ATTENTION", attention)
    cfg = preset(arch).replace(hidden_size=128)          # head width 32: the fused attention applies
    plain = Model.init_random(cfg, seed=2)
    fused = Model(cfg, plain.params)
    fused.ops = kernels.FUSED_OPS
    calls = []
    monkeypatch.setattr(kernels.attention_fused_backward, "reference",
                        lambda *a: (calls.append(1), kernels.attention_backward_reference(*a))[1])
    ids = RNG.integers(0, cfg.vocab_size, (2, 16))
    targets = RNG.integers(0, cfg.vocab_size, (2, 16))
    targets[0, :3] = ops.IGNORE_INDEX
    l0, g0 = plain.loss_and_grads(ids, targets)
    l1, g1 = fused.loss_and_grads(ids, targets)
    assert l1 == pytest.approx(l0, rel=1e-6)
    for name in g0:
        close(g1[name], g0[name], rtol=1e-4, atol=1e-7)
    close(fused.forward(ids), plain.forward(ids))
    assert len(calls) == (cfg.num_layers if attention == "fused" else 0)


def test_ops_for_picks_the_fused_set_only_on_a_gpu(monkeypatch):
    assert kernels.ops_for(SimpleNamespace(is_gpu=False)) is ops
    assert kernels.ops_for(SimpleNamespace(is_gpu=True)) is kernels.FUSED_OPS
    monkeypatch.setenv("APR_REF_KERNELS", "0")
    assert kernels.ops_for(SimpleNamespace(is_gpu=True)) is ops
    assert kernels.FUSED_OPS.embedding_forward is ops.embedding_forward   # not fused: ref.ops


def test_kernel_sources_name_their_entry_points():
    assert 'extern "C" __global__ void rmsnorm_fwd(' in kernels.RMSNORM_SOURCE
    assert 'extern "C" __global__ void rmsnorm_bwd(' in kernels.RMSNORM_SOURCE
    assert 'extern "C" __global__ void cross_entropy_fwd(' in kernels.CROSS_ENTROPY_SOURCE
    for src in (kernels.RMSNORM_SOURCE, kernels.CROSS_ENTROPY_SOURCE):
        assert src.count("{") == src.count("}") and src.count("(") == src.count(")")


# --------------------------------------------------------------------------- dispatch

class DeviceArray(np.ndarray):
    """A NumPy array that `ref.backend.array_module` takes for a CuPy array."""


DeviceArray.__module__ = "cupy._core.core"


@pytest.fixture
def fake_cupy(monkeypatch):
    mod = types.ModuleType("cupy")
    mod.__getattr__ = lambda name: getattr(np, name)
    mod.asarray = lambda a, dtype=None: np.asarray(a, dtype).view(DeviceArray)
    monkeypatch.setitem(sys.modules, "cupy", mod)
    for op in kernels.ALL:
        monkeypatch.setattr(op, "ok", None)
        monkeypatch.setattr(op, "failure", None)
    return mod


def dev(a):
    return np.asarray(a).view(DeviceArray)


def _swiglu_args():
    g = RNG.standard_normal((3, 8)).astype(np.float32)
    return dev(g), dev(RNG.standard_normal((3, 8)).astype(np.float32))


def test_a_kernel_runs_after_its_self_check_passes(fake_cupy, monkeypatch):
    calls = []

    def good(g, u, act="silu"):              # a correct "kernel"
        calls.append(type(g))
        return kernels.swiglu_forward_reference(g, u, act)

    op = kernels.swiglu_forward
    monkeypatch.setattr(op, "kernel", good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g, u = _swiglu_args()
        y, _ = op(g, u, "silu")
        op(g, u, "silu")
    assert op.ok is True and len(calls) == 3           # the self-check, then both calls
    close(y, ops.gated_mlp_forward(np.asarray(g), np.asarray(u), "silu")[0])


def test_no_kernel_for_numpy_float64_or_other_activations(fake_cupy, monkeypatch):
    op = kernels.swiglu_forward
    monkeypatch.setattr(op, "kernel", lambda *a: pytest.fail("kernel called"))
    g, u = _swiglu_args()
    op(np.asarray(g), np.asarray(u), "silu")                       # NumPy
    op(dev(np.asarray(g, np.float64)), dev(np.asarray(u, np.float64)), "silu")   # float64
    y, cache = op(g, u, "relu")                                    # not a SwiGLU
    assert cache[2] is ops.ACTIVATIONS["relu"] and op.ok is None   # never even checked


@pytest.mark.parametrize("failure", ["wrong", "raises"])
def test_a_failing_kernel_warns_once_and_the_reference_runs(fake_cupy, monkeypatch, failure):
    calls = []

    def bad(g, u, act="silu"):
        calls.append(1)
        if failure == "raises":
            raise RuntimeError("nvrtc: error: identifier undefined")
        y, cache = kernels.swiglu_forward_reference(g, u, act)
        return y + 1e-2, cache

    op = kernels.swiglu_forward
    monkeypatch.setattr(op, "kernel", bad)
    g, u = _swiglu_args()
    with pytest.warns(RuntimeWarning, match="SwiGLU forward kernel: self-check failed") as rec:
        y1, _ = op(g, u, "silu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # no second warning
        y2, _ = op(g, u, "silu")
    assert len(rec) == 1 and op.ok is False and len(calls) == 1     # only the self-check ran it
    assert ("differ" if failure == "wrong" else "identifier undefined") in op.failure
    want = ops.gated_mlp_forward(np.asarray(g), np.asarray(u), "silu")[0]
    close(y1, want)
    close(y2, want)


def test_in_place_ops_self_check_on_separate_copies(fake_cupy, monkeypatch):
    """AdamW's kernel updates in place: the self-check gives kernel and reference their own
    arrays and compares p, m and v."""
    seen = []

    def good(p, g, m, v, *rest):
        seen.append(id(p))
        kernels.adamw_reference(p, g, m, v, *rest)

    monkeypatch.setattr(kernels.adamw_step, "kernel", good)
    p, g, m, v = (dev(RNG.standard_normal((4, 4)).astype(np.float32)) for _ in range(4))
    v[...] = np.abs(v)
    want = [np.array(a) for a in (p, g, m, v)]
    kernels.adamw_reference(want[0], want[1], want[2], want[3], 0.99, 0.9, 0.95, 1e-8, 1e-3, 0.5)
    kernels.adamw_step(p, g, m, v, 0.99, 0.9, 0.95, 1e-8, 1e-3, 0.5)
    assert kernels.adamw_step.ok is True and len(seen) == 2 and seen[1] == id(p)
    for got, w in zip((p, m, v), (want[0], want[2], want[3])):
        close(got, w, rtol=1e-6)

    monkeypatch.setattr(kernels.adamw_step, "ok", None)
    monkeypatch.setattr(kernels.adamw_step, "kernel", lambda p, g, m, v, *r: None)  # forgets m, v
    with pytest.warns(RuntimeWarning, match="AdamW kernel: self-check failed"):
        kernels.adamw_step(p, g, m, v, 0.99, 0.9, 0.95, 1e-8, 1e-3, 0.5)


def test_optimizer_on_device_arrays_goes_through_the_fused_step(fake_cupy, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels.adamw_step, "ok", True)
    monkeypatch.setattr(kernels.adamw_step, "kernel",
                        lambda *a: (calls.append(a[4]), kernels.adamw_reference(*a)))
    host = {"model.layers.0.mlp.up_proj.weight": RNG.standard_normal((6, 5)).astype(np.float32),
            "model.norm.weight": RNG.standard_normal(5).astype(np.float32)}
    grads = {k: RNG.standard_normal(x.shape).astype(np.float32) for k, x in host.items()}
    params = {k: dev(v.copy()) for k, v in host.items()}
    ref_opt, opt = AdamW(host), AdamW(params)
    ref_opt.step(host, grads, 0.1)
    opt.step(params, {k: dev(g) for k, g in grads.items()}, 0.1)
    assert calls == [pytest.approx(1 - 0.1 * 0.1), 1.0]      # decay on the matrix only
    for k in host:
        close(params[k], host[k], rtol=1e-6)


@pytest.fixture
def tf32_entries(fake_cupy, monkeypatch) -> list:
    """The TF32 switch recorded instead of entered (one entry per product on it), and a
    working bf16 rounding kernel."""
    from contextlib import contextmanager
    entered = []

    @contextmanager
    def tf32(cp):
        entered.append(cp)
        yield

    monkeypatch.setattr(kernels, "_tf32", tf32)
    monkeypatch.setattr(kernels.bf16_round, "ok", True)
    monkeypatch.setattr(kernels.bf16_round, "kernel", lambda x: dev(kernels._bf16_round_reference(x)))
    return entered


def test_bf16_products_run_on_tensor_cores_only_after_the_self_check(tf32_entries):
    from ref import precision
    entered = tf32_entries
    x = RNG.standard_normal((3, 4, 32)).astype(np.float32)
    w = RNG.standard_normal((16, 32)).astype(np.float32)
    dy = RNG.standard_normal((3, 4, 16)).astype(np.float32)
    y0, c0 = precision.linear_forward(x, w, None, "bf16")           # NumPy: never
    d0 = precision.linear_backward(dy, c0, "bf16")
    assert entered == [] and kernels.bf16_matmul.ok is None
    y, c = precision.linear_forward(dev(x), dev(w), None, "bf16")
    assert kernels.bf16_matmul.ok is True and len(entered) == 2     # self-check, forward
    d = precision.linear_backward(dev(dy), c, "bf16")
    assert len(entered) == 3
    precision.linear_forward(dev(x), dev(w), None, None)             # float32 products: never
    assert len(entered) == 3
    close(y, y0, rtol=0, atol=0)
    for a, b in zip(d[:2], d0[:2]):
        close(a, b, rtol=0, atol=0)


def test_bf16_products_stay_simt_when_the_self_check_fails(tf32_entries, monkeypatch):
    from ref import precision
    entered = tf32_entries
    monkeypatch.setattr(kernels.bf16_matmul, "kernel", lambda a, b: (a @ b) * 1.001)
    x = dev(RNG.standard_normal((5, 32)).astype(np.float32))
    w = dev(RNG.standard_normal((16, 32)).astype(np.float32))
    with pytest.warns(RuntimeWarning, match="bf16 GEMM on TF32 tensor cores kernel: self-check failed"):
        precision.linear_forward(x, w, None, "bf16")
    precision.linear_forward(x, w, None, "bf16")
    assert entered == [] and kernels.bf16_matmul.ok is False
