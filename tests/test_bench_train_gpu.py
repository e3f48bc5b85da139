"""bench/train_gpu.py on the CPU (a tiny preset, --device cpu): it runs both implementations
on the same weights and batch, and its FLOP count and MFU are what the formula says. The GPU
numbers come from bench/gpu_check.sh."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_train_gpu_bench_runs_on_the_cpu(tmp_path, dtype):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "bench/train_gpu.py", "--preset", "qwen2-tiny", "--seq", "64",
                        "--batch", "2", "--steps", "2", "--warmup", "1", "--device", "cpu",
                        "--dtype", dtype, "--peak-n", "128", "--out", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "ratio ours/torch" in r.stdout and res["device"].startswith("cpu")
    # qwen2-tiny: width 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 160, vocabulary 512, tied.
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 160
    matmul = 2 * per_layer + 512 * 64
    assert res["model_flops_per_token"] == 6 * matmul + 6 * 2 * 64 * 64
    ours, torch = res["ours"], res["torch"]
    assert len(ours["step_seconds"]) == len(torch["step_seconds"]) == 2
    assert len(ours["losses"]) == len(torch["losses"]) == 3
    # the same weights and batch: the first losses agree (before any update)
    tol = 1e-4 if dtype == "f32" else 1e-2
    assert abs(ours["losses"][0] - torch["losses"][0]) <= tol * torch["losses"][0]
    for part in (ours, torch):
        assert part["tokens_per_second"] > 0 and part["memory_bytes"] > 0
        assert part["mfu_vs_f32_peak"] == pytest.approx(
            part["tokens_per_second"] * res["model_flops_per_token"] / res["matmul_peak_flops"]["f32"])
    assert res["ratio_ours_over_torch"] == pytest.approx(
        ours["tokens_per_second"] / torch["tokens_per_second"])
