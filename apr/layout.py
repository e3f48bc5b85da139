"""Layout transforms between formats. Data is never transposed: GGUF reverses the
dimension list only. The one real data movement is llama.cpp's rotary row order."""
from __future__ import annotations

import numpy as np


def halves_to_adjacent(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder Q/K rows from HF order (rotary pairs (j, j + d/2) within each head) to
    llama.cpp's llama order (pairs (2j, 2j + 1)). Works for weights [rows, in] and biases [rows]."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def adjacent_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `halves_to_adjacent`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """GGUF `ne` list (fastest-varying first) of a row-major shape: the reversed list."""
    return tuple(reversed(shape))
