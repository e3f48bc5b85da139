"""The checks before step 1 that refuse a training run, and their thresholds. `start_run` and
`resume_run` (`ref.train`) check them in a fixed order, each failing with a one-line
`GateError` that says what to change:

* the combination of ``--mode``, ``--arch`` and ``--init``, and the ranges of the counts and
  ``--lr`` (`resolve_config`); on ``--resume``, a flag that would change the trajectory;
* ``--device cuda`` without a usable GPU (no CPU fallback);
* a tokenizer with more tokens than the model's ``vocab_size``; a ``--seq-length`` above
  ``max_position_embeddings``; a shape flag that disagrees with the ``--init`` file;
* memory: the estimated peak of a step (`ref.train_memory`: weights, gradients, AdamW state,
  activations) above the budget, ``--max-memory`` or by default half the memory the machine
  has available (`ref.memory`), unless ``--allow-memory-overrun``; the refusal names the
  flags that would make it fit;
* data starvation: planned training tokens (steps x batch x seq) per parameter below
  `FROM_SCRATCH_MIN_TOKENS_PER_PARAM` (20, the compute-optimal ratio of Hoffmann et al. 2022)
  from scratch, or below `FINE_TUNE_MIN_TOKENS_PER_PARAM` (0.1) for a fine-tune, unless
  ``--allow-data-starvation``. A fine-tune only has to move an already trained model, so its
  bar is 200x lower, but a run below 0.1 token per parameter touches each weight's gradient
  with so little data that it is almost always a mistake (a wrong ``--steps``, a tiny corpus);
* prepared data from another tokenizer, or with token ids beyond the embedding;
* a train split that cannot supply the planned steps without wrapping under ``--no-wrap``;
* a validation split smaller than ``--val-batches`` full batches (`ref.data`);
* a fine-tune whose init model scores no better than chance on the validation data at step 0
  (validation loss not at least `INIT_LOSS_MARGIN_NATS` below ln(vocab_size): a wrong
  tokenizer, a layout defect, or an untrained file), unless ``--allow-untrained-init``; and
  from any start, a non-finite step-0 validation loss.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from apr.config import ModelConfig
from apr.errors import AprError
from apr.tokenizer import TokenizerData

from .backend import Backend, get_backend
from .data import PreparedData, TrainBatches, required_steps, tokenizer_hash
from .memory import format_size
from .precision import PRECISIONS
from .run import (DEFAULT_LR, MODES, PATH_FIELDS, RESUME_OVERRIDABLE, RunConfig, flag,
                  flag_value)
from .train_memory import MemoryEstimate

FROM_SCRATCH_MIN_TOKENS_PER_PARAM = 20.0
FINE_TUNE_MIN_TOKENS_PER_PARAM = 0.1
INIT_LOSS_MARGIN_NATS = 1.0


class GateError(AprError):
    """A check before step 1 refused the run; the message says what to change."""


def resolve_config(cfg: RunConfig) -> RunConfig:
    """A copy with the defaults that depend on other fields filled in, after checking
    the combination of mode, --arch and --init."""
    if cfg.mode not in MODES:
        raise GateError(f"--mode {cfg.mode!r}: choose from {', '.join(MODES)}")
    if cfg.fine_tune and not cfg.init:
        raise GateError("--mode fine-tune needs --init MODEL (an APR, GGUF or HF model)")
    if not cfg.fine_tune and cfg.init:
        raise GateError("--init MODEL is a fine-tune: drop --mode from-scratch (or pass "
                        "--mode fine-tune)")
    if cfg.init and cfg.arch:
        raise GateError(f"--arch {cfg.arch} and --init both given: with --init the "
                        "architecture comes from the file; drop --arch")
    if not cfg.init and not cfg.arch:
        raise GateError("a from-scratch run needs --arch PRESET (or --init MODEL to "
                        "fine-tune a model file)")
    if cfg.dtype not in PRECISIONS:
        raise GateError(f"--dtype {cfg.dtype}: must be one of {', '.join(PRECISIONS)}")
    for name in ("steps", "batch_size", "seq_length", "eval_every", "val_batches", "save_every",
                 "check_every"):
        if getattr(cfg, name) < 1:
            raise GateError(f"{flag(name)} {getattr(cfg, name)}: must be at least 1")
    lr = DEFAULT_LR[cfg.mode] if cfg.lr is None else cfg.lr
    if not lr > 0:
        raise GateError(f"--lr {lr}: must be positive")
    warmup = min(100, cfg.steps // 10) if cfg.warmup_steps is None else cfg.warmup_steps
    return dataclasses.replace(cfg, lr=float(lr), warmup_steps=int(warmup))


def gate_resume_overrides(cfg: RunConfig, given: dict[str, Any], where: str) -> RunConfig:
    """The stored config with the command line's changes that keep the trajectory."""
    def same(k: str, v: Any) -> bool:
        stored = getattr(cfg, k, None)
        if k in PATH_FIELDS and stored is not None and v is not None:
            return Path(stored).resolve() == Path(v).resolve()
        return stored == v

    refused = {k: v for k, v in given.items() if k not in RESUME_OVERRIDABLE and not same(k, v)}
    if refused:
        parts = ", ".join(f"{flag_value(k, v)} (the run has {k}={getattr(cfg, k, None)})"
                          for k, v in refused.items())
        raise GateError(f"--resume {where}: {parts} would change the run, not continue it: drop "
                        "these flags (only " + ", ".join(sorted(flag(k) for k in RESUME_OVERRIDABLE))
                        + " may change on resume)")
    return dataclasses.replace(cfg, **{k: v for k, v in given.items() if k in RESUME_OVERRIDABLE})


def gate_device(device: str) -> Backend:
    """The backend for --device; no GPU behind --device cuda is an error, never a CPU run."""
    try:
        return get_backend(device)
    except AprError as e:
        raise GateError(f"{e}; run with --device cpu (or auto), or where a GPU is usable") from None


def gate_vocab(td: TokenizerData, config: ModelConfig, cfg: RunConfig) -> None:
    """Every token id the tokenizer can produce must have an embedding row."""
    if td.vocab_size <= config.vocab_size:
        return
    fix = ("use the model's own tokenizer (omit --tokenizer)" if cfg.fine_tune else
           f"pass --vocab-size {td.vocab_size} (or more), or a tokenizer with at most "
           f"{config.vocab_size} tokens")
    raise GateError(f"the tokenizer has {td.vocab_size} tokens but the model's vocab_size is "
                    f"{config.vocab_size}: {fix}")


def gate_seq_length(cfg: RunConfig, config: ModelConfig) -> None:
    if cfg.seq_length > config.max_position_embeddings:
        raise GateError(f"--seq-length {cfg.seq_length} exceeds the model's "
                        f"max_position_embeddings {config.max_position_embeddings}: lower "
                        "--seq-length")


def check_shape_flags(config: ModelConfig, shape: dict[str, int], where: str) -> None:
    """Every requested shape field must equal the file's; the error names each that differs."""
    conflicts = {k: v for k, v in shape.items() if getattr(config, k) != v}
    if conflicts:
        has = ", ".join(f"{k}={getattr(config, k)}" for k in conflicts)
        given = ", ".join(flag_value(k, v) for k, v in conflicts.items())
        raise GateError(f"{where}: the architecture comes from the file, which has {has}, but "
                        f"{given} was requested: drop these flags")


def min_tokens_per_param(cfg: RunConfig) -> float:
    return FINE_TUNE_MIN_TOKENS_PER_PARAM if cfg.fine_tune else FROM_SCRATCH_MIN_TOKENS_PER_PARAM


def gate_tokens_per_param(cfg: RunConfig, params: int) -> None:
    """Refuse a data-starved run (see the module notes) unless --allow-data-starvation."""
    planned = cfg.steps * cfg.global_batch * cfg.seq_length
    floor = min_tokens_per_param(cfg)
    if planned / params >= floor or cfg.allow_data_starvation:
        return
    need = required_steps(floor * params, cfg.global_batch, cfg.seq_length)
    kind = "a fine-tune" if cfg.fine_tune else "a from-scratch run"
    raise GateError(
        f"data starvation: {cfg.steps} steps x {cfg.global_batch} x {cfg.seq_length} = "
        f"{planned:,} training tokens is {planned / params:.3g} tokens per parameter for "
        f"{params:,} parameters; {kind} needs at least {floor:g}: raise --steps to {need:,} "
        f"(or --batch-size/--seq-length), use a smaller model, or pass --allow-data-starvation")


def gate_memory(estimate: MemoryEstimate, budget: int, where: str, fixes: list[str],
                allow: bool) -> None:
    """Refuse a run whose estimated peak memory exceeds the budget, unless
    --allow-memory-overrun; ``where``: the budget's source, ``fixes``: the flags that would
    make the run fit (`ref.train_memory.what_fits`)."""
    if estimate.peak <= budget or allow:
        return
    process = estimate.part("process") * estimate.ranks_here
    if fixes:
        change = f"use {' or '.join(fixes)}, "
    elif process >= budget:
        change = f"no run fits (the process alone holds {format_size(process)} already): "
    else:
        change = "use a smaller model (no single flag brings it within the budget), "
    raise GateError(
        f"memory: training needs an estimated {estimate.describe()} at its peak, above the "
        f"budget of {format_size(budget)} ({where}): {change}raise --max-memory, or pass "
        "--allow-memory-overrun")


def gate_data(data: PreparedData, td: TokenizerData, config: ModelConfig, where: str) -> None:
    """The prepared data must come from this tokenizer and fit the embedding."""
    m = data.manifest
    expected = tokenizer_hash(td)
    if m.tokenizer_hash != expected:
        raise GateError(f"{where} was tokenized with another tokenizer ({m.tokenizer_hash[:19]}..., "
                        f"this run's is {expected[:19]}...): re-run prepare-data with this "
                        "tokenizer, or pass the tokenizer it was prepared with")
    if m.max_token_id >= config.vocab_size:
        raise GateError(f"{where} holds token id {m.max_token_id}, beyond the model's vocab_size "
                        f"{config.vocab_size}: re-run prepare-data with the model's tokenizer")


def gate_train_supply(cfg: RunConfig, batches: TrainBatches) -> None:
    """Under --no-wrap the train split must supply every planned step (all legs of a resumed
    run together) in one pass."""
    if cfg.wrap or cfg.steps <= batches.batches_per_epoch:
        return
    raise GateError(
        f"--no-wrap: the train split supplies {batches.batches_per_epoch} batches of "
        f"{cfg.global_batch} x {cfg.seq_length} tokens in one pass "
        f"({batches.tokens_per_epoch:,} tokens) but --steps {cfg.steps} needs {cfg.steps}: add "
        f"data, lower --steps to {batches.batches_per_epoch}, or drop --no-wrap (wraps are "
        "counted and warned)")


def better_than_chance(loss: float, vocab_size: int) -> bool:
    """Whether a mean next-token loss (nats) is at least `INIT_LOSS_MARGIN_NATS` below
    ln(vocab_size), the loss of a uniform guess: the bar a trained model clears on text it
    models (pretrain's step-0 gate for an init, qa's forward gate)."""
    return math.isfinite(loss) and loss <= math.log(vocab_size) - INIT_LOSS_MARGIN_NATS


def gate_init_loss(cfg: RunConfig, val_loss: float, vocab_size: int) -> None:
    """The step-0 validation loss must be finite, and a fine-tune must start from a model that
    predicts the data better than chance."""
    if not math.isfinite(val_loss):
        raise GateError(f"step 0: the validation loss of the initial model is {val_loss}: its "
                        "weights hold non-finite or overflowing values; check the --init file")
    ln_vocab = math.log(vocab_size)
    if not cfg.fine_tune or cfg.allow_untrained_init or better_than_chance(val_loss, vocab_size):
        return
    raise GateError(
        f"--init {cfg.init}: step-0 validation loss {val_loss:.4f} is not {INIT_LOSS_MARGIN_NATS:g} "
        f"nat below ln(vocab_size) = {ln_vocab:.4f}, i.e. the model predicts this data no better "
        "than chance (a wrong tokenizer, a layout defect, or an untrained file): check the file "
        "(apr-ref qa, or apr-ref diff against its source), or pass --allow-untrained-init")
