"""Every op of ref.ops: backward against central finite differences (float64) and forward and
backward against PyTorch autograd (torch.float64) on the same inputs, over tiny shapes drawn
by Hypothesis. Also the rotary layouts, repeated embedding ids, ignored CE targets and the
backend selection."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from apr import names
from apr.errors import AprError
from apr.names import ROPE_ADJACENT, ROPE_HALVES
from ref import ops
from ref.backend import array_module, get_backend

EXAMPLES = settings(max_examples=20, deadline=None)
FD_EPS = 1e-6
FD_TOL = 1e-5      # central differences in float64: error ~eps^2 f''' + 1e-16/eps
TORCH_TOL = 1e-10  # same math in another order: rounding only


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a).max())


def grad_err(a, b, floor: float = 1e-3) -> float:
    """max|a - b| relative to max|b|, floored: a vanishing gradient (a saturated softmax, say)
    is below what O(1) losses resolve, whether by differences or by rounding."""
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(b).max(), floor))


def numeric_grad(f, x: np.ndarray, eps: float = FD_EPS) -> np.ndarray:
    """Central differences of the scalar f() w.r.t. every element of x (x is modified in
    place and restored)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def t64(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)


def check_op(forward, backward, inputs: dict[str, np.ndarray], torch_fn, rng, options=()):
    """Project the output on a random R (loss = sum(out * R)), then compare
    backward(R) with central differences and with torch autograd, for every input."""
    out, cache = forward(*inputs.values(), *options)
    r = rng.standard_normal(np.shape(out))
    grads = backward(r, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    grads = [g for g in grads if g is not None]
    assert len(grads) == len(inputs)

    def loss():
        return float((forward(*inputs.values(), *options)[0] * r).sum())

    for (name, x), g in zip(inputs.items(), grads):
        num = numeric_grad(loss, x)
        assert grad_err(g, num) < FD_TOL, f"{name}: backward vs finite differences"

    tin = {k: t64(v) for k, v in inputs.items()}
    tout = torch_fn(**tin)
    # floored: an output far below its inputs' scale (GELU's 1 + tanh at z = -5.5, ~1e-8) is
    # all cancellation, and two libraries' tanh differ there by an ulp of the terms
    assert grad_err(out, tout.detach().numpy(), floor=1e-4) < TORCH_TOL, "forward vs torch"
    (tout * torch.tensor(r)).sum().backward()
    for (name, t), g in zip(tin.items(), grads):
        assert grad_err(g, t.grad.numpy()) < TORCH_TOL, f"{name}: backward vs torch autograd"


seeds = st.integers(0, 2**32 - 1)


# --------------------------------------------------------------------------- embedding

@EXAMPLES
@given(seed=seeds, vocab=st.integers(1, 5), width=st.integers(1, 4),
       b=st.integers(1, 2), t=st.integers(1, 6))
def test_embedding(seed, vocab, width, b, t):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t))
    w = rng.standard_normal((vocab, width))
    check_op(lambda w_: ops.embedding_forward(ids, w_), ops.embedding_backward, {"weight": w},
             lambda weight: F.embedding(torch.tensor(ids), weight), rng)
    # a padding row (one the ids use): torch's convention, not the calculus, so against torch
    pad = int(ids.reshape(-1)[0])
    out, cache = ops.embedding_forward(ids, w, pad)
    r = rng.standard_normal(out.shape)
    tw = t64(w)
    tout = F.embedding(torch.tensor(ids), tw, padding_idx=pad)
    (tout * torch.tensor(r)).sum().backward()
    np.testing.assert_array_equal(out, tout.detach().numpy())
    dw = ops.embedding_backward(r, cache)
    assert grad_err(dw, tw.grad.numpy()) < TORCH_TOL and not dw[pad].any()


def test_embedding_repeated_ids_accumulate():
    w = np.arange(12, dtype=np.float64).reshape(4, 3)
    ids = np.array([[2, 2, 0], [2, 1, 0]])
    out, cache = ops.embedding_forward(ids, w)
    np.testing.assert_array_equal(out[0, 0], w[2])
    dout = np.ones((2, 3, 3))
    dout[1, 0] = 10.0
    dw = ops.embedding_backward(dout, cache)
    np.testing.assert_array_equal(dw[2], [12.0, 12.0, 12.0])   # 1 + 1 + 10
    np.testing.assert_array_equal(dw[0], [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(dw[1], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(dw[3], [0.0, 0.0, 0.0])
    # into a given gradient (a tied lm_head's): added in place, the same array returned
    base = np.full((4, 3), 0.5)
    got = ops.embedding_backward(dout, cache, base)
    assert got is base
    np.testing.assert_array_equal(got, dw + 0.5)
    with pytest.raises(ValueError, match="shape"):
        ops.embedding_backward(dout, cache, np.zeros((3, 3)))
    # a padding row (2) gets nothing from the lookup, and keeps what the tied gradient holds
    _, cache = ops.embedding_forward(ids, w, 2)
    base = np.full((4, 3), 0.5)
    got = ops.embedding_backward(dout, cache, base)
    np.testing.assert_array_equal(got[2], [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(np.delete(got, 2, 0), np.delete(dw + 0.5, 2, 0))


# --------------------------------------------------------------------------- rmsnorm

@EXAMPLES
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       width=st.integers(2, 6), eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_rmsnorm(seed, lead, width, eps):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, width))
    w = rng.standard_normal(width)

    def torch_rmsnorm(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    check_op(ops.rmsnorm_forward, ops.rmsnorm_backward, {"x": x, "weight": w}, torch_rmsnorm,
             rng, (eps,))


# --------------------------------------------------------------------------- linear

@EXAMPLES
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       n_in=st.integers(1, 5), n_out=st.integers(1, 5), bias=st.booleans())
def test_linear(seed, lead, n_in, n_out, bias):
    rng = np.random.default_rng(seed)
    inputs = {"x": rng.standard_normal((*lead, n_in)), "weight": rng.standard_normal((n_out, n_in))}
    if bias:
        inputs["bias"] = rng.standard_normal(n_out)
    check_op(ops.linear_forward, ops.linear_backward, inputs, F.linear, rng)


def test_linear_uses_hf_layout():
    w = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])   # (out=3, in=2)
    y, _ = ops.linear_forward(np.array([[1.0, 10.0]]), w, np.array([0.5, 0.0, 0.0]))
    np.testing.assert_array_equal(y, [[21.5, 43.0, 65.0]])


# --------------------------------------------------------------------------- rotary

def meta_llama_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The original (Meta) llama rotary, adjacent pairs as complex numbers:
    an independent oracle for the "adjacent" order."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def hf_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half formula (the "halves" order)."""
    from transformers.models.llama.modeling_llama import rotate_half
    emb = torch.cat((angles, angles), dim=-1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


@EXAMPLES
@given(seed=seeds, b=st.integers(1, 2), h=st.integers(1, 3), t=st.integers(1, 4),
       half=st.integers(1, 3), start=st.integers(0, 50), theta=st.sampled_from([1e4, 1e6]),
       rope_type=st.sampled_from([ROPE_HALVES, ROPE_ADJACENT]))
def test_rope(seed, b, h, t, half, start, theta, rope_type):
    rng = np.random.default_rng(seed)
    d = 2 * half
    positions = np.arange(start, start + t)
    cos, sin = ops.rope_tables(positions, d, theta, np.float64)
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * torch.tensor(
        1.0 / theta ** (np.arange(0, d, 2) / d))
    oracle = hf_rope if rope_type == ROPE_HALVES else meta_llama_rope
    check_op(ops.rope_forward, ops.rope_backward, {"x": rng.standard_normal((b, h, t, d))},
             lambda x: oracle(x, angles), rng, (cos, sin, rope_type))


def test_rope_tables_match_hf_inv_freq():
    """inv_freq = 1 / theta^(arange(0, D, 2) / D), laid out as HF's cos/sin (computed by HF
    in float32, hence the tolerance)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    cfg = LlamaConfig(hidden_size=48, num_attention_heads=3, rope_theta=1e6)
    rot = LlamaRotaryEmbedding(cfg)
    positions = torch.arange(0, 40)[None]
    hf_cos, hf_sin = rot(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = ops.rope_tables(np.arange(40), 16, 1e6, np.float64)
    np.testing.assert_allclose(np.concatenate([cos, cos], -1), hf_cos[0].numpy(), atol=5e-6)
    np.testing.assert_allclose(np.concatenate([sin, sin], -1), hf_sin[0].numpy(), atol=5e-6)
    np.testing.assert_allclose(ops.rope_inv_freq(16, 1e6), rot.inv_freq.numpy(), rtol=1e-6)


def permute_halves_to_adjacent(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert permutation of Q/K rows (HF halves order -> adjacent order)."""
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@EXAMPLES
@given(seed=seeds, n_head=st.integers(1, 3), n_kv=st.integers(1, 3), half=st.integers(1, 4),
       t=st.integers(1, 5), n_in=st.integers(1, 6))
def test_rope_adjacent_on_permuted_rows_gives_same_scores(seed, n_head, n_kv, half, t, n_in):
    """Permuting Q/K rows halves->adjacent and running the adjacent rotary gives the permuted
    rotated vectors, hence the same attention scores q.k for every head pair."""
    rng = np.random.default_rng(seed)
    d = 2 * half
    x = rng.standard_normal((1, t, n_in))
    wq = rng.standard_normal((n_head * d, n_in))
    wk = rng.standard_normal((n_kv * d, n_in))
    cos, sin = ops.rope_tables(np.arange(t), d, 1e4, np.float64)

    def rotated(w, n, rope_type):
        y = ops.linear_forward(x, w)[0].reshape(1, t, n, d).transpose(0, 2, 1, 3)
        return ops.rope_forward(y, cos, sin, rope_type)[0]

    q_h, k_h = rotated(wq, n_head, ROPE_HALVES), rotated(wk, n_kv, ROPE_HALVES)
    q_a = rotated(permute_halves_to_adjacent(wq, n_head), n_head, ROPE_ADJACENT)
    k_a = rotated(permute_halves_to_adjacent(wk, n_kv), n_kv, ROPE_ADJACENT)
    perm = permute_halves_to_adjacent(np.arange(d)[:, None], 1)[:, 0]
    np.testing.assert_allclose(q_a, q_h[..., perm], rtol=0, atol=1e-12)
    scores_h = np.einsum("bhtd,bksd->bhkts", q_h, k_h)
    scores_a = np.einsum("bhtd,bksd->bhkts", q_a, k_a)
    np.testing.assert_allclose(scores_a, scores_h, rtol=0, atol=1e-12 * np.abs(scores_h).max())
    if d > 2 and t > 1:   # the halves rotary on the permuted rows is wrong: the test can fail
        q_wrong = rotated(permute_halves_to_adjacent(wq, n_head), n_head, ROPE_HALVES)
        assert np.abs(q_wrong - q_a).max() > 1e-6


# --------------------------------------------------------------------------- attention

def torch_attention(q, k, v, window=0):
    t, s = q.shape[2], k.shape[2]
    rel = (s - t) + torch.arange(t)[:, None] - torch.arange(s)[None, :]
    allowed = (rel >= 0) & ((rel < window) if window else True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


@EXAMPLES
@given(seed=seeds, b=st.integers(1, 2), kv=st.integers(1, 2), group=st.integers(1, 3),
       t=st.integers(1, 4), past=st.integers(0, 3), d=st.sampled_from([1, 2, 4]))
def test_attention(seed, b, kv, group, t, past, d):
    rng = np.random.default_rng(seed)
    s = t + past
    inputs = {"q": rng.standard_normal((b, kv * group, t, d)),
              "k": rng.standard_normal((b, kv, s, d)),
              "v": rng.standard_normal((b, kv, s, d))}
    check_op(ops.attention_forward, ops.attention_backward, inputs, torch_attention, rng)


@EXAMPLES
@given(seed=seeds, kv=st.integers(1, 2), group=st.integers(1, 2), t=st.integers(1, 6),
       past=st.integers(0, 5), window=st.integers(1, 4))
def test_sliding_window_attention(seed, kv, group, t, past, window):
    rng = np.random.default_rng(seed)
    s = t + past
    inputs = {"q": rng.standard_normal((1, kv * group, t, 4)),
              "k": rng.standard_normal((1, kv, s, 4)),
              "v": rng.standard_normal((1, kv, s, 4))}
    check_op(ops.attention_forward, ops.attention_backward, inputs,
             lambda q, k, v: torch_attention(q, k, v, window), rng, options=(window,))


def torch_attention_full(q, k, v, window=0, scale=None, softcap=None):
    """The whole T x S scores at once, with GQA by repeating K/V, a scale and a soft-cap."""
    t, s, d = q.shape[2], k.shape[2], q.shape[3]
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = q @ k.transpose(-1, -2) * (d ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    rel = (s - t) + torch.arange(t)[:, None] - torch.arange(s)[None, :]
    allowed = (rel >= 0) & ((rel < window) if window else True)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


@EXAMPLES
@given(seed=seeds, block=st.integers(1, 3), kv=st.integers(1, 2), group=st.integers(1, 2),
       t=st.integers(1, 7), past=st.integers(0, 4), window=st.integers(0, 4),
       scale=st.sampled_from([None, 0.3]), softcap=st.sampled_from([None, 1.5]))
def test_attention_in_query_blocks(seed, block, kv, group, t, past, window, scale, softcap):
    """Blocks of 1-3 query positions (several per call, each against only the keys it sees)
    give the gradients of the whole-matrix attention."""
    rng = np.random.default_rng(seed)
    s = t + past
    inputs = {"q": rng.standard_normal((2, kv * group, t, 4)),
              "k": rng.standard_normal((2, kv, s, 4)),
              "v": rng.standard_normal((2, kv, s, 4))}
    saved = ops.ATTENTION_BLOCK
    ops.ATTENTION_BLOCK = block
    try:
        check_op(ops.attention_forward, ops.attention_backward, inputs,
                 lambda q, k, v: torch_attention_full(q, k, v, window, scale, softcap), rng,
                 options=(window, scale, softcap))
    finally:
        ops.ATTENTION_BLOCK = saved


def test_sliding_window_forgets_old_positions():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 1, 6, 4)) for _ in range(3))
    out, _ = ops.attention_forward(q, k, v, 2)
    v2 = v.copy()
    v2[:, :, 0] += 100.0      # position 0 is outside the window of positions 2..5
    out2, _ = ops.attention_forward(q, k, v2, 2)
    np.testing.assert_array_equal(out[:, :, 2:], out2[:, :, 2:])
    assert np.abs(out2[:, :, :2] - out[:, :, :2]).max() > 1.0


def test_attention_is_causal():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 5, 4)) for _ in range(3))
    out, _ = ops.attention_forward(q, k, v)
    v2 = v.copy()
    v2[:, :, 3:] += 100.0             # the future must not leak into positions 0..2
    out2, _ = ops.attention_forward(q, k, v2)
    np.testing.assert_array_equal(out[:, :, :3], out2[:, :, :3])
    assert np.abs(out2[:, :, 3:] - out[:, :, 3:]).max() > 1.0


# --------------------------------------------------------------------------- gated MLP

@pytest.mark.parametrize("act", names.ACTIVATIONS)
@settings(max_examples=8, deadline=None)
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       width=st.integers(1, 6), scale=st.sampled_from([1.0, 5.0]))
def test_gated_mlp_every_activation(act, seed, lead, width, scale):
    """act(gate) * up against transformers' own ACT2FN[act] (torch autograd)."""
    from transformers.activations import ACT2FN
    rng = np.random.default_rng(seed)
    inputs = {"gate": scale * rng.standard_normal((*lead, width)),
              "up": rng.standard_normal((*lead, width))}
    check_op(ops.gated_mlp_forward, ops.gated_mlp_backward, inputs,
             lambda gate, up: ACT2FN[act](gate) * up, rng, options=(act,))


def test_activation_lists_agree():
    assert set(ops.ACTIVATIONS) == set(names.ACTIVATIONS)


def test_sigmoid_extremes_are_finite():
    z = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = ops.sigmoid(z)
    np.testing.assert_allclose(s, torch.sigmoid(torch.tensor(z)).numpy(), rtol=1e-6, atol=1e-7)
    assert s[0] == 0.0 and s[-1] == 1.0


# --------------------------------------------------------------------------- cross-entropy

@EXAMPLES
@given(seed=seeds, b=st.integers(1, 2), t=st.integers(1, 4), vocab=st.integers(2, 6),
       ignore_frac=st.sampled_from([0.0, 0.5]), scale=st.sampled_from([1.0, 30.0]))
def test_cross_entropy(seed, b, t, vocab, ignore_frac, scale):
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((b, t, vocab))
    targets = rng.integers(0, vocab, (b, t))
    targets[rng.random((b, t)) < ignore_frac] = -100
    targets.reshape(-1)[0] = rng.integers(0, vocab)        # at least one kept target

    def torch_ce(logits):
        return F.cross_entropy(logits.reshape(-1, vocab), torch.tensor(targets.reshape(-1)),
                               ignore_index=-100)

    check_op(lambda z: ops.cross_entropy_forward(z, targets), ops.cross_entropy_backward,
             {"logits": logits}, torch_ce, rng)


def test_cross_entropy_ignored_targets():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 3, 5))
    targets = np.array([[1, -100, 4], [-100, -100, 0]])
    loss, cache = ops.cross_entropy_forward(logits, targets)
    kept = [(0, 0, 1), (0, 2, 4), (1, 2, 0)]
    expected = np.mean([np.log(np.exp(logits[b, t]).sum()) - logits[b, t, y] for b, t, y in kept])
    assert abs(float(loss) - expected) < 1e-14
    d = ops.cross_entropy_backward(1.0, cache)
    assert np.all(d[0, 1] == 0) and np.all(d[1, :2] == 0)
    assert np.abs(d[0, 0]).max() > 0
    # a custom ignore index
    loss7, _ = ops.cross_entropy_forward(logits, np.where(targets == -100, 7, targets), ignore_index=7)
    assert abs(float(loss7) - expected) < 1e-14


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_cross_entropy_in_place_equals_torch(ignore_index):
    """float64, against torch's gradient: the forward written over the logits
    (``overwrite``) and the backward written over the cache give the same loss and gradient
    as the out-of-place forward, the gradient lives in the logits' buffer, and the
    out-of-place forward leaves the logits alone."""
    rng = np.random.default_rng(7)
    logits = 20.0 * rng.standard_normal((2, 5, 11))
    targets = rng.integers(0, 11, (2, 5))
    targets[0, 1] = targets[1, 3] = targets[1, 4] = ignore_index
    targets[0, 0] = 4 if ignore_index == 3 else 3          # a kept target equal to the other index
    dloss = 0.37
    tz = torch.tensor(logits, requires_grad=True)
    want_loss = F.cross_entropy(tz.reshape(-1, 11), torch.tensor(targets).reshape(-1),
                                ignore_index=ignore_index)
    (want_loss * dloss).backward()
    want = tz.grad.numpy()

    kept = logits.copy()
    loss, cache = ops.cross_entropy_forward(logits, targets, ignore_index)
    assert np.array_equal(logits, kept)
    d = ops.cross_entropy_backward(dloss, cache)
    assert np.shares_memory(d, cache[0])                   # no second vocabulary-wide array
    buf = logits.copy()
    loss_in, cache_in = ops.cross_entropy_forward(buf, targets, ignore_index, True)
    d_in = ops.cross_entropy_backward(dloss, cache_in)
    assert np.shares_memory(d_in, buf)
    for got_loss, got in ((loss, d), (loss_in, d_in)):
        assert abs(float(got_loss) - want_loss.item()) < 1e-14 * abs(want_loss.item())
        assert np.abs(got - want).max() < 1e-15
        assert not got[0, 1].any() and not got[1, 3:].any()   # ignored rows: no gradient
    assert np.array_equal(d, d_in)


def test_cross_entropy_stable_and_strict():
    logits = np.array([[1000.0, 0.0, -1000.0]])
    loss, _ = ops.cross_entropy_forward(logits, np.array([0]))
    assert float(loss) == 0.0
    loss, _ = ops.cross_entropy_forward(logits, np.array([1]))
    assert abs(float(loss) - 1000.0) < 1e-9
    with pytest.raises(ValueError, match="ignore_index"):
        ops.cross_entropy_forward(logits, np.array([-100]))
    with pytest.raises(ValueError, match="target ids"):
        ops.cross_entropy_forward(logits, np.array([3]))


# --------------------------------------------------------------------------- float32 and backend

def test_ops_keep_float32():
    rng = np.random.default_rng(0)
    f = np.float32
    x = rng.standard_normal((2, 3, 8)).astype(f)
    assert ops.rmsnorm_forward(x, np.ones(8, f), 1e-6)[0].dtype == f
    assert ops.linear_forward(x, np.ones((4, 8), f), np.ones(4, f))[0].dtype == f
    for act in ops.ACTIVATIONS:
        assert ops.gated_mlp_forward(x, x, act)[0].dtype == f, act
    cos, sin = ops.rope_tables(np.arange(3), 8, 1e4, f)
    q = x.reshape(2, 1, 3, 8)
    assert ops.rope_forward(q, cos, sin, ROPE_HALVES)[0].dtype == f
    assert ops.rope_forward(q, cos, sin, ROPE_ADJACENT)[0].dtype == f
    assert ops.attention_forward(q, q, q)[0].dtype == f
    assert ops.cross_entropy_forward(x, np.zeros((2, 3), dtype=np.int64))[0].dtype == f


def _cuda_usable() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def test_backend_cpu_and_auto():
    cpu = get_backend("cpu")
    assert cpu.name == "cpu" and cpu.xp is np
    a = cpu.to_device([[1, 2]], np.float32)
    assert a.dtype == np.float32 and array_module(a) is np
    assert isinstance(cpu.to_numpy(a), np.ndarray)
    auto = get_backend("auto")
    assert auto.name == ("cuda" if _cuda_usable() else "cpu")
    assert auto.description.startswith(auto.name)
    with pytest.raises(AprError, match="unknown device"):
        get_backend("tpu")


def test_backend_cuda_never_falls_back():
    if _cuda_usable():
        be = get_backend("cuda")
        assert be.name == "cuda" and be.xp is not np
        x = be.to_device(np.arange(6.0).reshape(2, 3))
        np.testing.assert_array_equal(be.to_numpy(ops.linear_forward(x, x)[0]),
                                      np.arange(6.0).reshape(2, 3) @ np.arange(6.0).reshape(2, 3).T)
    else:
        with pytest.raises(AprError, match=r"--device cuda: no usable GPU \("):
            get_backend("cuda")
