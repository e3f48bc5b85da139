"""The ref/ code on CuPy against the NumPy path (float32; relative 1e-4):

* every fused kernel of `ref.kernels` against its array-code reference, on shapes of a
  Qwen2-0.5B training step (sequence 1024), and its self-check passes (no fallback), the
  bf16 products on TF32 tensor cores among them;
* logits, loss and every gradient of Llama and Qwen2 models on the GPU (with the kernels,
  with the fused attention too, and without kernels: plain `ref.ops` on CuPy) against the
  same model on NumPy;
* bf16 mixed precision on the GPU against bf16 on the CPU and against float64;
* a 20-step training run on the GPU against the same run on the CPU, loss by loss.

Run by bench/gpu_check.sh (APR_REF_GPU_TESTS=1); not part of the default test run."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from apr.config import preset
from ref import kernels, ops
from ref.model import Model
from ref.precision import round_bf16

U = 2.0 ** -8          # bfloat16 unit roundoff
RTOL = 1e-4


def rel(a, b) -> float:
    """Normwise relative difference ||a - b|| / ||b|| (in float64, on the host)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def maxrel(a, b) -> float:
    """max |a - b| / max |b|: the largest elementwise difference against the tensor's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


# --------------------------------------------------------------------------- kernels

def _kernel_cases(cp):
    """(op, make(seed) -> args) on the shapes of a Qwen2-0.5B step, batch 4 x 1024."""
    def arr(seed, *shape, scale=1.0):
        return cp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * scale)

    def rope_args(seed, rope_type):
        ang = np.random.default_rng(seed).uniform(-50, 50, (1024, 32))
        x = arr(seed + 1, 4, 1024, 14, 64).transpose(0, 2, 1, 3)       # a head view, as in the model
        return x, cp.asarray(np.cos(ang), cp.float32), cp.asarray(np.sin(ang), cp.float32), rope_type

    def ce_args(seed):
        z = arr(seed, 4096, 151936, scale=3.0)
        t = cp.asarray(np.random.default_rng(seed).integers(0, 151936, 4096))
        t[::17] = ops.IGNORE_INDEX
        return z, t, ops.IGNORE_INDEX

    def adamw_args(seed):
        v = cp.abs(arr(seed + 3, 896, 4864, scale=1e-3))
        return (arr(seed, 896, 4864, scale=0.02), arr(seed + 1, 896, 4864, scale=1e-3),
                arr(seed + 2, 896, 4864, scale=1e-4), v, 1 - 3e-4 * 0.1, 0.9, 0.95, 1e-8,
                3e-4 / (1 - 0.9 ** 10), (1 - 0.95 ** 10) ** 0.5)

    def norm_bwd(seed):
        _, cache = kernels.rmsnorm_forward_reference(arr(seed, 4, 1024, 896), arr(seed + 1, 896), 1e-6)
        return arr(seed + 2, 4, 1024, 896), cache

    def swiglu_bwd(seed):
        g, u = arr(seed, 4096, 4864, scale=3.0), arr(seed + 1, 4096, 4864)
        return arr(seed + 2, 4096, 4864), (g, u, ops.ACTIVATIONS["silu"], None)   # gated_mlp_forward's form

    def ce_bwd(seed):
        _, cache = kernels.cross_entropy_forward_reference(*ce_args(seed))
        return 1.0, cache

    def attn_args(seed, window=0, shape=(4, 14, 2, 1024, 1024, 64)):
        b, h, kh, t, s, d = shape
        return arr(seed, b, h, t, d), arr(seed + 1, b, kh, s, d), arr(seed + 2, b, kh, s, d), window, None

    def attn_bwd(seed, window=0):
        q, k, v, w, scale = attn_args(seed, window)
        _, cache = kernels.attention_forward_reference(q, k, v, w, scale)
        return arr(seed + 3, *q.shape), cache

    return [
        (kernels.attention_fused_forward, lambda s: attn_args(s)),
        (kernels.attention_fused_forward, lambda s: attn_args(s, window=256)),
        (kernels.attention_fused_forward, lambda s: attn_args(s, shape=(2, 32, 8, 512, 512, 128))),
        (kernels.attention_fused_forward, lambda s: attn_args(s, shape=(3, 14, 2, 1, 300, 64))),  # decode
        (kernels.attention_fused_backward, lambda s: attn_bwd(s)),
        (kernels.attention_fused_backward, lambda s: attn_bwd(s, window=256)),
        (kernels.rmsnorm_forward, lambda s: (arr(s, 4, 1024, 896), arr(s + 1, 896), 1e-6)),
        (kernels.rmsnorm_backward, norm_bwd),
        (kernels.rope_forward, lambda s: rope_args(s, ops.ROPE_HALVES)),
        (kernels.rope_forward, lambda s: rope_args(s, ops.ROPE_ADJACENT)),
        (kernels.rope_backward, lambda s: (lambda a: (a[0], a[1:]))(rope_args(s, ops.ROPE_HALVES))),
        (kernels.rope_backward, lambda s: (lambda a: (a[0], a[1:]))(rope_args(s, ops.ROPE_ADJACENT))),
        (kernels.swiglu_forward, lambda s: (arr(s, 4096, 4864, scale=3.0), arr(s + 1, 4096, 4864), "silu")),
        (kernels.swiglu_backward, swiglu_bwd),
        (kernels.cross_entropy_forward, ce_args),
        (kernels.cross_entropy_backward, ce_bwd),
        (kernels.adamw_step, adamw_args),
        (kernels.bf16_matmul, lambda s: (round_bf16(arr(s, 4096, 896)), round_bf16(arr(s + 1, 4864, 896)).T)),
    ]


@pytest.mark.parametrize("index", range(18))
def test_kernel_against_reference(gpu, report, index):
    cp = gpu.xp
    op, make = _kernel_cases(cp)[index]
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a failed self-check warns: that fails here
        ref_args, ker_args = make(0), make(0)
        want = [host(a) for a in op.outputs(ref_args, op.reference(*ref_args))]
        del ref_args
        got = [host(a) for a in op.outputs(ker_args, op(*ker_args))]   # through the dispatch
    assert op.ok is True, op.failure
    errs = [maxrel(g, w) for g, w in zip(got, want)]
    report.setdefault("kernels", {})[f"{index}: {op.name}"] = errs
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.allclose(g, w, rtol=RTOL, atol=RTOL * max(float(np.abs(w).max()), 1e-30))


# --------------------------------------------------------------------------- the model

MODELS = {
    "llama-tiny": preset("llama-tiny"),
    "qwen2-tiny": preset("qwen2-tiny"),
    "qwen2-25m": preset("qwen2-25m"),
    "llama-wide": preset("llama-tiny").replace(hidden_size=256, num_heads=8, num_kv_heads=2,
                                               intermediate_size=704, vocab_size=4096),
}


def _pair(name, gpu, seed=1, matmul=None):
    cfg = MODELS[name]
    cpu = Model.init_random(cfg, seed=seed, matmul=matmul)
    dev = Model(cfg, cpu.params, backend=gpu, matmul=matmul)
    return cfg, cpu, dev


def _batch(cfg, t=128):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (2, t))
    targets = rng.integers(0, cfg.vocab_size, (2, t))
    targets[1, :5] = ops.IGNORE_INDEX
    return ids, targets


@pytest.mark.parametrize("mode", ["kernels", "fused-attention", "plain-ops"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_gradients_equal_numpy(gpu, report, monkeypatch, name, mode):
    use_kernels = mode != "plain-ops"
    monkeypatch.setenv("APR_REF_KERNELS", "1" if use_kernels else "0")
    monkeypatch.setenv("APR_REF_ATTENTION", "fused" if mode == "fused-attention" else "")
    cfg, cpu, dev = _pair(name, gpu)
    assert (dev.ops is kernels.FUSED_OPS) == use_kernels
    ids, targets = _batch(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits = host(dev.forward(ids))
        loss, grads = dev.loss_and_grads(ids, targets)
    want_logits = cpu.forward(ids)
    want_loss, want_grads = cpu.loss_and_grads(ids, targets)
    errs = {"logits": maxrel(logits, want_logits), "loss": abs(loss - want_loss) / abs(want_loss)}
    errs.update({k: maxrel(host(grads[k]), want_grads[k]) for k in want_grads})
    report.setdefault("model", {})[f"{name} {mode}"] = {
        "max": max(errs.values()), "logits": errs["logits"], "loss": errs["loss"]}
    assert set(grads) == set(want_grads)
    bad = {k: v for k, v in errs.items() if not v <= RTOL}
    assert not bad, bad
    if use_kernels:
        for op in (kernels.rmsnorm_forward, kernels.rmsnorm_backward, kernels.rope_forward,
                   kernels.rope_backward, kernels.swiglu_forward, kernels.swiglu_backward,
                   kernels.cross_entropy_forward, kernels.cross_entropy_backward):
            assert op.ok is True, (op.name, op.failure)
    if mode == "fused-attention" and MODELS[name].head_dim % 32 == 0:
        for op in (kernels.attention_fused_forward, kernels.attention_fused_backward):
            assert op.ok is True, (op.name, op.failure)


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-25m"])
def test_bf16_on_the_gpu(gpu, report, name):
    """Operands rounded the same way on both sides; only float32 summation order differs,
    which can move an operand across a bfloat16 rounding boundary now and then (one
    bfloat16 step, relative u, in that operand), so the two runs agree far within u."""
    cfg, cpu, dev = _pair(name, gpu, matmul="bf16")
    ids, targets = _batch(cfg)
    logits, want = host(dev.forward(ids)), cpu.forward(ids)
    loss, grads = dev.loss_and_grads(ids, targets)
    want_loss, want_grads = cpu.loss_and_grads(ids, targets)
    exact = Model(cfg, {k: v.astype(np.float64) for k, v in cpu.params.items()}, dtype=np.float64)
    errs = {"logits vs cpu bf16": rel(logits, want), "logits vs f64": rel(logits, exact.forward(ids)),
            "grads vs cpu bf16": max(rel(host(grads[k]), want_grads[k]) for k in grads)}
    report.setdefault("bf16", {})[name] = errs
    assert kernels.bf16_matmul.ok is True, kernels.bf16_matmul.failure     # on tensor cores
    assert errs["logits vs cpu bf16"] <= U / 4 and errs["grads vs cpu bf16"] <= U / 4
    assert U / 20 < errs["logits vs f64"] <= 4 * U
    assert abs(loss - want_loss) <= U * abs(want_loss)


# --------------------------------------------------------------------------- training

def _train(tmp, device, dtype="f32"):
    import shutil
    from oracles import stdlib_files, tokenizer_json
    from ref.data import load_tokenizer, prepare_dataset
    from ref.train import RunConfig, start_run, train
    data = tmp / "data"
    if not data.exists():
        (tmp / "corpus").mkdir(parents=True)
        for f in stdlib_files(16):
            shutil.copy(f, tmp / "corpus" / f.name)
        (tmp / "tokenizer.json").write_text(tokenizer_json(400), encoding="utf-8")
        prepare_dataset(tmp / "corpus", load_tokenizer(tmp / "tokenizer.json"), data, val_fraction=0.3)
    cfg = RunConfig(dataset=str(data), run_dir=str(tmp / f"run-{device}-{dtype}"),
                    tokenizer=str(tmp / "tokenizer.json"), arch="qwen2-tiny", steps=20,
                    batch_size=8, seq_length=64, lr=3e-3, warmup_steps=4, eval_every=10,
                    val_batches=4, save_every=20, device=device, seed=0, dtype=dtype,
                    allow_data_starvation=True)
    run = start_run(cfg, force=True)
    summary = train(run)
    import json
    records = [json.loads(line) for line in (tmp / f"run-{device}-{dtype}" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("loss") is not None], summary


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_twenty_training_steps_match_the_cpu(gpu, report, tmp_path_factory, dtype):
    tmp = tmp_path_factory.getbasetemp() / "train"
    cpu_losses, _ = _train(tmp, "cpu", dtype)
    gpu_losses, summary = _train(tmp, "cuda", dtype)
    assert summary.device.startswith("cuda")
    diffs = [abs(a - b) / abs(b) for a, b in zip(gpu_losses, cpu_losses)]
    report.setdefault("training", {})[dtype] = {"cpu": cpu_losses, "gpu": gpu_losses,
                                                "max_rel_diff": max(diffs)}
    assert len(gpu_losses) == len(cpu_losses) == 20
    assert gpu_losses[-1] < gpu_losses[0] - 1.0
    # float32: the runs differ only in summation order; bf16 can flip an operand's rounding
    assert max(diffs) <= (1e-3 if dtype == "f32" else 2e-2), diffs


def test_bf16_rounding_kernel_is_ml_dtypes(gpu, report):
    """The rounding kernel against ml_dtypes bit for bit, on a million random bit patterns
    (every exponent, subnormals, infinities, NaNs) and the ties."""
    import ml_dtypes
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2 ** 32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x[:4] = [1 + 2 ** -8, 1 + 3 * 2 ** -8, np.finfo(np.float32).max, -np.inf]
    got = host(kernels.bf16_round(gpu.xp.asarray(x)))
    assert kernels.bf16_round.ok is True, kernels.bf16_round.failure
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
