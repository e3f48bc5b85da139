"""The reference training loop: pretraining from scratch or fine-tuning a model file, built so
that a run cannot fail silently.

Before step 1 (`start_run`, `resume_run`) every gate below is checked, each failing with a
one-line `GateError` that says what to change:

* ``--device cuda`` without a usable GPU (no CPU fallback);
* a tokenizer with more tokens than the model's ``vocab_size``; a ``--seq-length`` above
  ``max_position_embeddings``;
* data starvation: planned training tokens (steps x batch x seq) per parameter below
  `FROM_SCRATCH_MIN_TOKENS_PER_PARAM` (20, the compute-optimal ratio of Hoffmann et al. 2022)
  from scratch, or below `FINE_TUNE_MIN_TOKENS_PER_PARAM` (0.1) for a fine-tune, unless
  ``--allow-data-starvation``. A fine-tune only has to move an already trained model, so its
  bar is 200x lower, but a run below 0.1 token per parameter touches each weight's gradient
  with so little data that it is almost always a mistake (a wrong ``--steps``, a tiny corpus);
* a train split that cannot supply the planned steps without wrapping under ``--no-wrap``;
* a validation split smaller than ``--val-batches`` full batches;
* a fine-tune whose init model scores no better than chance on the validation data at step 0
  (validation loss not at least `INIT_LOSS_MARGIN_NATS` below ln(vocab_size): a wrong
  tokenizer, a layout defect, or an untrained file), unless ``--allow-untrained-init``.

The architecture comes from one place: ``--arch PRESET`` (plus shape flags) from scratch, the
file's own metadata with ``--init``, where a shape flag that disagrees fails naming the fields.

During the run: AdamW (`ref.optim`), warm-up + cosine schedule, global gradient-norm clipping,
validation on fixed batches every ``--eval-every`` steps, early stopping after ``--patience``
evaluations without improvement. A non-finite loss or gradient norm stops the run with a
`TrainingError`; checkpoints are only written from finite parameters, so the last one on disk
is the last good state. Every step appends one JSON object to ``metrics.jsonl``; ``loss.png``
is drawn at the end.

Checkpoints (``RUN_DIR/ckpt/step-NNNNNN.apr``, ``best.apr``, ``final.apr``) are self-contained
APR v2 files: architecture keys, the embedded tokenizer, ``training.*`` provenance keys, a
tied ``lm_head.weight`` stored as a copy of the embedding, and (except ``best.apr``, the
deliverable) the optimizer state as ``__training__.exp_avg.<param>`` /
``__training__.exp_avg_sq.<param>`` tensors. A run holds no random state besides its seed:
initialization uses it once and the data order of pass e is a function of (seed, e), so
``--resume`` from a checkpoint continues exactly where an uninterrupted run would be.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from apr import names
from apr.atomic import atomic_file, remove_stale_in
from apr.config import ModelConfig, preset
from apr.container import AprFile, TensorSource, tensor_source, write_apr
from apr.errors import AprError, ConfigError
from apr.model import ModelView, open_model
from apr.tokenizer import TokenizerData
from apr.tokenizer import to_apr_metadata as tokenizer_metadata

from .backend import Backend, get_backend
from .data import (DataPosition, PreparedData, TrainBatches, is_prepared, load_tokenizer,
                   open_prepared, prepare_dataset, read_manifest, required_steps,
                   tokenizer_hash, validation_batches)
from .load import model_from_view
from .model import EMBED, LM_HEAD, Model
from .optim import AdamW, AdamWConfig, CosineSchedule, clip_grad_norm
from .plot import plot_losses

FROM_SCRATCH_MIN_TOKENS_PER_PARAM = 20.0
FINE_TUNE_MIN_TOKENS_PER_PARAM = 0.1
INIT_LOSS_MARGIN_NATS = 1.0
DEFAULT_LR = {"from-scratch": 3e-4, "fine-tune": 3e-5}
MODES = ("from-scratch", "fine-tune")

CKPT_DIR = "ckpt"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
RUN_JSON = "run.json"
DATA_DIR = "data"
BEST = "best.apr"
FINAL = "final.apr"
CHECKPOINT_FORMAT = "apr-ref-train/1"

# Shape flags: ModelConfig fields a command line may set (from scratch) or must agree with
# (with --init).
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "vocab_size", "max_position_embeddings")

# RunConfig fields that a resumed run may change: they do not alter the trajectory up to the
# checkpoint (steps extends or shortens the schedule from there on).
RESUME_OVERRIDABLE = frozenset({
    "steps", "eval_every", "save_every", "patience", "device", "wrap", "warn_on_wrap",
    "allow_data_starvation", "allow_untrained_init"})


PATH_FIELDS = frozenset({"dataset", "run_dir", "tokenizer", "init"})


class GateError(AprError):
    """A check before step 1 refused the run; the message says what to change."""


class TrainingError(AprError):
    """The run stopped during training (a non-finite loss or gradient)."""


_FLAG_SPELLING = {"wrap": "--no-wrap", "warn_on_wrap": "--warn-on-wrap-around"}


def flag(field_name: str) -> str:
    """The command-line spelling of a RunConfig / ModelConfig field."""
    return _FLAG_SPELLING.get(field_name, "--" + field_name.replace("_", "-"))


def _flag_value(field_name: str, value: Any) -> str:
    return flag(field_name) if isinstance(value, bool) else f"{flag(field_name)} {value}"


# --------------------------------------------------------------------------- configuration

@dataclass
class RunConfig:
    """Everything that decides a run's trajectory (stored in every checkpoint)."""
    dataset: str
    run_dir: str
    tokenizer: Optional[str] = None
    mode: str = "from-scratch"
    arch: Optional[str] = None
    init: Optional[str] = None
    shape: dict[str, int] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 8
    seq_length: int = 256
    lr: Optional[float] = None              # None: DEFAULT_LR[mode]
    min_lr_ratio: float = 0.1
    warmup_steps: Optional[int] = None      # None: min(100, steps // 10)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    eval_every: int = 100
    val_batches: int = 20
    save_every: int = 500
    patience: int = 0                        # 0: no early stopping
    val_fraction: float = 0.1
    wrap: bool = True
    warn_on_wrap: bool = False
    allow_data_starvation: bool = False
    allow_untrained_init: bool = False
    data_dir: Optional[str] = None           # the prepared data actually read (set by start_run)

    @property
    def fine_tune(self) -> bool:
        return self.mode == "fine-tune"

    def resolved(self) -> "RunConfig":
        """A copy with the defaults that depend on other fields filled in, after checking
        the combination of mode, --arch and --init."""
        if self.mode not in MODES:
            raise GateError(f"--mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.fine_tune and not self.init:
            raise GateError("--mode fine-tune needs --init MODEL (an APR, GGUF or HF model)")
        if not self.fine_tune and self.init:
            raise GateError("--init MODEL is a fine-tune: drop --mode from-scratch (or pass "
                            "--mode fine-tune)")
        if self.init and self.arch:
            raise GateError(f"--arch {self.arch} and --init both given: with --init the "
                            "architecture comes from the file; drop --arch")
        if not self.init and not self.arch:
            raise GateError("a from-scratch run needs --arch PRESET (or --init MODEL to "
                            "fine-tune a model file)")
        for name in ("steps", "batch_size", "seq_length", "eval_every", "val_batches", "save_every"):
            if getattr(self, name) < 1:
                raise GateError(f"{flag(name)} {getattr(self, name)}: must be at least 1")
        lr = DEFAULT_LR[self.mode] if self.lr is None else self.lr
        if not lr > 0:
            raise GateError(f"--lr {lr}: must be positive")
        warmup = min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps
        return dataclasses.replace(self, lr=float(lr), warmup_steps=int(warmup))

    def optimizer_config(self) -> AdamWConfig:
        return AdamWConfig(self.beta1, self.beta2, self.eps, self.weight_decay)

    def schedule(self) -> CosineSchedule:
        return CosineSchedule(self.lr, self.warmup_steps, self.steps, self.min_lr_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint as ``training.*`` keys."""
    step: int = 0
    tokens_seen: int = 0
    data_epoch: int = 0
    data_batch: int = 0
    loss: Optional[float] = None
    val_loss: Optional[float] = None
    step0_val_loss: Optional[float] = None
    best_val_loss: Optional[float] = None
    best_step: Optional[int] = None
    evals_since_best: int = 0
    seconds: float = 0.0
    optimizer_step: int = 0

    def to_metadata(self) -> dict[str, Any]:
        return {f"training.{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "TrainState":
        values = {}
        for f in dataclasses.fields(cls):
            key = f"training.{f.name}"
            if key not in meta:
                raise ConfigError(f"checkpoint metadata lacks {key}; it was not written by "
                                  "this trainer (or is damaged)")
            values[f.name] = meta[key]
        return cls(**values)


@dataclass
class RunPlan:
    """The numbers the gates look at, reported before step 1 and in the summary."""
    params: int
    planned_tokens: int
    tokens_per_param: float
    min_tokens_per_param: float
    train_tokens: int
    unique_tokens_per_param: float
    planned_epochs: float
    train_batches_per_epoch: int
    val_tokens: int
    val_batches: int
    ln_vocab: float
    device: str


@dataclass
class Timings:
    """Wall time of the loop, by what it was spent on (seconds)."""
    data: float = 0.0
    model: float = 0.0         # forward + backward
    optimizer: float = 0.0     # clipping + AdamW update
    eval: float = 0.0
    log: float = 0.0           # metrics.jsonl, progress bar
    checkpoint: float = 0.0
    total: float = 0.0

    @property
    def overhead_share(self) -> float:
        """Share of the loop outside the model step and evaluation (data, logging,
        checkpoints, everything else)."""
        inside = self.model + self.optimizer + self.eval
        return max(0.0, self.total - inside) / self.total if self.total else 0.0


@dataclass
class StepRecord:
    """One line of metrics.jsonl."""
    step: int
    loss: Optional[float]
    lr: Optional[float]
    grad_norm: Optional[float]
    tokens_seen: int
    epoch: float
    wraps: int
    seconds: float
    val_loss: Optional[float] = None
    event: Optional[str] = None

    def to_json(self) -> str:
        d = asdict(self)
        for optional in ("val_loss", "event"):
            if d[optional] is None:
                del d[optional]
        return json.dumps(d)


@dataclass
class RunSummary:
    """What a run did (``--json`` prints it)."""
    run_dir: str
    status: str                     # completed | early-stopped | stopped-after
    resumed_from: Optional[str]
    mode: str
    arch: Optional[str]
    init: Optional[str]
    config: dict[str, Any]
    device: str
    params: int
    step: int
    steps: int
    steps_this_run: int
    tokens_seen: int
    plan: dict[str, Any]
    epochs: float
    wraps: int
    step0_val_loss: Optional[float]
    ln_vocab: float
    loss: Optional[float]
    val_loss: Optional[float]
    best_val_loss: Optional[float]
    best_step: Optional[int]
    checkpoints: dict[str, Optional[str]]
    metrics: str
    plot: str
    data: dict[str, Any]
    seconds: float
    tokens_per_second: float
    timings: dict[str, float]
    overhead_share: float


@dataclass
class Run:
    """A run assembled and checked, ready for `train`."""
    cfg: RunConfig
    run_dir: Path
    backend: Backend
    tokenizer: TokenizerData
    model: Model
    optimizer: AdamW
    schedule: CosineSchedule
    data: PreparedData
    batches: TrainBatches
    val: list[np.ndarray]
    state: TrainState
    plan: RunPlan
    init_format: Optional[str] = None
    resumed_from: Optional[str] = None

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CKPT_DIR


# --------------------------------------------------------------------------- gates

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


def min_tokens_per_param(cfg: RunConfig) -> float:
    return FINE_TUNE_MIN_TOKENS_PER_PARAM if cfg.fine_tune else FROM_SCRATCH_MIN_TOKENS_PER_PARAM


def gate_tokens_per_param(cfg: RunConfig, params: int) -> None:
    """Refuse a data-starved run (see the module notes) unless --allow-data-starvation."""
    planned = cfg.steps * cfg.batch_size * cfg.seq_length
    floor = min_tokens_per_param(cfg)
    if planned / params >= floor or cfg.allow_data_starvation:
        return
    need = required_steps(floor * params, cfg.batch_size, cfg.seq_length)
    kind = "a fine-tune" if cfg.fine_tune else "a from-scratch run"
    raise GateError(
        f"data starvation: {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_length} = "
        f"{planned:,} training tokens is {planned / params:.3g} tokens per parameter for "
        f"{params:,} parameters; {kind} needs at least {floor:g}: raise --steps to {need:,} "
        f"(or --batch-size/--seq-length), use a smaller model, or pass --allow-data-starvation")


def gate_train_supply(cfg: RunConfig, batches: TrainBatches) -> None:
    """Under --no-wrap the train split must supply every planned step (all legs of a resumed
    run together) in one pass."""
    if cfg.wrap or cfg.steps <= batches.batches_per_epoch:
        return
    raise GateError(
        f"--no-wrap: the train split supplies {batches.batches_per_epoch} batches of "
        f"{cfg.batch_size} x {cfg.seq_length} tokens in one pass "
        f"({batches.tokens_per_epoch:,} tokens) but --steps {cfg.steps} needs {cfg.steps}: add "
        f"data, lower --steps to {batches.batches_per_epoch}, or drop --no-wrap (wraps are "
        "counted and warned)")


def gate_init_loss(cfg: RunConfig, val_loss: float, vocab_size: int) -> None:
    """A fine-tune must start from a model that predicts the data better than chance."""
    ln_vocab = math.log(vocab_size)
    if not cfg.fine_tune or cfg.allow_untrained_init or val_loss <= ln_vocab - INIT_LOSS_MARGIN_NATS:
        return
    raise GateError(
        f"--init {cfg.init}: step-0 validation loss {val_loss:.4f} is not {INIT_LOSS_MARGIN_NATS:g} "
        f"nat below ln(vocab_size) = {ln_vocab:.4f}, i.e. the model predicts this data no better "
        "than chance (a wrong tokenizer, a layout defect, or an untrained file): check the file "
        "(apr-ref qa, or apr-ref diff against its source), or pass --allow-untrained-init")


def _gate_data(data: PreparedData, td: TokenizerData, config: ModelConfig, where: str) -> None:
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


def check_shape_flags(config: ModelConfig, shape: dict[str, int], where: str) -> None:
    """Every requested shape field must equal the file's; the error names each that differs."""
    conflicts = {k: v for k, v in shape.items() if getattr(config, k) != v}
    if conflicts:
        has = ", ".join(f"{k}={getattr(config, k)}" for k in conflicts)
        given = ", ".join(_flag_value(k, v) for k, v in conflicts.items())
        raise GateError(f"{where}: the architecture comes from the file, which has {has}, but "
                        f"{given} was requested: drop these flags")


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


def make_plan(cfg: RunConfig, config: ModelConfig, data: PreparedData, batches: TrainBatches,
              backend: Backend) -> RunPlan:
    params = config.param_count()
    planned = cfg.steps * cfg.batch_size * cfg.seq_length
    return RunPlan(
        params=params, planned_tokens=planned, tokens_per_param=planned / params,
        min_tokens_per_param=min_tokens_per_param(cfg), train_tokens=len(data.train),
        unique_tokens_per_param=len(data.train) / params,
        planned_epochs=cfg.steps / batches.batches_per_epoch,
        train_batches_per_epoch=batches.batches_per_epoch, val_tokens=len(data.val),
        val_batches=cfg.val_batches, ln_vocab=math.log(config.vocab_size),
        device=backend.description)


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


def start_run(cfg: RunConfig, *, force: bool = False, progress: bool = False,
              log: Callable[[str], None] = lambda s: None) -> Run:
    """Check every gate, prepare data, build the model and evaluate step 0."""
    cfg = cfg.resolved()
    run_dir = Path(cfg.run_dir).resolve()
    backend = gate_device(cfg.device)
    config, init = resolve_architecture(cfg)
    try:
        td = resolve_tokenizer(cfg, init)
        gate_vocab(td, config, cfg)
        gate_seq_length(cfg, config)
        gate_tokens_per_param(cfg, config.param_count())
        prepare_run_dir(run_dir, force)
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir),
                                  data_dir=str(resolve_data(cfg, td, run_dir, progress)))
        data = open_prepared(cfg.data_dir)
        _gate_data(data, td, config, cfg.data_dir)
        batches = TrainBatches(data.train, cfg.batch_size, cfg.seq_length, cfg.seed,
                               wrap=cfg.wrap, on_wrap=_wrap_notice(cfg, log))
        gate_train_supply(cfg, batches)
        val = validation_batches(data.val, cfg.batch_size, cfg.seq_length, cfg.val_batches)
        if init is not None:
            model = model_from_view(init, backend, np.float32)
        else:
            model = Model.init_random(config, seed=cfg.seed, backend=backend, dtype=np.float32)
        init_format = init.format if init is not None else None
    finally:
        if init is not None:
            init.close()
    _owned_params(model)
    plan = make_plan(cfg, config, data, batches, backend)
    run = Run(cfg, run_dir, backend, td, model, AdamW(model.params, cfg.optimizer_config()),
              cfg.schedule(), data, batches, val, TrainState(), plan, init_format)
    log_plan(run, log)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        val0 = evaluate(run.model, run.val)
    log(f"step 0: validation loss {val0:.4f} (ln(vocab_size) = {plan.ln_vocab:.4f})")
    if not math.isfinite(val0):
        raise GateError(f"step 0: the validation loss of the initial model is {val0}: its "
                        "weights hold non-finite or overflowing values; check the --init file")
    gate_init_loss(cfg, val0, config.vocab_size)
    run.state.step0_val_loss = run.state.val_loss = val0
    _atomic_text(run_dir / RUN_JSON, json.dumps(cfg.to_dict(), indent=1))
    return run


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
    log(f"plan: {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_length} = {p.planned_tokens:,} "
        f"tokens = {p.tokens_per_param:.3g} tokens/parameter (floor {p.min_tokens_per_param:g})"
        f"{allowed}; {p.unique_tokens_per_param:.3g} unique train tokens/parameter; "
        f"{p.planned_epochs:.3g} passes over the train split")
    log(f"device: {p.device}")


# --------------------------------------------------------------------------- resuming

def find_resume_checkpoint(path: Path) -> Path:
    """The checkpoint to resume from: ``path`` itself, or the latest checkpoint (highest
    training.step) that carries optimizer state in RUN_DIR/ckpt."""
    if path.is_file():
        return path
    ckpt = path / CKPT_DIR
    candidates = sorted(ckpt.glob("step-*.apr")) + ([ckpt / FINAL] if (ckpt / FINAL).exists() else [])
    best: tuple[int, int, Path] | None = None
    for rank, p in enumerate(candidates):
        try:
            with AprFile.open(p) as f:
                has_state = any(n.startswith(names.TRAINING_PREFIX) for n in f.tensors)
                step = f.metadata.get("training.step")
        except AprError as e:
            raise GateError(f"--resume {path}: {e}; move that file away to resume from an "
                            "earlier checkpoint") from None
        if has_state and isinstance(step, int) and (best is None or (step, rank) > best[:2]):
            best = (step, rank, p)
    if best is None:
        raise GateError(f"--resume {path}: no checkpoint with optimizer state in {ckpt} "
                        "(step-NNNNNN.apr or final.apr)")
    return best[2]


def _apply_overrides(cfg: RunConfig, given: dict[str, Any], where: str) -> RunConfig:
    """The stored config with the command line's changes that keep the trajectory."""
    def same(k: str, v: Any) -> bool:
        stored = getattr(cfg, k, None)
        if k in PATH_FIELDS and stored is not None and v is not None:
            return Path(stored).resolve() == Path(v).resolve()
        return stored == v

    refused = {k: v for k, v in given.items() if k not in RESUME_OVERRIDABLE and not same(k, v)}
    if refused:
        parts = ", ".join(f"{_flag_value(k, v)} (the run has {k}={getattr(cfg, k, None)})"
                          for k, v in refused.items())
        raise GateError(f"--resume {where}: {parts} would change the run, not continue it: drop "
                        "these flags (only " + ", ".join(sorted(flag(k) for k in RESUME_OVERRIDABLE))
                        + " may change on resume)")
    return dataclasses.replace(cfg, **{k: v for k, v in given.items() if k in RESUME_OVERRIDABLE})


def resume_run(path: str, given: dict[str, Any] | None = None, *, progress: bool = False,
               log: Callable[[str], None] = lambda s: None) -> Run:
    """Rebuild a run from a checkpoint (or RUN_DIR's latest) so that it continues exactly."""
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
        cfg = _apply_overrides(RunConfig.from_dict(meta["training.run_config"]), given, str(ckpt))
        run_dir = (src if src.is_dir() else
                   ckpt.parent.parent if ckpt.parent.name == CKPT_DIR else Path(cfg.run_dir))
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir.resolve()))
        for stale in remove_stale_in(ckpt.parent):          # left by a run killed mid-write
            log(f"removed {stale.name}, the temporary of a checkpoint write that was killed")
        state = TrainState.from_metadata(meta)
        if state.step >= cfg.steps:
            raise GateError(f"--resume {ckpt}: the run is complete at step {state.step} "
                            f"(--steps {cfg.steps}): pass --steps N > {state.step} to train further")
        if not view.training:
            raise GateError(f"--resume {ckpt}: holds no optimizer state; resume from "
                            "step-NNNNNN.apr or final.apr")
        backend = gate_device(cfg.device)
        config, td = view.require_config(), view.tokenizer
        if td is None:
            raise GateError(f"--resume {ckpt}: no embedded tokenizer")
        gate_tokens_per_param(cfg, config.param_count())
        data = open_prepared(cfg.data_dir)
        if data.manifest.content_hash != meta.get("training.data_hash"):
            raise GateError(f"--resume {ckpt}: the data in {cfg.data_dir} changed since the "
                            "checkpoint (content hash differs); restore it or start a new run")
        _gate_data(data, td, config, cfg.data_dir)
        batches = TrainBatches(data.train, cfg.batch_size, cfg.seq_length, cfg.seed,
                               wrap=cfg.wrap, on_wrap=_wrap_notice(cfg, log),
                               position=DataPosition(state.data_epoch, state.data_batch))
        gate_train_supply(cfg, batches)
        val = validation_batches(data.val, cfg.batch_size, cfg.seq_length, cfg.val_batches)
        model = model_from_view(view, backend, np.float32)
        _owned_params(model)
        optimizer = AdamW(model.params, cfg.optimizer_config())
        prefix = names.TRAINING_PREFIX
        try:
            optimizer.load_state({n[len(prefix):]: r.numpy(np.float32)
                                  for n, r in view.training.items()}, state.optimizer_step)
        except (KeyError, ValueError) as e:
            raise GateError(f"--resume {ckpt}: optimizer state does not match the model ({e})") from None
    finally:
        view.close()
    plan = make_plan(cfg, config, data, batches, backend)
    run = Run(cfg, run_dir.resolve(), backend, td, model, optimizer, cfg.schedule(), data,
              batches, val, state, plan, meta.get("original_format"), str(ckpt))
    MetricsLog.truncate_after(run.run_dir / METRICS, state.step)
    log(f"resuming from {ckpt} at step {state.step} of {cfg.steps}")
    log_plan(run, log)
    return run


# --------------------------------------------------------------------------- checkpoints

def checkpoint_path(run: Run, step: int) -> Path:
    return run.ckpt_dir / f"step-{step:06d}.apr"


def checkpoint_metadata(run: Run, kind: str, total_size: int) -> dict[str, Any]:
    """Everything a consumer needs: architecture, tokenizer, provenance (``training.*``)."""
    cfg, config, m = run.cfg, run.model.config, run.data.manifest
    meta: dict[str, Any] = {
        "model_type": config.family,
        "name": run.run_dir.name,
        "description": f"apr-ref pretrain checkpoint ({kind}, step {run.state.step})",
        "source": "apr-ref pretrain",
        "original_format": run.init_format,
        "data_source": m.source,
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "total_size": total_size,
        "param_count": config.param_count(),
    }
    meta.update(config.to_apr_metadata())
    meta.update(tokenizer_metadata(run.tokenizer))
    meta.update({
        "training.format": CHECKPOINT_FORMAT,
        "training.checkpoint": kind,
        "training.mode": cfg.mode,
        "training.init": cfg.init,
        "training.seed": cfg.seed,
        "training.data_hash": m.content_hash,
        "training.data_dir": cfg.data_dir,
        "training.tokenizer_hash": m.tokenizer_hash,
        "training.batch_size": cfg.batch_size,
        "training.seq_length": cfg.seq_length,
        "training.lr_schedule": run.schedule.to_dict(),
        "training.optimizer": {"name": "AdamW", **run.optimizer.config.to_dict(),
                               "max_grad_norm": cfg.max_grad_norm},
        "training.epochs": run.batches.epochs,
        "training.wraps": run.batches.wraps,
        "training.tokens_per_param": run.plan.tokens_per_param,
        "training.run_config": cfg.to_dict(),
    })
    meta.update(run.state.to_metadata())
    return meta


def write_checkpoint(run: Run, path: Path, kind: str, with_optimizer: bool,
                     check_loss: bool = True) -> Path:
    """An APR checkpoint of the current state, written atomically. Only a good state is
    written: finite parameters that give a finite loss on the first validation batch
    (``check_loss``; skipped where that loss was just computed); otherwise TrainingError."""
    run.state.data_epoch, run.state.data_batch = run.batches.position.epoch, run.batches.position.batch
    run.state.optimizer_step = run.optimizer.step_count
    to_np = run.backend.to_numpy
    params = {n: to_np(p) for n, p in run.model.params.items()}
    bad = [n for n, a in params.items() if not np.isfinite(a).all()]
    if bad:
        raise stop_error(run, run.state.step, f"parameter {bad[0]} ({len(bad)} in all) holds a "
                         f"value that", float("nan"))
    if check_loss:
        tokens = run.val[0]
        probe = run.model.loss(tokens[:, :-1], tokens[:, 1:])
        if not math.isfinite(probe):
            raise stop_error(run, run.state.step, f"the loss of the parameters to save in "
                             f"{path.name} (first validation batch)", probe)
    sources: list[TensorSource] = [tensor_source(n, a) for n, a in params.items()]
    if run.model.config.tie_word_embeddings:
        sources.append(tensor_source(LM_HEAD, params[EMBED]))   # APR convention: a copy
    total_size = sum(int(np.prod(s.shape)) * 4 for s in sources)
    if with_optimizer:
        sources += [tensor_source(names.TRAINING_PREFIX + n, to_np(a))
                    for n, a in run.optimizer.state_tensors().items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_apr(path, checkpoint_metadata(run, kind, total_size), sources)
    return path


def last_checkpoint(run: Run) -> Optional[Path]:
    """The newest step-NNNNNN.apr / final.apr on disk, if any."""
    files = sorted(run.ckpt_dir.glob("step-*.apr"))
    final = run.ckpt_dir / FINAL
    if final.exists() and (not files or final.stat().st_mtime >= files[-1].stat().st_mtime):
        return final
    return files[-1] if files else None


# --------------------------------------------------------------------------- metrics

class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as the run goes."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: StepRecord) -> None:
        self.f.write(record.to_json() + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """Every record; a last line cut short by a crash is dropped, any other bad line is
        an error."""
        if not path.exists():
            return []
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
        records = []
        for n, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if n < len(lines):
                    raise AprError(f"{path}:{n}: not a JSON object; the metrics file is "
                                   "damaged") from None
        return records

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resume starts from)."""
        records = MetricsLog.read(path)
        kept = [r for r in records if r["step"] <= step]
        if len(kept) != len(records):
            _atomic_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _atomic_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- the loop

def evaluate(model: Model, batches: list[np.ndarray]) -> float:
    """Mean validation loss over the fixed batches (every batch has the same token count)."""
    total = 0.0
    for tokens in batches:
        total += model.loss(tokens[:, :-1], tokens[:, 1:])
    return total / len(batches)


def stop_error(run: Run, step: int, what: str, value: float) -> TrainingError:
    """The error that stops a run at ``step``, naming the last good checkpoint."""
    last, best = last_checkpoint(run), run.ckpt_dir / BEST
    if last is not None:
        kept = f"the last good checkpoint is {last}"
    elif best.exists():
        kept = f"the only checkpoint is {best} (no optimizer state)"
    else:
        kept = "no checkpoint had been written yet"
    return TrainingError(f"step {step}: {what} is {value} (non-finite); the run stopped and "
                         f"{kept}: lower --lr (now {run.cfg.lr:g}) or --max-grad-norm, or "
                         "raise --warmup-steps, and start again")


def _non_finite(run: Run, step: int, key: str, what: str, value: float,
                metrics: MetricsLog) -> TrainingError:
    """Record the failure at ``step`` in metrics.jsonl and build the error."""
    metrics.write(StepRecord(step, None, run.schedule(step), None, run.state.tokens_seen,
                             run.batches.epochs, run.batches.wraps, run.state.seconds,
                             event=f"non-finite {key}"))
    return stop_error(run, step, what, value)


def train_step(run: Run, timings: Timings, metrics: MetricsLog) -> tuple[float, float, float]:
    """One optimizer step: (loss, grad norm before clipping, learning rate)."""
    t0 = time.perf_counter()
    batch = next(run.batches)
    t1 = time.perf_counter()
    loss, grads = run.model.loss_and_grads(batch.inputs, batch.targets)
    t2 = time.perf_counter()
    if not math.isfinite(loss):
        raise _non_finite(run, run.state.step + 1, "loss", "the training loss", loss, metrics)
    norm = clip_grad_norm(grads, run.cfg.max_grad_norm)
    if not math.isfinite(norm):
        raise _non_finite(run, run.state.step + 1, "grad_norm", "the gradient norm", norm, metrics)
    lr = run.schedule(run.state.step + 1)
    run.optimizer.step(run.model.params, grads, lr)
    del grads   # freeing them is part of the step
    run.backend.synchronize()
    t3 = time.perf_counter()
    timings.data += t1 - t0
    timings.model += t2 - t1
    timings.optimizer += t3 - t2
    run.state.step += 1
    run.state.tokens_seen += batch.inputs.size
    run.state.loss = loss
    return loss, norm, lr


def track_validation(run: Run, val_loss: float) -> bool:
    """Update best / patience bookkeeping and best.apr; True when early stopping triggers."""
    s = run.state
    s.val_loss = val_loss
    if s.best_val_loss is None or val_loss < s.best_val_loss:
        s.best_val_loss, s.best_step, s.evals_since_best = val_loss, s.step, 0
        write_checkpoint(run, run.ckpt_dir / BEST, "best", with_optimizer=False,
                         check_loss=False)
        return False
    s.evals_since_best += 1
    return bool(run.cfg.patience) and s.evals_since_best >= run.cfg.patience


def _progress_bar(run: Run, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=run.cfg.steps, initial=run.state.step, unit="step", file=sys.stderr,
                dynamic_ncols=True, desc="pretrain")


@dataclass
class _Leg:
    """This invocation of `train`: its start, the run's seconds before it, its first step."""
    first_step: int
    prior_seconds: float
    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        """Wall time of the whole run so far (earlier legs included)."""
        return self.prior_seconds + time.perf_counter() - self.start

    def tokens_per_second(self, run: Run) -> float:
        done = (run.state.step - self.first_step) * run.cfg.batch_size * run.cfg.seq_length
        return done / max(1e-9, time.perf_counter() - self.start)


def train(run: Run, *, stop_after: Optional[int] = None, progress: bool = False,
          log: Callable[[str], None] = lambda s: None) -> RunSummary:
    """Train until --steps (or early stopping, or ``stop_after`` steps, which stops as an
    interruption would: a step checkpoint, no final.apr), then draw loss.png. Raises
    TrainingError on a non-finite loss, gradient norm or validation loss."""
    timings = Timings()
    leg = _Leg(run.state.step, run.state.seconds)
    metrics = MetricsLog(run.run_dir / METRICS)
    bar = _progress_bar(run, progress)
    try:
        # Non-finite values are detected and reported as errors, not warned about.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if leg.first_step == 0:
                _start_record(run, metrics, timings)
            status = _run_steps(run, leg, timings, metrics, bar, stop_after, log)
            run.state.seconds = leg.seconds()
            _save_at_end(run, timings, status)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    t0 = time.perf_counter()
    plot_metrics(run.run_dir / METRICS, run.run_dir / PLOT)
    timings.log += time.perf_counter() - t0
    timings.total = time.perf_counter() - leg.start
    return summarize(run, status, leg.first_step, timings)


def _run_steps(run: Run, leg: _Leg, timings: Timings, metrics: MetricsLog, bar,
               stop_after: Optional[int], log: Callable[[str], None]) -> str:
    """The step loop; returns how it ended: completed, early-stopped or stopped-after."""
    cfg, state = run.cfg, run.state
    while state.step < cfg.steps:
        if stop_after is not None and state.step >= stop_after:
            return "stopped-after"
        loss, norm, lr = train_step(run, timings, metrics)
        record = StepRecord(state.step, loss, lr, norm, state.tokens_seen, run.batches.epochs,
                            run.batches.wraps, 0.0)
        stop = False
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            record.val_loss, stop = _evaluate_step(run, timings, metrics)
            record.event = "early-stop" if stop else None
        t0 = time.perf_counter()
        record.seconds = state.seconds = leg.seconds()
        metrics.write(record)
        _report_step(run, record, bar, leg, log)
        timings.log += time.perf_counter() - t0
        if state.step % cfg.save_every == 0 and state.step < cfg.steps:   # the last is final.apr
            _timed_save(run, timings, checkpoint_path(run, state.step), "step")
        if stop:
            log(f"early stop at step {state.step}: no validation improvement in "
                f"{cfg.patience} evaluations (best {state.best_val_loss:.4f} at step "
                f"{state.best_step})")
            return "early-stopped"
    return "completed"


def _report_step(run: Run, record: StepRecord, bar, leg: _Leg, log: Callable[[str], None]) -> None:
    """Progress bar (loss, tokens/s, ETA), or one log line per evaluation without a bar."""
    if bar is not None:
        bar.set_postfix(loss=f"{record.loss:.3f}", tok_s=f"{leg.tokens_per_second(run):,.0f}",
                        refresh=False)
        bar.update(1)
    elif record.val_loss is not None:
        log(f"step {record.step}/{run.cfg.steps}: loss {record.loss:.4f}, validation loss "
            f"{record.val_loss:.4f}, lr {record.lr:.3g}, {leg.tokens_per_second(run):,.0f} tokens/s")


def _save_at_end(run: Run, timings: Timings, status: str) -> None:
    """final.apr, or for a stop as if interrupted the step checkpoint (if not just written)."""
    if status != "stopped-after":
        _timed_save(run, timings, run.ckpt_dir / FINAL, "final")
    elif run.state.step % run.cfg.save_every or run.state.step == 0:   # not written in the loop
        _timed_save(run, timings, checkpoint_path(run, run.state.step), "step")


def _start_record(run: Run, metrics: MetricsLog, timings: Timings) -> None:
    """Step 0: the initial validation loss (evaluated by start_run) and best.apr."""
    val0 = run.state.step0_val_loss
    metrics.write(StepRecord(0, None, None, None, 0, 0.0, 0, 0.0, val_loss=val0, event="start"))
    t0 = time.perf_counter()
    track_validation(run, val0)
    timings.checkpoint += time.perf_counter() - t0


def _evaluate_step(run: Run, timings: Timings, metrics: MetricsLog) -> tuple[float, bool]:
    t0 = time.perf_counter()
    val = evaluate(run.model, run.val)
    timings.eval += time.perf_counter() - t0
    if not math.isfinite(val):
        raise _non_finite(run, run.state.step, "val_loss", "the validation loss", val, metrics)
    t0 = time.perf_counter()
    stop = track_validation(run, val)
    timings.checkpoint += time.perf_counter() - t0
    return val, stop


def _timed_save(run: Run, timings: Timings, path: Path, kind: str) -> None:
    t0 = time.perf_counter()
    write_checkpoint(run, path, kind, with_optimizer=True)
    timings.checkpoint += time.perf_counter() - t0


def summarize(run: Run, status: str, first_step: int, timings: Timings) -> RunSummary:
    cfg, s = run.cfg, run.state
    trained = (s.step - first_step) * cfg.batch_size * cfg.seq_length
    last = last_checkpoint(run)
    best = run.ckpt_dir / BEST
    return RunSummary(
        run_dir=str(run.run_dir), status=status, resumed_from=run.resumed_from, mode=cfg.mode, arch=cfg.arch, init=cfg.init,
        config=run.model.config.to_dict(), device=run.backend.description,
        params=run.plan.params, step=s.step, steps=cfg.steps, steps_this_run=s.step - first_step,
        tokens_seen=s.tokens_seen, plan=asdict(run.plan), epochs=run.batches.epochs,
        wraps=run.batches.wraps, step0_val_loss=s.step0_val_loss, ln_vocab=run.plan.ln_vocab,
        loss=s.loss, val_loss=s.val_loss, best_val_loss=s.best_val_loss, best_step=s.best_step,
        checkpoints={"final": str(run.ckpt_dir / FINAL) if status != "stopped-after" else None,
                     "best": str(best) if best.exists() else None,
                     "last": str(last) if last else None},
        metrics=str(run.run_dir / METRICS), plot=str(run.run_dir / PLOT),
        data=run.data.manifest.summary(), seconds=s.seconds,
        tokens_per_second=trained / timings.total if timings.total else 0.0,
        timings=asdict(timings), overhead_share=timings.overhead_share)


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """loss.png from metrics.jsonl."""
    plot_losses(MetricsLog.read(metrics_path), png_path)
