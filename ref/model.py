"""The decoder-only transformer (Llama, Qwen2, Qwen3 and Mistral families) from the ops in
`ref.ops`.

One decoder layer, in HF's order (pre-norm, residual around each block):

    h = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1))),  n1 = rmsnorm(x)
    y = h + down_proj(act(gate_proj(n2)) * up_proj(n2)),                         n2 = rmsnorm(h)

(act is config.hidden_act, SiLU by default; every projection has a bias where the config says
so; with config.qk_norm (Qwen3) each head of q and k is RMS-normalized by its own weight before
rope; layers the config marks as sliding attend to the last config.sliding_window positions;
rope's frequencies come from config.rope_theta and config.rope_scaling, see `apr.rope`)

and the model:  logits = lm_head(rmsnorm(layers(embed(ids)))).

Every shape comes from the `ModelConfig`; parameters are a dict keyed by the canonical HF
names of `config.tensor_shapes()`. With tied embeddings there is no separate lm_head: the
output projection IS ``model.embed_tokens.weight``, and its gradient is the sum of the
embedding's and the projection's. ``config.rope_type`` says in which order the Q/K rows are
stored ("halves" as in HF, "adjacent" as in a llama GGUF), and the rotary op follows it, so
the permuted Q/K of a GGUF run as stored.
"""
from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from apr import names
from apr.config import ModelConfig
from apr.errors import AprError, ConfigError
from apr.names import EMBED, FINAL_NORM, LM_HEAD

from . import kernels, ops, precision
from .backend import Backend, array_module, blas_threads_settable, cpu_backend, single_threaded_blas

Array = Any  # numpy.ndarray or cupy.ndarray

INIT_STD = 0.02


# --------------------------------------------------------------------------- KV cache

class KVCache:
    """Rotated keys and values of every layer for the positions seen so far.

    ``k[i]``, ``v[i]``: (batch, num_kv_heads, capacity, head_dim); the first ``length``
    positions are filled. `Model.forward_step` appends and advances ``length``. They are
    the two halves of ``kv[i]``, (2, batch, num_kv_heads, capacity, head_dim), so that one
    position's keys and values can be written at once."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int, backend: Backend,
                 dtype: Any):
        shape = (2, batch, config.num_kv_heads, capacity, config.head_dim)
        self.kv: list[Array] = [backend.xp.zeros(shape, dtype=dtype) for _ in range(config.num_layers)]
        self.k: list[Array] = [kv[0] for kv in self.kv]
        self.v: list[Array] = [kv[1] for kv in self.kv]
        self.batch = batch
        self.capacity = capacity
        self.length = 0

    def append(self, layer: int, k: Array, v: Array) -> tuple[Array, Array]:
        """Store the new positions' k, v (B, K, T, D) after the ``length`` cached ones and
        return the keys and values of all positions so far (views, (B, K, length + T, D))."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# --------------------------------------------------------------------------- decode weights

class DecodeWeights:
    """Every projection of a decode step, transposed, for inference: (in_features,
    out_features), so that a single position's x @ W^T is ``x @ wt``. C-contiguous (BLAS's
    row-major matrix-vector product, which streams the matrix faster than the dot products of
    the HF layout) where a projection widens or keeps its width; where it narrows (the MLP's
    down projection) ``wt`` is the .T view of a C-contiguous HF-layout copy, whose dot
    products OpenBLAS splits over both threads where the row-major product of that shape
    runs on one (bench/decode.py, docs/benchmarks.md); and the projections that read the
    same input concatenated into one matrix:
    ``layers[i]`` maps the fused kinds to (wt, bias or None): "attn_qkv" holds the columns of
    q_proj, k_proj, v_proj (a family that stores them fused, Phi-3, has them so already),
    "ffn_up" those of gate_proj then up_proj (Phi-3's gate_up), "attn_output" and "ffn_down"
    their own; ``head`` is the output projection.

    These are copies: they hold the parameters of the moment `Model.decode_weights` built
    them, so they are built per use (``generate`` builds them once per call) and never kept
    across a change of the parameters."""

    def __init__(self, model: "Model"):
        xp = model.backend.xp
        self.params = model.params      # the dict they were built from (checked on use)

        def cat(i: int, kinds: tuple[str, ...]) -> tuple[Array, Optional[Array]]:
            ws = [model._p(i, k + ".weight") for k in kinds]
            bs = [model._p(i, k + ".bias") for k in kinds]
            if all(b is None for b in bs):
                bias = None
            else:                       # a bias on some of them only: zeros for the others
                bias = xp.concatenate([xp.zeros(w.shape[0], dtype=w.dtype) if b is None else b
                                       for w, b in zip(ws, bs)])
            n_in, n_out = ws[0].shape[1], sum(w.shape[0] for w in ws)
            if n_in > n_out:            # the HF layout, C order, multiplied through its .T
                return xp.ascontiguousarray(xp.concatenate(ws)).T, bias
            wt = xp.empty((n_in, n_out), dtype=ws[0].dtype)
            start = 0                   # (C order: concatenate would keep the inputs' F order)
            for w in ws:
                wt[:, start:start + w.shape[0]] = w.T
                start += w.shape[0]
            return wt, bias

        parts = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_up": ("ffn_gate", "ffn_up"),
                 "attn_output": ("attn_output",), "ffn_down": ("ffn_down",)}
        cfg = model.config
        self.layers = [{kind: cat(i, (kind,) if cfg.fused else kinds) for kind, kinds in parts.items()}
                       for i in range(cfg.num_layers)]
        self.head = xp.ascontiguousarray(model.lm_head.T)

        # for `Model._step_forward`: the norm weights as the family multiplies by them (Gemma's
        # 1 + w), per layer by kind, None where the config has none; q and k's per-head norms
        # (Qwen3, Gemma 3) as one (H + K, D) table, a row per head of the fused q/k output
        def norm(w: Optional[Array]) -> Optional[Array]:
            return w if w is None or not cfg.norm_offset else w + cfg.norm_offset

        def qk_norm(i: int) -> Optional[Array]:
            wq, wk = model._p(i, "attn_q_norm.weight"), model._p(i, "attn_k_norm.weight")
            if wq is None:
                return None
            d = cfg.head_dim
            return norm(xp.concatenate([xp.broadcast_to(wq, (cfg.num_heads, d)),
                                        xp.broadcast_to(wk, (cfg.num_kv_heads, d))]))

        self.norms = [{**{kind: norm(model._p(i, kind)) for kind in self.NORMS},
                       "attn_qk_norm": qk_norm(i)} for i in range(cfg.num_layers)]
        self.final_norm = norm(model.params[FINAL_NORM])
        # rotary pairs in the stored order (`ops._rope_pairs`), per column of a head: the
        # pair it belongs to, its partner's column, and -1 for a pair's first member, +1 for
        # its second, so that rope(x) = x * cos[pair] + x[partner] * sign * sin[pair]
        first, second = ops._rope_pairs(np.arange(cfg.head_dim), cfg.rope_type)
        self.rope_pair = np.empty(cfg.head_dim, dtype=np.int64)
        self.rope_partner = np.empty(cfg.head_dim, dtype=np.int64)
        self.rope_pair[first] = self.rope_pair[second] = np.arange(cfg.head_dim // 2)
        self.rope_partner[first], self.rope_partner[second] = second, first
        self.rope_sign = np.where(np.isin(np.arange(cfg.head_dim), first), -1, 1).astype(model.dtype)
        self.rope_rows: Optional[list[tuple[Array, Array]]] = None    # see `Model._step_rope`

    NORMS = ("attn_norm.weight", "attn_post_norm.weight", "ffn_norm.weight", "ffn_post_norm.weight")

    @staticmethod
    def linear(x: Array, weight: tuple[Array, Optional[Array]]) -> Array:
        """x @ wt + b for one (wt, b) entry: the value of `ops.linear_forward` (x @ W^T + b)."""
        wt, bias = weight
        y = x @ wt if x.ndim == 2 else x.reshape(-1, x.shape[-1]) @ wt    # rows: as they are
        if bias is not None:
            y += bias
        return y if x.ndim == 2 else y.reshape(*x.shape[:-1], wt.shape[1])


# The fields of a config and of a family that `Model._step_forward` was written for: a field
# added later sends every step to the general path (tests/test_decode_step.py then fails on
# the lean path not being taken) until the lean step implements it, never past it.
LEAN_STEP_FIELDS = frozenset({
    "attention_bias", "attn_logit_softcapping", "family", "final_logit_softcapping", "head_dim",
    "hidden_act", "hidden_size", "intermediate_size", "layer_types", "max_position_embeddings",
    "mlp_bias", "num_heads", "num_kv_heads", "num_layers", "pad_token_id",
    "query_pre_attn_scalar", "rms_norm_eps", "rope_local_scaling", "rope_local_theta",
    "rope_scaling", "rope_theta", "rope_type", "sliding_window", "tie_word_embeddings",
    "vocab_size",
    # the family flags
    "attention_bias_option", "attn_softcap", "default_act", "default_head_dim", "default_pad",
    "default_tied", "default_window", "embed_scale", "fused", "gguf_arch", "gguf_attention_bias",
    "gguf_family", "gguf_free_head_dim", "gguf_mlp_bias", "gguf_norm_fold", "gguf_rope_permuted",
    "hf_act_key", "hf_architecture", "hf_model_type", "local_rope", "mlp_bias_option", "name",
    "norm_offset", "output_bias", "post_norms", "pretraining_tp", "qk_norm",
    "query_scalar_option", "rope_theta_range", "sliding_all_layers", "sliding_window_option",
    "softcap_option", "window_pattern"})
LEAN_STEP_COVERS_CONFIG = {f.name for cls in (ModelConfig, names.Family)
                           for f in dataclasses.fields(cls)} <= LEAN_STEP_FIELDS


# --------------------------------------------------------------------------- model

_POOLS: dict[int, ThreadPoolExecutor] = {}


def _worker_pool(n: int) -> ThreadPoolExecutor:
    """The threads of `Model.loss_and_grads` with ``n`` workers: kept for the process (a
    BLAS may keep buffers per thread, so the same threads serve every step)."""
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="loss-and-grads")
    return _POOLS[n]


class Model:
    """Parameters on a backend, in one dtype, and the forward / backward passes over them."""

    def __init__(self, config: ModelConfig, params: Mapping[str, Any],
                 backend: Optional[Backend] = None, dtype: Any = np.float32,
                 matmul: Optional[str] = None):
        """``params``: array-likes keyed by exactly the names of ``config.tensor_shapes()``,
        each of that shape. With tied embeddings a ``lm_head.weight`` entry is accepted only
        if it equals the embedding (HF state dicts list the shared tensor under both names)
        and is then dropped; otherwise it is a ConfigError, as are missing or unknown names
        and wrong shapes. Arrays are moved to the backend and converted to ``dtype``; one
        that already is a CPU array of ``dtype`` is used as is, not copied (so a memory-mapped
        tensor stays mapped and read-only, and an array passed in is shared with the caller).
        ``matmul="bf16"``: the linear layers' products take bfloat16 operands with float32
        accumulation, the parameters staying float32 (`ref.precision`)."""
        self.config = config
        self.backend = backend or cpu_backend()
        self.dtype = np.dtype(dtype)
        if matmul not in (None, "bf16") or (matmul and self.dtype != np.float32):
            raise AprError(f"matmul precision {matmul!r} with {self.dtype} parameters: "
                           "bf16 products need float32 master weights")
        self.matmul = matmul
        self.ops = kernels.ops_for(self.backend)     # ref.ops, or fused kernels on a GPU
        # every parameter in memory, or (a model larger than its memory budget) read from the
        # file a layer at a time (`ref.weights`): a StreamedWeights, for inference only
        self.streamed = bool(getattr(params, "streamed", False))
        self.params: Mapping[str, Array] = params if self.streamed else self._check_params(params)
        self._names: dict[tuple[int, str], Optional[str]] = {}    # (layer, kind) -> name

    @classmethod
    def init_random(cls, config: ModelConfig, seed: int = 0, backend: Optional[Backend] = None,
                    dtype: Any = np.float32, matmul: Optional[str] = None) -> "Model":
        """HF-like initialization: weights ~ N(0, 0.02^2), norm weights 1, biases 0, the
        embedding's padding row (``pad_token_id``) 0 (drawn with numpy's Generator(seed) on the
        host, so the same on every backend)."""
        rng = np.random.default_rng(seed)
        params: dict[str, np.ndarray] = {}
        for name, shape in config.tensor_shapes().items():
            init = names.init_of(name)
            if init == "norm":      # the identity norm: w = 1, or 0 where it computes x (1 + w)
                params[name] = np.full(shape, 1.0 - config.norm_offset, dtype=dtype)
            elif init == "zeros":
                params[name] = np.zeros(shape, dtype=dtype)
            else:
                params[name] = (rng.standard_normal(shape, dtype=np.float32) * INIT_STD).astype(dtype)
        if config.pad_token_id is not None:     # nn.Embedding's padding row starts at zero
            params[EMBED][config.pad_token_id] = 0
        return cls(config, params, backend, dtype, matmul)

    def _check_params(self, params: Mapping[str, Any]) -> dict[str, Array]:
        cfg = self.config
        shapes = cfg.tensor_shapes()
        given = dict(params)
        if cfg.tie_word_embeddings and LM_HEAD in given and EMBED in given:
            head, embed = np.asarray(self._host(given[LM_HEAD])), np.asarray(self._host(given[EMBED]))
            if head.shape != embed.shape or not np.array_equal(head, embed):
                raise ConfigError(f"tie_word_embeddings is set but {LM_HEAD} differs from {EMBED}")
            del given[LM_HEAD]
        found = cfg.mismatches({n: np.shape(a) for n, a in given.items()})
        if LM_HEAD not in shapes:        # tied: a stored lm_head was equal and is dropped above
            found = [m for m in found if m.name != LM_HEAD]
        groups = {k: [m.name for m in found if m.kind == k] for k in ("missing", "unexpected")}
        if any(groups.values()):
            parts = [f"{what} {len(ns)} ({', '.join(ns[:4])}{', ...' if len(ns) > 4 else ''})"
                     for what, ns in groups.items() if ns]
            raise ConfigError("parameters do not match the config: " + "; ".join(parts))
        for m in found:                  # shapes
            raise ConfigError(f"{m.name}: shape {m.found}, config implies {m.expected}")
        return {name: self.backend.to_device(given[name], self.dtype) for name in shapes}

    @staticmethod
    def _host(a: Any) -> Any:
        return a.get() if array_module(a) is not np else a

    # ------------------------------------------------------------------ helpers
    @property
    def lm_head(self) -> Array:
        """The output projection (V, C): the embedding itself when tied."""
        return self.params[EMBED] if self.config.tie_word_embeddings else self.params[LM_HEAD]

    def _name(self, kind: str, i: int) -> str:
        return names.tensor_name(kind, i, self.config.family)

    def _p(self, i: int, kind: str) -> Optional[Array]:
        """Layer i's parameter of ``kind`` (`apr.names.TENSOR_KINDS`); None for one the
        config does not have (a bias, a q/k norm)."""
        key = (i, kind)
        if key not in self._names:      # the name only: the array is looked up every time
            self._names[key] = (names.tensor_name(kind, i, self.config.family)
                                if kind in names.kinds_for(self.config.family) else None)
        name = self._names[key]
        return None if name is None else self.params.get(name)

    def _ids(self, ids: Any) -> Array:
        """Token ids as a (batch, T) integer array on the backend, each in [0, vocab_size)."""
        ids = self.backend.to_device(ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise AprError(f"token ids must have shape (batch, T) with T >= 1, got {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise AprError(f"token ids must be integers, got {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise AprError(f"token id {hi if hi >= self.config.vocab_size else lo} is out of range "
                           f"for vocab_size={self.config.vocab_size}")
        return ids.astype(np.int64, copy=False)

    def _rope(self, start: int, t: int) -> list[tuple[Array, Array]]:
        """Per layer, the cos, sin tables (T, D/2) for positions start .. start + T - 1 (the
        same arrays for every layer with the same RoPE; Gemma 3's sliding layers have their
        own)."""
        positions = self.backend.xp.arange(start, start + t)
        tables: dict[tuple, tuple[Array, Array]] = {}
        out = []
        for i in range(self.config.num_layers):
            theta, scaling = self.config.rope_of(i)
            if (theta, scaling) not in tables:
                tables[theta, scaling] = ops.rope_tables(positions, self.config.head_dim, theta,
                                                         self.dtype, scaling)
            out.append(tables[theta, scaling])
        return out

    @staticmethod
    def _split_heads(x: Array, n: int) -> Array:
        """(B, T, n*D) -> (B, n, T, D)."""
        b, t, _ = x.shape
        return x.reshape(b, t, n, -1).transpose(0, 2, 1, 3)

    @staticmethod
    def _merge_heads(x: Array) -> Array:
        """(B, n, T, D) -> (B, T, n*D) (a contiguous copy)."""
        b, n, t, d = x.shape
        return x.transpose(0, 2, 1, 3).reshape(b, t, n * d)

    def _projection_forward(self, i: int, proj: str, x: Array,
                            dw: Optional[DecodeWeights] = None) -> tuple[Array, Optional[tuple]]:
        """linear_forward with layer i's ``proj``.weight and, when the config has it, .bias;
        with decode weights, their matrix of that kind (no backward cache then)."""
        if dw is not None:
            return dw.linear(x, dw.layers[i][proj]), None
        return precision.linear_forward(x, self._p(i, proj + ".weight"), self._p(i, proj + ".bias"),
                                        self.matmul)

    def _norm_forward(self, x: Array, weight: Array) -> tuple[Array, tuple]:
        """rmsnorm with the weight as the family computes it: w, or (1 + w) in Gemma (the
        gradient of w is the same)."""
        offset = self.config.norm_offset
        return self.ops.rmsnorm_forward(x, weight + offset if offset else weight, self.config.rms_norm_eps)

    def _heads_forward(self, i: int, x: Array, n: int, norm: str) -> tuple[Array, tuple]:
        """(B, T, n*D) -> (B, n, T, D), each head RMS-normalized by layer i's ``norm`` weight
        when the config has q/k norms (the cache is None otherwise)."""
        x = self._split_heads(x, n)
        w = self._p(i, norm)
        if w is None:
            return x, None
        return self._norm_forward(x, w)

    def _heads_backward(self, i: int, dx: Array, cache: Optional[tuple], norm: str,
                        grads: dict[str, Array]) -> Array:
        """Backward of `_heads_forward`: (B, n, T, D) -> (B, T, n*D)."""
        if cache is not None:
            dx, grads[self._name(norm, i)] = self.ops.rmsnorm_backward(dx, cache)
        return self._merge_heads(dx)

    # ------------------------------------------------------------------ attention block
    def _attention_forward(self, i: int, x: Array, cos: Array, sin: Array,
                           kv: Optional[KVCache], dw: Optional[DecodeWeights] = None
                           ) -> tuple[Array, tuple]:
        """x + o_proj(attention(rope(q), rope(k), v)) over rmsnorm(x) (the block's output
        normalized again where the config has post norms). ``dw``: the decode weights to use
        (no backward cache then)."""
        cfg = self.config
        n1, c_norm = self._norm_forward(x, self._p(i, "attn_norm.weight"))
        if cfg.fused or dw is not None:  # one q/k/v matrix: its output split into views (Phi-3)
            qkv, c_q = self._projection_forward(i, "attn_qkv", n1, dw)
            q, k, v = (qkv[..., :cfg.q_size], qkv[..., cfg.q_size:cfg.q_size + cfg.kv_size],
                       qkv[..., cfg.q_size + cfg.kv_size:])
            c_k = c_v = None
        else:
            q, c_q = self._projection_forward(i, "attn_q", n1)
            k, c_k = self._projection_forward(i, "attn_k", n1)
            v, c_v = self._projection_forward(i, "attn_v", n1)
        q, c_nq = self._heads_forward(i, q, cfg.num_heads, "attn_q_norm.weight")
        k, c_nk = self._heads_forward(i, k, cfg.num_kv_heads, "attn_k_norm.weight")
        q, c_rq = self.ops.rope_forward(q, cos, sin, cfg.rope_type)
        k, c_rk = self.ops.rope_forward(k, cos, sin, cfg.rope_type)
        v = self.backend.xp.ascontiguousarray(self._split_heads(v, cfg.num_kv_heads))
        if kv is not None:
            k, v = kv.append(i, k, v)
        a, c_att = self.ops.attention_forward(q, k, v, cfg.window(i), cfg.attention_scale,
                                         cfg.attn_logit_softcapping)
        out, c_o = self._projection_forward(i, "attn_output", self._merge_heads(a), dw)
        out, c_post = self._post_norm_forward(i, "attn_post_norm.weight", out)
        out += x                                    # a new array (product or norm): reused
        return out, (c_norm, c_q, c_k, c_v, c_nq, c_nk, c_rq, c_rk, c_att, c_o, c_post)

    def _post_norm_forward(self, i: int, kind: str, out: Array) -> tuple[Array, tuple | None]:
        w = self._p(i, kind)
        return (out, None) if w is None else self._norm_forward(out, w)

    def _post_norm_backward(self, i: int, kind: str, dy: Array, cache: tuple | None,
                            grads: dict[str, Array]) -> Array:
        if cache is None:
            return dy
        dout, grads[self._name(kind, i)] = self.ops.rmsnorm_backward(dy, cache)
        return dout

    def _attention_backward(self, i: int, dy: Array, cache: tuple,
                            grads: dict[str, Array]) -> Array:
        """Gradient w.r.t. the block input x (residual + block path); fills ``grads``."""
        cfg = self.config
        c_norm, c_q, c_k, c_v, c_nq, c_nk, c_rq, c_rk, c_att, c_o, c_post = cache
        dout = self._post_norm_backward(i, "attn_post_norm.weight", dy, c_post, grads)
        da = self._projection_backward(i, "attn_output", dout, c_o, grads)
        dq, dk, dv = self.ops.attention_backward(self._split_heads(da, cfg.num_heads), c_att)
        dq = self._heads_backward(i, self.ops.rope_backward(dq, c_rq), c_nq, "attn_q_norm.weight", grads)
        dk = self._heads_backward(i, self.ops.rope_backward(dk, c_rk), c_nk, "attn_k_norm.weight", grads)
        dv = self._merge_heads(dv)
        if cfg.fused:
            dn1 = self._projection_backward(i, "attn_qkv", self.backend.xp.concatenate(
                [dq, dk, dv], axis=-1), c_q, grads)
        else:                                   # summed in place, in the same order
            dn1 = self._projection_backward(i, "attn_q", dq, c_q, grads)
            dn1 += self._projection_backward(i, "attn_k", dk, c_k, grads)
            dn1 += self._projection_backward(i, "attn_v", dv, c_v, grads)
        dx, grads[self._name("attn_norm.weight", i)] = self.ops.rmsnorm_backward(dn1, c_norm)
        dx += dy
        return dx

    def _projection_backward(self, i: int, proj: str, dy: Array, cache: tuple,
                             grads: dict[str, Array]) -> Array:
        """linear_backward of layer i's ``proj``: stores its .weight (and .bias) grads."""
        dx, grads[self._name(proj + ".weight", i)], dbias = precision.linear_backward(
            dy, cache, self.matmul)
        if dbias is not None:
            grads[self._name(proj + ".bias", i)] = dbias
        return dx

    # ------------------------------------------------------------------ MLP block
    def _mlp_forward(self, i: int, x: Array, dw: Optional[DecodeWeights] = None
                     ) -> tuple[Array, tuple]:
        """x + down_proj(act(gate_proj(n)) * up_proj(n)),  n = rmsnorm(x), act = config.hidden_act.
        ``dw``: the decode weights to use (no backward cache then)."""
        n2, c_norm = self._norm_forward(x, self._p(i, "ffn_norm.weight"))
        if self.config.fused or dw is not None:  # one gate/up matrix: gate is its first half
            gate_up, c_gate = self._projection_forward(i, "ffn_up", n2, dw)
            f = self.config.intermediate_size
            gate, up, c_up = gate_up[..., :f], gate_up[..., f:], None
        else:
            gate, c_gate = self._projection_forward(i, "ffn_gate", n2)
            up, c_up = self._projection_forward(i, "ffn_up", n2)
        m, c_act = self.ops.gated_mlp_forward(gate, up, self.config.hidden_act)
        out, c_down = self._projection_forward(i, "ffn_down", m, dw)
        out, c_post = self._post_norm_forward(i, "ffn_post_norm.weight", out)
        out += x
        return out, (c_norm, c_gate, c_up, c_act, c_down, c_post)

    def _mlp_backward(self, i: int, dy: Array, cache: tuple, grads: dict[str, Array]) -> Array:
        c_norm, c_gate, c_up, c_act, c_down, c_post = cache
        dout = self._post_norm_backward(i, "ffn_post_norm.weight", dy, c_post, grads)
        dm = self._projection_backward(i, "ffn_down", dout, c_down, grads)
        dgate, dup = self.ops.gated_mlp_backward(dm, c_act)
        if self.config.fused:
            dn = self._projection_backward(i, "ffn_up", self.backend.xp.concatenate(
                [dgate, dup], axis=-1), c_gate, grads)
        else:
            dn = self._projection_backward(i, "ffn_gate", dgate, c_gate, grads)
            dn += self._projection_backward(i, "ffn_up", dup, c_up, grads)
        dx, grads[self._name("ffn_norm.weight", i)] = self.ops.rmsnorm_backward(dn, c_norm)
        dx += dy
        return dx

    # ------------------------------------------------------------------ trunk
    def _trunk_forward(self, ids: Array, start: int, kv: Optional[KVCache],
                       caches: Optional[list], hidden: Optional[list],
                       dw: Optional[DecodeWeights] = None) -> Array:
        """embed -> layers -> final norm, for positions start .. start + T - 1.
        ``caches``: a list to receive every backward cache (training) or None (inference);
        ``hidden``: a list to receive the embedding output, every layer's output and the
        final norm's output (L + 2 arrays), or None."""
        for x in self._trunk_stages(ids, start, kv, caches, dw):
            if hidden is not None:
                hidden.append(x)
        return x

    def _trunk_stages(self, ids: Array, start: int, kv: Optional[KVCache],
                      caches: Optional[list], dw: Optional[DecodeWeights] = None,
                      known: Optional[Callable[[int, Array], Optional[Array]]] = None
                      ) -> Iterator[Array]:
        """`_trunk_forward` a stage at a time: yields the embedding output, each layer's
        output and the final norm's output as each is computed. ``known(k, x)`` (inference):
        stage k's output for its input x when the caller already has it (stage 0 takes the
        ids), None to compute it; a stage it answers reads none of its weights."""
        x = known(0, ids) if known else None
        if x is None:
            x, c_embed = ops.embedding_forward(ids, self.params[EMBED], self.config.pad_token_id)
            if self.config.embed_scale != 1.0:       # Gemma: rows times sqrt(hidden_size)
                x = x * x.dtype.type(self.config.embed_scale)
        ropes = self._rope(start, ids.shape[1])
        layer_caches = []
        yield x
        for i in range(self.config.num_layers):
            y = known(i + 1, x) if known else None
            if y is None:
                y, c_attn = self._attention_forward(i, x, *ropes[i], kv, dw)
                y, c_mlp = self._mlp_forward(i, y, dw)
                if caches is not None:
                    layer_caches.append((c_attn, c_mlp))
                del c_attn, c_mlp       # they hold the layer's weights: a streamed layer's go now
            x = y
            yield x
        y = known(self.config.num_layers + 1, x) if known else None
        if y is None:
            y, c_norm = self._norm_forward(x, self.params[FINAL_NORM])
            if caches is not None:
                caches.extend([c_embed, layer_caches, c_norm])
        yield y

    def _trunk_backward(self, dx: Array, caches: list, grads: dict[str, Array]) -> None:
        """Backward through final norm, layers (last to first) and embedding; fills ``grads``
        (adding the embedding gradient to one already there, the tied lm_head's)."""
        c_embed, layer_caches, c_norm = caches
        dx, grads[FINAL_NORM] = self.ops.rmsnorm_backward(dx, c_norm)
        for i in reversed(range(self.config.num_layers)):
            c_attn, c_mlp = layer_caches[i]
            dx = self._mlp_backward(i, dx, c_mlp, grads)
            dx = self._attention_backward(i, dx, c_attn, grads)
        if self.config.embed_scale != 1.0:
            dx = dx * dx.dtype.type(self.config.embed_scale)
        grads[EMBED] = ops.embedding_backward(dx, c_embed, grads.get(EMBED))   # tied: added in place

    def _head_forward(self, x: Array, dw: Optional[DecodeWeights] = None) -> tuple[Array, tuple]:
        """The output projection, soft-capped where the config says (Gemma 2). Streamed, it
        is multiplied a block of its rows at a time (no backward cache then)."""
        if self.streamed:
            blocks = []
            for w in self.lm_head.blocks():
                blocks.append(precision.linear_forward(x, w, None, self.matmul)[0])
                del w                   # before the next block is read: one held at a time
            logits, c_head = self.backend.xp.concatenate(blocks, axis=-1), None
        elif dw is None:
            logits, c_head = precision.linear_forward(x, self.lm_head, None, self.matmul)
        else:
            logits, c_head = dw.linear(x, (dw.head, None)), None
        cap = self.config.final_logit_softcapping
        if not cap:
            return logits, (c_head, None)
        logits, c_cap = ops.softcap_forward(logits, cap)
        return logits, (c_head, c_cap)

    def _head_backward(self, dlogits: Array, cache: tuple) -> tuple[Array, Array]:
        c_head, c_cap = cache
        if c_cap is not None:
            dlogits = ops.softcap_backward(dlogits, c_cap)
        dx, d_head, _ = precision.linear_backward(dlogits, c_head, self.matmul)
        return dx, d_head

    # ------------------------------------------------------------------ public API
    def forward(self, ids: Any, capture_hidden: bool = False):
        """Logits (batch, T, vocab) for token ids (batch, T), positions 0 .. T-1.
        With ``capture_hidden``: (logits, hidden), hidden a list of L + 2 arrays
        (batch, T, hidden_size): the embeddings, the output of each decoder layer, and the
        output of the final norm."""
        hidden: Optional[list] = [] if capture_hidden else None
        x = self._trunk_forward(self._ids(ids), 0, None, None, hidden)
        logits, _ = self._head_forward(x)
        return (logits, hidden) if capture_hidden else logits

    def stages(self, ids: Any, known: Optional[Callable[[int, Array], Optional[Array]]] = None
               ) -> Iterator[Array]:
        """`forward(ids, capture_hidden=True)` a stage at a time, as each is computed: the
        L + 2 hidden states (embeddings, each decoder layer's output, the final norm's
        output), then the logits (stage L + 2). Two models read this way in step hold one
        layer each at a time when streamed (`diff`). ``known(k, x)``: stage k's output for
        input x where the caller already has it (None: compute it)."""
        x = None
        for x in self._trunk_stages(self._ids(ids), 0, None, None, None, known):
            yield x
        logits = known(self.config.num_layers + 2, x) if known else None
        yield self._head_forward(x)[0] if logits is None else logits

    def loss(self, ids: Any, targets: Any, ignore_index: int = ops.IGNORE_INDEX) -> float:
        """Mean cross-entropy of the logits for ``ids`` against ``targets`` (same shape,
        already shifted: targets[b, t] is the token that should follow ids[b, t])."""
        logits = self.forward(ids)
        loss, _ = self.ops.cross_entropy_forward(logits, self.backend.to_device(targets), ignore_index,
                                                 True)      # the logits are not needed after it
        return float(loss)

    def loss_and_grads(self, ids: Any, targets: Any, ignore_index: int = ops.IGNORE_INDEX,
                       workers: int = 1) -> tuple[float, dict[str, Array]]:
        """The loss of `loss` and its gradient for every parameter, keyed like ``params``
        (with tied embeddings one entry, ``model.embed_tokens.weight``, holding the sum of
        the embedding's and the output projection's gradients).

        ``workers`` > 1 (CPU only): the batch's rows are split into that many contiguous
        shards, each run through the same forward and backward in its own thread with
        single-threaded BLAS (NumPy releases the GIL in its loops and products, so the
        elementwise work, which a single NumPy call does on one core, runs on several;
        `backend.single_threaded_blas`: the process's BLAS is single-threaded meanwhile).
        The loss is the mean over every kept target of the whole batch, as with one worker:
        shard i's cross-entropy backward starts from n_i / n (its kept targets over all), so
        its gradients are its rows' share of the batch mean, and the shards' gradients are
        summed. The same values as one worker up to rounding (the order of the sums over
        rows changes). Where the rows cannot be split (`can_split_rows`), it runs as one
        worker."""
        if workers > 1 and self.can_split_rows() and np.ndim(ids) == 2 and len(ids) > 1:
            return self._loss_and_grads_threaded(ids, targets, ignore_index, min(workers, len(ids)))
        loss, grads = self._loss_and_grads(ids, targets, ignore_index, 1.0)
        return float(loss), grads

    def can_split_rows(self) -> bool:
        """Whether `loss_and_grads` can run shards of the rows in threads: on the CPU, where
        the BLAS's thread count can be set (`backend.blas_threads_settable`)."""
        return self.backend.xp is np and blas_threads_settable()

    def _loss_and_grads(self, ids: Any, targets: Any, ignore_index: int,
                        dloss: float) -> tuple[Array, dict[str, Array]]:
        """One forward and backward over all of ``ids``; the backward starts from ``dloss``
        (the loss's weight in a larger batch; 1 for the whole batch). The loss unweighted."""
        caches: list = []
        x = self._trunk_forward(self._ids(ids), 0, None, caches, None)
        logits, c_head = self._head_forward(x)
        loss, c_loss = self.ops.cross_entropy_forward(logits, self.backend.to_device(targets),
                                                      ignore_index, True)   # written over logits
        del logits
        grads: dict[str, Array] = {}
        dlogits = self.ops.cross_entropy_backward(dloss, c_loss)
        del c_loss
        dx, d_head = self._head_backward(dlogits, c_head)
        del dlogits
        grads[EMBED if self.config.tie_word_embeddings else LM_HEAD] = d_head
        self._trunk_backward(dx, caches, grads)
        return loss, {name: grads[name] for name in self.params}

    def _loss_and_grads_threaded(self, ids: Any, targets: Any, ignore_index: int,
                                 workers: int) -> tuple[float, dict[str, Array]]:
        """`loss_and_grads` over ``workers`` shards of the rows, in threads (see there)."""
        ids, targets = self._ids(ids), np.asarray(targets)     # every shard's ids checked
        if targets.shape != ids.shape:
            raise AprError(f"targets have shape {targets.shape}, the ids {ids.shape}")
        kept = (targets != ignore_index).reshape(len(targets), -1).sum(axis=1)
        total = int(kept.sum())
        bounds = np.linspace(0, len(ids), workers + 1).round().astype(int)
        shards = [(a, b, int(kept[a:b].sum())) for a, b in zip(bounds[:-1], bounds[1:])]
        shards = [sh for sh in shards if sh[2] > 0]     # a shard with nothing to predict adds 0
        if total == 0 or len(shards) < 2:               # (the plain path's errors, if any)
            loss, grads = self._loss_and_grads(ids, targets, ignore_index, 1.0)
            return float(loss), grads

        def run(shard: tuple[int, int, int]) -> tuple[Array, dict[str, Array]]:
            a, b, n = shard
            return self._loss_and_grads(ids[a:b], targets[a:b], ignore_index, n / total)

        with single_threaded_blas():
            results = list(_worker_pool(len(shards)).map(run, shards))
        loss = sum(float(l) * n for (l, _), (_, _, n) in zip(results, shards)) / total
        grads = results[0][1]
        for _, more in results[1:]:
            for name, g in grads.items():
                g += more[name]
        return loss, grads

    def new_kv_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` positions."""
        return KVCache(self.config, batch, capacity, self.backend, self.dtype)

    def decode_weights(self) -> DecodeWeights:
        """The current parameters in the decode layout (`DecodeWeights`) for `forward_step`.
        Build them again after any change of the parameters: they are copies. Not with
        bf16 products (``matmul``): the decode layout multiplies in the parameters' dtype."""
        if self.streamed:
            raise AprError("decode weights are a copy of every parameter: not for a model "
                           "streamed from its file")
        if self.matmul is not None:
            raise AprError(f"decode weights multiply in {self.dtype}; this model's products are "
                           f"{self.matmul} (use forward_step without weights)")
        return DecodeWeights(self)

    def forward_step(self, ids: Any, cache: KVCache, last_only: bool = False,
                     weights: Optional[DecodeWeights] = None) -> Array:
        """Logits for ``ids`` (batch, T) that follow the ``cache.length`` positions already
        in ``cache``, which is then extended by T. A prompt at once (prefill), then one token
        at a time, gives the logits of `forward` on the whole sequence. ``last_only``:
        return only the last position's logits, (batch, 1, vocab). ``weights``: from
        `decode_weights` of this model (the same numbers in fewer, larger products); a step
        of one new token of one sequence on the CPU then takes `_step_forward`."""
        if weights is not None and (self.streamed or weights.params is not self.params):
            raise AprError("forward_step: the decode weights were built for another model")
        ids = self._ids(ids)
        b, t = ids.shape
        if b != cache.batch:
            raise AprError(f"forward_step: batch {b} but the KV cache holds {cache.batch} sequences")
        if cache.length + t > cache.capacity:
            raise AprError(f"forward_step: {cache.length} cached + {t} new positions exceed "
                           f"the KV cache capacity {cache.capacity}")
        if weights is not None and b == t == 1 and self.backend.xp is np and LEAN_STEP_COVERS_CONFIG:
            logits = self._step_forward(int(ids[0, 0]), cache, weights)
            cache.length += 1
            return logits
        x = self._trunk_forward(ids, cache.length, cache, None, None, weights)
        cache.length += t
        if last_only:
            x = x[:, -1:]
        logits, _ = self._head_forward(x, weights)
        return logits

    def _step_rope(self, dw: DecodeWeights, need: int, capacity: int) -> list[tuple[Array, Array]]:
        """Per layer, the rotary tables of `_rope` for positions 0 .. need-1 (or more) as rows
        of the full head width for `_step_forward`: (cos[pair], sign * sin[pair]), kept in
        ``dw`` and built again, for twice as many positions up to ``capacity``, only when
        ``need`` outgrows them."""
        if dw.rope_rows is None or len(dw.rope_rows[0][0]) < need:
            tables = self._rope(0, min(capacity, max(2 * need, 256)))  # shared by equal RoPEs
            full = {id(cos): (cos[:, dw.rope_pair], sin[:, dw.rope_pair] * dw.rope_sign)
                    for cos, sin in tables}
            dw.rope_rows = [full[id(cos)] for cos, _ in tables]
        return dw.rope_rows

    def _step_forward(self, token: int, cache: KVCache, dw: DecodeWeights) -> Array:
        """The logits (1, 1, V) of one token of one sequence at position ``cache.length``, on
        the CPU with decode weights: what `_trunk_forward` and `_head_forward` compute for
        it, in far fewer NumPy calls (at this size each costs more than its arithmetic):
        rows of one position throughout, q and k rotated together on the fused q/k/v output,
        the G query heads of a K/V head as one (G, D) @ (D, S) product, the norms' sum of
        squares as one dot product (the rest of their scale in Python floats), SiLU's sigmoid
        as one call of SciPy's ``expit``, and the rest in place. The same operations in the
        same order otherwise, so the same values up to rounding. Writes the position's k, v
        into ``cache`` (the caller advances ``cache.length``)."""
        from scipy.special import expit     # here: importing scipy.special takes ~0.3 s
        cfg, pos = self.config, cache.length
        h, kvh, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        q_size, k_end = cfg.q_size, cfg.q_size + cfg.kv_size
        scale = self.dtype.type(cfg.attention_scale)
        eps, silu = cfg.rms_norm_eps, ops.ACTIVATIONS[cfg.hidden_act] is ops.ACTIVATIONS["silu"]
        linear = dw.linear

        def norm(x: Array, w: Array) -> Array:         # rmsnorm of one row (1, C)
            y = x * (1.0 / math.sqrt(float(np.vdot(x, x)) / x.shape[1] + eps))
            y *= w
            return y

        x = self.params[EMBED][[token]]                 # (1, C), a copy
        if cfg.embed_scale != 1.0:
            x *= x.dtype.type(cfg.embed_scale)
        for i, (cos, sin) in enumerate(self._step_rope(dw, pos + 1, cache.capacity)):
            cos, sin = cos[pos], sin[pos]
            weights, norms = dw.layers[i], dw.norms[i]
            # attention
            qkv = linear(norm(x, norms["attn_norm.weight"]), weights["attn_qkv"])
            qk = qkv[0, :k_end].reshape(h + kvh, d)      # every head of q, then of k
            if norms["attn_qk_norm"] is not None:
                qk[...] = ops.rmsnorm_forward(qk, norms["attn_qk_norm"], eps)[0]
            rotated = qk.take(dw.rope_partner, axis=1)
            rotated *= sin
            qk *= cos
            qk += rotated
            kv = cache.kv[i]                             # (2, 1, K, capacity, D)
            kv[:, 0, :, pos] = qkv[0, q_size:].reshape(2, kvh, d)  # k and v, as they follow q
            keys, values = kv[0, 0], kv[1, 0]
            window = cfg.window(i)
            first = max(0, pos + 1 - window) if window else 0
            q = qk[:h].reshape(kvh, h // kvh, d)
            q *= scale
            scores = q @ keys[:, first:pos + 1].transpose(0, 2, 1)      # (K, G, S)
            if cfg.attn_logit_softcapping:
                scores, _ = ops.softcap_forward(scores, cfg.attn_logit_softcapping)
            ops._softmax_inplace(scores)
            out = linear((scores @ values[:, first:pos + 1]).reshape(1, q_size),
                         weights["attn_output"])
            if norms["attn_post_norm.weight"] is not None:
                out = norm(out, norms["attn_post_norm.weight"])
            x += out
            # MLP
            gate_up = linear(norm(x, norms["ffn_norm.weight"]), weights["ffn_up"])
            gate = gate_up[:, :f]
            if silu:                                    # silu(z) = z sigmoid(z), in one call
                m = expit(gate)
                m *= gate
            else:
                m = ops.ACTIVATIONS[cfg.hidden_act].f(gate)
            m *= gate_up[:, f:]
            out = linear(m, weights["ffn_down"])
            if norms["ffn_post_norm.weight"] is not None:
                out = norm(out, norms["ffn_post_norm.weight"])
            x += out
        logits = linear(norm(x, dw.final_norm), (dw.head, None))
        if cfg.final_logit_softcapping:
            logits, _ = ops.softcap_forward(logits, cfg.final_logit_softcapping)
        return logits[None]
