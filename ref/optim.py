"""AdamW, the learning-rate schedule and gradient clipping, written out.

AdamW (Loshchilov & Hutter, decoupled weight decay), for each parameter p with gradient g at
step t = 1, 2, ...:

    p   <- p * (1 - lr * wd)                       (only matrices: no decay on norms, biases)
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g^2
    p   <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

which is torch.optim.AdamW's update, term for term. The state is two arrays per parameter
(``exp_avg`` = m, ``exp_avg_sq`` = v), on the parameter's backend and in its dtype, and the
step count t. Everything is in place: parameters, m and v are updated where they live.

The schedule is linear warm-up from 0 to the peak over ``warmup_steps``, then cosine decay to
``min_lr_ratio * peak`` at ``total_steps``. Clipping scales all gradients together so that
their global L2 norm is at most ``max_norm``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from apr import names

from . import kernels
from .backend import array_module

Array = Any  # numpy.ndarray or cupy.ndarray

EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"


def decays(name: str, shape: tuple[int, ...]) -> bool:
    """Weight decay applies to matrices (projections, embedding), never to norms or biases:
    the tensor-kind table says which (`apr.names.TENSOR_KINDS`)."""
    return names.decays(name) and len(shape) >= 2


@dataclass(frozen=True)
class AdamWConfig:
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class AdamW:
    """AdamW over a dict of parameters (see the module notes)."""

    def __init__(self, params: Mapping[str, Array], config: AdamWConfig = AdamWConfig()):
        self.config = config
        self.step_count = 0
        self.exp_avg: dict[str, Array] = {}
        self.exp_avg_sq: dict[str, Array] = {}
        self.decay: dict[str, bool] = {}
        for name, p in params.items():
            xp = array_module(p)
            self.exp_avg[name] = xp.zeros_like(p)
            self.exp_avg_sq[name] = xp.zeros_like(p)
            self.decay[name] = decays(name, tuple(p.shape))

    def step(self, params: Mapping[str, Array], grads: Mapping[str, Array], lr: float) -> None:
        """One update of every parameter, in place, with learning rate ``lr``."""
        c = self.config
        self.step_count += 1
        t = self.step_count
        bias_correction1 = 1.0 - c.beta1 ** t
        bias_correction2 = 1.0 - c.beta2 ** t
        step_size = lr / bias_correction1
        sqrt_bc2 = math.sqrt(bias_correction2)
        for name, p in params.items():
            g = grads[name]
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            xp = array_module(p)
            if xp is not np:                                    # one fused kernel on a GPU
                decay = 1.0 - lr * c.weight_decay if self.decay[name] else 1.0
                kernels.adamw_step(p, g, m, v, decay, c.beta1, c.beta2, c.eps, step_size, sqrt_bc2)
                continue
            if self.decay[name] and c.weight_decay:
                p *= 1.0 - lr * c.weight_decay                  # p <- p (1 - lr wd)
            m *= c.beta1                                        # m <- b1 m + (1 - b1) g
            m += (1.0 - c.beta1) * g
            g2 = xp.multiply(g, g)                              # v <- b2 v + (1 - b2) g^2
            g2 *= 1.0 - c.beta2
            v *= c.beta2
            v += g2
            update = xp.sqrt(v, out=g2)                         # (reusing g2's memory)
            update /= sqrt_bc2                                  # sqrt(v) / sqrt(1 - b2^t) + eps
            update += c.eps
            xp.divide(m, update, out=update)                    # m / (...)
            update *= step_size                                 # * lr / (1 - b1^t)
            p -= update

    def state_tensors(self) -> dict[str, Array]:
        """The state as named arrays: ``exp_avg.<param>`` and ``exp_avg_sq.<param>``."""
        out = {f"{EXP_AVG}.{n}": a for n, a in self.exp_avg.items()}
        out.update({f"{EXP_AVG_SQ}.{n}": a for n, a in self.exp_avg_sq.items()})
        return out

    def load_state(self, tensors: Mapping[str, Array], step_count: int) -> None:
        """Restore `state_tensors` output (values copied into the existing arrays)."""
        for kind, store in ((EXP_AVG, self.exp_avg), (EXP_AVG_SQ, self.exp_avg_sq)):
            for name, arr in store.items():
                key = f"{kind}.{name}"
                if key not in tensors:
                    raise KeyError(key)
                src = tensors[key]
                if tuple(src.shape) != tuple(arr.shape):
                    raise ValueError(f"{key}: shape {tuple(src.shape)}, the parameter has "
                                     f"{tuple(arr.shape)}")
                arr[...] = array_module(arr).asarray(src, dtype=arr.dtype)
        self.step_count = int(step_count)


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio * peak_lr`` at ``total_steps``; steps are counted from 1."""
    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step <= self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        min_lr = self.min_lr_ratio * self.peak_lr
        return min_lr + 0.5 * (self.peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "linear-warmup-cosine", **asdict(self)}


def global_grad_norm(grads: Mapping[str, Array]) -> float:
    """sqrt(sum of every squared gradient element), accumulated in float64."""
    total = 0.0
    for g in grads.values():
        xp = array_module(g)
        total += float(xp.sum(xp.square(g), dtype=xp.float64))
    return math.sqrt(total)


def clip_grad_norm(grads: Mapping[str, Array], max_norm: float) -> float:
    """Scale every gradient in place so that the global norm is at most ``max_norm``
    (no clipping when ``max_norm`` <= 0). Returns the norm before clipping."""
    norm = global_grad_norm(grads)
    scale_to_norm(grads, norm, max_norm)
    return norm


def scale_to_norm(grads: Mapping[str, Array], norm: float, max_norm: float) -> None:
    """The scaling of `clip_grad_norm` given the global norm ``norm`` (which, under ZeRO, the
    caller sums over every rank's shard)."""
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= scale
