"""demo: the whole product on an embedded default, no downloads.

Trains a byte-level BPE tokenizer and a small Qwen2-shaped model on the Python standard
library's own source files, then runs qa, exports GGUF, diffs the checkpoint against its
export, generates a sample, and prints the next commands to try.
"""
from __future__ import annotations

import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

import click

from apr.console import handle_errors, show_progress

from .backend import DEVICES

CORPUS_GLOB = "*.py"            # the top-level modules of the standard library
DEMO_VOCAB = 1024
DEMO_SHAPE = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                  intermediate_size=352, vocab_size=DEMO_VOCAB, max_position_embeddings=256)
SPECIAL = "<|endoftext|>"


def stdlib_corpus(dst: Path) -> tuple[int, int]:
    """Copy the standard library's top-level modules into `dst`; (files, bytes)."""
    src = Path(sysconfig.get_paths()["stdlib"])
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.glob(CORPUS_GLOB) if p.is_file())
    total = 0
    for p in files:
        shutil.copyfile(p, dst / p.name)
        total += p.stat().st_size
    return len(files), total


def train_tokenizer(corpus: Path, out_dir: Path, vocab_size: int = DEMO_VOCAB) -> Path:
    """A GPT-2 style byte-level BPE trained with the `tokenizers` library."""
    import json
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(p) for p in sorted(corpus.glob("*.py"))], trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL, "eos_token": SPECIAL}))
    return out_dir


def run_demo(out: Path, steps: int, batch_size: int, seq_length: int, lr: float, device: str,
             force: bool, progress: bool, echo: Callable[[str], None],
             allow_untrained: bool = False) -> int:
    from apr.atomic import check_output
    from apr.convert import convert
    from diff import compare
    from ref.generate import generate
    from ref.load import load_model
    from ref.qa import run_qa
    from ref.train import RunConfig, start_run, train

    check_output(out, force)
    if out.exists():
        shutil.rmtree(out)
    t_start = time.perf_counter()

    def step(n: int, title: str) -> None:
        echo(f"\n[{n}/6] {title}")

    step(1, "corpus and tokenizer: the Python standard library's own source files")
    n_files, n_bytes = stdlib_corpus(out / "corpus")
    tok_dir = train_tokenizer(out / "corpus", out / "tokenizer")
    echo(f"  {n_files} modules, {n_bytes / 1e6:.1f} MB; byte-level BPE with {DEMO_VOCAB} tokens "
         f"-> {tok_dir / 'tokenizer.json'}")

    step(2, f"pretrain a small Qwen2-shaped model from scratch ({steps} steps on {device})")
    echo("  (data-starved by design so that it finishes in minutes: the run reports its tokens "
         "per parameter, and --allow-data-starvation is what lets it start)")
    cfg = RunConfig(dataset=str(out / "corpus"), run_dir=str(out / "run"), tokenizer=str(tok_dir),
                    arch="qwen2-tiny", shape=dict(DEMO_SHAPE), steps=steps, batch_size=batch_size,
                    seq_length=seq_length, lr=lr, eval_every=max(1, steps // 10),
                    save_every=steps, val_batches=20, device=device, allow_data_starvation=True)
    run = start_run(cfg, progress=progress, log=lambda s: echo("  " + s))
    summary = train(run, progress=progress, log=lambda s: echo("  " + s))
    ckpt = Path(summary.checkpoints["final"])
    echo(f"  validation loss {summary.step0_val_loss:.3f} at step 0 (ln vocab {summary.ln_vocab:.3f}) "
         f"-> {summary.val_loss:.3f} at step {summary.step}; {summary.tokens_per_second:,.0f} tokens/s")
    echo(f"  checkpoints in {Path(summary.run_dir) / 'ckpt'}, curves in {summary.plot}")

    step(3, f"qa {ckpt.name}")
    report = run_qa(ckpt, gguf=True, allow_untrained=allow_untrained)
    for g in report.gates:
        status = "SKIP" if g.skipped else ("PASS" if g.passed else "FAIL")
        echo(f"  {status:<4}  {g.name:<16} {g.message}")

    step(4, "export GGUF for llama.cpp")
    gguf_path = out / "model.gguf"
    conv = convert(ckpt, gguf_path)
    echo(f"  wrote {gguf_path}: {conv.tensors} tensors, {conv.bytes_written:,} bytes")

    step(5, f"diff {ckpt.name} {gguf_path.name}")
    d = compare(ckpt, gguf_path, logits=True)
    echo(f"  {d.diagnosis.line}")

    step(6, "generate from the trained model")
    model, view = load_model(ckpt)
    from apr.tokenizer import build_tokenizer
    tok = build_tokenizer(view.tokenizer)
    prompt = "def "
    res = generate(model, tok.encode(prompt).ids, 48, temperature=0.7, top_k=40, seed=0,
                   eos_ids=[view.tokenizer.eos_token_id])
    sample = prompt + tok.decode(res.new_ids, skip_special_tokens=True)
    echo("  " + sample.replace("\n", "\n  "))

    ok = report.passed and d.diagnosis.cls == "equivalent"
    echo(f"\ndone in {time.perf_counter() - t_start:.0f} s. Next:")
    for cmd in (f"python cli.py inspect {ckpt}",
                f"python cli.py run {ckpt} \"import \" --max-tokens 40 --temperature 0.7",
                f"python cli.py convert {ckpt} -o {out / 'hf'}",
                f"python cli.py diff {ckpt} {gguf_path} --all",
                f"python cli.py bench {gguf_path}",
                f"python cli.py pretrain --resume {out / 'run'} --steps {steps * 2}"):
        echo(f"  {cmd}")
    return 0 if ok else 1


@click.command("demo")
@click.option("-o", "--out", default="demo-run", show_default=True, type=click.Path(),
              help="Directory for the corpus, tokenizer, run and exports.")
@click.option("--steps", default=400, show_default=True, help="Training steps.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--seq-length", default=128, show_default=True)
@click.option("--lr", default=3e-3, show_default=True, help="Peak learning rate.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--allow-untrained", is_flag=True,
              help="qa passes a model too briefly trained to beat chance on its sample text (a "
                   "quick run with few --steps), saying so.")
def demo_command(out, steps, batch_size, seq_length, lr, device, force, quiet, allow_untrained) -> None:
    """Train a tiny model on the Python standard library's source, then qa, export, diff and
    generate: the whole tool on an embedded default, no downloads."""
    code = handle_errors(run_demo)(Path(out), steps, batch_size, seq_length, lr, device, force,
                                   show_progress(quiet), click.echo, allow_untrained)
    sys.exit(code)
