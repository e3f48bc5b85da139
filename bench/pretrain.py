"""Training throughput of `pretrain` on the CPU, and how much of its wall time is spent outside
the model step (data, metrics.jsonl, progress, checkpoints, loss.png): target < 5%.

Peer, measured in the same run on the same batches: a bare loop of the same model step
(forward + backward, gradient clipping, AdamW update) with no data pipeline, no logging, no
evaluation and no checkpoints, timed before and after the pretrain run (the faster counts). The ratio bare / pretrain tokens/s is the trainer's overhead as
a throughput loss.

    python bench/pretrain.py                          # qwen2-tiny and qwen2-25m, 1 BLAS thread
    python bench/pretrain.py --presets qwen2-tiny --threads 2 --json

The corpus is Python's standard library (the first --files modules), tokenized with a
512-token byte-level BPE trained on it here (prepare-data's rate is reported too).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# (preset, batch, seq, steps, eval_every, val_batches, save_every)
CASES = {
    "qwen2-tiny": (8, 128, 300, 100, 4, 100),
    "llama-tiny": (8, 128, 300, 100, 4, 100),
    "qwen2-25m": (4, 128, 48, 24, 2, 48),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="qwen2-tiny,qwen2-25m",
                    help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    ap.add_argument("--files", type=int, default=80, help="stdlib modules in the corpus")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from ref.data import TrainBatches, load_tokenizer, open_prepared, prepare_dataset  # noqa: E402
from ref.model import Model  # noqa: E402
from ref.optim import AdamW, clip_grad_norm  # noqa: E402
from ref.train import RunConfig, start_run, train, write_checkpoint  # noqa: E402


@dataclass
class Case:
    preset: str
    params: int
    batch: int
    seq: int
    steps: int
    pretrain_tokens_per_s: float       # whole loop: steps, evaluations, checkpoints, logging
    train_only_tokens_per_s: float     # the same, without evaluation time
    bare_tokens_per_s: float           # peer: model step + clip + AdamW only
    overhead_share: float              # outside model step and evaluation
    eval_share: float
    shares: dict[str, float]
    checkpoint_seconds: float          # one step checkpoint with optimizer state
    checkpoint_mb: float


def build_corpus(root: Path, files: int) -> tuple[Path, Path]:
    """(corpus dir, tokenizer.json): stdlib modules and a 512-token BPE trained on them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    corpus = root / "corpus"
    corpus.mkdir()
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:files]:
        shutil.copy(f, corpus / f.name)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(p) for p in corpus.iterdir()], trainer)
    path = root / "tokenizer.json"
    path.write_text(tok.to_str(), encoding="utf-8")
    return corpus, path


def bare_loop(preset: str, data_dir: Path, batch: int, seq: int, steps: int) -> float:
    """tokens/s of the model step alone on the batches pretrain reads (peer)."""
    from apr.config import preset as get_preset
    model = Model.init_random(get_preset(preset), seed=0)
    opt = AdamW(model.params)
    batches = TrainBatches(open_prepared(data_dir).train, batch, seq, seed=0)
    held = [next(batches) for _ in range(steps)]
    start = time.perf_counter()
    for b in held:
        loss, grads = model.loss_and_grads(b.inputs, b.targets)
        clip_grad_norm(grads, 1.0)
        opt.step(model.params, grads, 1e-4)
        del grads
    return steps * batch * seq / (time.perf_counter() - start)


def run_case(preset: str, root: Path, data_dir: Path, tok: Path) -> Case:
    batch, seq, steps, eval_every, val_batches, save_every = CASES[preset]
    cfg = RunConfig(dataset=str(data_dir), run_dir=str(root / f"run-{preset}"), tokenizer=str(tok),
                    arch=preset, steps=steps, batch_size=batch, seq_length=seq, lr=1e-3,
                    eval_every=eval_every, val_batches=val_batches, save_every=save_every,
                    device="cpu", allow_data_starvation=True)
    bare_before = bare_loop(preset, data_dir, batch, seq, steps)
    run = start_run(cfg, force=True)
    summary = train(run)
    t = summary.timings
    start = time.perf_counter()
    path = write_checkpoint(run, root / f"probe-{preset}.apr", "step", with_optimizer=True)
    ckpt_seconds = time.perf_counter() - start
    bare = max(bare_before, bare_loop(preset, data_dir, batch, seq, steps))   # before and after
    tokens = steps * batch * seq
    shares = {k: v / t["total"] for k, v in t.items() if k != "total"}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return Case(preset, summary.params, batch, seq, steps, summary.tokens_per_second,
                tokens / (t["total"] - t["eval"]), bare, summary.overhead_share,
                t["eval"] / t["total"], shares, ckpt_seconds, path.stat().st_size / 1e6)


def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="apr-bench-pretrain-") as tmp:
        root = Path(tmp)
        corpus, tok = build_corpus(root, args.files)
        start = time.perf_counter()
        m = prepare_dataset(corpus, load_tokenizer(tok), root / "data", val_fraction=0.1)
        prep_seconds = time.perf_counter() - start
        cases = [run_case(p, root, root / "data", tok) for p in args.presets.split(",")]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"NumPy {np.__version__}",
        "threads": args.threads,
        "load_average": os.getloadavg()[0],
        "corpus_tokens": m.train.tokens + m.val.tokens,
        "prepare_tokens_per_s": (m.train.tokens + m.val.tokens) / prep_seconds,
        "cases": [c.__dict__ for c in cases],
    }


def report(r: dict) -> None:
    print(f"{r['date']}  {r['machine']}, {r['threads']} BLAS thread(s), load {r['load_average']:.2f}")
    print(f"prepare-data: {r['corpus_tokens']:,} tokens at {r['prepare_tokens_per_s']:,.0f} tokens/s")
    for c in r["cases"]:
        s = c["shares"]
        print(f"{c['preset']} ({c['params']:,} params), {c['steps']} steps x {c['batch']} x {c['seq']}: "
              f"pretrain {c['pretrain_tokens_per_s']:,.0f} tok/s (without eval "
              f"{c['train_only_tokens_per_s']:,.0f}), bare step {c['bare_tokens_per_s']:,.0f} tok/s "
              f"(ratio {c['bare_tokens_per_s'] / c['train_only_tokens_per_s']:.3f})")
        print(f"    outside model step + eval: {100 * c['overhead_share']:.2f}% (target < 5%); "
              + ", ".join(f"{k} {100 * v:.2f}%" for k, v in s.items()))
        print(f"    one checkpoint with optimizer state: {c['checkpoint_mb']:.1f} MB in "
              f"{c['checkpoint_seconds']:.2f} s")


if __name__ == "__main__":
    result = main(ARGS)
    if ARGS.json:
        print(json.dumps(result, indent=1))
    else:
        report(result)
