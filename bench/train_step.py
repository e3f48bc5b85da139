"""Training-step throughput: the NumPy reference (forward + backward by hand) against PyTorch
CPU eager on transformers' Qwen2ForCausalLM, same config, same weights, same loss, same
thread count, measured in the same run with the steps interleaved (so both see the same
machine load).

    python bench/train_step.py                       # qwen2-25m, batch 8 x 256, float32
    python bench/train_step.py --steps 5 --threads 2 --json

A step is: logits, mean cross-entropy over the shifted targets, and the gradient of every
parameter (no optimizer update). tokens/s = batch * seq / median step time. Our step splits
the batch's rows over --workers threads (default: --threads), each with single-threaded BLAS
(`Model.loss_and_grads(workers=)`); --workers 1 is the single call with BLAS's own threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen2-25m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workers", type=int, default=None,
                    help="threads over which our step splits the batch's rows "
                         "(Model.loss_and_grads(workers=); default: --threads)")
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                    help="transformers attention implementation for the PyTorch peer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # BLAS thread pools read these when numpy / torch are first imported.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from apr.config import preset  # noqa: E402
from ref.backend import get_backend  # noqa: E402
from ref.model import Model  # noqa: E402


def torch_peer(model: Model, attn: str) -> torch.nn.Module:
    """transformers' Qwen2/Llama model with our model's weights (float32, train mode)."""
    cfg = model.config
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    hf_cfg._attn_implementation = attn
    cls = getattr(transformers, cfg.hf_architecture)
    peer = cls(hf_cfg).float().train()
    state = {name: torch.from_numpy(np.asarray(a)) for name, a in model.params.items()}
    missing, unexpected = peer.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return peer


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    ours = Model.init_random(cfg, seed=args.seed, backend=get_backend("cpu"), dtype=np.float32)
    peer = torch_peer(ours, args.attn)
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1))
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    t_ids, t_targets = torch.from_numpy(ids), torch.from_numpy(targets)

    workers = (args.threads if args.workers is None else args.workers) if ours.can_split_rows() else 1

    def step_ours() -> float:
        loss, _grads = ours.loss_and_grads(ids, targets, workers=workers)
        return loss

    def step_torch() -> float:
        peer.zero_grad(set_to_none=True)
        logits = peer(input_ids=t_ids).logits
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), t_targets.reshape(-1))
        loss.backward()
        return loss.item()

    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {"numpy": [], "torch": []}
    losses: dict[str, float] = {}
    for i in range(args.warmup + args.steps):
        for name, fn in (("numpy", step_ours), ("torch", step_torch)):
            t0 = time.perf_counter()
            losses[name] = fn()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)
    tokens_per_step = args.batch * args.seq
    tps = {k: tokens_per_step / statistics.median(v) for k, v in times.items()}
    return {
        "preset": args.preset, "params": cfg.param_count(), "batch": args.batch, "seq": args.seq,
        "dtype": "float32", "threads": args.threads, "workers": workers, "torch_attn": args.attn,
        "steps": args.steps, "warmup": args.warmup,
        "numpy_step_seconds": times["numpy"], "torch_step_seconds": times["torch"],
        "numpy_tokens_per_second": tps["numpy"], "torch_tokens_per_second": tps["torch"],
        "ratio_numpy_over_torch": tps["numpy"] / tps["torch"],
        "loss_numpy": losses["numpy"], "loss_torch": losses["torch"],
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "numpy": np.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "date": time.strftime("%Y-%m-%d"),
    }


def report(r: dict) -> str:
    return "\n".join([
        f"train step, {r['preset']} ({r['params'] / 1e6:.1f}M params), batch {r['batch']} x {r['seq']}, "
        f"float32, {r['threads']} threads (ours: rows in {r['workers']} worker thread(s)), "
        f"median of {r['steps']} steps",
        f"  numpy reference : {r['numpy_tokens_per_second']:9.1f} tokens/s  "
        f"(steps {', '.join(f'{s:.2f}' for s in r['numpy_step_seconds'])} s, loss {r['loss_numpy']:.5f})",
        f"  torch eager ({r['torch_attn']}): {r['torch_tokens_per_second']:9.1f} tokens/s  "
        f"(steps {', '.join(f'{s:.2f}' for s in r['torch_step_seconds'])} s, loss {r['loss_torch']:.5f})",
        f"  ratio numpy/torch: {r['ratio_numpy_over_torch']:.3f}   "
        f"(1-min load average {r['loadavg_1min_before_after'][0]:.2f} before, "
        f"{r['loadavg_1min_before_after'][1]:.2f} after; other processes skew both)",
    ])


if __name__ == "__main__":
    result = main(ARGS)
    print(json.dumps(result) if ARGS.json else report(result))
