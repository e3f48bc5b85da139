"""ref.optim and ref.train: AdamW against torch, the schedule and clipping, every gate's
message, deterministic CPU training, resume equal to an uninterrupted run bit for bit, a
non-finite loss stopping the run, complete checkpoints whose logits reload exactly,
architecture from --init files (APR, HF, GGUF), and a short real run whose validation loss
falls.

Runs go through the real command line in a subprocess with one BLAS thread (two threads on
two busy cores are slower, and one thread keeps results independent of the machine's load)."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apr.container import AprFile
from apr.convert import convert
from apr.model import open_model
from oracles import make_hf_model, stdlib_files, tokenizer_json
from ref import train as train_mod
from ref.backend import get_backend
from ref.data import load_tokenizer, prepare_dataset, tokenizer_hash
from ref.load import load_model
from ref.optim import AdamW, AdamWConfig, CosineSchedule, clip_grad_norm, decays
from ref.train import RunConfig, resume_run, start_run, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CLI = ("import cli; from ref.commands import pretrain_command, prepare_data_command; "
       "cli.main.add_command(pretrain_command, 'pretrain'); "
       "cli.main.add_command(prepare_data_command, 'prepare-data'); cli.main()")


def pretrain(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, "pretrain", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The run failed as bad input does: exit 2 and one `error: ...` line, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: corpus of 16 stdlib modules, tokenizer.json (400 tokens), prepared data."""
    root = tmp_path_factory.mktemp("train")
    (root / "corpus").mkdir()
    for f in stdlib_files(16):
        shutil.copy(f, root / "corpus" / f.name)
    (root / "tokenizer.json").write_text(tokenizer_json(400), encoding="utf-8")
    prepare_dataset(root / "corpus", load_tokenizer(root / "tokenizer.json"), root / "data",
                    val_fraction=0.3)
    return root


def small(ws: Path, *extra) -> list:
    """Options of a small from-scratch run on the prepared data."""
    return ["--dataset", ws / "data", "--tokenizer", ws / "tokenizer.json", "--arch", "qwen2-tiny",
            "--batch-size", 4, "--seq-length", 32, "--val-batches", 4, "--device", "cpu", "-q",
            "--allow-data-starvation", *extra]


@pytest.fixture(scope="module")
def trained(ws) -> tuple[Path, dict]:
    """A short real run: 300 steps of qwen2-tiny on the stdlib corpus."""
    run = ws / "real"
    r = pretrain("--dataset", ws / "data", "--tokenizer", ws / "tokenizer.json", "--arch",
                 "qwen2-tiny", "--run-dir", run, "--steps", 300, "--batch-size", 8,
                 "--seq-length", 64, "--lr", 3e-3, "--warmup-steps", 20, "--eval-every", 100,
                 "--val-batches", 8, "--save-every", 150, "--device", "cpu", "--seed", 0,
                 "--allow-data-starvation", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return run, json.loads(r.stdout)


# --------------------------------------------------------------------------- optimizer

def test_adamw_matches_torch():
    import torch
    rng = np.random.default_rng(0)
    shapes = {"model.layers.0.mlp.up_proj.weight": (6, 4), "model.layers.0.self_attn.q_proj.bias": (6,),
              "model.norm.weight": (4,)}
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    cfg = AdamWConfig(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    ours = AdamW(params, cfg)
    t_params = {n: torch.tensor(p.copy(), requires_grad=True) for n, p in params.items()}
    groups = [{"params": [t_params[n] for n in shapes if decays(n, shapes[n])], "weight_decay": 0.1},
              {"params": [t_params[n] for n in shapes if not decays(n, shapes[n])], "weight_decay": 0.0}]
    assert [len(g["params"]) for g in groups] == [1, 2]       # no decay on norms and biases
    peer = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(1, 6):
        lr = 1e-2 * step / 5
        grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        ours.step(params, grads, lr)
        for g in peer.param_groups:
            g["lr"] = lr
        for n, t in t_params.items():
            t.grad = torch.from_numpy(grads[n])
        peer.step()
        for n in shapes:
            np.testing.assert_allclose(params[n], t_params[n].detach().numpy(), rtol=2e-6, atol=2e-7)
            np.testing.assert_allclose(ours.exp_avg_sq[n], peer.state[t_params[n]]["exp_avg_sq"].numpy(),
                                       rtol=2e-6, atol=1e-9)
    assert ours.step_count == 5


def test_schedule_and_clipping():
    s = CosineSchedule(peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert s(1) == pytest.approx(0.1) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    after = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    grads = {"a": np.full((3, 4), 2.0, np.float32), "b": np.full(4, 2.0, np.float32)}
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(8.0)
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    assert total == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm(grads, 5.0) == pytest.approx(1.0, rel=1e-5)    # below: untouched
    assert float(grads["a"][0, 0]) == pytest.approx(0.25, rel=1e-5)


# --------------------------------------------------------------------------- gates

def _hf(ws: Path) -> Path:
    path = ws / "hf-llama"
    if not path.exists():
        make_hf_model(path, "llama", hidden=32, layers=1, heads=2, kv_heads=1, ffn=64, vocab=448)
    return path


GATES = {
    "starved from scratch": (lambda ws: ["--dataset", ws / "data", "--tokenizer", ws / "tokenizer.json",
                                         "--arch", "qwen2-tiny", "--steps", 50, "--device", "cpu"],
                             ["data starvation", "tokens per parameter", "at least 20",
                              "--steps", "--allow-data-starvation"]),
    "no wrap": (lambda ws: small(ws, "--steps", 100000, "--no-wrap"),
                ["--no-wrap", "batches of 4 x 32", "lower --steps", "drop --no-wrap"]),
    "validation too small": (lambda ws: small(ws, "--steps", 5, "--val-batches", 10000),
                             ["validation split", "--val-batches 10000", "--val-fraction"]),
    "tokenizer larger than vocab": (lambda ws: small(ws, "--steps", 5, "--vocab-size", 300),
                                    ["tokenizer has 400 tokens", "vocab_size is 300",
                                     "--vocab-size 400"]),
    "sequence too long": (lambda ws: small(ws, "--steps", 5, "--seq-length", 1024),
                          ["--seq-length 1024", "max_position_embeddings 256"]),
    "untrained init": (lambda ws: ["--dataset", ws / "data", "--init", _hf(ws), "--steps", 200,
                                   "--batch-size", 4, "--seq-length", 32, "--val-batches", 4,
                                   "--device", "cpu"],
                       ["step-0 validation loss", "ln(vocab_size)", "--allow-untrained-init"]),
    "starved fine-tune": (lambda ws: ["--dataset", ws / "data", "--init", _hf(ws), "--steps", 2,
                                      "--batch-size", 4, "--seq-length", 32, "--device", "cpu"],
                          ["a fine-tune needs at least 0.1", "--allow-data-starvation"]),
    "other tokenizer": (lambda ws: small(ws, "--steps", 5, "--tokenizer", ws / "tok300.json"),
                        ["tokenized with another tokenizer", "prepare-data"]),
    "no arch": (lambda ws: ["--dataset", ws / "data", "--tokenizer", ws / "tokenizer.json"],
                ["needs --arch PRESET"]),
    "memory over budget": (lambda ws: small(ws, "--steps", 5, "--batch-size", 256,
                                            "--seq-length", 256, "--max-memory", "600M"),
                           ["memory: training needs an estimated", "activations",
                            "above the budget of 600.0 MiB (--max-memory)", "use --batch-size ",
                            " or --seq-length ", "raise --max-memory", "--allow-memory-overrun"]),
}


@pytest.mark.parametrize("name", list(GATES))
def test_gate_refuses_with_one_line(ws, tmp_path, name):
    (ws / "tok300.json").write_text(tokenizer_json(300), encoding="utf-8")
    args, phrases = GATES[name]
    r = pretrain(*args(ws), "--run-dir", tmp_path / "run")
    line = one_line_error(r)
    for phrase in phrases:
        assert phrase in line, line
    for leftover in ("ckpt", "metrics.jsonl", "run.json"):      # nothing that blocks a retry
        assert not (tmp_path / "run" / leftover).exists()


def test_tokens_per_parameter_floor_is_exact(ws, tmp_path):
    params = 119_360                                         # qwen2-tiny
    need = math.ceil(20 * params / (4 * 32))
    opts = ["--dataset", ws / "data", "--tokenizer", ws / "tokenizer.json", "--arch", "qwen2-tiny",
            "--batch-size", 4, "--seq-length", 32, "--val-batches", 4, "--device", "cpu", "-q",
            "--stop-after", 1, "--json"]
    assert f"raise --steps to {need:,}" in one_line_error(
        pretrain(*opts, "--steps", need - 1, "--run-dir", tmp_path / "a"))
    r = pretrain(*opts, "--steps", need, "--run-dir", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["params"] == params and s["plan"]["tokens_per_param"] >= 20 > s["plan"]["unique_tokens_per_param"]


def test_device_cuda_is_never_a_silent_cpu_run(ws, tmp_path):
    try:
        get_backend("cuda")
        has_gpu = True
    except Exception:
        has_gpu = False
    r = pretrain(*small(ws, "--steps", 2, "--device", "cuda", "--json"), "--run-dir", tmp_path / "r")
    if has_gpu:
        assert r.returncode == 0 and json.loads(r.stdout)["device"].startswith("cuda")
    else:
        line = one_line_error(r)
        assert "--device cuda: no usable GPU" in line and "--device cpu" in line


def test_a_run_dir_holds_one_run(ws, tmp_path):
    assert pretrain(*small(ws, "--steps", 2), "--run-dir", tmp_path / "r").returncode == 0
    line = one_line_error(pretrain(*small(ws, "--steps", 2), "--run-dir", tmp_path / "r"))
    assert "already holds a run" in line and "--resume" in line and "--force" in line
    assert pretrain(*small(ws, "--steps", 2, "--force"), "--run-dir", tmp_path / "r").returncode == 0


# --------------------------------------------------------------------------- determinism, resume

def _losses(run_dir: Path) -> list:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in metrics(run_dir)]


def test_same_seed_same_losses(ws, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        r = pretrain(*small(ws, "--steps", 8, "--eval-every", 4, "--seed", seed), "--run-dir", tmp_path / name)
        assert r.returncode == 0, r.stderr
        runs[name] = _losses(tmp_path / name)
    assert runs["a"] == runs["b"] and len(runs["a"]) == 9
    assert runs["a"] != runs["c"]


def test_resume_equals_uninterrupted(ws, tmp_path):
    opts = small(ws, "--steps", 6, "--eval-every", 2, "--save-every", 100, "--lr", 1e-2)
    assert pretrain(*opts, "--run-dir", tmp_path / "whole").returncode == 0
    r = pretrain(*opts, "--run-dir", tmp_path / "split", "--stop-after", 3, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "stopped-after"
    ckpt = tmp_path / "split" / "ckpt"
    assert (ckpt / "step-000003.apr").exists() and not (ckpt / "final.apr").exists()
    line = one_line_error(pretrain("--resume", tmp_path / "split", "--lr", 0.5))
    assert "--lr 0.5" in line and "would change the run" in line
    r = pretrain("--resume", tmp_path / "split", "-q", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps_this_run"] == 3
    whole, split = _losses(tmp_path / "whole"), _losses(tmp_path / "split")
    assert [s for s, _, _ in split] == list(range(7))
    assert whole == split                                  # bit for bit (JSON floats round-trip)
    with AprFile.open(tmp_path / "whole" / "ckpt" / "final.apr") as a, \
            AprFile.open(ckpt / "final.apr") as b:
        assert sorted(a.tensors) == sorted(b.tensors)
        assert any(n.startswith("__training__.") for n in a.tensors)
        for name in a.tensors:
            assert np.array_equal(a.raw(name), b.raw(name)), name


# --------------------------------------------------------------------------- failures

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(ws, tmp_path):
    run = tmp_path / "nan"
    r = pretrain(*small(ws, "--steps", 30, "--lr", 1e3, "--warmup-steps", 0, "--save-every", 1,
                        "--eval-every", 100), "--run-dir", run)
    line = one_line_error(r)
    assert "non-finite" in line and "lower --lr" in line and "last good checkpoint is" in line
    good = Path(line.split("last good checkpoint is ")[1].split(":")[0])
    assert good.exists() and good.parent == run / "ckpt"
    failed_step = int(line.split("step ")[1].split(":")[0])
    saved = sorted(int(p.stem.split("-")[1]) for p in (run / "ckpt").glob("step-*.apr"))
    assert saved and max(saved) < failed_step and good.name == f"step-{max(saved):06d}.apr"
    assert not (run / "ckpt" / "final.apr").exists()
    model, view = load_model(good)
    tokens = np.arange(33).reshape(1, 33) % 400
    with np.errstate(over="ignore"):     # its weights are huge, but it still gives a finite loss
        assert math.isfinite(model.loss(tokens[:, :-1], tokens[:, 1:]))
    assert all(np.isfinite(np.asarray(p)).all() for p in model.params.values())
    view.close()


def test_non_finite_training_loss_is_recorded(ws, tmp_path):
    run = tmp_path / "nan"
    r = pretrain(*small(ws, "--steps", 30, "--lr", 1e30, "--warmup-steps", 0, "--save-every", 100,
                        "--eval-every", 100), "--run-dir", run)
    line = one_line_error(r)
    assert "the training loss is nan" in line and "best.apr (no optimizer state)" in line
    last = metrics(run)[-1]
    assert last["event"] == "non-finite loss" and last["loss"] is None
    assert not list((run / "ckpt").glob("step-*.apr")) and not (run / "ckpt" / "final.apr").exists()


def test_progress_bar_only_on_a_terminal(ws, tmp_path):
    import fcntl
    import pty
    import termios
    outputs = {}
    for quiet in (False, True):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        args = small(ws, "--steps", 20, "--eval-every", 10, "--run-dir", tmp_path / f"r{quiet}")
        args.remove("-q")
        proc = subprocess.Popen([sys.executable, "-c", CLI, "pretrain", *map(str, args),
                                 *(["-q"] if quiet else [])],
                                stdout=subprocess.PIPE, stderr=slave, cwd=ROOT, env=ENV)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.communicate(timeout=120)
        os.close(master)
        assert proc.returncode == 0
        outputs[quiet] = b"".join(chunks).decode(errors="replace")
    assert "pretrain" in outputs[False] and "tok_s=" in outputs[False] and "loss=" in outputs[False]
    assert "20/20" in outputs[False] and "<" in outputs[False]          # count and ETA
    assert "tok_s=" not in outputs[True] and "step 0: validation loss" not in outputs[True]
    # without a terminal (capture_output) there is no bar either, only the plan lines
    r = pretrain(*[a for a in small(ws, "--steps", 4) if a != "-q"], "--run-dir", tmp_path / "pipe")
    assert r.returncode == 0 and "tok_s=" not in r.stderr and "tokens/parameter" in r.stderr


def test_missing_and_corrupt_init_fail_fast(ws, tmp_path, trained):
    run_dir, _ = trained
    base = ["--dataset", ws / "data", "--steps", 50, "--device", "cpu", "--run-dir", tmp_path / "r"]
    assert "no such file" in one_line_error(pretrain(*base, "--init", tmp_path / "none.apr"))
    flipped = tmp_path / "flipped.apr"
    data = bytearray((run_dir / "ckpt" / "best.apr").read_bytes())
    data[-100] ^= 1
    flipped.write_bytes(bytes(data))
    assert "CRC" in one_line_error(pretrain(*base, "--init", flipped))
    truncated = tmp_path / "truncated.apr"
    truncated.write_bytes(bytes(data[:5000]))
    assert "truncated" in one_line_error(pretrain(*base, "--init", truncated))


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_is_complete_and_reloads_to_the_same_logits(ws, tmp_path):
    cfg = RunConfig(dataset=str(ws / "data"), run_dir=str(tmp_path / "r"),
                    tokenizer=str(ws / "tokenizer.json"), arch="qwen2-tiny", steps=4,
                    batch_size=4, seq_length=32, val_batches=4, eval_every=2, save_every=2,
                    device="cpu", seed=3, allow_data_starvation=True)
    run = start_run(cfg)
    summary = train(run)
    assert summary.status == "completed" and summary.step == 4
    config = run.model.config
    assert config.tie_word_embeddings and config.attention_bias
    final = tmp_path / "r" / "ckpt" / "final.apr"
    with AprFile.open(final) as f:
        meta, tensors = f.metadata, f.tensors
        assert f.verify_footer()
        for key, value in config.to_apr_metadata().items():     # every architecture key
            assert meta[key] == value, key
        assert meta["tokenizer.vocabulary"] == run.tokenizer.vocab
        assert meta["tokenizer.merges"] == run.tokenizer.merges
        assert meta["tokenizer.eos_token_id"] == run.tokenizer.eos_token_id
        assert meta["param_count"] == config.param_count()
        assert meta["training.step"] == 4 and meta["training.tokens_seen"] == 4 * 4 * 32
        assert meta["training.seed"] == 3 and meta["training.optimizer_step"] == 4
        assert meta["training.data_hash"] == run.data.manifest.content_hash
        assert meta["training.tokenizer_hash"] == tokenizer_hash(run.tokenizer)
        assert meta["training.lr_schedule"]["total_steps"] == 4
        assert meta["training.run_config"]["arch"] == "qwen2-tiny"
        assert meta["training.val_loss"] == pytest.approx(summary.val_loss)
        assert meta["tied_embeddings"] is True
        assert np.array_equal(f.raw("lm_head.weight"), f.raw("model.embed_tokens.weight"))
        for name in config.tensor_shapes():
            assert f"__training__.exp_avg.{name}" in tensors
            assert f"__training__.exp_avg_sq.{name}" in tensors
    with AprFile.open(tmp_path / "r" / "ckpt" / "best.apr") as f:
        assert not any(n.startswith("__training__.") for n in f.tensors)
        assert "tokenizer.vocabulary" in f.metadata and f.metadata["training.checkpoint"] == "best"
    assert sorted(p.name for p in (tmp_path / "r" / "ckpt").iterdir()) == [
        "best.apr", "final.apr", "step-000002.apr"]
    view = open_model(final, verify=True)
    assert view.config == config and tokenizer_hash(view.tokenizer) == tokenizer_hash(run.tokenizer)
    view.close()
    loaded, view = load_model(final)
    ids = np.array([[5, 17, 42, 399, 0, 7, 7, 100]])
    assert np.array_equal(np.asarray(loaded.forward(ids)), np.asarray(run.model.forward(ids)))
    view.close()
    # resuming this run at its end asks for more steps
    with pytest.raises(train_mod.GateError, match="complete at step 4"):
        resume_run(str(tmp_path / "r"))


def test_early_stopping_after_patience(ws, tmp_path, monkeypatch):
    scripted = iter([6.0, 5.0, 5.5, 5.2, 5.1, 4.0])
    monkeypatch.setattr(train_mod, "evaluate", lambda model, batches: next(scripted))
    cfg = RunConfig(dataset=str(ws / "data"), run_dir=str(tmp_path / "r"),
                    tokenizer=str(ws / "tokenizer.json"), arch="qwen2-tiny", steps=20,
                    batch_size=2, seq_length=16, val_batches=2, eval_every=1, patience=2,
                    device="cpu", allow_data_starvation=True)
    summary = train(start_run(cfg))
    assert summary.status == "early-stopped" and summary.step == 3
    assert (summary.best_val_loss, summary.best_step) == (5.0, 1)
    records = metrics(tmp_path / "r")
    assert records[-1]["event"] == "early-stop" and records[-1]["val_loss"] == 5.2
    with AprFile.open(tmp_path / "r" / "ckpt" / "best.apr") as f:
        assert f.metadata["training.step"] == 1


def test_a_cpu_step_runs_its_rows_in_as_many_threads_as_the_blas_has(ws, tmp_path, monkeypatch):
    """pretrain on the CPU passes the BLAS's thread count as `loss_and_grads` workers (the
    rows in threads, each single-threaded: tests/test_loss_workers.py checks the values), and
    one worker where the environment limits the BLAS to one thread."""
    import threadpoolctl
    from ref.model import Model
    seen = []
    real = Model.loss_and_grads
    monkeypatch.setattr(Model, "loss_and_grads",
                        lambda self, *a, workers=1, **k: seen.append(workers) or real(self, *a, workers=workers, **k))
    for limit in (2, 1):
        with threadpoolctl.threadpool_limits(limit, user_api="blas"):
            cfg = RunConfig(dataset=str(ws / "data"), run_dir=str(tmp_path / f"r{limit}"),
                            tokenizer=str(ws / "tokenizer.json"), arch="qwen2-tiny", steps=2,
                            batch_size=2, seq_length=16, val_batches=2, device="cpu",
                            allow_data_starvation=True)
            assert train(start_run(cfg)).step == 2
        assert seen == [limit, limit], seen
        seen.clear()


def test_wraps_are_counted_and_warned(ws, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    text = (ws / "corpus" / "textwrap.py").read_text()
    for i in range(16):          # part12 .. part15 are held out at --val-fraction 0.35
        (corpus / f"part{i:02d}.py").write_text(text[i * 300:(i + 1) * 300])
    m = prepare_dataset(corpus, load_tokenizer(ws / "tokenizer.json"), tmp_path / "probe",
                        val_fraction=0.35)
    per_pass = (m.train.tokens - 1) // 16 // 4                     # batches of 4 x 16 per pass
    base = ["--dataset", corpus, "--tokenizer", ws / "tokenizer.json", "--arch", "qwen2-tiny",
            "--batch-size", 4, "--seq-length", 16, "--val-batches", 2, "--val-fraction", 0.35,
            "--device", "cpu", "-q", "--allow-data-starvation", "--steps", 2 * per_pass + 2]
    r = pretrain(*base, "--run-dir", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "data" / "manifest.json").exists()     # the corpus was prepared
    records = metrics(tmp_path / "a")
    assert [r["wraps"] for r in records[1:]] == [0] * per_pass + [1] * per_pass + [2] * 2
    assert records[-1]["epoch"] == pytest.approx(2 + 2 / per_pass)
    assert r.stderr.count("warning: the train split is used up") == 1
    r = pretrain(*base, "--run-dir", tmp_path / "b", "--warn-on-wrap-around")
    assert r.stderr.count("warning: the train split is used up") == 2
    line = one_line_error(pretrain(*base, "--run-dir", tmp_path / "c", "--no-wrap"))
    assert "--no-wrap" in line


# --------------------------------------------------------------------------- --init

def test_init_reads_the_architecture_from_apr(ws, tmp_path, trained):
    run_dir, _ = trained
    init = run_dir / "ckpt" / "best.apr"
    line = one_line_error(pretrain("--dataset", ws / "data", "--init", init, "--hidden-size", 128,
                                   "--num-layers", 2, "--vocab-size", 1000, "--run-dir", tmp_path / "x"))
    assert "hidden_size=64" in line and "vocab_size=512" in line and "--hidden-size 128" in line
    assert "--vocab-size 1000" in line and "num_layers" not in line      # 2 agrees with the file
    line = one_line_error(pretrain("--dataset", ws / "data", "--init", init, "--arch", "llama-tiny",
                                   "--run-dir", tmp_path / "x"))
    assert "--arch" in line
    r = pretrain("--dataset", ws / "data", "--init", init, "--num-layers", 2, "--run-dir", tmp_path / "ft",
                 "--steps", 100, "--batch-size", 4, "--seq-length", 32, "--val-batches", 4,
                 "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["mode"] == "fine-tune" and s["config"]["hidden_size"] == 64
    # a real init sits far below chance at step 0, and both numbers are reported
    assert s["step0_val_loss"] < s["ln_vocab"] - 2 and s["ln_vocab"] == pytest.approx(math.log(512))
    with AprFile.open(tmp_path / "ft" / "ckpt" / "final.apr") as f:
        assert f.metadata["training.mode"] == "fine-tune" and f.metadata["training.init"] == str(init)
        assert f.metadata["hidden_size"] == 64 and f.metadata["tokenizer.vocabulary"]


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_init_reads_the_architecture_from_hf_and_gguf(ws, tmp_path, fmt):
    init = _hf(ws)
    if fmt == "gguf":
        convert(init, tmp_path / "m.gguf")
        init = tmp_path / "m.gguf"
    r = pretrain("--dataset", ws / "data", "--init", init, "--run-dir", tmp_path / "r", "--steps", 30,
                 "--batch-size", 4, "--seq-length", 32, "--val-batches", 4, "--device", "cpu",
                 "--allow-untrained-init", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["config"]["family"] == "llama" and s["config"]["hidden_size"] == 32
    assert s["config"]["vocab_size"] == 448 and not s["config"]["tie_word_embeddings"]
    view = open_model(tmp_path / "r" / "ckpt" / "final.apr", verify=True)
    assert view.config.rope_type == ("adjacent" if fmt == "gguf" else "halves")
    assert "lm_head.weight" in view.tensors and view.tokenizer is not None
    assert tokenizer_hash(view.tokenizer) == tokenizer_hash(load_tokenizer(ws / "tokenizer.json"))
    view.close()
    line = one_line_error(pretrain("--dataset", ws / "data", "--init", init, "--num-heads", 4,
                                   "--intermediate-size", 64, "--run-dir", tmp_path / "x"))
    assert "num_heads=2" in line and "--num-heads 4" in line and "intermediate_size" not in line


# --------------------------------------------------------------------------- a real run

def _png_pixels(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a PNG, read with matplotlib."""
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return (imread(path)[..., :3] * 255).round().astype(np.uint8)


def test_real_run_validation_loss_falls(trained):
    run_dir, s = trained
    assert s["status"] == "completed" and s["step"] == 300 and s["device"].startswith("cpu")
    assert s["step0_val_loss"] == pytest.approx(math.log(512), abs=0.05)
    assert s["val_loss"] < s["step0_val_loss"] - 1.0
    assert s["best_val_loss"] <= s["val_loss"] and s["best_step"] == 300
    plan = s["plan"]
    assert plan["params"] == s["params"] and plan["planned_tokens"] == 300 * 8 * 64
    assert plan["tokens_per_param"] == pytest.approx(300 * 8 * 64 / s["params"])
    assert plan["min_tokens_per_param"] == 20
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(301))
    for r in records[1:]:
        assert {"step", "loss", "lr", "grad_norm", "tokens_seen", "epoch", "wraps", "seconds"} <= set(r)
        assert r["tokens_seen"] == r["step"] * 8 * 64
    assert [r["step"] for r in records if "val_loss" in r] == [0, 100, 200, 300]
    assert records[-1]["epoch"] == pytest.approx(s["epochs"]) and records[-1]["wraps"] == s["wraps"]
    ckpts = sorted(p.name for p in (run_dir / "ckpt").iterdir())
    assert ckpts == ["best.apr", "final.apr", "step-000150.apr"]    # step 300 is final.apr
    px = _png_pixels(run_dir / "loss.png")
    colors = {tuple(int(v) for v in c) for c in px.reshape(-1, 3)}
    blue, orange = (31, 119, 180), (255, 127, 14)     # matplotlib's tab:blue, tab:orange
    assert blue in colors and orange in colors
