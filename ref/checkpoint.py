"""Checkpoints of a training run: where they lie (``RUN_DIR/ckpt/step-NNNNNN.apr``,
``best.apr``, ``final.apr``), what they hold (the format is described in `ref.train`'s notes:
architecture, tokenizer, ``training.*`` provenance, optimizer state), how one is written (only
from a good state), which one a ``--resume`` continues from, and the `TrainingError` that
stops a run naming the last good one.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from apr import names
from apr.console import utc_timestamp
from apr.container import AprFile, TensorSource, tensor_source, write_apr
from apr.errors import AprError
from apr.tokenizer import to_apr_metadata as tokenizer_metadata

from .gates import GateError
from .model import EMBED, LM_HEAD
from .run import BEST, CKPT_DIR, FINAL, Run

CHECKPOINT_FORMAT = "apr-ref-train/1"


class TrainingError(AprError):
    """The run stopped during training (a non-finite loss or gradient)."""


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
        "created_at": utc_timestamp(),
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
                     check_loss: bool = True,
                     optimizer_state: Optional[dict[str, Any]] = None) -> Path:
    """An APR checkpoint of the current state, written atomically. Only a good state is
    written: finite parameters that give a finite loss on the first validation batch
    (``check_loss``; skipped where that loss was just computed); otherwise TrainingError.
    ``optimizer_state``: the state's tensors when the caller has them already (under ZeRO
    they are gathered from every rank); by default ``run.optimizer.state_tensors()``."""
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
                    for n, a in (optimizer_state if optimizer_state is not None
                                 else run.optimizer.state_tensors()).items()]
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
