"""Reading a tensor's stored bytes and values in row blocks, with reused buffers.

A large tensor (a 151936 x 896 embedding) is compared block by block so that neither its
values nor the pages of the file stay in memory: bytes are read with `readinto` into a
buffer that is reused from block to block (never memory-mapped), then decoded.

Rows of every plain dtype and of every GGML block type are contiguous byte ranges; APR_Q8
keeps one f32 scale in front of the tensor (re-attached to each block before decoding);
APR_Q4 runs its 32-value blocks over the flat tensor, so only rows that are a multiple of
32 long can be cut. Anything else is read whole with `TensorRef.read()`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from apr.dtypes import APR_Q4, APR_Q4_BLOCK, APR_Q4_BLOCK_BYTES, APR_Q8, APR_Q8_HEADER, decode
from apr.errors import FormatError
from apr.model import TensorRef

# Values per block: 1M (4 MiB as float32, 2 MiB of F16 bytes) keeps a block in the CPU
# cache between its read and its comparison; larger blocks were slower on a 2-core VM.
BLOCK_VALUES = 1 << 20


def row_layout(ref: TensorRef) -> tuple[int, int, int] | None:
    """(rows, bytes per row, header bytes) when the stored rows can be read independently,
    else None. Rows are the first dimension; a row is everything after it."""
    if len(ref.shape) < 2 or ref.numel == 0:
        return None
    rows = int(ref.shape[0])
    per_row = ref.numel // rows
    dt = ref.dtype
    if dt.numpy is not None:
        return rows, per_row * dt.type_size, 0
    if dt is APR_Q8:
        return rows, per_row, APR_Q8_HEADER
    if dt is APR_Q4:
        return (rows, per_row // APR_Q4_BLOCK * APR_Q4_BLOCK_BYTES, 0) \
            if per_row % APR_Q4_BLOCK == 0 else None
    if int(ref.shape[-1]) % dt.block_size == 0:
        return rows, per_row // dt.block_size * dt.type_size, 0
    return None


def rows_per_block(ref: TensorRef, values: int | None = None) -> int:
    per_row = max(ref.numel // max(int(ref.shape[0]), 1), 1) if ref.shape else 1
    return max(1, (values or BLOCK_VALUES) // per_row)


class BlockReader:
    """Reads stored bytes of tensors through one reused buffer and cached file handles."""

    def __init__(self) -> None:
        self._buf = np.empty(0, np.uint8)
        self._files: dict[Path, BinaryIO] = {}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._buf = np.empty(0, np.uint8)

    def __enter__(self) -> "BlockReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _buffer(self, n: int) -> np.ndarray:
        if self._buf.size < n:
            self._buf = np.empty(n, np.uint8)
        return self._buf[:n]

    def read_bytes(self, ref: TensorRef, start: int, n: int) -> np.ndarray:
        """n stored bytes of `ref` from byte `start` (a view of the reused buffer)."""
        span = ref.file_span
        if span is None:                      # not file-backed: slice the stored bytes
            flat = np.ascontiguousarray(ref.raw()).reshape(-1).view(np.uint8)
            return flat[start:start + n]
        path, offset = span
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb", buffering=0)
        out = self._buffer(n)
        f.seek(offset + start)
        got = f.readinto(memoryview(out))
        if got != n:
            raise FormatError(f"{path}: tensor {ref.source_name!r} is truncated")
        return out

    def raw_blocks(self, ref: TensorRef, block_rows: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(first row, end row, stored bytes) of consecutive row blocks. The bytes are a view
        of the reused buffer, valid until the next read."""
        layout = row_layout(ref)
        if layout is None:
            raise ValueError(f"{ref.name}: rows of {ref.dtype.name} {list(ref.shape)} cannot be cut")
        rows, row_bytes, header = layout
        for r0 in range(0, rows, block_rows):
            r1 = min(rows, r0 + block_rows)
            yield r0, r1, self.read_bytes(ref, header + r0 * row_bytes, (r1 - r0) * row_bytes)

    def value_blocks(self, ref: TensorRef, block_rows: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(first row, end row, float32 values with shape (r1 - r0, *shape[1:]))."""
        scale = self.read_bytes(ref, 0, APR_Q8_HEADER).copy() if ref.dtype is APR_Q8 else None
        for r0, r1, raw in self.raw_blocks(ref, block_rows):
            shape = (r1 - r0, *ref.shape[1:])
            if scale is not None:
                raw = np.concatenate([scale, raw])
            yield r0, r1, decode(raw, ref.dtype, shape).astype(np.float32, copy=False)


def blockwise(ref: TensorRef) -> bool:
    """Whether `ref` is worth reading in blocks: larger than one block, rows cuttable, and
    stored in HF row order (rotary-permuted Q/K are read whole)."""
    return (ref.numel > BLOCK_VALUES and not ref.rotary_heads and row_layout(ref) is not None)


def block_rows_for(*refs: TensorRef) -> int:
    return min(rows_per_block(r) for r in refs)


def whole(ref: TensorRef, order: str = "hf") -> np.ndarray:
    """All values of `ref` as float32 with its HF shape, in HF row order or as stored."""
    return ref.numpy(np.float32, order=order)


def n_blocks(ref: TensorRef, block_rows: int) -> int:
    return math.ceil(int(ref.shape[0]) / block_rows) if ref.shape else 1
