"""Benchmark: `diff` of a Qwen2-0.5B-shaped F16 model as APR against its GGUF export (~1 GB
each), wall time as a ratio to reading both files once, and peak RSS.

    python bench/diff.py [--preset qwen2-0.5b] [--workdir DIR] [--repeats 3]

The model is written as in bench/convert.py (random F16 weights, streaming), converted
HF -> APR -> GGUF. The peer reads both files once, sequentially, with readinto into one
reused 1 MiB buffer (the fastest of 256 KiB .. 16 MiB measured). The diff runs
`diff.compare` with the CLI's default (logits auto: skipped above 100M parameters) in its own
process; its peak RSS is that process's VmHWM (not ru_maxrss, which Linux carries over from
the parent across exec). Both see the same page-cache state (every file is read once before
anything is timed); peer and diff are interleaved and the fastest of each is kept. The
diff's time is split into opening both files (`open_model`) and comparing. The diff
compares the tensors' bytes in a child process while it opens both files (`diff.ahead`); that
child's peak RSS is reported apart (`helper_peak_rss_mb`; the pages it shares with the diff
count in both) and the memory target holds for the sum.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """
import json, re, resource, sys, time
t0 = time.perf_counter()
from diff import compare
t1 = time.perf_counter()
report = compare(sys.argv[1], sys.argv[2], logits=None)
t2 = time.perf_counter()
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
helper = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"import_s": t1 - t0, "total_s": t2 - t1, **report.timings,
                  "peak_rss_mb": hwm / 1024, "helper_peak_rss_mb": helper / 1024,
                  "diagnosis": report.diagnosis.line, "logits": report.logits.note}))
"""
BUFFER = 1024 * 1024         # the fastest of 256 KiB .. 16 MiB on the 2-core VM


def _bench_convert():
    """bench/convert.py as a module (it writes the HF model)."""
    spec = importlib.util.spec_from_file_location("bench_convert", ROOT / "bench" / "convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_once(*paths: Path) -> float:
    """Seconds to read every byte of the files once, through one reused buffer."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - t


def run_diff(a: Path, b: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(a), str(b)], capture_output=True,
                         text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_files(work: Path, preset: str) -> tuple[Path, Path]:
    """m.apr and m.gguf in `work` (kept from an earlier run with the same --workdir)."""
    from apr.convert import convert
    apr_path, gguf_path = work / "m.apr", work / "m.gguf"
    if apr_path.exists() and gguf_path.exists():
        return apr_path, gguf_path
    hf = work / "hf"
    _bench_convert().make_hf(hf, preset)
    convert(hf, apr_path)
    convert(apr_path, gguf_path)
    shutil.rmtree(hf)
    return apr_path, gguf_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-diff-"))
    try:
        apr_path, gguf_path = make_files(work, args.preset)
        read_once(apr_path, gguf_path)                      # same cache state for everyone
        reads, diffs = [], []
        for _ in range(args.repeats):
            reads.append(read_once(apr_path, gguf_path))
            diffs.append(run_diff(apr_path, gguf_path))
        read_s = min(reads)
        best = min(diffs, key=lambda r: r["total_s"])
        compare_s = best["tensors_s"] + best["logits_s"]
        rss = best["peak_rss_mb"] + best["helper_peak_rss_mb"]     # pages they share count twice
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "preset": args.preset,
            "apr_bytes": apr_path.stat().st_size, "gguf_bytes": gguf_path.stat().st_size,
            "read_both_s": round(read_s, 3),
            "diff_total_s": round(best["total_s"], 3),
            "ratio_total": round(best["total_s"] / read_s, 2),
            "open_both_s": round(best["open_s"], 3),
            "compare_s": round(compare_s, 3),
            "ratio_compare": round(compare_s / read_s, 2),
            "import_s": round(best["import_s"], 3),
            "peak_rss_mb": round(best["peak_rss_mb"]),
            "helper_peak_rss_mb": round(best["helper_peak_rss_mb"]),
            "answers_ahead": best["answers_ahead"],
            "target_met_total": best["total_s"] / read_s <= 2.0 and rss < 1024,
            "target_met_compare": compare_s / read_s <= 2.0 and rss < 1024,
            "diagnosis": best["diagnosis"],
            "logits": best["logits"],
        }
        print(json.dumps(result, indent=2, ensure_ascii=False))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
