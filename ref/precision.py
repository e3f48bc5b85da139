"""Precision of the model's arithmetic: ``f32``, ``f64`` or ``bf16`` mixed precision.

``f32`` and ``f64``: parameters, optimizer state and every product in that dtype.

``bf16``: the master weights, the gradients and the AdamW state stay float32; the operands of
the matrix products of every linear layer (the attention and MLP projections and the output
head) are rounded to bfloat16, and the products are accumulated in float32. The forward
rounds x and W, the backward rounds the incoming gradient dy, so all three products
(y = x W^T, dx = dy W, dW = dy^T x) have bfloat16 operands. Norms, rotary, softmax,
attention scores, the loss and the optimizer stay float32.

On NumPy (and CuPy) the rounding is emulated: the bfloat16 value is held in a float32 (its
upper 16 bits, the lower 16 zero). A product of two bfloat16 values has at most 16
significant bits, so it is exact in float32; a float32 GEMM of rounded operands is therefore
the same math as a bfloat16 GEMM with float32 accumulation, up to the order of summation.

On a GPU the products of the rounded operands run on TF32 tensor cores (`ref.kernels`,
after a self-check): TF32 keeps 11 significant bits, so the bfloat16 operands pass exactly.

Rounding is round-to-nearest, ties to even, as ``ml_dtypes.bfloat16`` (and a GPU's
conversion instruction) rounds; NaN stays NaN, values beyond the largest bfloat16 round to
infinity.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from apr.errors import AprError

from . import kernels, ops
from .backend import array_module

Array = Any

PRECISIONS = ("f32", "f64", "bf16")


def check(name: str) -> str:
    """``name`` if it is a known precision, else an AprError naming the choices."""
    if name not in PRECISIONS:
        raise AprError(f"--dtype {name}: unknown dtype (expected one of {', '.join(PRECISIONS)})")
    return name


def storage_dtype(name: str) -> Any:
    """The dtype of parameters, gradients and optimizer state for precision ``name``."""
    return np.float64 if check(name) == "f64" else np.float32


def matmul_precision(name: str) -> Optional[str]:
    """"bf16" when the linear layers' products have bfloat16 operands, else None."""
    return "bf16" if check(name) == "bf16" else None


def round_bf16(x: Array) -> Array:
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), as float32: the array
    code below on NumPy, one fused kernel on a GPU (`ref.kernels.bf16_round`)."""
    if array_module(x) is not np:
        return kernels.bf16_round(x)
    return kernels.round_bf16_array(x)


# --------------------------------------------------------------------------- linear layers

def linear_forward(x: Array, weight: Array, bias: Optional[Array] = None,
                   precision: Optional[str] = None) -> tuple[Array, tuple]:
    """`ops.linear_forward`, with bfloat16 operands when ``precision`` is "bf16" (the bias is
    added in float32). The cache holds the rounded x and W, so the backward's products use
    them."""
    if precision != "bf16":
        return ops.linear_forward(x, weight, bias)
    x, weight = round_bf16(x), round_bf16(weight)
    with kernels.bf16_products(x):
        return ops.linear_forward(x, weight, bias)


def linear_backward(dout: Array, cache: tuple,
                    precision: Optional[str] = None) -> tuple[Array, Array, Optional[Array]]:
    """`ops.linear_backward`, with dy rounded to bfloat16 when ``precision`` is "bf16"; the
    bias gradient sums the float32 dy."""
    if precision != "bf16":
        return ops.linear_backward(dout, cache)
    x, weight, has_bias = cache
    with kernels.bf16_products(x):
        dx, dweight, _ = ops.linear_backward(round_bf16(dout), (x, weight, False))
    dbias = dout.reshape(-1, dout.shape[-1]).sum(axis=0) if has_bias else None
    return dx, dweight, dbias
