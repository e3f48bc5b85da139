"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling.

The prompt is run once (prefill), which gives the logits of the first new token; every
further token is one `Model.forward_step` of a single position. A generation of at least
`DECODE_LAYOUT_MIN_TOKENS` new tokens reads the weights in the decode layout
(`Model.decode_weights`: transposed, q/k/v and gate/up as one matrix each), built from the
parameters at the start of the call (``setup_seconds``), so never older than them.
Sampling happens on the host with a seeded ``numpy.random.Generator``, so a seed gives the
same tokens on every backend (up to ties in the logits). Timings are taken after the logits
reach the host, so GPU work is included in full: ``prefill_seconds`` is the time to the first
token's logits, and ``decode_seconds[j]`` the time of the j-th single-token step (its forward
and its sampling).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from apr.errors import AprError

from .model import Model

# Generations of at least this many new tokens read the weights in the decode layout
# (`Model.decode_weights`). Measured on qwen2-25m (bench/decode.py, 2026-12-04): the build took
# 0.10 s and saved 1.6 ms per token at 1 thread; both scale with the weights' bytes, so the
# break-even, about 60 tokens, does not depend on the model's size.
DECODE_LAYOUT_MIN_TOKENS = 64

STOP_EOS = "eos"
STOP_MAX_TOKENS = "max_new_tokens"


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int]                  # generated tokens, including the eos that stopped it
    stop_reason: str                    # "eos" or "max_new_tokens"
    prefill_seconds: float              # prompt forward pass up to the first token's logits
    decode_seconds: list[float] = field(default_factory=list)  # one per single-token step
    setup_seconds: float = 0.0          # building the decode weights, before the prefill

    @property
    def ids(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_ids + self.new_ids

    @property
    def prefill_tokens_per_second(self) -> float:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        total = sum(self.decode_seconds)
        return len(self.decode_seconds) / total if total > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": len(self.prompt_ids), "new_tokens": len(self.new_ids),
            "new_ids": self.new_ids, "stop_reason": self.stop_reason,
            "setup_seconds": self.setup_seconds,
            "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
            "prefill_tokens_per_second": self.prefill_tokens_per_second,
            "decode_tokens_per_second": self.decode_tokens_per_second,
        }


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:
        raise AprError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise AprError(f"top_k={top_k} must be an integer >= 0 (0 means no top-k)")
    if not 0 < top_p <= 1:
        raise AprError(f"top_p={top_p} must be in (0, 1] (1 means no top-p)")


def sample_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0) -> int:
    """One token id from a (vocab,) row of logits.
    temperature 0: argmax (greedy; no random number is drawn). Otherwise p = softmax(logits / T)
    restricted to the top_k most likely tokens (top_k > 0) and then to the smallest set of most
    likely tokens whose probability reaches top_p (top_p < 1), renormalized, and sampled."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cumulative, top_p)) + 1   # first prefix reaching top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[:n_keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def _eos_set(eos_ids: Union[None, int, Iterable[int]]) -> set[int]:
    if eos_ids is None:
        return set()
    if isinstance(eos_ids, (int, np.integer)):
        return {int(eos_ids)}
    return {int(e) for e in eos_ids}


def generate(model: Model, prompt_ids: Sequence[int], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: Optional[int] = None, eos_ids: Union[None, int, Iterable[int]] = None
             ) -> GenerationResult:
    """Continue ``prompt_ids`` (one sequence) by up to ``max_new_tokens`` tokens, stopping
    after the first token in ``eos_ids``. See `sample_token` for the sampling options."""
    check_sampling(temperature, top_k, top_p)
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise AprError("generate: the prompt is empty (at least one token is needed)")
    if max_new_tokens < 0:
        raise AprError(f"max_new_tokens={max_new_tokens} must be >= 0")
    rng = np.random.default_rng(seed)
    stop = _eos_set(eos_ids)
    backend = model.backend
    if max_new_tokens == 0:
        return GenerationResult(prompt, [], STOP_MAX_TOKENS, 0.0, [])

    t0 = time.perf_counter()
    # built per call, so never older than the parameters; only for a generation long enough
    # to repay the build (a copy of every weight matrix: it costs about as much as
    # DECODE_LAYOUT_MIN_TOKENS single-token steps save), and not under bf16 products,
    # which the decode layout does not round, nor for a model streamed from its file
    use = max_new_tokens >= DECODE_LAYOUT_MIN_TOKENS and model.matmul is None and not model.streamed
    weights = model.decode_weights() if use else None
    setup_seconds = time.perf_counter() - t0
    cache = model.new_kv_cache(1, len(prompt) + max_new_tokens)
    t0 = time.perf_counter()
    logits = backend.to_numpy(model.forward_step(np.array([prompt]), cache, last_only=True,
                                                 weights=weights))[0, -1]
    token = sample_token(logits, rng, temperature, top_k, top_p)
    prefill_seconds = time.perf_counter() - t0

    new_ids = [token]
    decode_seconds: list[float] = []
    while token not in stop and len(new_ids) < max_new_tokens:
        t0 = time.perf_counter()
        logits = backend.to_numpy(model.forward_step(np.array([[token]]), cache,
                                                     weights=weights))[0, -1]
        token = sample_token(logits, rng, temperature, top_k, top_p)
        decode_seconds.append(time.perf_counter() - t0)
        new_ids.append(token)
    reason = STOP_EOS if token in stop else STOP_MAX_TOKENS
    return GenerationResult(prompt, new_ids, reason, prefill_seconds, decode_seconds, setup_seconds)
