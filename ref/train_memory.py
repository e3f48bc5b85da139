"""The peak memory of a training run, estimated before step 1 from what the code holds, so
that `pretrain` refuses a run that cannot fit (`ref.gates.gate_memory`) instead of being
killed for memory hours in.

A step has two high points, and the estimate is the higher:

* the end of the backward pass: the parameters, the AdamW state (m and v, each the size of
  the parameters; this rank's shard under ``--zero 1``), a whole set of gradients per thread
  of `Model.loss_and_grads` (on the CPU the batch's rows run in one thread per BLAS thread,
  each thread's shard summing into its own gradients), and every layer's backward cache,
  which `Model._loss_and_grads` keeps until the backward is done;
* the optimizer step: the parameters, the state, one set of gradients, and the step's
  temporaries (on the CPU one array the size of the largest parameter at a time: the
  gradient norm's squares, AdamW's products; under ZeRO the flattened gradients and this
  rank's block of their sum).

On the CPU the arrays' bytes are not the whole of the process's memory: glibc's allocator
serves arrays below its mmap threshold (up to 32 MiB) from heaps whose freed holes it keeps,
and the BLAS keeps buffers of its own. A Qwen2.5-0.5B step (batch 1 x 256) peaked 6.5% above
the bytes its arrays held at most (tracemalloc), a 30M-parameter one 0%; the estimate adds
`ALLOCATOR_SHARE` of the arrays for it.

The caches, per token, as `ref.model` and `ref.ops` keep them (C hidden, Q = heads x
head_dim, K = kv_heads x head_dim, F intermediate, V vocabulary):

* attention: the pre-norm's x_hat and output (2C), the scaled queries (Q), the rotated keys
  and the values (2K), the attention output and its merged copy, the o_proj input (2Q), the
  probabilities of every query block against the keys it sees (heads x about T/2 per token:
  `ref.ops.attention_forward` skips the masked corner in blocks of 32 queries; twice that
  with Gemma 2's attention soft-cap, whose tanh is kept), the q/k norms' x_hat (Q + K)
  where the family has them, a post-norm's x_hat (C) where it has those;
* MLP: the pre-norm's x_hat and output (2C), gate and up (2F), SiLU's sigmoid (F), the
  down projection's input (F); a post-norm's x_hat (C);
* head: the final norm's x_hat and output (2C); the logits (V; the softmax is computed in
  their buffer, and the gradient after it; four times V with a final soft-cap: its tanh and
  two temporaries of its backward), alive only until the head's backward, so they count
  against the largest backward temporaries (about 3F + 2C).

With ``--dtype bf16`` every linear layer's cache holds its input and its weight rounded to
bfloat16 in float32 arrays: a copy of every weight matrix per thread, and the q/k/v and
gate/up inputs once per projection; rounding a matrix takes two more of its size a moment.
Tied embeddings' lm_head is the embedding, rounded too.

On a GPU the estimate is the device's, against the device's free memory; on the CPU it
includes the process as it stands when the gate runs (interpreter, libraries, tokenizer)
and is multiplied by the ranks this host runs. The checkpoint writes and evaluation add
less than a step (an array the size of the largest parameter; logits of one batch)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from apr.config import ModelConfig
from apr.names import EMBED

from .memory import format_size, proc_bytes, resolve_budget
from .ops import ACTIVATIONS, _SILU, _query_blocks

DTYPE_ITEMSIZE = {"f32": 4, "bf16": 4, "f64": 8}
GPU_DEFAULT_SHARE = 0.9
ALLOCATOR_SHARE = 0.1       # the process's memory beyond its arrays' bytes (module notes)


@dataclass(frozen=True)
class StepShape:
    """What the size of a step depends on, besides the model."""
    batch: int              # sequences per step on this rank (--batch-size)
    seq: int                # --seq-length
    dtype: str              # --dtype: f32, bf16 (float32 storage) or f64
    threads: int = 1        # threads of loss_and_grads, each with its own gradients
    ranks: int = 1          # ranks of the run
    zero: int = 0           # --zero 1: the AdamW state sharded across the ranks
    ranks_here: int = 1     # ranks on this host (their memory adds up)
    gpu: bool = False

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def shards(self) -> int:
        """Threads that actually get rows: no more than the batch has."""
        return max(1, min(self.threads, self.batch))

    @property
    def sharded_state(self) -> bool:
        return bool(self.zero) and self.ranks > 1


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes at the peak of a step, by what holds them (one rank), and the ranks on this host."""
    parts: tuple[tuple[str, int], ...]    # (what, bytes) in the order they are reported
    ranks_here: int = 1
    phase: str = "backward"               # which high point is the higher: backward | step

    @property
    def per_rank(self) -> int:
        return sum(b for _, b in self.parts)

    @property
    def peak(self) -> int:
        return self.per_rank * self.ranks_here

    def part(self, what: str) -> int:
        return dict(self.parts).get(what, 0)

    def describe(self) -> str:
        """"8.9 GiB (weights 2.0, gradients 2.0, AdamW 4.0, activations 0.9, process 0.1
        GiB)": the parts in the unit of the whole (GiB, or MiB below 1 GiB)."""
        unit, name = (1 << 30, "GiB") if self.per_rank >= 1 << 30 else (1 << 20, "MiB")
        inner = ", ".join(f"{what} {b / unit:.{1 if b >= unit // 10 else 2}f}"
                          for what, b in self.parts if b) + " " + name
        if self.ranks_here == 1:
            return f"{format_size(self.per_rank)} ({inner})"
        return (f"{format_size(self.per_rank)} per rank ({inner}) x {self.ranks_here} ranks on "
                f"this machine = {format_size(self.peak)}")

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak, "per_rank_bytes": self.per_rank,
                "ranks_here": self.ranks_here, "phase": self.phase,
                "parts": {what: b for what, b in self.parts}}


def attention_scores_per_row(config: ModelConfig, seq: int) -> int:
    """Attention probabilities one sequence keeps over all layers (elements): per layer, heads
    x the (query, visible key) pairs of `ref.ops.attention_forward`'s blocks."""
    total = 0
    for i in range(config.num_layers):
        blocks = _query_blocks(seq, seq, config.window(i))
        pairs = sum((t1 - t0) * (k1 - k0) for t0, t1, k0, k1 in blocks)
        total += config.num_heads * pairs * (2 if config.attn_logit_softcapping else 1)
    return total


def saved_per_token(config: ModelConfig, bf16: bool) -> int:
    """Elements of the backward caches per token position, over all layers and the head
    (the attention probabilities and the logits apart)."""
    c, q, k, f = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    post = c if config.post_norms else 0
    silu = ACTIVATIONS.get(config.hidden_act) is _SILU
    attn = 2 * c + q + 2 * k + 2 * q + post + ((q + k) if config.qk_norm else 0)
    mlp = 2 * c + 2 * f + (f if silu else 0) + f + post
    if bf16 and not config.fused:       # the norm's output rounded once per projection
        attn += 2 * c                   # q, k, v: three rounded copies instead of one input
        mlp += c                        # gate, up: two
    head = 2 * c + (c if bf16 else 0)
    return config.num_layers * (attn + mlp) + head


def _param_sizes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(elements, dimensions) of every parameter."""
    sizes = {}
    for name, shape in config.tensor_shapes().items():
        n = 1
        for d in shape:
            n *= d
        sizes[name] = (n, len(shape))
    return sizes


def estimate_training_memory(config: ModelConfig, shape: StepShape, process: int = 0
                             ) -> MemoryEstimate:
    """The estimate of one rank's peak (see the module notes); ``process``: bytes the process
    holds already (counted once per rank)."""
    s = shape.itemsize
    sizes = _param_sizes(config)
    params = sum(n for n, _ in sizes.values())
    largest = max(n for n, _ in sizes.values())
    weights = params * s
    state = 2 * (-(-params // shape.ranks) if shape.sharded_state else params) * s
    tokens = shape.batch * shape.seq
    v = config.vocab_size
    caches = (tokens * saved_per_token(config, shape.dtype == "bf16")
              + shape.batch * attention_scores_per_row(config, shape.seq)) * s
    # the logits, their softmax in their buffer; a final soft-cap keeps tanh and its backward
    # makes two more arrays of that size while the softmax gradient is alive
    logits = tokens * v * (4 if config.final_logit_softcapping else 1) * s
    backward_temps = tokens * (3 * config.intermediate_size + 2 * config.hidden_size) * s
    activations = caches + max(logits, backward_temps)
    copies = 0
    if shape.dtype == "bf16":           # every matrix a product reads, rounded, per thread
        matrices = sum(n for n, dims in sizes.values() if dims == 2)
        if not config.tie_word_embeddings:
            matrices -= sizes[EMBED][0]     # looked up, never a product's operand
        copies = shape.shards * matrices * 4
        # rounding one matrix makes two more arrays of its size for a moment (the lm_head's:
        # the largest), in each thread
        activations += shape.shards * 2 * max(n for n, dims in sizes.values() if dims == 2) * 4
    gradients = shape.shards * params * s
    backward = gradients + activations + copies
    if shape.sharded_state:             # flattened gradients and this rank's block of the sum
        temps = params * s + -(-params // shape.ranks) * s
    else:
        temps = 0 if shape.gpu else largest * s
    step = params * s + temps
    base = [("weights", weights)]
    if backward >= step:
        parts = base + [("gradients", gradients), ("AdamW", state), ("activations", activations),
                        ("bf16 copies", copies)]
        phase = "backward"
    else:
        parts = base + [("gradients", params * s), ("AdamW", state), ("step temporaries", temps)]
        phase = "step"
    arrays = sum(b for _, b in parts)
    parts += [("allocator", 0 if shape.gpu else int(arrays * ALLOCATOR_SHARE)), ("process", process)]
    return MemoryEstimate(parts=tuple(parts), ranks_here=shape.ranks_here, phase=phase)


def process_rss() -> int:
    """Bytes this process holds now (VmRSS of /proc/self/status; 0 where unknown)."""
    return proc_bytes("/proc/self/status", "VmRSS") or 0


def gpu_free_memory() -> Optional[int]:
    """Free bytes of the current GPU (None where CuPy cannot say)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.memGetInfo()[0])
    except Exception:       # noqa: BLE001 - no CuPy, no device: unknown
        return None


def what_fits(config: ModelConfig, shape: StepShape, process: int, budget: int) -> list[str]:
    """The changes of one flag (or the BLAS threads) that would bring the estimate within
    ``budget``, as the user would type them."""
    def fits(**changes: Any) -> bool:
        return estimate_training_memory(config, dataclasses.replace(shape, **changes),
                                        process).peak <= budget

    def largest(lo: int, hi: int, key: str) -> Optional[int]:
        """The largest value in [lo, hi) of ``key`` that fits (the estimate grows with it)."""
        if hi <= lo or not fits(**{key: lo}):
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(**{key: mid}) else (lo, mid)
        return lo

    out = []
    b = largest(1, shape.batch, "batch")
    if b is not None:
        out.append(f"--batch-size {b}")
    t = largest(1, shape.seq, "seq")
    if t is not None:
        out.append(f"--seq-length {t}")
    if shape.dtype != "f32" and fits(dtype="f32"):
        out.append("--dtype f32")
    if shape.ranks > 1 and not shape.zero and fits(zero=1):
        out.append("--zero 1")
    if shape.shards > 1 and fits(threads=1):
        out.append(f"one BLAS thread (OPENBLAS_NUM_THREADS=1: each of the {shape.shards} "
                   "threads of a step holds its own gradients)")
    return out


def resolve_training_budget(text: Optional[str], gpu: bool) -> tuple[int, str]:
    """(bytes, where it came from) for pretrain's --max-memory (None: the default). On a GPU
    the default is `GPU_DEFAULT_SHARE` of the device's free memory (nothing else uses it:
    no page cache to leave room for); elsewhere `ref.memory.resolve_budget`'s."""
    free = gpu_free_memory() if gpu and text is None else None
    if free is None:
        return resolve_budget(text)
    return (int(free * GPU_DEFAULT_SHARE),
            f"default: {GPU_DEFAULT_SHARE:.0%} of the GPU's {format_size(free)} free")
