"""ref.precision: bfloat16 products with float32 accumulation and float32 master weights.

Tolerances. bfloat16 keeps 8 significant bits: the unit roundoff is u = 2^-8. Rounding both
operands of a product a*b gives r(a) r(b) = a b (1 + d), |d| <= 2u + u^2, and the product
of two bfloat16 values is exact in float32. So one output of a linear layer obeys, against
the float32 layer,
    |y_bf16 - y_f32| <= (2u + u^2) * sum_i |x_i w_i| + 2 gamma_n sum_i |x_i w_i|,
gamma_n = n 2^-24 the worst-case float32 summation error of n terms (once per side). That
bound is checked elementwise for all three products of a linear layer.

For the whole model the errors of successive layers mix; the rounding errors of a dot
product have random signs, so its normwise relative error is about u (not n u), and a few
layers add a few such terms. The bound used is 4u normwise (relative L2 error of the logits
and of every gradient against float64), which the Llama and Qwen2 tiny models meet with a
margin (measured about 0.8u for the logits and at most 2u for a gradient). The test also
requires the error to exceed u/10, so a run that silently skipped the rounding fails, and
float32 itself is checked to be 1000 times closer, so the bound is not loose enough to hide
a wrong gradient."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from apr.config import preset
from apr.container import AprFile
from ref import precision
from ref.model import Model
from test_train import metrics, one_line_error, pretrain, small, ws  # noqa: F401 (fixture)

U = 2.0 ** -8


def _bf16_reference(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):          # NaN payloads among the random bit patterns
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_rounding_is_ml_dtypes_round_to_nearest_even():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(200_000) * np.exp(rng.uniform(-60, 60, 200_000))).astype(np.float32)
    bits = rng.integers(0, 2 ** 32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    f32 = np.finfo(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, f32.max, -f32.max, f32.tiny, f32.smallest_subnormal,
                        1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20,   # ties, above a tie
                        3.3895314e38], np.float32)
    for arr in (x, bits, special):
        got, want = precision.round_bf16(arr), _bf16_reference(arr)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    # ties go to the even neighbour: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7
    assert precision.round_bf16(np.float32([1 + 2 ** -8, 1 + 3 * 2 ** -8])).tolist() == [1.0, 1 + 2 ** -6]


def _bound_check(got, want, a, b, n):
    """|got - want| <= (2u + u^2 + 2 gamma_n) (|a| @ |b|), elementwise."""
    scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    bound = (2 * U + U * U + 2 * n * 2.0 ** -24) * scale
    assert np.all(np.abs(got.astype(np.float64) - want) <= bound)


def test_linear_layer_products_are_bf16_with_f32_accumulation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 5, 96)).astype(np.float32)
    w = rng.standard_normal((40, 96)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    dy = rng.standard_normal((6, 5, 40)).astype(np.float32)
    y, cache = precision.linear_forward(x, w, bias, "bf16")
    dx, dw, db = precision.linear_backward(dy, cache, "bf16")
    xr, wr, dyr = _bf16_reference(x), _bf16_reference(w), _bf16_reference(dy)
    x2, dy2, dyr2 = x.reshape(-1, 96), dy.reshape(-1, 40), dyr.reshape(-1, 40)
    # exactly the products of the rounded operands, up to float32 summation
    for got, a, b in ((y.reshape(-1, 40) - bias, xr.reshape(-1, 96), wr.T),
                      (dx.reshape(-1, 96), dyr2, wr), (dw, dyr2.T, xr.reshape(-1, 96))):
        exact = a.astype(np.float64) @ b.astype(np.float64)
        tol = 2 * a.shape[1] * 2.0 ** -24 * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
        assert np.all(np.abs(got - exact) <= tol + 1e-30)
    # within the derived bound of the float32 layer, and not equal to it
    y32, c32 = precision.linear_forward(x, w, bias, None)
    dx32, dw32, db32 = precision.linear_backward(dy, c32, None)
    _bound_check(y.reshape(-1, 40) - bias, x2.astype(np.float64) @ w.T.astype(np.float64), x2, w.T, 96)
    _bound_check(dx.reshape(-1, 96), dy2.astype(np.float64) @ w.astype(np.float64), dy2, w, 40)
    _bound_check(dw, dy2.T.astype(np.float64) @ x2.astype(np.float64), dy2.T, x2, 30)
    assert not np.array_equal(y, y32) and not np.array_equal(dw, dw32)
    np.testing.assert_allclose(db, db32, rtol=1e-6)        # the bias gradient stays float32
    assert y.dtype == dx.dtype == dw.dtype == np.float32


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("arch", ["llama-tiny", "qwen2-tiny"])
def test_bf16_model_is_close_to_float64(arch):
    cfg = preset(arch)
    m32 = Model.init_random(cfg, seed=1)
    mbf = Model(cfg, m32.params, matmul="bf16")
    m64 = Model(cfg, {k: v.astype(np.float64) for k, v in m32.params.items()}, dtype=np.float64)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (2, 32))
    targets = rng.integers(0, cfg.vocab_size, (2, 32))
    ref = m64.forward(ids)
    err_bf, err_32 = _rel(mbf.forward(ids), ref), _rel(m32.forward(ids), ref)
    assert U / 10 < err_bf <= 4 * U and err_32 < 4 * U / 1000
    l64, g64 = m64.loss_and_grads(ids, targets)
    lbf, gbf = mbf.loss_and_grads(ids, targets)
    l32, g32 = m32.loss_and_grads(ids, targets)
    assert abs(lbf - l64) <= 4 * U * abs(l64)
    for name in g64:
        assert gbf[name].dtype == np.float32
        assert _rel(gbf[name], g64[name]) <= 4 * U, name
        assert _rel(g32[name], g64[name]) < 4 * U / 1000, name
    assert max(_rel(gbf[n], g64[n]) for n in g64) > U / 10
    assert all(p.dtype == np.float32 for p in mbf.params.values())


def test_bf16_needs_float32_master_weights():
    cfg = preset("llama-tiny")
    with pytest.raises(Exception, match="float32 master weights"):
        Model.init_random(cfg, dtype=np.float64, matmul="bf16")
    with pytest.raises(Exception, match="unknown dtype"):
        precision.check("fp16")


def test_pretrain_bf16_loss_falls_and_checkpoint_is_f32(ws, tmp_path):  # noqa: F811
    runs = {}
    for dtype in ("bf16", "f32"):
        run = tmp_path / dtype
        r = pretrain(*small(ws, "--run-dir", run, "--steps", 40, "--lr", 3e-3, "--warmup-steps", 4,
                            "--eval-every", 20, "--save-every", 40, "--dtype", dtype, "--json"))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[dtype] = (json.loads(r.stdout), metrics(run))
    summary, recs = runs["bf16"]
    assert summary["config"] and summary["val_loss"] < summary["step0_val_loss"] - 1.0
    losses = [m["loss"] for m in recs if m.get("loss") is not None]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    # the same run in float32 differs (the rounding is in effect) but only a little
    f32_losses = [m["loss"] for m in runs["f32"][1] if m.get("loss") is not None]
    assert losses != f32_losses
    assert abs(losses[-1] - f32_losses[-1]) < 0.1 * f32_losses[-1]
    with AprFile.open(tmp_path / "bf16" / "ckpt" / "final.apr") as f:
        assert f.metadata["training.run_config"]["dtype"] == "bf16"
        kinds = {e.dtype.name for e in f.tensors.values()}
        assert kinds == {"F32"}, kinds


def test_unknown_dtype_is_refused(ws, tmp_path):  # noqa: F811
    r = pretrain(*small(ws, "--run-dir", tmp_path / "r", "--steps", 2, "--dtype", "fp16"))
    assert r.returncode == 2 and "'fp16' is not one of 'f32', 'f64', 'bf16'" in r.stderr
    from ref.gates import GateError, resolve_config
    from ref.run import RunConfig
    with pytest.raises(GateError, match="--dtype fp16: must be one of f32, f64, bf16"):
        resolve_config(RunConfig(dataset="d", run_dir="r", arch="qwen2-tiny", dtype="fp16"))


def test_bench_takes_dtype_bf16(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    from oracles import make_hf_model
    model = make_hf_model(tmp_path / "m", "qwen2")
    root = Path(__file__).resolve().parents[1]
    runs = {}
    for dtype in ("bf16", "f32"):
        r = subprocess.run([sys.executable, "cli.py", "bench", str(model), "--dtype", dtype,
                            "--iterations", "1", "--warmup", "0", "--prompt-tokens", "8",
                            "--gen-tokens", "2", "--json"], cwd=root, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[dtype] = json.loads(r.stdout)
    assert runs["bf16"]["dtype"] == "bf16" and runs["f32"]["dtype"] == "f32"
    # the model bench loads for bf16 multiplies bfloat16 operands: its logits differ from f32
    import cli
    ids = np.arange(8)[None]
    (mb, vb, _), (m32, v32, _) = cli._load(str(model), "cpu", "bf16"), cli._load(str(model), "cpu", "f32")
    assert mb.matmul == "bf16" and m32.matmul is None and mb.dtype == m32.dtype == np.float32
    err = _rel(mb.forward(ids), m32.forward(ids).astype(np.float64))
    vb.close()
    v32.close()
    assert U / 20 < err <= 4 * U
