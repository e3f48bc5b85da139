"""The reference training loop: pretraining from scratch or fine-tuning a model file, built so
that a run cannot fail silently.

Before step 1 (`start_run`, `resume_run`) every gate of `ref.gates` is checked (its notes
list them: device, vocabulary and sequence length, data starvation, data supply, the
validation split, an untrained init), each failing with a one-line `GateError` that says what
to change.

The architecture comes from one place: ``--arch PRESET`` (plus shape flags) from scratch, the
file's own metadata with ``--init``, where a shape flag that disagrees fails naming the fields.
Both a new and a resumed run are put together by one function, `_assemble_run`.

During the run (`train`): AdamW (`ref.optim`), warm-up + cosine schedule, global
gradient-norm clipping, validation on fixed batches every ``--eval-every`` steps, early
stopping after ``--patience`` evaluations without improvement. A non-finite loss or gradient
norm stops the run with a `TrainingError`; checkpoints are only written from finite
parameters, so the last one on disk is the last good state. Every step appends one JSON
object to ``metrics.jsonl``; ``loss.png`` is drawn at the end.

Checkpoints (``RUN_DIR/ckpt/step-NNNNNN.apr``, ``best.apr``, ``final.apr``; `ref.checkpoint`)
are self-contained APR v2 files: architecture keys, the embedded tokenizer, ``training.*``
provenance keys, a tied ``lm_head.weight`` stored as a copy of the embedding, and (except
``best.apr``, the deliverable) the optimizer state as ``__training__.exp_avg.<param>`` /
``__training__.exp_avg_sq.<param>`` tensors. A run holds no random state besides its seed:
initialization uses it once and the data order of pass e is a function of (seed, e), so
``--resume`` from a checkpoint continues exactly where an uninterrupted run would be.

The records (`RunConfig`, `TrainState`, `Run`, ...) live in `ref.run`; the names of those
three modules that callers use are importable from here too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from apr import names
from apr.atomic import remove_stale_in
from apr.config import ModelConfig, preset
from apr.console import progress_bar
from apr.errors import AprError, ConfigError, UnsupportedError
from apr.model import ModelView, open_model
from apr.tokenizer import TokenizerData

from .backend import Backend, blas_threads, blas_threads_settable
from .checkpoint import (CHECKPOINT_FORMAT, TrainingError, checkpoint_path, find_resume_checkpoint,
                         last_checkpoint, stop_error, write_checkpoint)
from .data import (DataPosition, PreparedData, TrainBatches, is_prepared, load_tokenizer,
                   open_prepared, prepare_dataset, read_manifest, tokenizer_hash,
                   validation_batches)
from .gates import (GateError, check_shape_flags, gate_data, gate_device, gate_init_loss,
                    gate_memory, gate_resume_overrides, gate_seq_length, gate_tokens_per_param,
                    gate_train_supply, gate_vocab, min_tokens_per_param, resolve_config)
from .load import model_from_view
from .memory import format_size
from .model import Model
from .optim import clip_grad_norm
from .parallel import MpiCollectives, NcclCollectives, World, params_digest, world
from .plot import plot_losses
from .run import (BEST, CKPT_DIR, DATA_DIR, FINAL, METRICS, PLOT, RUN_JSON, SHAPE_FIELDS,
                  MetricsLog, Run, RunConfig, RunPlan, RunSummary, StepRecord, Timings,
                  TrainState, atomic_text)
from .train_memory import (StepShape, estimate_training_memory, process_rss,
                           resolve_training_budget, what_fits)
from .zero import ShardedAdamW, make_optimizer, optimizer_state_nbytes

__all__ = [
    "train", "start_run", "resume_run", "evaluate", "track_validation", "summarize",
    "plot_metrics", "resolve_architecture", "resolve_tokenizer", "resolve_data",
    "prepare_run_dir", "make_plan", "log_plan",
    # re-exported from ref.run, ref.gates and ref.checkpoint
    "RunConfig", "TrainState", "RunPlan", "Run", "StepRecord", "RunSummary", "Timings",
    "MetricsLog", "SHAPE_FIELDS", "GateError", "TrainingError", "CHECKPOINT_FORMAT",
    "checkpoint_path", "write_checkpoint", "last_checkpoint", "find_resume_checkpoint",
]


# --------------------------------------------------------------------------- assembling a run

def resolve_architecture(cfg: RunConfig) -> tuple[ModelConfig, Optional[ModelView]]:
    """(config, init view): the preset with shape flags applied, or the init file's own
    architecture, which every shape flag must agree with."""
    if not cfg.init:
        try:
            return preset(cfg.arch).replace(**cfg.shape), None
        except ConfigError as e:
            raise GateError(f"--arch {cfg.arch}: {e}") from None
    view = open_model(cfg.init, verify=True)
    try:
        config = view.require_config()
        check_shape_flags(config, cfg.shape, f"--init {cfg.init}")
    except BaseException:
        view.close()
        raise
    return config, view


def resolve_tokenizer(cfg: RunConfig, init: Optional[ModelView]) -> TokenizerData:
    """--tokenizer, or the init model's embedded tokenizer; the two must agree when both exist."""
    embedded = init.tokenizer if init is not None else None
    if cfg.tokenizer:
        td = load_tokenizer(cfg.tokenizer)
        if embedded is not None and tokenizer_hash(td) != tokenizer_hash(embedded):
            raise GateError(f"--tokenizer {cfg.tokenizer} differs from the tokenizer embedded in "
                            f"--init {cfg.init}: omit --tokenizer to train with the model's own")
        return td
    if embedded is not None:
        return embedded
    if init is not None:
        raise GateError(f"--init {cfg.init} embeds no tokenizer: pass --tokenizer")
    raise GateError("--tokenizer is required from scratch (a tokenizer.json, an HF directory or "
                    "a model file that embeds one)")


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse to mix two runs in one directory; --force clears the old run's outputs."""
    leftovers = [p for p in (run_dir / METRICS, run_dir / CKPT_DIR, run_dir / RUN_JSON)
                 if p.exists()]
    if leftovers and not force:
        raise GateError(f"{run_dir} already holds a run ({', '.join(p.name for p in leftovers)}): "
                        f"continue it with --resume {run_dir}, or start over with --force")
    for p in leftovers + [run_dir / PLOT]:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def resolve_data(cfg: RunConfig, td: TokenizerData, run_dir: Path,
                 progress: bool) -> Path:
    """The prepared directory to read: --dataset itself, or RUN_DIR/data prepared from the
    corpus (reused when it already holds this corpus with this tokenizer)."""
    if is_prepared(cfg.dataset):
        return Path(cfg.dataset).resolve()
    target = run_dir / DATA_DIR
    if is_prepared(target):
        m = read_manifest(target)
        if (m.source == str(Path(cfg.dataset).resolve()) and m.tokenizer_hash == tokenizer_hash(td)
                and m.val_fraction == cfg.val_fraction):
            return target.resolve()
    prepare_dataset(cfg.dataset, td, target, val_fraction=cfg.val_fraction, force=True,
                    progress=progress)
    return target.resolve()


def step_workers(w: Optional[World]) -> int:
    """Threads `Model.loss_and_grads` may split a step's rows over on this rank: on the CPU
    as many as its BLAS has (each of them then single-threaded); ranks of a data-parallel
    run already share the cores, so one each."""
    return 1 if w is not None and w.size > 1 else blas_threads()


def _ranks_on_host(w: World) -> int:
    """The ranks of the run on this rank's host (their memory adds up); collective."""
    if w.size == 1 or w.comm is None:
        return 1
    from mpi4py import MPI
    node = w.comm.Split_type(MPI.COMM_TYPE_SHARED, key=w.rank)
    try:
        return node.Get_size()
    finally:
        node.Free()


def check_memory(cfg: RunConfig, config: ModelConfig, backend: Backend, w: World,
                 max_memory: Optional[str], allow: bool) -> dict[str, Any]:
    """The memory gate (`ref.gates.gate_memory`): the estimated peak of a step against the
    budget (``--max-memory``, or the default of `ref.train_memory.resolve_training_budget`),
    judged on rank 0 alone (each rank's reading of the free memory differs) for every rank.
    Returns the plan's ``memory`` entry."""
    threads = step_workers(w) if backend.xp is np and blas_threads_settable() else 1
    shape = StepShape(batch=cfg.batch_size, seq=cfg.seq_length, dtype=cfg.dtype, threads=threads,
                      ranks=w.size, zero=cfg.zero,
                      ranks_here=1 if backend.is_gpu else _ranks_on_host(w), gpu=backend.is_gpu)

    def judge() -> dict[str, Any]:
        budget, where = resolve_training_budget(max_memory, backend.is_gpu)
        process = 0 if backend.is_gpu else process_rss()
        estimate = estimate_training_memory(config, shape, process)
        fixes = what_fits(config, shape, process, budget) if estimate.peak > budget else []
        gate_memory(estimate, budget, where, fixes, allow)
        return {**estimate.to_dict(), "estimate": estimate.describe(), "budget_bytes": budget,
                "budget": where, "device": "gpu" if backend.is_gpu else "host",
                "over_budget": estimate.peak > budget}
    return _on_main(w, judge)


def make_plan(cfg: RunConfig, config: ModelConfig, data: PreparedData, batches: TrainBatches,
              backend: Backend, memory: Optional[dict[str, Any]] = None) -> RunPlan:
    params = config.param_count()
    planned = cfg.steps * cfg.global_batch * cfg.seq_length
    return RunPlan(
        params=params, planned_tokens=planned, tokens_per_param=planned / params,
        min_tokens_per_param=min_tokens_per_param(cfg), train_tokens=len(data.train),
        unique_tokens_per_param=len(data.train) / params,
        planned_epochs=cfg.steps / batches.batches_per_epoch,
        train_batches_per_epoch=batches.batches_per_epoch, val_tokens=len(data.val),
        val_batches=cfg.val_batches, ln_vocab=math.log(config.vocab_size),
        device=backend.description, memory=memory)


def _owned_params(model: Model) -> None:
    """Make every parameter a writable array of its own (a loaded one may be read-only)."""
    if model.backend.is_gpu:
        return   # CuPy arrays made by the backend are always its own
    for name, p in model.params.items():
        if not p.flags.writeable or not p.flags.c_contiguous:
            model.params[name] = np.array(p, copy=True)


def _wrap_notice(cfg: RunConfig, log: Callable[[str], None]) -> Callable[[int], None]:
    """Warn on the first wrap-around, and on every one with --warn-on-wrap-around."""
    def on_wrap(epoch: int) -> None:
        if cfg.warn_on_wrap or epoch == 1:
            more = "" if cfg.warn_on_wrap else " (--warn-on-wrap-around warns on every wrap)"
            log(f"warning: the train split is used up; starting pass {epoch + 1} over the same "
                f"data (wrap {epoch}){more}")
    return on_wrap


def _assemble_run(cfg: RunConfig, *, backend: Backend, tokenizer: TokenizerData,
                  config: ModelConfig, data: PreparedData, view: Optional[ModelView],
                  state: TrainState, log: Callable[[str], None],
                  init_format: Optional[str] = None, resumed_from: Optional[Path] = None,
                  memory: Optional[dict[str, Any]] = None) -> Run:
    """The run that `start_run` and `resume_run` both end in, with the data's gates in their
    order: the data fits the tokenizer and the embedding, the train split supplies the steps,
    the validation split its batches. The batches go on from ``state``'s data position; the
    model is read from ``view`` (the --init file, or the checkpoint resumed from, whose
    optimizer state is restored too) or initialized from the seed. ``view`` is still open."""
    gate_data(data, tokenizer, config, cfg.data_dir)
    batches = TrainBatches(data.train, cfg.global_batch, cfg.seq_length, cfg.seed, wrap=cfg.wrap,
                           on_wrap=_wrap_notice(cfg, log),
                           position=DataPosition(epoch=state.data_epoch, batch=state.data_batch))
    gate_train_supply(cfg, batches)
    val = validation_batches(data.val, cfg.batch_size, cfg.seq_length, cfg.val_batches)
    if view is not None:
        model = model_from_view(view, backend, cfg.np_dtype, cfg.matmul)
    else:
        model = Model.init_random(config, seed=cfg.seed, backend=backend, dtype=cfg.np_dtype,
                                  matmul=cfg.matmul)
    _owned_params(model)
    optimizer = make_optimizer(model.params, cfg.optimizer_config(), world(), cfg.zero)
    if resumed_from is not None:
        prefix = names.TRAINING_PREFIX
        try:
            optimizer.load_state({n[len(prefix):]: r.numpy(cfg.np_dtype)
                                  for n, r in view.training.items()}, state.optimizer_step)
        except (KeyError, ValueError) as e:
            raise GateError(f"--resume {resumed_from}: optimizer state does not match the model "
                            f"({e})") from None
    return Run(cfg=cfg, run_dir=Path(cfg.run_dir), backend=backend, tokenizer=tokenizer, world=world(),
               model=model, optimizer=optimizer, schedule=cfg.schedule(), data=data,
               batches=batches, val=val, state=state,
               plan=make_plan(cfg, config, data, batches, backend, memory),
               init_format=init_format,
               resumed_from=str(resumed_from) if resumed_from is not None else None)


def start_run(cfg: RunConfig, *, force: bool = False, progress: bool = False,
              log: Callable[[str], None] = lambda s: None, max_memory: Optional[str] = None,
              allow_memory_overrun: bool = False) -> Run:
    """Check every gate, prepare data, build the model and evaluate step 0. Under mpirun,
    every rank checks the same gates; rank 0 alone prepares the run directory and the data
    and the others read what it made. ``max_memory``: --max-memory (a size as people write
    it; None: the default budget); the memory gate is the machine's, not the run's, so it is
    not part of `RunConfig` and a resumed run takes it from its own command line."""
    w = world()
    log = log if w.main else _quiet
    cfg = resolve_config(dataclasses.replace(cfg, ranks=w.size))
    run_dir = Path(cfg.run_dir).resolve()
    backend = _gate_parallel_device(cfg, w)
    config, init = resolve_architecture(cfg)
    try:
        td = resolve_tokenizer(cfg, init)
        gate_vocab(td, config, cfg)
        gate_seq_length(cfg, config)
        gate_tokens_per_param(cfg, config.param_count())
        memory = check_memory(cfg, config, backend, w, max_memory, allow_memory_overrun)
        data_dir = _on_main(w, lambda: (prepare_run_dir(run_dir, force),
                                        str(resolve_data(cfg, td, run_dir, progress)))[1])
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir), data_dir=data_dir)
        run = _assemble_run(cfg, backend=backend, tokenizer=td, config=config,
                            data=open_prepared(cfg.data_dir), view=init, state=TrainState(),
                            log=log, init_format=init.format if init is not None else None,
                            memory=memory)
    finally:
        if init is not None:
            init.close()
    log_plan(run, log)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        val0 = evaluate(run.model, run.val)
    log(f"step 0: validation loss {val0:.4f} (ln(vocab_size) = {run.plan.ln_vocab:.4f})")
    gate_init_loss(cfg, val0, config.vocab_size)
    run.state.step0_val_loss = run.state.val_loss = val0
    if run.main:
        atomic_text(run_dir / RUN_JSON, json.dumps(cfg.to_dict(), indent=1))
    return run


def _quiet(_: str) -> None:
    """The log of a rank other than 0: rank 0 speaks for the run."""


def _gate_parallel_device(cfg: RunConfig, w: World) -> Backend:
    """The backend; with more than one rank on GPUs, NCCL set up first (it selects this
    rank's GPU), or a GateError saying why it cannot be."""
    why = None
    if w.size > 1 and cfg.device != "cpu":
        try:
            w.use_nccl()
        except UnsupportedError as e:
            why = str(e)
    if why and cfg.device == "cuda":
        raise GateError(f"{w.size} ranks on --device cuda need NCCL: {why}; run the ranks with "
                        "--device cpu")
    backend = gate_device(cfg.device)
    nccl = isinstance(w.collectives, NcclCollectives)
    if w.size > 1 and backend.is_gpu and not nccl:
        raise GateError(f"{w.size} ranks on --device {cfg.device} (a GPU) need NCCL: {why}; "
                        "run the ranks with --device cpu")
    if nccl and not backend.is_gpu:          # auto settled on the CPU: host buffers, MPI
        w.collectives = MpiCollectives(w.comm)
    return backend


def _on_main(w: World, work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0, its result on every rank; an error there is the same error on
    every rank (no rank waits for a result that will not come)."""
    if w.size == 1:
        return work()
    result, error = None, None
    if w.main:
        try:
            result = work()
        except AprError as e:
            error = e
        except OSError as e:      # a file rank 0 could not write: the same error everywhere
            where = getattr(e, "filename", None)
            error = AprError(f"{where}: {e.strerror}" if where and e.strerror else str(e))
    result, error = w.bcast((result, None if error is None else (type(error), str(error))))
    if error is not None:
        raise error[0](error[1])
    return result


def resume_run(path: str, given: dict[str, Any] | None = None, *, progress: bool = False,
               log: Callable[[str], None] = lambda s: None, max_memory: Optional[str] = None,
               allow_memory_overrun: bool = False) -> Run:
    """Rebuild a run from a checkpoint (or RUN_DIR's latest) so that it continues exactly (with
    the same number of ranks; with another, the global batch changes and the data goes on
    from the same sequence, as near as the new batch allows)."""
    w = world()
    log = log if w.main else _quiet
    src = Path(path)
    ckpt = find_resume_checkpoint(src)
    view = open_model(ckpt, verify=True)
    try:
        meta = view.metadata
        if meta.get("training.format") != CHECKPOINT_FORMAT or "training.run_config" not in meta:
            raise GateError(f"--resume {ckpt}: not a checkpoint written by pretrain "
                            "(no training.run_config)")
        given = dict(given or {})
        check_shape_flags(view.require_config(), given.pop("shape", {}), f"--resume {ckpt}")
        cfg = gate_resume_overrides(RunConfig.from_dict(meta["training.run_config"]), given,
                                    str(ckpt))
        run_dir = (src if src.is_dir() else
                   ckpt.parent.parent if ckpt.parent.name == CKPT_DIR else Path(cfg.run_dir))
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir.resolve()))
        if w.main:
            for stale in remove_stale_in(ckpt.parent):      # left by a run killed mid-write
                log(f"removed {stale.name}, the temporary of a checkpoint write that was killed")
        state = TrainState.from_metadata(meta)
        if cfg.ranks != w.size:
            cfg, state = _change_ranks(cfg, state, w.size, log)
        if state.step >= cfg.steps:
            raise GateError(f"--resume {ckpt}: the run is complete at step {state.step} "
                            f"(--steps {cfg.steps}): pass --steps N > {state.step} to train further")
        if not view.training:
            raise GateError(f"--resume {ckpt}: holds no optimizer state; resume from "
                            "step-NNNNNN.apr or final.apr")
        backend = _gate_parallel_device(cfg, w)
        config, td = view.require_config(), view.tokenizer
        if td is None:
            raise GateError(f"--resume {ckpt}: no embedded tokenizer")
        gate_tokens_per_param(cfg, config.param_count())
        memory = check_memory(cfg, config, backend, w, max_memory, allow_memory_overrun)
        data = open_prepared(cfg.data_dir)
        if data.manifest.content_hash != meta.get("training.data_hash"):
            raise GateError(f"--resume {ckpt}: the data in {cfg.data_dir} changed since the "
                            "checkpoint (content hash differs); restore it or start a new run")
        run = _assemble_run(cfg, backend=backend, tokenizer=td, config=config, data=data,
                            view=view, state=state, log=log,
                            init_format=meta.get("original_format"), resumed_from=ckpt,
                            memory=memory)
    finally:
        view.close()
    if run.main:
        MetricsLog.truncate_after(run.run_dir / METRICS, state.step)
    log(f"resuming from {ckpt} at step {state.step} of {cfg.steps}")
    log_plan(run, log)
    return run


def _change_ranks(cfg: RunConfig, state: TrainState, ranks: int,
                  log: Callable[[str], None]) -> tuple[RunConfig, TrainState]:
    """A checkpoint of ``cfg.ranks`` ranks resumed by ``ranks``: the global batch becomes
    ranks x batch_size, and the data goes on from the first sequence not yet read."""
    old, new = cfg.global_batch, cfg.batch_size * ranks
    read = state.data_batch * old
    batch = read // new
    log(f"warning: resuming a {cfg.ranks}-rank run with {ranks} rank(s): the global batch "
        f"changes from {old} to {new} sequences"
        + ("" if read % new == 0 else f" ({read - batch * new} sequences of this pass are skipped)"))
    return (dataclasses.replace(cfg, ranks=ranks),
            dataclasses.replace(state, data_batch=batch))


def log_plan(run: Run, log: Callable[[str], None]) -> None:
    cfg, p, m = run.cfg, run.plan, run.data.manifest
    c = run.model.config
    what = f"fine-tune of {cfg.init}" if cfg.fine_tune else f"from scratch (--arch {cfg.arch})"
    log(f"model: {c.family}, hidden {c.hidden_size}, {c.num_layers} layers, vocab "
        f"{c.vocab_size}: {p.params:,} parameters, {what}")
    log(f"data: {m.train.tokens:,} train tokens ({m.train.documents} documents), "
        f"{m.val.tokens:,} validation tokens ({m.val.documents} documents, {cfg.val_batches} "
        f"batches), {cfg.data_dir}")
    allowed = (" (below the floor: allowed by --allow-data-starvation)"
               if p.tokens_per_param < p.min_tokens_per_param else "")
    ranks = f" ({cfg.ranks} ranks x {cfg.batch_size})" if cfg.ranks > 1 else ""
    log(f"plan: {cfg.steps} steps x {cfg.global_batch}{ranks} x {cfg.seq_length} = {p.planned_tokens:,} "
        f"tokens = {p.tokens_per_param:.3g} tokens/parameter (floor {p.min_tokens_per_param:g})"
        f"{allowed}; {p.unique_tokens_per_param:.3g} unique train tokens/parameter; "
        f"{p.planned_epochs:.3g} passes over the train split")
    log(f"device: {p.device}")
    if p.memory:
        mem = p.memory
        over = (" (above it: allowed by --allow-memory-overrun)" if mem["over_budget"] else "")
        where = " of GPU memory" if mem["device"] == "gpu" else ""
        log(f"memory: estimated peak {mem['estimate']} of a {format_size(mem['budget_bytes'])}"
            f"{where} budget ({mem['budget']}){over}")


# --------------------------------------------------------------------------- the loop

def train(run: Run, *, stop_after: Optional[int] = None, progress: bool = False,
          log: Callable[[str], None] = lambda s: None) -> RunSummary:
    """Train until --steps (or early stopping, or ``stop_after`` steps, which stops as an
    interruption would: a step checkpoint, no final.apr), then draw loss.png. Raises
    TrainingError on a non-finite loss, gradient norm or validation loss."""
    cfg, state = run.cfg, run.state
    if not run.main:
        progress, log = False, _quiet
    leg = _Leg(run, progress, log)
    status = "completed"
    # Non-finite values are detected and reported as errors, not warned about.
    with leg, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if leg.first_step == 0:
            leg.record_start()
        while state.step < cfg.steps:
            if stop_after is not None and state.step >= stop_after:
                status = "stopped-after"
                break
            record = leg.step()
            stop = False
            if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
                record.val_loss, stop = leg.validate()
                record.event = "early-stop" if stop else None
            leg.write(record)
            if state.step % cfg.check_every == 0:
                leg.check_replicas()
            if state.step % cfg.save_every == 0 and state.step < cfg.steps:   # the last is final.apr
                leg.save(checkpoint_path(run, state.step), "step")
            if stop:
                log(f"early stop at step {state.step}: no validation improvement in "
                    f"{cfg.patience} evaluations (best {state.best_val_loss:.4f} at step "
                    f"{state.best_step})")
                status = "early-stopped"
                break
        state.seconds = leg.seconds()
        # final.apr; or, stopped as if interrupted, the step checkpoint (if not just written)
        if status != "stopped-after":
            leg.save(run.ckpt_dir / FINAL, "final")
        elif state.step % cfg.save_every or state.step == 0:
            leg.save(checkpoint_path(run, state.step), "step")
    if run.main:
        with leg.timings.phase("log"):
            plot_metrics(run.run_dir / METRICS, run.run_dir / PLOT)
    leg.timings.total = leg.elapsed()
    return summarize(run, status, leg.first_step, leg.timings)


class _Leg:
    """One call of `train` (a resumed run has several legs): the run it moves on, its metrics
    log, progress bar, log function and `Timings`, its first step, and the run's seconds before
    it. A ``with`` block closes the bar and the metrics log."""

    def __init__(self, run: Run, progress: bool, log: Callable[[str], None]):
        self.run, self.progress, self.log = run, progress, log
        self.timings = Timings()
        self.first_step, self.prior_seconds = run.state.step, run.state.seconds
        self.workers = step_workers(run.world)      # threads of Model.loss_and_grads
        self.start = time.perf_counter()
        self.metrics = MetricsLog(run.run_dir / METRICS) if run.main else None
        self.bar = progress_bar(progress, total=run.cfg.steps, initial=run.state.step,
                                unit="step", desc="pretrain", leave=True)

    def __enter__(self) -> "_Leg":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()

    def log_record(self, record: StepRecord) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def elapsed(self) -> float:
        """Wall time of this leg so far."""
        return time.perf_counter() - self.start

    def seconds(self) -> float:
        """Wall time of the whole run so far (earlier legs included)."""
        return self.prior_seconds + self.elapsed()

    def tokens_per_second(self) -> float:
        cfg = self.run.cfg
        done = (self.run.state.step - self.first_step) * cfg.global_batch * cfg.seq_length
        return done / max(1e-9, self.elapsed())

    def record_start(self) -> None:
        """Step 0: the initial validation loss (evaluated by start_run) and best.apr."""
        val0 = self.run.state.step0_val_loss
        self.log_record(StepRecord(step=0, loss=None, lr=None, grad_norm=None, tokens_seen=0,
                                      epoch=0.0, wraps=0, seconds=0.0, val_loss=val0,
                                      event="start"))
        with self.timings.phase("checkpoint"):
            track_validation(self.run, val0)

    def step(self) -> StepRecord:
        """One optimizer step; its record, with the seconds still to fill in."""
        run, state = self.run, self.run.state
        step = state.step + 1
        with self.timings.phase("data"):
            batch = next(run.batches)                  # the global batch: this rank's rows
            rank = run.world.rank if run.world else 0
            rows = slice(rank * run.cfg.batch_size, (rank + 1) * run.cfg.batch_size)
        with self.timings.phase("model"):
            loss, grads = run.model.loss_and_grads(batch.inputs[rows], batch.targets[rows],
                                                   workers=self.workers)
        zero = isinstance(run.optimizer, ShardedAdamW)
        if run.world is not None and run.world.size > 1:
            with self.timings.phase("allreduce"):    # the mean over the global batch
                if zero:                             # ... this rank's shard of it
                    grads = run.optimizer.reduce_grads(grads)
                else:
                    names_ = list(grads)
                    grads = dict(zip(names_, run.world.mean_([grads[n] for n in names_])))
                loss = run.world.mean(loss)
        if not math.isfinite(loss):
            raise self.non_finite(step, "loss", "the training loss", loss)
        with self.timings.phase("optimizer"):
            norm = (run.optimizer.clip(grads, run.cfg.max_grad_norm) if zero else
                    clip_grad_norm(grads, run.cfg.max_grad_norm))
            if not math.isfinite(norm):
                raise self.non_finite(step, "grad_norm", "the gradient norm", norm)
            lr = run.schedule(step)
            run.optimizer.step(run.model.params, grads, lr)
            del grads   # freeing them is part of the step
            run.backend.synchronize()
        if zero:
            with self.timings.phase("allreduce"):    # every rank's updated shard, everywhere
                run.optimizer.gather_params(run.model.params)
                run.backend.synchronize()
        state.step = step
        state.tokens_seen += batch.inputs.size
        state.loss = loss
        return StepRecord(step=step, loss=loss, lr=lr, grad_norm=norm,
                          tokens_seen=state.tokens_seen, epoch=run.batches.epochs,
                          wraps=run.batches.wraps, seconds=0.0)

    def validate(self) -> tuple[float, bool]:
        """The validation loss at this step (best.apr kept up to date), and whether early
        stopping triggers."""
        with self.timings.phase("eval"):
            val = evaluate(self.run.model, self.run.val)
        if not math.isfinite(val):
            raise self.non_finite(self.run.state.step, "val_loss", "the validation loss", val)
        with self.timings.phase("checkpoint"):
            stop = track_validation(self.run, val)
        return val, stop

    def write(self, record: StepRecord) -> None:
        """The step's line in metrics.jsonl, and the progress bar (loss, tokens/s, ETA) or,
        without a bar, one log line per evaluation."""
        with self.timings.phase("log"):
            record.seconds = self.run.state.seconds = self.seconds()
            self.log_record(record)
            if self.progress:
                self.bar.set_postfix(loss=f"{record.loss:.3f}",
                                     tok_s=f"{self.tokens_per_second():,.0f}", refresh=False)
                self.bar.update(1)
            elif record.val_loss is not None:
                self.log(f"step {record.step}/{self.run.cfg.steps}: loss {record.loss:.4f}, "
                         f"validation loss {record.val_loss:.4f}, lr {record.lr:.3g}, "
                         f"{self.tokens_per_second():,.0f} tokens/s")

    def save(self, path: Path, kind: str) -> None:
        """A checkpoint written by rank 0; the optimizer state comes from every rank under
        ZeRO, and an error writing it stops every rank."""
        run = self.run
        self.check_replicas()
        with self.timings.phase("checkpoint"):
            state = run.optimizer.state_tensors()      # under ZeRO: gathered to rank 0
            _on_main(run.world or World(), lambda: write_checkpoint(
                run, path, kind, with_optimizer=True, optimizer_state=state))

    def check_replicas(self) -> None:
        """Every rank holds the same parameters (else a ParallelError naming the ranks)."""
        run = self.run
        if run.world is not None and run.world.size > 1:
            with self.timings.phase("allreduce"):
                run.world.check_same(params_digest(run.model.params, run.backend.to_numpy),
                                     f"step {run.state.step}: parameters")

    def non_finite(self, step: int, key: str, what: str, value: float) -> TrainingError:
        """Record the failure at ``step`` in metrics.jsonl and build the error."""
        run = self.run
        self.log_record(StepRecord(step=step, loss=None, lr=run.schedule(step), grad_norm=None,
                                      tokens_seen=run.state.tokens_seen, epoch=run.batches.epochs,
                                      wraps=run.batches.wraps, seconds=run.state.seconds,
                                      event=f"non-finite {key}"))
        return stop_error(run, step, what, value)


def evaluate(model: Model, batches: list[np.ndarray]) -> float:
    """Mean validation loss over the fixed batches (every batch has the same token count)."""
    total = 0.0
    for tokens in batches:
        total += model.loss(tokens[:, :-1], tokens[:, 1:])
    return total / len(batches)


def track_validation(run: Run, val_loss: float) -> bool:
    """Update best / patience bookkeeping and best.apr; True when early stopping triggers."""
    s = run.state
    s.val_loss = val_loss
    if s.best_val_loss is None or val_loss < s.best_val_loss:
        s.best_val_loss, s.best_step, s.evals_since_best = val_loss, s.step, 0
        _on_main(run.world or World(), lambda: write_checkpoint(
            run, run.ckpt_dir / BEST, "best", with_optimizer=False, check_loss=False))
        return False
    s.evals_since_best += 1
    return bool(run.cfg.patience) and s.evals_since_best >= run.cfg.patience


def summarize(run: Run, status: str, first_step: int, timings: Timings) -> RunSummary:
    cfg, s = run.cfg, run.state
    trained = (s.step - first_step) * cfg.global_batch * cfg.seq_length
    last = last_checkpoint(run)
    best = run.ckpt_dir / BEST
    return RunSummary(
        run_dir=str(run.run_dir), status=status, resumed_from=run.resumed_from, mode=cfg.mode,
        arch=cfg.arch, init=cfg.init, config=run.model.config.to_dict(),
        device=run.backend.description, params=run.plan.params, step=s.step, steps=cfg.steps,
        steps_this_run=s.step - first_step, tokens_seen=s.tokens_seen, plan=asdict(run.plan),
        epochs=run.batches.epochs, wraps=run.batches.wraps, step0_val_loss=s.step0_val_loss,
        ln_vocab=run.plan.ln_vocab, loss=s.loss, val_loss=s.val_loss,
        best_val_loss=s.best_val_loss, best_step=s.best_step,
        checkpoints={"final": str(run.ckpt_dir / FINAL) if status != "stopped-after" else None,
                     "best": str(best) if best.exists() else None,
                     "last": str(last) if last else None},
        metrics=str(run.run_dir / METRICS), plot=str(run.run_dir / PLOT),
        data=run.data.manifest.summary(), seconds=s.seconds,
        tokens_per_second=trained / timings.total if timings.total else 0.0,
        timings=asdict(timings), overhead_share=timings.overhead_share,
        optimizer_state_bytes=optimizer_state_nbytes(run.optimizer))


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """loss.png from metrics.jsonl."""
    plot_losses(MetricsLog.read(metrics_path), png_path)
