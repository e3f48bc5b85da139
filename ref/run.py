"""The records of a training run: what decides it (`RunConfig`, and how its fields are spelled
on the command line), where it stands (`TrainState`), the numbers the gates look at
(`RunPlan`), the assembled `Run`, one line of ``metrics.jsonl`` (`StepRecord`, `MetricsLog`),
where the loop's time went (`Timings`) and what the run did (`RunSummary`); and the layout of
a run directory. Data only: the gates (`ref.gates`), checkpoints (`ref.checkpoint`) and the
loop (`ref.train`) build on it, and it imports none of them.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from apr.atomic import atomic_file
from apr.errors import AprError, ConfigError, FormatError
from apr.tokenizer import TokenizerData
from apr.untrusted import load_json

from .backend import Backend
from .data import PreparedData, TrainBatches
from .model import Model
from .parallel import World
from .precision import matmul_precision, storage_dtype
from .optim import AdamW, AdamWConfig, CosineSchedule

DEFAULT_LR = {"from-scratch": 3e-4, "fine-tune": 3e-5}
MODES = ("from-scratch", "fine-tune")

# A run directory: RUN_DIR/metrics.jsonl, loss.png, run.json, data/ (a corpus prepared for the
# run) and ckpt/ (step-NNNNNN.apr, best.apr, final.apr).
CKPT_DIR = "ckpt"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
RUN_JSON = "run.json"
DATA_DIR = "data"
BEST = "best.apr"
FINAL = "final.apr"

# Shape flags: ModelConfig fields a command line may set (from scratch) or must agree with
# (with --init).
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "vocab_size", "max_position_embeddings")

# RunConfig fields that a resumed run may change: they do not alter the trajectory up to the
# checkpoint (steps extends or shortens the schedule from there on).
RESUME_OVERRIDABLE = frozenset({
    "steps", "eval_every", "save_every", "patience", "device", "wrap", "warn_on_wrap",
    "allow_data_starvation", "allow_untrained_init", "check_every", "zero"})


PATH_FIELDS = frozenset({"dataset", "run_dir", "tokenizer", "init"})

_FLAG_SPELLING = {"wrap": "--no-wrap", "warn_on_wrap": "--warn-on-wrap-around"}


def flag(field_name: str) -> str:
    """The command-line spelling of a RunConfig / ModelConfig field."""
    return _FLAG_SPELLING.get(field_name, "--" + field_name.replace("_", "-"))


def flag_value(field_name: str, value: Any) -> str:
    """A field and its value as typed on the command line (a boolean is the flag alone)."""
    return flag(field_name) if isinstance(value, bool) else f"{flag(field_name)} {value}"


# --------------------------------------------------------------------------- configuration

@dataclass
class RunConfig:
    """Everything that decides a run's trajectory (stored in every checkpoint).
    `ref.gates.resolve_config` checks it and fills in the defaults left as None."""
    dataset: str
    run_dir: str
    tokenizer: Optional[str] = None
    mode: str = "from-scratch"
    arch: Optional[str] = None
    init: Optional[str] = None
    shape: dict[str, int] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 8                      # per rank (the global batch is ranks x this)
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
    ranks: int = 1                           # data-parallel processes (set by start/resume)
    dtype: str = "f32"                       # f32 or f64 (parameters, optimizer state and
                                             # compute), or bf16 (f32 with bfloat16 products)
    check_every: int = 100                   # steps between checks that every rank holds the same
                                             # parameters (and at every checkpoint)
    zero: int = 0                            # 1: ZeRO-1, AdamW state sharded across the ranks

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.batch_size * self.ranks

    @property
    def np_dtype(self) -> Any:
        """The dtype of parameters, gradients and optimizer state (float32 under bf16)."""
        return storage_dtype(self.dtype)

    @property
    def matmul(self) -> Optional[str]:
        """"bf16" when the linear layers' products take bfloat16 operands, else None."""
        return matmul_precision(self.dtype)

    @property
    def fine_tune(self) -> bool:
        return self.mode == "fine-tune"

    def optimizer_config(self) -> AdamWConfig:
        return AdamWConfig(beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                           weight_decay=self.weight_decay)

    def schedule(self) -> CosineSchedule:
        return CosineSchedule(peak_lr=self.lr, warmup_steps=self.warmup_steps,
                              total_steps=self.steps, min_lr_ratio=self.min_lr_ratio)

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
    # the memory gate's estimate and budget (`ref.train.check_memory`): peak_bytes, parts, ...
    memory: Optional[dict[str, Any]] = None


@dataclass
class Run:
    """A run assembled and checked, ready for `ref.train.train`."""
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
    world: Optional[World] = None           # the ranks of a data-parallel run (None: one)

    @property
    def main(self) -> bool:
        """This process writes the run's files and talks to the user (rank 0)."""
        return self.world is None or self.world.main

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CKPT_DIR


# --------------------------------------------------------------------------- what a run did

@dataclass
class Timings:
    """Wall time of the loop, by what it was spent on (seconds)."""
    data: float = 0.0
    model: float = 0.0         # forward + backward
    optimizer: float = 0.0     # clipping + AdamW update
    eval: float = 0.0
    log: float = 0.0           # metrics.jsonl, progress bar
    checkpoint: float = 0.0
    allreduce: float = 0.0     # gradient means and replica checks across ranks
    total: float = 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to the field ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, name, getattr(self, name) + time.perf_counter() - start)

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
                records.append(load_json(line, f"{path}:{n}"))
            except FormatError:
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
            atomic_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def atomic_text(path: Path, text: str) -> None:
    """Write a text file of the run directory atomically (run.json, a truncated metrics log)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
    optimizer_state_bytes: int = 0  # m and v held by one rank (its shard under --zero 1)
