"""pretrain's memory gate (`ref.train_memory`, `ref.gates.gate_memory`): the estimate against
the bytes the training step really allocates (tracemalloc sees every NumPy array) for each
kind of layer the families have, and against the peak RSS of a real run; the flags that
would fit, the override, a bad --max-memory, and --help. The refusal's one line is a case
of tests/test_train.py's GATES."""
from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from apr.config import ModelConfig, preset
from ref.model import Model
from ref.train_memory import StepShape, estimate_training_memory, what_fits
from test_train import CLI, ENV, ROOT, one_line_error, pretrain, small, ws  # noqa: F401 (fixture)

GiB = 1 << 30

# Every kind of saved tensor the estimate counts: biases and tied embeddings (Qwen2), q/k
# norms and a free head_dim (Qwen3), fused q/k/v and gate/up (Phi-3), post norms, GeGLU, both
# soft-caps and a sliding window (Gemma 2), untied lm_head (Llama).
CONFIGS = {
    "qwen2": (ModelConfig("qwen2", 128, 3, 4, 2, 352, 1500, tie_word_embeddings=True,
                          attention_bias=True), "f32"),
    "qwen2 bf16": (ModelConfig("qwen2", 128, 3, 4, 2, 352, 1500, tie_word_embeddings=True,
                               attention_bias=True), "bf16"),
    "qwen3": (ModelConfig("qwen3", 128, 2, 4, 2, 320, 1500, head_dim=48), "f32"),
    "phi3": (ModelConfig("phi3", 128, 2, 4, 4, 320, 1500), "f32"),
    "gemma2": (ModelConfig("gemma2", 128, 2, 4, 2, 320, 1500, hidden_act="gelu_pytorch_tanh",
                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                           sliding_window=40, layer_types=("sliding_attention", "full_attention"),
                           tie_word_embeddings=True), "f32"),
    "llama f64": (ModelConfig("llama", 96, 2, 4, 4, 256, 1500), "f64"),
}


def allocated_peak(model: Model, ids: np.ndarray, workers: int) -> int:
    """Peak bytes NumPy holds during one loss_and_grads beyond what it held before."""
    model.loss_and_grads(ids[:2, :5], ids[:2, 1:6], workers=workers)     # pools, tables
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loss, grads = model.loss_and_grads(ids[:, :-1], ids[:, 1:], workers=workers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.isfinite(loss) and len(grads) == len(model.params)
    return peak - before


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("workers", [1, 2])
def test_estimate_matches_what_a_step_allocates(name, workers):
    config, dtype = CONFIGS[name]
    batch, seq = 4, 96
    from ref.precision import matmul_precision, storage_dtype
    model = Model.init_random(config, seed=0, dtype=storage_dtype(dtype),
                              matmul=matmul_precision(dtype))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1))
    measured = allocated_peak(model, ids, workers)
    est = estimate_training_memory(config, StepShape(batch, seq, dtype, threads=workers))
    assert est.phase == "backward"
    expected = est.part("gradients") + est.part("activations") + est.part("bf16 copies")
    # never more than 10% below (an estimate that lets a run be killed), at most a third above
    # (two threads' peaks do not quite coincide)
    assert 0.75 <= measured / expected <= 1.1, (measured, expected, est.parts)


def test_estimate_against_a_real_runs_peak_rss(ws, tmp_path):
    """A 30M-parameter model (120 MB of float32 weights, 480 MB with gradients and AdamW
    state) and a batch whose activations are a third of the whole: the run's peak RSS above
    the process at the gate is at most 10% above the estimate of that, and at most 20%
    below (measured: 0.89; the arrays alone 0.98, the estimate adds 10% for the allocator)."""
    hwm = ("import atexit, sys\n"
           "def hwm():\n"
           "    for line in open('/proc/self/status'):\n"
           "        if line.startswith('VmHWM:'):\n"
           "            sys.stderr.write('VMHWM ' + line.split()[1] + '\\n')\n"
           "atexit.register(hwm)\n" + CLI)
    args = ["pretrain", "--dataset", ws / "data", "--tokenizer", ws / "tokenizer.json",
            "--arch", "qwen2-25m", "--hidden-size", 384, "--num-layers", 8, "--num-heads", 6,
            "--num-kv-heads", 2, "--intermediate-size", 1536, "--vocab-size", 32768,
            "--batch-size", 2, "--seq-length", 256, "--steps", 1, "--val-batches", 1,
            "--device", "cpu", "--allow-data-starvation", "--run-dir", tmp_path / "run",
            "--json", "-q"]
    r = subprocess.run([sys.executable, "-c", hwm, *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    peak_rss = int(r.stderr.split("VMHWM ")[1].split()[0]) * 1024
    mem = json.loads(r.stdout)["plan"]["memory"]
    process = mem["parts"]["process"]
    assert 0 < process < mem["peak_bytes"] and mem["ranks_here"] == 1
    assert mem["parts"]["weights"] == 4 * json.loads(r.stdout)["params"]
    estimated, measured = mem["peak_bytes"] - process, peak_rss - process
    assert mem["parts"]["activations"] > estimated / 4
    assert 0.8 <= measured / estimated <= 1.1, (measured, estimated, mem["parts"])


def test_qwen2_0_5b_shape():
    """A Qwen2.5-0.5B step: 494,032,768 parameters, so 1.84 GiB each of weights and
    gradients and 3.68 of AdamW state in float32. `pretrain --arch qwen2-0.5b --batch-size 1
    --seq-length 256 --steps 2` (one BLAS thread) peaked at 8,832 MiB VmHWM with 53 MiB
    at the gate."""
    config = preset("qwen2-0.5b")
    est = estimate_training_memory(config, StepShape(1, 256, "f32"), 53 << 20)
    assert est.part("weights") == 4 * 494_032_768
    assert est.part("gradients") == est.part("weights")
    assert est.part("AdamW") == 2 * est.part("weights")
    assert 0.9 <= (8832 << 20) / est.peak <= 1.1
    long = estimate_training_memory(config, StepShape(1, 1024, "f32"))
    assert 2 * GiB < long.part("activations") < 4 * GiB
    two = estimate_training_memory(config, StepShape(2, 256, "f32", threads=2))
    assert two.part("gradients") == 2 * est.part("gradients")     # one set per thread
    zero = estimate_training_memory(config, StepShape(1, 256, "f32", ranks=4, zero=1))
    assert zero.part("AdamW") == est.part("AdamW") // 4


def test_what_fits_names_each_flag_that_fits():
    config = preset("qwen2-0.5b")
    shape = StepShape(8, 1024, "f64", threads=2, ranks=2, ranks_here=1)
    budget = estimate_training_memory(config, StepShape(1, 1024, "f64", threads=2, ranks=2)).peak
    fixes = what_fits(config, shape, 0, budget)
    assert fixes[0] == "--batch-size 1" and fixes[1].startswith("--seq-length ")
    seq = int(fixes[1].split()[1])
    def at(t: int) -> int:
        return estimate_training_memory(config, StepShape(8, t, "f64", threads=2, ranks=2)).peak
    assert at(seq) <= budget < at(seq + 1)
    big = estimate_training_memory(config, shape).peak
    assert "--dtype f32" in what_fits(config, shape, 0, big * 0.6)
    assert "--zero 1" in what_fits(config, shape, 0, big - 1)


def test_budget_below_the_process_itself(ws, tmp_path):
    """(A budget that a smaller batch would meet: tests/test_train.py GATES.)"""
    r = pretrain(*small(ws, "--steps", 5, "--max-memory", "1M"), "--run-dir", tmp_path / "run")
    line = one_line_error(r)
    assert "no run fits (the process alone holds" in line and "--allow-memory-overrun" in line
    assert not (tmp_path / "run").exists()         # refused before the run directory is made


def test_override_and_plan_line(ws, tmp_path):
    r = pretrain(*[a for a in small(ws, "--steps", 1, "--max-memory", "1M",
                                    "--allow-memory-overrun", "--json") if a != "-q"],
                 "--run-dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    mem = json.loads(r.stdout)["plan"]["memory"]
    assert mem["over_budget"] and mem["budget_bytes"] == 1 << 20 and mem["budget"] == "--max-memory"
    assert "memory: estimated peak" in r.stderr
    assert "(above it: allowed by --allow-memory-overrun)" in r.stderr
    r = pretrain(*small(ws, "--steps", 1, "--json"), "--run-dir", tmp_path / "default")
    assert r.returncode == 0, r.stderr[-2000:]
    mem = json.loads(r.stdout)["plan"]["memory"]
    assert mem["budget"].startswith("default: 50% of the ") and not mem["over_budget"]
    # a resumed run is judged again, by its own command line's budget
    line = one_line_error(pretrain("--resume", tmp_path / "default", "--steps", 2, "--max-memory",
                                   "1M", "-q"))
    assert "above the budget of 1.0 MiB (--max-memory)" in line
    r = pretrain("--resume", tmp_path / "default", "--steps", 2, "--max-memory", "1M",
                 "--allow-memory-overrun", "-q", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["plan"]["memory"]["over_budget"], r.stderr


def test_bad_max_memory_and_help(ws, tmp_path):
    line = one_line_error(pretrain(*small(ws, "--steps", 1, "--max-memory", "lots"),
                                   "--run-dir", tmp_path / "run"))
    assert "memory size 'lots'" in line
    assert not (tmp_path / "run").exists()
    out = subprocess.run([sys.executable, "-c", CLI, "pretrain", "--help"], capture_output=True,
                         text=True, cwd=ROOT, env=ENV).stdout
    assert "--max-memory SIZE" in out and "--allow-memory-overrun" in out
