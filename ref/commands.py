"""The ``prepare-data`` and ``pretrain`` commands (registered in cli.py with
``main.add_command``).

    apr-ref prepare-data CORPUS --tokenizer tokenizer.json -o data/
    apr-ref pretrain --dataset data/ --tokenizer tokenizer.json --arch qwen2-tiny --run-dir runs/a
    apr-ref pretrain --dataset corpus/ --init model.apr --run-dir runs/ft --steps 200
    apr-ref pretrain --resume runs/a
"""
from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict
from typing import Any, Callable

import click
from click.core import ParameterSource

from apr.console import EXIT_BAD_INPUT, EXIT_INTERNAL, handle_errors, log_lines, show_progress
from apr.errors import AprError

from .backend import DEVICES

TRAIN_OPTION_FIELDS = (
    "dataset", "tokenizer", "run_dir", "mode", "arch", "init", "steps", "batch_size",
    "seq_length", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "eps",
    "max_grad_norm", "seed", "device", "eval_every", "val_batches", "save_every", "patience",
    "val_fraction", "wrap", "warn_on_wrap", "allow_data_starvation", "allow_untrained_init",
    "dtype", "check_every", "zero")


# --------------------------------------------------------------------------- prepare-data

@click.command("prepare-data")
@click.argument("corpus", type=click.Path())
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(),
              help="tokenizer.json, an HF directory, or a model file that embeds a tokenizer.")
@click.option("-o", "--output", "output", required=True, type=click.Path(),
              help="Directory to write the shards and manifest.json into.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.1,
              show_default=True, help="Share of documents held out for validation (by a hash "
                                      "of each document's path).")
@click.option("--shard-tokens", type=click.IntRange(min=1), default=1 << 24, show_default=True,
              help="Tokens per .npy shard.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@handle_errors
def prepare_data_command(corpus: str, tokenizer_path: str, output: str, val_fraction: float,
                         shard_tokens: int, force: bool, quiet: bool, as_json: bool) -> None:
    """Tokenize a corpus (a directory of text/code files, or .jsonl with a "text" field)
    into uint32 shards with a train/validation split by document."""
    from .data import load_tokenizer, prepare_dataset
    td = load_tokenizer(tokenizer_path)
    m = prepare_dataset(corpus, td, output, val_fraction=val_fraction, shard_tokens=shard_tokens,
                        force=force, progress=show_progress(quiet))
    if as_json:
        click.echo(json.dumps({"output": output, **asdict(m)}, indent=1, ensure_ascii=False))
        return
    click.echo(f"wrote {output}: {m.train.tokens:,} train tokens ({m.train.documents} documents, "
               f"{len(m.train.shards)} shards), {m.val.tokens:,} validation tokens "
               f"({m.val.documents} documents, {len(m.val.shards)} shards)")
    click.echo(f"  {m.files_read} files read; skipped: "
               + (", ".join(f"{len(v)} {k}" for k, v in m.skipped_files.items()) or "none"))
    click.echo(f"  content {m.content_hash}")
    click.echo(f"  tokenizer {m.tokenizer_hash} ({m.tokenizer_vocab_size} tokens)")


# --------------------------------------------------------------------------- pretrain

def _given(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The run options the command line actually set (not click defaults)."""
    out = {}
    for name in TRAIN_OPTION_FIELDS:
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                               ParameterSource.ENVIRONMENT):
            out[name] = values[name]
    return out


def _shape(values: dict[str, Any]) -> dict[str, int]:
    from .train import SHAPE_FIELDS
    return {k: values[k] for k in SHAPE_FIELDS if values.get(k) is not None}


def _print_summary(s) -> None:
    out = click.echo
    out(f"{s.status} at step {s.step}/{s.steps}: {s.tokens_seen:,} tokens "
        f"({s.plan['tokens_per_param']:.3g} planned tokens/parameter, {s.params:,} parameters), "
        f"{s.epochs:.3g} passes, {s.wraps} wraps")
    out(f"  validation loss: step 0 {s.step0_val_loss:.4f} (ln(vocab) {s.ln_vocab:.4f}), "
        f"last {s.val_loss:.4f}, best {s.best_val_loss:.4f} at step {s.best_step}")
    out(f"  {s.tokens_per_second:,.0f} tokens/s on {s.device}; "
        f"{100 * s.overhead_share:.1f}% of the time outside the model step and evaluation")
    for kind, path in s.checkpoints.items():
        if path:
            out(f"  {kind}: {path}")
    out(f"  metrics: {s.metrics}; plot: {s.plot}")


_int = click.IntRange(min=1)


def one_report(fn: Callable) -> Callable:
    """Under mpirun, a failing run says so once. An `AprError` (or a usage error) is raised
    by every rank alike: the ranks check the same gates on the same files, and what rank 0
    alone does (data preparation, checkpoints) it broadcasts, errors included; so rank 0
    prints the ``error: ...`` line and the other ranks exit 2 without a word. Any other
    failure may be this rank's alone, with the others waiting for it in a collective: it is
    printed with the rank's number and the job is ended (MPI_Abort) instead."""
    from .parallel import current_world, launch_rank, launched_by_mpi

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (AprError, click.ClickException):
            if launched_by_mpi() and launch_rank() != 0:
                sys.exit(EXIT_BAD_INPUT)
            raise
        except Exception as e:       # noqa: BLE001 - see above
            w = current_world()
            if w is None or w.size == 1:
                raise
            if isinstance(e, OSError) and getattr(e, "filename", None) and e.strerror:
                what, code = f"{e.filename}: {e.strerror}", EXIT_BAD_INPUT
            else:
                message = " ".join(str(e).split())[:300]
                what = f"internal error (please report): {type(e).__name__}: {message}"
                code = EXIT_INTERNAL
            click.echo(f"error: rank {w.rank}: {what}", err=True)
            sys.stderr.flush()
            w.abort(code)
            raise
    return wrapper


@click.command("pretrain")
@click.option("--dataset", type=click.Path(), help="A corpus directory/file, or a directory "
              "written by prepare-data.")
@click.option("--tokenizer", type=click.Path(), help="tokenizer.json, an HF directory, or a "
              "model file; default with --init: the model's embedded tokenizer.")
@click.option("--run-dir", type=click.Path(), help="Where metrics, plot and checkpoints go.")
@click.option("--mode", type=click.Choice(["from-scratch", "fine-tune"]), default=None,
              help="Default: fine-tune with --init, else from-scratch.")
@click.option("--arch", help="Preset for a from-scratch run (apr.config.PRESETS).")
@click.option("--init", type=click.Path(), help="Model to fine-tune (APR, GGUF or HF directory); "
              "its architecture is read from the file.")
@click.option("--hidden-size", type=_int, help="Shape flag (from scratch: overrides the preset; "
              "with --init: must match the file).")
@click.option("--num-layers", type=_int, help="Shape flag.")
@click.option("--num-heads", type=_int, help="Shape flag.")
@click.option("--num-kv-heads", type=_int, help="Shape flag.")
@click.option("--intermediate-size", type=_int, help="Shape flag.")
@click.option("--vocab-size", type=_int, help="Shape flag.")
@click.option("--max-position-embeddings", type=_int, help="Shape flag.")
@click.option("--steps", type=_int, default=1000, show_default=True)
@click.option("--batch-size", type=_int, default=8, show_default=True,
              help="Sequences per step on each rank (under mpirun the global batch is "
                   "ranks x this).")
@click.option("--seq-length", type=_int, default=256, show_default=True)
@click.option("--lr", type=float, default=None,
              help="Peak learning rate. Default: 3e-4 from scratch, 3e-5 fine-tune.")
@click.option("--min-lr-ratio", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Cosine decays to this share of --lr.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Linear warm-up steps. Default: min(100, steps/10).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="AdamW decoupled weight decay (never on norms and biases).")
@click.option("--beta1", type=click.FloatRange(0, 1, max_open=True), default=0.9, show_default=True)
@click.option("--beta2", type=click.FloatRange(0, 1, max_open=True), default=0.95, show_default=True)
@click.option("--eps", type=click.FloatRange(min=0, min_open=True), default=1e-8, show_default=True)
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Clip the global gradient norm to this (0: no clipping).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="cuda without a usable GPU is an error, not a CPU run.")
@click.option("--eval-every", type=_int, default=100, show_default=True)
@click.option("--val-batches", type=_int, default=20, show_default=True,
              help="Fixed validation batches per evaluation.")
@click.option("--save-every", type=_int, default=500, show_default=True)
@click.option("--dtype", type=click.Choice(["f32", "f64", "bf16"]), default="f32", show_default=True,
              help="Parameters, optimizer state and compute (f64: a float64 reference run; "
                   "bf16: float32 weights, gradients and optimizer state, bfloat16 operands "
                   "in the linear layers' products with float32 accumulation).")
@click.option("--check-every", type=_int, default=100, show_default=True,
              help="Under mpirun: steps between checks that every rank holds the same "
                   "parameters (also at every checkpoint).")
@click.option("--zero", type=click.IntRange(0, 1), default=0, show_default=True,
              help="Under mpirun: 1 shards the AdamW state across the ranks (ZeRO stage 1); "
                   "checkpoints are the same either way.")
@click.option("--patience", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop after this many evaluations without improvement (0: never).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.1,
              show_default=True, help="When --dataset is a corpus: share of documents held out.")
@click.option("--no-wrap", "wrap", is_flag=True, flag_value=False, default=True,
              help="Refuse to reuse the train split: stop with an error when it runs out.")
@click.option("--warn-on-wrap-around", "warn_on_wrap", is_flag=True,
              help="Warn on every wrap-around (default: on the first only; all are counted).")
@click.option("--allow-data-starvation", is_flag=True,
              help="Train even below the tokens-per-parameter floor (20 from scratch, 0.1 fine-tune).")
@click.option("--allow-untrained-init", is_flag=True,
              help="Fine-tune even when the init model is no better than chance at step 0.")
@click.option("--max-memory", metavar="SIZE", default=None,
              help="Memory the run may use (e.g. 12G, 512M): before step 1 the peak of a step "
                   "(weights, gradients, AdamW state, activations) is estimated and a run above "
                   "it refused, naming the flags that would make it fit. Default: half the "
                   "memory the machine has available (on a GPU: 90% of its free memory); under "
                   "mpirun, for the ranks of one machine together.")
@click.option("--allow-memory-overrun", is_flag=True,
              help="Train even when the estimated peak memory exceeds --max-memory.")
@click.option("--resume", type=click.Path(), help="A run directory (its latest checkpoint) or "
              "a checkpoint to continue from.")
@click.option("--stop-after", type=click.IntRange(min=0), default=None,
              help="Stop after this step as an interruption would (step checkpoint, no "
                   "final.apr); the schedule still follows --steps.")
@click.option("--force", is_flag=True, help="Start over in a run directory that holds a run.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no plan/eval lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout.")
@click.pass_context
@handle_errors
@one_report
def pretrain_command(ctx: click.Context, **values: Any) -> None:
    """Train a model from scratch (--arch) or fine-tune one (--init) on a corpus, with every
    data and configuration gate checked before step 1."""
    from .train import RunConfig, resume_run, start_run, train
    from .memory import parse_size
    quiet, as_json = values["quiet"], values["as_json"]
    progress, log = show_progress(quiet), log_lines(quiet)
    if values["max_memory"] is not None:
        parse_size(values["max_memory"])        # a bad size is refused before anything runs
    memory = {"max_memory": values["max_memory"],
              "allow_memory_overrun": values["allow_memory_overrun"]}
    if values["resume"]:
        given = _given(ctx, values)
        shape = _shape(values)
        if shape:
            given["shape"] = shape
        run = resume_run(values["resume"], given, progress=progress, log=log, **memory)
    else:
        missing = [f"--{n.replace('_', '-')}" for n in ("dataset", "run_dir") if not values[n]]
        if missing:
            raise click.UsageError(f"{' and '.join(missing)} required (or --resume RUN_DIR)")
        mode = values["mode"] or ("fine-tune" if values["init"] else "from-scratch")
        fields = {n: values[n] for n in TRAIN_OPTION_FIELDS if n != "mode"}
        cfg = RunConfig(mode=mode, shape=_shape(values), **fields)
        run = start_run(cfg, force=values["force"], progress=progress, log=log, **memory)
    summary = train(run, stop_after=values["stop_after"], progress=progress, log=log)
    if not run.main:
        return                          # rank 0 reports for a data-parallel run
    if as_json:
        click.echo(json.dumps(asdict(summary), indent=1))
    else:
        _print_summary(summary)
