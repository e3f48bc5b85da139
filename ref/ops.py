"""The ops of a Llama/Qwen2 decoder, each a forward/backward pair, side by side (as in llm.c).

Conventions, the same for every pair:

* ``op_forward(inputs..., options...) -> (out, cache)``: ``cache`` holds what the backward needs
  and nothing else.
* ``op_backward(dout, cache)`` returns the gradients of the forward's differentiable inputs, in
  the forward's argument order (one array, or a tuple when there are several).
* Pure functions of arrays: the array module (NumPy or CuPy) comes from the inputs, so the
  same code runs on the CPU and the GPU. Nothing here loops over batch, heads or positions in
  Python; every contraction is one (batched) matmul.

Shapes: B batch, T query positions, S key positions (S = T without a KV cache), C model width,
H query heads, K key/value heads (H a multiple of K), D head width, V vocabulary, N = B*T rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from apr.names import ROPE_ADJACENT, ROPE_HALVES
from apr.rope import inverse_frequencies

from .backend import array_module, erf, scatter_add_rows

Array = Any  # a numpy.ndarray or a cupy.ndarray


def _rowdot(a: Array, b: Array) -> Array:
    """sum(a * b) over the last axis, (...,): for NumPy float32/float64 arrays NumPy's vecdot
    (NumPy 2; one pass, no product array), else the product summed."""
    vecdot = getattr(np, "vecdot", None)
    if vecdot is not None and type(a) is type(b) is np.ndarray and a.dtype == b.dtype \
            and a.dtype in (np.float32, np.float64):
        return vecdot(a, b)
    return (a * b).sum(axis=-1)


# --------------------------------------------------------------------------- embedding

def embedding_forward(ids: Array, weight: Array, padding_idx: int | None = None) -> tuple[Array, tuple]:
    """out[b, t] = weight[ids[b, t]]   (ids: integer array of any shape; weight: (V, C)).
    ``padding_idx``: a row that the backward never updates (torch's nn.Embedding padding_idx,
    set by transformers from config.pad_token_id); the forward reads it like any other."""
    return weight[ids], (ids, weight.shape, padding_idx)


def embedding_backward(dout: Array, cache: tuple, out: Optional[Array] = None) -> Array:
    """dweight[v] = sum of dout[b, t] over every (b, t) with ids[b, t] = v, except for the
    padding row, which gets nothing. A token that occurs several times gets the sum of all its
    rows (scatter-add). ``out``: a (V, C) array to add dweight into (a tied output projection's
    gradient), in place and returned, instead of a new array of zeros; its padding row keeps
    what it holds."""
    ids, shape, padding_idx = cache
    xp = array_module(dout)
    if out is None:
        out = xp.zeros(shape, dtype=dout.dtype)
    elif out.shape != tuple(shape):
        raise ValueError(f"embedding_backward: out has shape {out.shape}, the weight {tuple(shape)}")
    ids, rows = ids.reshape(-1), dout.reshape(-1, shape[1])
    if padding_idx is not None:
        keep = ids != padding_idx
        if not keep.all():                      # rows copied only when the padding id occurs
            ids, rows = ids[keep], rows[keep]
    scatter_add_rows(out, ids, rows)
    return out


# --------------------------------------------------------------------------- rmsnorm

def rmsnorm_forward(x: Array, weight: Array, eps: float) -> tuple[Array, tuple]:
    """y = w * x / sqrt(mean(x^2) + eps), over the last axis.  Cache: x_hat = x * rstd, rstd."""
    xp = array_module(x)
    rstd = _rowdot(x, x)[..., None]     # sum(x^2), without an x^2 array
    rstd /= x.shape[-1]                 # the mean, as xp.mean computes it, without its overhead
    rstd += eps
    xp.sqrt(rstd, out=rstd)
    xp.divide(1.0, rstd, out=rstd)
    x_hat = x * rstd
    return x_hat * weight, (x_hat, rstd, weight)


def rmsnorm_backward(dout: Array, cache: tuple) -> tuple[Array, Array]:
    """With g = dout * w:   dx = rstd * (g - x_hat * mean(g * x_hat))
                            dw = sum over rows of dout * x_hat."""
    x_hat, rstd, weight = cache
    xp = array_module(dout)
    g = dout * weight
    c = x_hat.shape[-1]
    m = _rowdot(g, x_hat)[..., None]    # mean(g * x_hat), without a g * x_hat array
    m /= c
    gx = dout * x_hat
    dweight = gx.reshape(-1, c).sum(axis=0)
    xp.multiply(x_hat, m, out=gx)
    g -= gx
    g *= rstd
    return g, dweight


# --------------------------------------------------------------------------- linear

def linear_forward(x: Array, weight: Array, bias: Optional[Array] = None) -> tuple[Array, tuple]:
    """y = x @ W^T + b, with W in the HF layout (out_features, in_features).
    x may have any leading axes; the product is one 2-D matmul over all rows."""
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ weight.T
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0]), (x, weight, bias is not None)


def linear_backward(dout: Array, cache: tuple) -> tuple[Array, Array, Optional[Array]]:
    """dx = dy @ W;   dW = dy^T @ x;   db = sum over rows of dy   (None without a bias)."""
    x, weight, has_bias = cache
    d2 = dout.reshape(-1, dout.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx = (d2 @ weight).reshape(x.shape)
    dweight = d2.T @ x2
    dbias = d2.sum(axis=0) if has_bias else None
    return dx, dweight, dbias


# --------------------------------------------------------------------------- rotary embedding

def rope_inv_freq(head_dim: int, theta: float, xp: Any = np, scaling: Any = None) -> Array:
    """inv_freq[i] = 1 / theta^(2i / D), i = 0 .. D/2-1 (as HF computes it, here in float64),
    changed as ``scaling`` (an `apr.rope.RopeScaling`) says; see `apr.rope`."""
    return xp.asarray(inverse_frequencies(head_dim, theta, scaling)[0])


def rope_tables(positions: Array, head_dim: int, theta: float, dtype: Any,
                scaling: Any = None) -> tuple[Array, Array]:
    """cos and sin of the angles positions[t] * inv_freq[i]: two (T, D/2) arrays in ``dtype``,
    each multiplied by the scaling's attention factor (YaRN; 1 otherwise). The angles are
    computed in float64 whatever ``dtype`` is."""
    xp = array_module(positions)
    inv_freq, factor = inverse_frequencies(head_dim, theta, scaling)
    angles = positions.astype(xp.float64)[:, None] * xp.asarray(inv_freq)[None, :]
    cos, sin = xp.cos(angles), xp.sin(angles)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.astype(dtype), sin.astype(dtype)


def _rope_pairs(x: Array, rope_type: str) -> tuple[Array, Array]:
    """The two members (a, b) of every rotary pair along the last axis, each (..., D/2).
    "halves" (HF): pair i is (x[i], x[i + D/2]).  "adjacent" (GGUF llama): (x[2i], x[2i+1])."""
    if rope_type == ROPE_HALVES:
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]
    if rope_type == ROPE_ADJACENT:
        return x[..., 0::2], x[..., 1::2]
    raise ValueError(f"rope_type={rope_type!r} (expected {ROPE_HALVES!r} or {ROPE_ADJACENT!r})")


def _rope_unpairs(a: Array, b: Array, rope_type: str) -> Array:
    """Inverse of `_rope_pairs`: put the pair members back in the stored order."""
    xp = array_module(a)
    if rope_type == ROPE_HALVES:
        return xp.concatenate([a, b], axis=-1)
    return xp.stack([a, b], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])


def rope_forward(x: Array, cos: Array, sin: Array, rope_type: str) -> tuple[Array, tuple]:
    """Rotate every pair (a, b) of x (..., T, D) by its angle:
        a' = a cos - b sin,    b' = a sin + b cos      (cos, sin: (T, D/2), from `rope_tables`)."""
    a, b = _rope_pairs(x, rope_type)
    out = _rope_unpairs(a * cos - b * sin, a * sin + b * cos, rope_type)
    return out, (cos, sin, rope_type)


def rope_backward(dout: Array, cache: tuple) -> Array:
    """A rotation is orthogonal, so dx = R^T dout: the rotation by the opposite angle,
        da = da' cos + db' sin,    db = -da' sin + db' cos."""
    cos, sin, rope_type = cache
    a, b = _rope_pairs(dout, rope_type)
    return _rope_unpairs(a * cos + b * sin, b * cos - a * sin, rope_type)


# --------------------------------------------------------------------------- attention

def causal_mask(t: int, s: int, xp: Any, dtype: Any, window: int = 0, first: int | None = None,
                key_first: int = 0, keys: int | None = None) -> Array:
    """(T, S) additive mask: 0 where query t (at absolute position S - T + t) may see key s,
    i.e. s <= S - T + t, and -inf elsewhere. With a sliding ``window`` > 0 the query also
    sees only the ``window`` most recent positions, its own included: S - T + t - s < window
    (HF's sliding-window mask). A block of it: ``first`` the absolute position of the first
    query (S - T unless given), keys key_first .. key_first + keys - 1 (all S unless given)."""
    first = s - t if first is None else first
    keys = s if keys is None else keys
    rel = (first - key_first) + xp.arange(t)[:, None] - xp.arange(keys)[None, :]  # query - key pos
    allowed = rel >= 0
    if window:
        allowed &= rel < window
    return xp.where(allowed, 0.0, -xp.inf).astype(dtype)


ATTENTION_BLOCK = 32   # query rows per block: key blocks wholly masked for it are skipped


def _query_blocks(t: int, s: int, window: int) -> list[tuple[int, int, int, int]]:
    """(t0, t1, k0, k1) per block of queries t0 .. t1-1: keys k0 .. k1-1 are all it can see
    (the causal limit on the right, the sliding window on the left)."""
    blocks = []
    for t0 in range(0, t, ATTENTION_BLOCK):
        t1 = min(t, t0 + ATTENTION_BLOCK)
        k0 = max(0, s - t + t0 - window + 1) if window else 0
        blocks.append((t0, t1, k0, s - t + t1))
    return blocks


def attention_forward(q: Array, k: Array, v: Array, window: int = 0, scale: float | None = None,
                      softcap: float | None = None) -> tuple[Array, tuple]:
    """Causal grouped-query attention (sliding-window when ``window`` > 0, see `causal_mask`).
    q: (B, H, T, D); k, v: (B, K, S, D) with S >= T (the last T keys are the queries' own).
    Query head h uses key/value head h // G, G = H / K (the HF repeat_kv order):
        S = q k^T * scale  (scale: 1/sqrt(D) unless given),
        S = c tanh(S / c)  (with a soft-cap c, as Gemma 2),
        P = softmax(S + mask),   out = P v         -> (B, H, T, D).
    The queries go in blocks of `ATTENTION_BLOCK` positions, each against only the keys it
    can see (so the masked corner of the T x S scores is never computed). In a block the G
    query heads of one K/V head are stacked along the rows (B, K, G*Tb, D), so each group is
    one matmul against its shared K/V. The mask is constant, so the backward is the same
    with or without a window."""
    xp = array_module(q)
    b, h, t, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = h // kv_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qs = (q * q.dtype.type(scale)).reshape(b, kv_heads, g, t, d)   # scaled here: T x D, not T x S
    out = xp.empty((b, kv_heads, g, t, d), dtype=xp.result_type(q, v))
    blocks = []
    for t0, t1, k0, k1 in _query_blocks(t, s, window):
        tb = t1 - t0
        qb = qs[:, :, :, t0:t1].reshape(b, kv_heads, g * tb, d)
        scores = (qb @ k[:, :, k0:k1].swapaxes(-1, -2)).reshape(b, kv_heads, g, tb, k1 - k0)
        capped = None
        if softcap:
            scores, capped = softcap_forward(scores, softcap)
        if tb > 1 and window:   # one query sees every key of its block (k0: its window's edge)
            scores += causal_mask(tb, s, xp, scores.dtype, window, s - t + t0, k0, k1 - k0)
        elif tb > 1:    # every query sees the keys before the last tb: only those are masked
            scores[..., k1 - k0 - tb:] += causal_mask(tb, s, xp, scores.dtype, 0, s - t + t0,
                                                       k1 - tb, tb)
        probs = _softmax_inplace(scores).reshape(b, kv_heads, g * tb, k1 - k0)
        out[:, :, :, t0:t1] = (probs @ v[:, :, k0:k1]).reshape(b, kv_heads, g, tb, d)
        blocks.append((t0, t1, k0, k1, qb, probs, capped))
    out = out.reshape(b, h, t, d)
    return out, (k, v, scale, blocks, out)


def attention_backward(dout: Array, cache: tuple) -> tuple[Array, Array, Array]:
    """With P the probabilities and dS the gradient of the (scaled, capped) scores:
        dV = P^T dout,   dP = dout V^T,   dS = P * (dP - rowsum(dP * P)),
        (through the soft-cap: dS = dS * (1 - tanh^2)),
        dq = dS K * scale,   dK = dS^T q * scale
    dK and dV sum over the G query heads that share each K/V head (the stacked rows) and
    over the query blocks. rowsum(dP * P) = rowsum(dout * (P V)) = rowsum(dout * out): a
    sum over D, not over S."""
    k, v, scale, blocks, out = cache
    xp = array_module(dout)
    b, h, t, d = dout.shape
    kv_heads = k.shape[1]
    g = h // kv_heads
    dout5 = dout.reshape(b, kv_heads, g, t, d)
    rowdot = _rowdot(dout, out).reshape(b, kv_heads, g, t, 1)
    dq = xp.empty((b, kv_heads, g, t, d), dtype=xp.result_type(dout, k))
    dk = xp.zeros(k.shape, dtype=dq.dtype)
    dv = xp.zeros(v.shape, dtype=dq.dtype)
    for t0, t1, k0, k1, qb, probs, capped in blocks:
        tb = t1 - t0
        db = dout5[:, :, :, t0:t1].reshape(b, kv_heads, g * tb, d)
        dv[:, :, k0:k1] += probs.swapaxes(-1, -2) @ db
        dscores = db @ v[:, :, k0:k1].swapaxes(-1, -2)                       # dP
        dscores -= rowdot[:, :, :, t0:t1].reshape(b, kv_heads, g * tb, 1)
        dscores *= probs
        if capped is not None:
            dscores = softcap_backward(dscores.reshape(capped[0].shape), capped).reshape(dscores.shape)
        dqb = dscores @ k[:, :, k0:k1]
        dqb *= dqb.dtype.type(scale)
        dq[:, :, :, t0:t1] = dqb.reshape(b, kv_heads, g, tb, d)
        dk[:, :, k0:k1] += dscores.swapaxes(-1, -2) @ qb                     # qb = q * scale
    return dq.reshape(b, h, t, d), dk, dv


# --------------------------------------------------------------------------- soft-capping

def softcap_forward(x: Array, cap: float) -> tuple[Array, tuple]:
    """y = cap * tanh(x / cap): x squashed smoothly into (-cap, cap) (Gemma 2's logit caps)."""
    xp = array_module(x)
    th = xp.tanh(x / cap)
    return th * cap, (th,)


def softcap_backward(dout: Array, cache: tuple) -> Array:
    """dy/dx = 1 - tanh^2(x / cap)."""
    (th,) = cache
    return dout * (1 - th * th)


def _softmax_inplace(x: Array) -> Array:
    """softmax over the last axis, overwriting x: exp(x - max) / sum(exp(x - max))."""
    xp = array_module(x)
    x -= x.max(axis=-1, keepdims=True)
    xp.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


# --------------------------------------------------------------------------- gated MLP

def sigmoid(z: Array) -> Array:
    """1 / (1 + exp(-z)), in place on one temporary. For z far below 0, exp(-z) overflows
    to inf and the result is exactly 0, the correctly rounded value (the overflow is expected
    and not reported); everywhere else every step keeps its relative precision, which the tanh
    form (1 + tanh(z / 2)) / 2 loses in the negative tail."""
    xp = array_module(z)
    z = xp.asarray(z)
    out = xp.empty_like(z, dtype=z.dtype if z.dtype.kind == "f" else np.float64)
    with np.errstate(over="ignore"):
        xp.negative(z, out=out)
        xp.exp(out, out=out)
    out += 1.0
    xp.reciprocal(out, out=out)
    return out


@dataclass(frozen=True)
class Activation:
    """An elementwise activation as a pair: ``f(z)`` and its derivative ``df(z)``."""
    f: Callable[[Array], Array]
    df: Callable[[Array], Array]


def _xp(z):
    return array_module(z)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(z, c=_SQRT_2_OVER_PI):
    return 0.5 * z * (1.0 + _xp(z).tanh(c * (z + 0.044715 * z ** 3)))


def _gelu_tanh_d(z, c=_SQRT_2_OVER_PI):
    th = _xp(z).tanh(c * (z + 0.044715 * z ** 3))
    return 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * c * (1.0 + 3 * 0.044715 * z * z)


def _gelu_fast(z):
    """transformers' FastGELU: the tanh form with the constant rounded to 0.7978845608."""
    return 0.5 * z * (1.0 + _xp(z).tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z)))


def _gelu_fast_d(z):
    u = z * 0.7978845608 * (1.0 + 0.044715 * z * z)
    th = _xp(z).tanh(u)
    return 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * 0.7978845608 * (1.0 + 3 * 0.044715 * z * z)


def _gelu(z):
    """Exact GELU: z * Phi(z) = z/2 (1 + erf(z / sqrt 2))."""
    return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))


def _gelu_d(z):
    return 0.5 * (1.0 + erf(z / math.sqrt(2.0))) + z * _xp(z).exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _silu(z):
    out = sigmoid(z)
    out *= z
    return out


def _silu_d(z):
    """sig * (1 + z * (1 - sig)), in place on one temporary besides sig."""
    sig = sigmoid(z)
    t = 1.0 - sig
    t *= z
    t += 1.0
    t *= sig
    return t


def _softplus(z):
    xp = _xp(z)
    return xp.logaddexp(0.0, z)


def _mish(z):
    return z * _xp(z).tanh(_softplus(z))


def _mish_d(z):
    th = _xp(z).tanh(_softplus(z))
    return th + z * (1.0 - th * th) * sigmoid(z)


_SILU = Activation(_silu, _silu_d)
_GELU = Activation(_gelu, _gelu_d)
_GELU_TANH = Activation(_gelu_tanh, _gelu_tanh_d)

# hidden_act name (transformers' ACT2FN spelling) -> the pair. A name not here is refused.
ACTIVATIONS: dict[str, Activation] = {
    "silu": _SILU,
    "swish": _SILU,
    "gelu": _GELU,
    "gelu_python": _GELU,
    "gelu_new": _GELU_TANH,
    "gelu_pytorch_tanh": _GELU_TANH,
    "gelu_accurate": _GELU_TANH,
    "gelu_fast": Activation(_gelu_fast, _gelu_fast_d),
    "quick_gelu": Activation(lambda z: z * sigmoid(1.702 * z),
                             lambda z: sigmoid(1.702 * z) * (1.0 + 1.702 * z * (1.0 - sigmoid(1.702 * z)))),
    "relu": Activation(lambda z: _xp(z).maximum(z, 0.0), lambda z: (z > 0).astype(z.dtype)),
    "relu2": Activation(lambda z: _xp(z).maximum(z, 0.0) ** 2, lambda z: 2.0 * _xp(z).maximum(z, 0.0)),
    "relu6": Activation(lambda z: _xp(z).clip(z, 0.0, 6.0), lambda z: ((z > 0) & (z < 6)).astype(z.dtype)),
    "leaky_relu": Activation(lambda z: _xp(z).where(z >= 0, z, 0.01 * z),
                             lambda z: _xp(z).where(z >= 0, 1.0, 0.01).astype(z.dtype)),
    "sigmoid": Activation(sigmoid, lambda z: sigmoid(z) * (1.0 - sigmoid(z))),
    "tanh": Activation(lambda z: _xp(z).tanh(z), lambda z: 1.0 - _xp(z).tanh(z) ** 2),
    "mish": Activation(_mish, _mish_d),
    "linear": Activation(lambda z: z, lambda z: _xp(z).ones_like(z)),
}


def gated_mlp_forward(gate: Array, up: Array, act: str = "silu") -> tuple[Array, tuple]:
    """out = act(gate) * up   (SwiGLU for silu, GeGLU for the gelus)."""
    a = ACTIVATIONS[act]
    if a is _SILU:      # silu(z) = z sig(z): sig(gate) is kept for the backward
        sig = sigmoid(gate)
        out = gate * sig
        out *= up
        return out, (gate, up, a, sig)
    return a.f(gate) * up, (gate, up, a, None)


def gated_mlp_backward(dout: Array, cache: tuple) -> tuple[Array, Array]:
    """dup = dout * act(gate);   dgate = dout * up * act'(gate)
    (for silu, with s = sig(gate) from the forward, act = gate s and
    act' = s (1 + gate (1 - s)) = s + act - act s: 7 passes)."""
    gate, up, a, sig = cache
    if sig is None:
        return dout * up * a.df(gate), dout * a.f(gate)
    dup = gate * sig                    # act, then dup in place
    dgate = dup * sig
    array_module(dup).subtract(dup, dgate, out=dgate)
    dgate += sig
    dgate *= up
    dgate *= dout
    dup *= dout
    return dgate, dup


# --------------------------------------------------------------------------- cross-entropy

IGNORE_INDEX = -100


def cross_entropy_targets(logits: Array, targets: Array, ignore_index: int) -> tuple[Array, Array, int]:
    """(flat targets, mask of the kept ones, how many are kept), after checking that some are
    kept and that every kept id lies in [0, vocab)."""
    vocab = logits.shape[-1]
    t = targets.reshape(-1)
    keep = t != ignore_index
    count = int(keep.sum())
    if count == 0:
        raise ValueError(f"cross-entropy: every target is ignore_index={ignore_index}; "
                         "the mean over no targets is undefined")
    kept = t[keep]
    if int(kept.min()) < 0 or int(kept.max()) >= vocab:
        raise ValueError(f"cross-entropy: target ids must lie in [0, {vocab}) "
                         f"(got {int(kept.min())}..{int(kept.max())})")
    return t, keep, count


def cross_entropy_forward(logits: Array, targets: Array, ignore_index: int = IGNORE_INDEX,
                          overwrite: bool = False) -> tuple[Array, tuple]:
    """Mean softmax cross-entropy over the targets that are not ``ignore_index``:
        loss = (1/n) sum_{kept rows r} [logsumexp(logits[r]) - logits[r, targets[r]]]
    logits: (..., V); targets: the same leading shape. The log-softmax subtracts the row
    maximum first, so it neither overflows nor underflows. Returns a 0-d array.

    The cache is (e, safe targets, weight = keep / n, shape, scale) with e = exp(z - max)
    and scale = 1 / sum(e) per row: the probabilities are e * scale, left unnormalized
    here because the backward scales every row anyway (one vocabulary-wide pass fewer).
    ``overwrite``: e is computed in the logits' own buffer, which is destroyed (the caller
    has no further use for the logits); otherwise in one new array."""
    xp = array_module(logits)
    z = logits.reshape(-1, logits.shape[-1])
    t, keep, count = cross_entropy_targets(logits, targets, ignore_index)
    rows = xp.arange(z.shape[0])
    safe_t = xp.where(keep, t, 0)
    row_max = z.max(axis=-1, keepdims=True)
    shifted = xp.subtract(z, row_max, out=z) if overwrite else z - row_max
    shifted_target = shifted[rows, safe_t]
    e = xp.exp(shifted, out=shifted)                        # unnormalized, in place
    total = e.sum(axis=-1)
    log_prob_target = shifted_target - xp.log(total)
    loss = -(log_prob_target * keep).sum() / count
    xp.reciprocal(total, out=total)                         # the rows' scale
    weight = keep.astype(logits.dtype) / count
    return loss, (e, safe_t, weight, logits.shape, total)


def cross_entropy_backward(dloss: float, cache: tuple) -> Array:
    """dlogits[r] = dloss * (softmax(logits[r]) - onehot(targets[r])) / n for kept rows,
    and 0 for ignored rows; with w = dloss * weight: e[r] * (w[r] scale[r]) - w[r] onehot.
    Written over the cache's e (one pass, no new vocabulary-wide array), so a cache serves
    one backward."""
    e, safe_t, weight, shape, scale = cache
    xp = array_module(e)
    w = weight * dloss
    e *= (w * scale)[:, None]
    e[xp.arange(e.shape[0]), safe_t] -= w
    return e.reshape(shape)
