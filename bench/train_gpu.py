"""Training throughput on a GPU: the hand-written model on CuPy (fused kernels, --dtype f32 or
bf16 mixed precision) against PyTorch eager on transformers' model (float32 weights, bf16
autocast for --dtype bf16), same config, same initial weights, same batch, in the same run.

    python bench/train_gpu.py                                  # qwen2-0.5b, 4 x 1024, bf16, cuda
    python bench/train_gpu.py --preset qwen2-tiny --seq 64 --batch 2 --steps 2 --device cpu

A step is the whole optimizer step: forward, loss, backward, gradient clipping to norm 1 and
AdamW. tokens/s = batch * seq / median step time (after --warmup untimed steps).

MFU: model FLOPs per second over the measured peak of a large square matmul on the same
device (float32 with CuPy, bfloat16 with PyTorch), both reported. Model FLOPs per token:
6 x (parameters in matrix products: every projection and the output head) + 6 x layers x seq
x width for causal attention (QK^T and PV, forward and backward, half the square).

Memory: on a GPU, the bytes CuPy's pool holds after our steps (the pool keeps what it
allocated, so this is the peak) and torch.cuda.max_memory_allocated for the peer; on the CPU
the process's peak RSS after each part.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--hidden-size", type=int, help="override the preset's width (with the shape flags below)")
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--num-heads", type=int)
    ap.add_argument("--num-kv-heads", type=int)
    ap.add_argument("--intermediate-size", type=int)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["f32", "bf16"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                    help="transformers attention implementation for the PyTorch peer")
    ap.add_argument("--no-torch", action="store_true", help="measure our model only")
    ap.add_argument("--peak-n", type=int, default=None,
                    help="matmul size for the peak (default 8192 on cuda, 1024 on cpu)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", help="also write the JSON object to this file")
    return ap.parse_args(argv)


def model_flops_per_token(cfg, seq: int) -> float:
    """6 N + 6 L T C (see the module notes), N the parameters of the matrix products."""
    shapes = cfg.tensor_shapes()
    matmul = sum(int(_prod(s)) for n, s in shapes.items() if len(s) == 2 and "embed_tokens" not in n)
    head = cfg.vocab_size * cfg.hidden_size          # the output projection (tied or not)
    if "lm_head.weight" in shapes:
        matmul -= head
    matmul += head
    attn = cfg.num_layers * seq * cfg.num_heads * cfg.head_dim
    return 6.0 * matmul + 6.0 * attn


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _median_time(fn, sync, repeats: int = 3) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peaks(backend, n: int) -> dict:
    """FLOP/s of an n x n x n matmul: float32 on our array module, bfloat16 with torch."""
    import numpy as np
    xp = backend.xp
    rng = np.random.default_rng(0)
    a = backend.to_device(rng.standard_normal((n, n), dtype=np.float32))
    b = backend.to_device(rng.standard_normal((n, n), dtype=np.float32))
    out = {"n": n, "f32": 2.0 * n ** 3 / _median_time(lambda: xp.matmul(a, b), backend.synchronize)}
    del a, b
    try:
        import torch
        dev = "cuda" if backend.is_gpu else "cpu"
        ta = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        tb = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        out["bf16"] = 2.0 * n ** 3 / _median_time(lambda: ta @ tb, sync)
        del ta, tb
    except ImportError:
        out["bf16"] = None
    return out


def run_ours(cfg, backend, args, ids, targets, init: dict) -> dict:
    from ref.model import Model
    from ref.optim import AdamW, clip_grad_norm
    from ref.precision import matmul_precision
    model = Model(cfg, {k: v.copy() for k, v in init.items()} if not backend.is_gpu else init,
                  backend=backend, matmul=matmul_precision(args.dtype))
    opt = AdamW(model.params)
    d_ids, d_targets = backend.to_device(ids), backend.to_device(targets)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        backend.synchronize()
        t0 = time.perf_counter()
        loss, grads = model.loss_and_grads(d_ids, d_targets)
        clip_grad_norm(grads, 1.0)
        opt.step(model.params, grads, args.lr)
        del grads
        backend.synchronize()
        dt = time.perf_counter() - t0
        losses.append(loss)
        if i >= args.warmup:
            times.append(dt)
    out = {"step_seconds": times, "losses": losses, "ops": type(model.ops).__name__
           if not hasattr(model.ops, "__file__") else "ref.ops"}
    if backend.is_gpu:
        from ref import kernels
        out["kernels"] = {op.name: op.ok for op in kernels.ALL}
        pool = backend.xp.get_default_memory_pool()
        out["memory_bytes"] = int(pool.total_bytes())
    else:
        out["memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del model, opt
    if backend.is_gpu:
        backend.xp.get_default_memory_pool().free_all_blocks()
    return out


def run_torch(cfg, state, args, ids, targets) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers
    dev = "cuda" if args.device == "cuda" else "cpu"
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    hf_cfg._attn_implementation = args.attn
    peer = getattr(transformers, cfg.hf_architecture)(hf_cfg).float()
    missing, unexpected = peer.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                               strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    peer = peer.to(dev).train()
    opt = torch.optim.AdamW(peer.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    t_ids, t_targets = torch.from_numpy(ids).to(dev), torch.from_numpy(targets).to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            logits = peer(input_ids=t_ids).logits
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), t_targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        opt.step()
        sync()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(dt)
    out = {"step_seconds": times, "losses": losses, "torch": torch.__version__,
           "transformers": transformers.__version__, "attn": args.attn}
    out["memory_bytes"] = (int(torch.cuda.max_memory_allocated()) if dev == "cuda" else
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    del peer, opt
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def main(args: argparse.Namespace) -> dict:
    import numpy as np
    from apr.config import preset
    from ref.backend import get_backend
    shape = {k: getattr(args, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                          "intermediate_size", "vocab_size") if getattr(args, k)}
    cfg = preset(args.preset).replace(**shape)
    if args.seq > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=args.seq)
    backend = get_backend(args.device)
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1))
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    peaks = matmul_peaks(backend, args.peak_n or (8192 if backend.is_gpu else 1024))
    from ref.model import Model
    init = Model.init_random(cfg, seed=args.seed).params        # on the host, float32
    ours = run_ours(cfg, backend, args, ids, targets, init)
    result = {"preset": args.preset, "shape": shape, "params": cfg.param_count(),
              "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "device": backend.description,
              "steps": args.steps, "warmup": args.warmup, "matmul_peak_flops": peaks,
              "model_flops_per_token": model_flops_per_token(cfg, args.seq), "ours": ours}
    tokens_per_step = args.batch * args.seq
    parts = {"ours": ours}
    if not args.no_torch:
        parts["torch"] = result["torch"] = run_torch(cfg, init, args, ids, targets)
    for name, part in parts.items():
        tps = tokens_per_step / statistics.median(part["step_seconds"])
        part["tokens_per_second"] = tps
        flops = tps * result["model_flops_per_token"]
        part["model_flops_per_second"] = flops
        part["mfu_vs_f32_peak"] = flops / peaks["f32"]
        part["mfu_vs_bf16_peak"] = flops / peaks["bf16"] if peaks.get("bf16") else None
    if "torch" in parts:
        result["ratio_ours_over_torch"] = ours["tokens_per_second"] / parts["torch"]["tokens_per_second"]
        result["first_loss_difference"] = abs(ours["losses"][0] - parts["torch"]["losses"][0])
    result.update({
        "loadavg_1min": os.getloadavg()[0], "numpy": np.__version__,
        "cupy": getattr(backend.xp, "__version__", None) if backend.is_gpu else None,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d %H:%M"),
    })
    return result


def _flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e11 else f"{x / 1e9:.2f} GFLOP/s"


def _gb(n) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def report(r: dict) -> str:
    peaks = r["matmul_peak_flops"]
    lines = [f"training step, {r['preset']} ({r['params'] / 1e6:.1f}M params), batch {r['batch']} x "
             f"{r['seq']}, {r['dtype']}, {r['device']}, median of {r['steps']} steps after {r['warmup']}",
             f"  measured matmul peak ({peaks['n']}^3): f32 {_flops(peaks['f32'])}"
             + (f", bf16 {_flops(peaks['bf16'])}" if peaks.get("bf16") else "")]
    for name, label in (("ours", "ours (CuPy/NumPy)"), ("torch", "torch eager")):
        p = r.get(name)
        if not p:
            continue
        mfu = f"MFU {100 * p['mfu_vs_f32_peak']:.1f}% of f32 peak"
        if p.get("mfu_vs_bf16_peak") is not None:
            mfu += f", {100 * p['mfu_vs_bf16_peak']:.1f}% of bf16 peak"
        lines.append(f"  {label:<18} {p['tokens_per_second']:10.0f} tokens/s  {mfu}; memory "
                     f"{_gb(p['memory_bytes'])}; losses {p['losses'][0]:.4f} -> {p['losses'][-1]:.4f}")
    if "ratio_ours_over_torch" in r:
        lines.append(f"  ratio ours/torch: {r['ratio_ours_over_torch']:.3f}; first-step loss difference "
                     f"{r['first_loss_difference']:.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    args = parse_args()
    result = main(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result) if args.json else report(result))
