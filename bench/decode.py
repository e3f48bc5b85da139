"""Benchmark: decode tokens/s of the reference model (the `bench` command's loop: greedy,
KV cache, float32, NumPy) against llama.cpp on the F32 GGUF of the same model, same threads.

    python bench/decode.py [--preset qwen2-25m] [--threads 2] [--prompt 64] [--gen 64]
                           [--rounds 5] [--profile]

llama.cpp runs in a child process (llama-cpp-python), feeding one token per eval() after the
same prompt, so both sides do the same work: a prefill and then single-token steps.
``--rounds N``: N rounds, each llama.cpp's runs then ours, alternated; ``ratio`` is the median
of the rounds' ratios (on a small shared machine one round moves by +-20%), ``round_ratios``
lists them. ``--profile``: afterwards, one more of our runs under pyinstrument (if installed),
its call tree printed to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_CHILD = """
import json, sys, time
from llama_cpp import Llama
path, prompt, gen, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(path, n_ctx=len(prompt) + gen + 8, n_batch=len(prompt), n_threads=threads, logits_all=True,
            n_threads_batch=threads, type_k=0, type_v=0, verbose=False)
runs = []
for _ in range(3):
    llm.reset()
    t = time.perf_counter(); llm.eval(prompt); prefill = time.perf_counter() - t
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
    t = time.perf_counter()
    for _ in range(gen):
        llm.eval([tok]); tok = int(llm.scores[llm.n_tokens - 1].argmax())
    runs.append({"prefill_s": prefill, "decode_s": time.perf_counter() - t})
print(json.dumps(runs))
"""


def products_only_tok_s(model, steps: int = 64, repeats: int = 5) -> float:
    """Tokens/s of a decode step that is nothing but its matrix-vector products: the model's
    decode weights (`Model.decode_weights`: 4 matrices per layer and the head) each times one
    activation vector, in a loop, as a decode step multiplies them, and nothing else. A bound
    on what this NumPy decode can reach at these threads, whatever its other work costs."""
    import numpy as np
    w = model.decode_weights()
    mats = [wt for layer in w.layers for wt, _ in layer.values()] + [w.head]
    xs = {m.shape[0]: np.ones((1, m.shape[0]), m.dtype) for m in mats}
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            for m in mats:
                xs[m.shape[0]] @ m
        best = min(best, (time.perf_counter() - t) / steps)
    return 1.0 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2-25m")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="alternated rounds; ratio = their median")
    ap.add_argument("--profile", action="store_true", help="profile one more run of ours")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import numpy as np
    from apr.config import preset
    from apr.container import TensorSource, write_apr
    from apr.convert import convert
    from apr.dtypes import dtype_by_name
    from ref.generate import generate
    from ref.load import load_model

    cfg = preset(args.preset)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arrays = {n: (rng.standard_normal(s, dtype=np.float32) * 0.02) if len(s) > 1 else np.ones(s, np.float32)
                  for n, s in cfg.tensor_shapes(include_lm_head=True).items()}
        if cfg.tie_word_embeddings:
            arrays["lm_head.weight"] = arrays["model.embed_tokens.weight"]
        write_apr(tmp / "m.apr", {"model_type": cfg.family, **cfg.to_apr_metadata()},
                  [TensorSource(n, dtype_by_name("F32"), a.shape, (lambda a=a: a))
                   for n, a in arrays.items()])
        convert(tmp / "m.apr", tmp / "m.gguf", allow_no_tokenizer=True)
        prompt = rng.integers(0, cfg.vocab_size, args.prompt).tolist()

        model, _ = load_model(tmp / "m.gguf")
        llama_runs, ours, round_ratios = [], [], []
        for _ in range(max(1, args.rounds)):
            out = subprocess.run([sys.executable, "-c", LLAMA_CHILD, str(tmp / "m.gguf"),
                                  json.dumps(prompt), str(args.gen), str(args.threads)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"llama.cpp failed:\n{out.stderr[-3000:]}")
            theirs = json.loads(out.stdout.strip().splitlines()[-1])[1:]     # after a warm-up
            mine = [generate(model, prompt, args.gen) for _ in range(4)][1:]
            llama_runs += theirs
            ours += mine
            round_ratios.append(max(r.decode_tokens_per_second for r in mine)
                                / max(args.gen / r["decode_s"] for r in theirs))
        products = products_only_tok_s(model)
        if args.profile:
            from pyinstrument import Profiler
            profiler = Profiler(interval=0.0005)
            profiler.start()
            generate(model, prompt, args.gen)
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False), file=sys.stderr)
    ours_decode = max(r.decode_tokens_per_second for r in ours)
    llama_decode = max(args.gen / r["decode_s"] for r in llama_runs)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "preset": args.preset, "params": cfg.param_count(), "threads": args.threads,
        "prompt_tokens": args.prompt, "gen_tokens": args.gen,
        "ours_decode_tok_s": round(ours_decode, 1), "llama_cpp_decode_tok_s": round(llama_decode, 1),
        "ratio": round(float(np.median(round_ratios)), 3),
        "round_ratios": [round(x, 3) for x in round_ratios],
        "products_only_tok_s": round(products, 1),
        "products_only_ratio": round(products / llama_decode, 3),
        "ours_prefill_tok_s": round(max(r.prefill_tokens_per_second for r in ours), 1),
        "ours_decode_weights_s": round(min(r.setup_seconds for r in ours), 4),
        "llama_cpp_prefill_tok_s": round(max(args.prompt / r["prefill_s"] for r in llama_runs), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
