"""Storage dtypes of APR v2, GGUF and safetensors: one table, sizes, encode and decode.

A `DType` describes how values are stored. Plain types (F32, F16, BF16, F64, I32, I64, I8, U8)
have a NumPy dtype and are stored little-endian, element by element. Quantized types have
``numpy=None``; their raw storage is a flat ``uint8`` array:

- GGML block types (Q8_0, Q4_0, Q4_K, Q6_K): ``block_size`` values -> ``type_size`` bytes, blocks
  run along the last (fastest) dimension, which must be a multiple of ``block_size``.
- APR_Q4 / APR_Q8: aprender's own formats, documented in `encode_apr_q4` / `encode_apr_q8`.

`encode` turns float values into raw storage, `decode` turns raw storage into float32 values
with the logical shape (integer types keep their integer dtype).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import ml_dtypes
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GGML
from gguf import quants as gguf_quants

from .errors import AprError, FormatError, UnsupportedError

QK_K = 256                      # GGML K-quant super-block size
APR_Q4_BLOCK = 32               # APR_Q4 values per block
APR_Q4_BLOCK_BYTES = 18         # f16 scale + 16 nibble bytes
APR_Q8_HEADER = 4               # APR_Q8 f32 scale in front of the int8 values
# aprender's F16_MIN_NORMAL: an APR_Q4 block scale below it (an f16 subnormal), NaN or inf
# decodes as 0 (GH-186 guard in aprender's dequantize_q4).
APR_F16_MIN_NORMAL = np.float32(6.1e-5)


@dataclass(frozen=True)
class DType:
    """A storage type. ``numpy`` is None for quantized (byte-packed) types."""
    name: str
    apr_code: int | None            # APR v2 dtype byte; None: cannot be stored in APR
    ggml: GGML | None               # GGUF tensor type; None: cannot be stored in GGUF
    numpy: np.dtype | None          # element dtype of plain types
    block_size: int = 1             # values per block
    type_size: int = 0              # bytes per block

    @property
    def quantized(self) -> bool:
        """True for byte-packed types (raw storage is flat uint8)."""
        return self.numpy is None

    @property
    def is_float(self) -> bool:
        return self.numpy is None or self.numpy.kind == "f" or self.name == "BF16"

    def __repr__(self) -> str:
        return f"DType({self.name})"


def _plain(name: str, apr_code: int | None, ggml: GGML | None, np_dtype) -> DType:
    dt = np.dtype(np_dtype)
    return DType(name, apr_code, ggml, dt, 1, dt.itemsize)


def _block(name: str, apr_code: int | None, ggml: GGML | None, block: int, size: int) -> DType:
    return DType(name, apr_code, ggml, None, block, size)


DTYPES: dict[str, DType] = {d.name: d for d in (
    _plain("F32", 0, GGML.F32, "<f4"),
    _plain("F16", 1, GGML.F16, "<f2"),
    _plain("BF16", 30, GGML.BF16, ml_dtypes.bfloat16),
    _plain("F64", 3, GGML.F64, "<f8"),
    _plain("I32", 4, GGML.I32, "<i4"),
    _plain("I64", 5, GGML.I64, "<i8"),
    _plain("I8", 6, GGML.I8, "i1"),
    _plain("U8", 7, None, "u1"),
    _block("Q4_K", 12, GGML.Q4_K, QK_K, 144),
    _block("Q6_K", 14, GGML.Q6_K, QK_K, 210),
    _block("APR_Q4", 128, None, APR_Q4_BLOCK, APR_Q4_BLOCK_BYTES),
    _block("APR_Q8", 129, None, 1, 1),          # plus a 4-byte scale per tensor
    _block("Q8_0", None, GGML.Q8_0, 32, 34),
    _block("Q4_0", None, GGML.Q4_0, 32, 18),
)}



def _dequantizable(t: GGML) -> bool:
    """Whether the gguf library decodes GGML block type ``t`` (probed on one zero block)."""
    block, size = GGML_QUANT_SIZES[t]
    try:
        gguf_quants.dequantize(np.zeros((1, size), np.uint8), t)
    except NotImplementedError:
        return False
    return True


# every other GGML block type the gguf library can decode: read by every command, kept as
# stored in GGUF, dequantized (exactly, to F32) for APR and HF
for _t in GGML:
    if GGML_QUANT_SIZES[_t][0] > 1 and _t.name not in DTYPES and _dequantizable(_t):
        DTYPES[_t.name] = _block(_t.name, None, _t, *GGML_QUANT_SIZES[_t])

F32 = DTYPES["F32"]
BF16 = DTYPES["BF16"]
APR_Q4 = DTYPES["APR_Q4"]
APR_Q8 = DTYPES["APR_Q8"]

_BY_APR_CODE: dict[int, DType] = {d.apr_code: d for d in DTYPES.values() if d.apr_code is not None}
_BY_APR_CODE[8] = APR_Q4        # legacy codes (before aprender GH-438)
_BY_APR_CODE[9] = APR_Q8
_BY_GGML: dict[GGML, DType] = {d.ggml: d for d in DTYPES.values() if d.ggml is not None}
_GGML_BLOCK_TYPES = frozenset(d.name for d in DTYPES.values() if d.quantized and d.ggml is not None)


# --------------------------------------------------------------------------- lookups

def dtype_by_name(name: str) -> DType:
    """Look a dtype up by name, case-insensitively ("f16", "Q4_K", "apr_q8")."""
    dt = DTYPES.get(name.upper())
    if dt is None:
        raise UnsupportedError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return dt


def dtype_from_apr_code(code: int) -> DType:
    """The dtype of an APR v2 dtype byte (legacy 8 / 9 read as APR_Q4 / APR_Q8)."""
    dt = _BY_APR_CODE.get(code)
    if dt is None:
        raise FormatError(f"unknown APR dtype code {code}")
    return dt


def dtype_from_ggml(ggml_type: GGML | int) -> DType:
    """The dtype of a GGUF tensor type; types we do not handle raise UnsupportedError."""
    try:
        ggml_type = GGML(int(ggml_type))
    except ValueError:
        raise UnsupportedError(f"unknown GGML tensor type {int(ggml_type)}") from None
    dt = _BY_GGML.get(ggml_type)
    if dt is None:
        raise UnsupportedError(f"GGML tensor type {ggml_type.name} is not supported "
                               f"(supported: {', '.join(d.name for d in _BY_GGML.values())})")
    return dt


# --------------------------------------------------------------------------- sizes

def n_elements(shape: Sequence[int]) -> int:
    """Element count of a shape (1 for a scalar), as an exact Python int."""
    return math.prod(int(d) for d in shape)


def nbytes(dtype: DType, shape: Sequence[int]) -> int:
    """Exact stored byte size of a tensor of this dtype and logical shape.

    APR_Q4: ceil(n / 32) * 18 (a partial last block is padded). APR_Q8: 4 + n, or 0 for an
    empty tensor (aprender writes no scale then). GGML block types: n / block * type_size, and
    the last dimension must be a multiple of the block size.
    """
    n = n_elements(shape)
    if dtype.numpy is not None:
        return n * dtype.type_size
    if dtype is APR_Q8:
        return APR_Q8_HEADER + n if n else 0
    if dtype is APR_Q4:
        return -(-n // APR_Q4_BLOCK) * APR_Q4_BLOCK_BYTES
    last = int(shape[-1]) if len(shape) else 1
    if last % dtype.block_size:
        raise UnsupportedError(f"{dtype.name} needs the last dimension to be a multiple of "
                               f"{dtype.block_size}; shape {list(shape)} is not")
    return n // dtype.block_size * dtype.type_size


# --------------------------------------------------------------------------- helpers

def _round_half_away(x: np.ndarray) -> np.ndarray:
    """Round half away from zero, like Rust's f32::round and C's roundf (exact, no x+0.5)."""
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0).astype(x.dtype)


def _rust_to_int(x: np.ndarray, lo: float, hi: float, dtype) -> np.ndarray:
    """Rust's ``x.round().clamp(lo, hi) as iN``: NaN becomes 0."""
    q = np.clip(_round_half_away(x), lo, hi)
    return np.where(np.isnan(q), 0, q).astype(dtype)


def _as_bytes(raw) -> np.ndarray:
    """Any buffer or array as a flat uint8 view of its bytes."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return np.frombuffer(raw, dtype=np.uint8)
    arr = np.ascontiguousarray(raw)
    return arr.reshape(-1).view(np.uint8)


def _f16_round_up(x: np.ndarray) -> np.ndarray:
    """The smallest f16 >= x (x >= 0), as float32."""
    h = x.astype(np.float16)
    h = np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float32)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """(n,) float32 -> (n, 2) uint8, little-endian f16."""
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


# --------------------------------------------------------------------------- APR_Q8

def encode_apr_q8(values: np.ndarray) -> np.ndarray:
    """aprender's APR_Q8 (``AprV2Writer::add_q8_tensor``): one scale for the whole tensor.

    Layout: f32 scale (little-endian), then one int8 per value in row-major order.
    scale = max|v| / 127 in f32 (1.0 when every value is 0; NaNs are ignored by the max);
    q = round_half_away_from_zero(v / scale) clamped to [-127, 127] (NaN -> 0).
    An empty tensor is stored as 0 bytes. Decoding is q * scale in f32.
    """
    x = np.asarray(values, dtype=np.float32).reshape(-1)
    if x.size == 0:
        return np.zeros(0, np.uint8)
    max_abs = np.fmax.reduce(np.abs(x), initial=np.float32(0))
    scale = np.float32(1.0) if max_abs == 0 else np.float32(max_abs / np.float32(127.0))
    with np.errstate(invalid="ignore", over="ignore"):
        q = _rust_to_int(x / scale, -127.0, 127.0, np.int8)
    return np.concatenate([np.frombuffer(np.float32(scale).astype("<f4").tobytes(), np.uint8),
                           q.view(np.uint8)])


def decode_apr_q8(raw: np.ndarray, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, np.float32)
    scale = raw[:APR_Q8_HEADER].view("<f4")[0]
    return raw[APR_Q8_HEADER:].view(np.int8).astype(np.float32) * scale


# --------------------------------------------------------------------------- APR_Q4

def encode_apr_q4(values: np.ndarray) -> np.ndarray:
    """aprender's APR_Q4 (``AprV2Writer::add_q4_tensor``): symmetric 4-bit, blocks of 32.

    The values are taken flat (row-major) in blocks of 32; each block is 18 bytes: its scale
    as f16 (little-endian, round-to-nearest-even), then 16 bytes of nibbles, value 2i in the
    low nibble of byte i and value 2i+1 in the high nibble.
    scale = max|v| / 7 in f32 over the block's real values (1.0 for an all-zero block);
    q = round_half_away_from_zero(v / scale) with the *f32* scale, clamped to [-8, 7]
    (NaN -> 0); nibble = q + 8. A partial last block is padded with nibble 0 (not 8).
    Decoding is (nibble - 8) * f16 scale, with a NaN, infinite or subnormal (< 6.1e-5) scale
    read as 0. An empty tensor is stored as 0 bytes.
    """
    x = np.asarray(values, dtype=np.float32).reshape(-1)
    n = x.size
    if n == 0:
        return np.zeros(0, np.uint8)
    n_blocks = -(-n // APR_Q4_BLOCK)
    padded = np.zeros(n_blocks * APR_Q4_BLOCK, np.float32)
    padded[:n] = x
    blocks = padded.reshape(n_blocks, APR_Q4_BLOCK)
    max_abs = np.fmax.reduce(np.abs(blocks), axis=1, initial=np.float32(0))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        scale = np.where(max_abs == 0, np.float32(1.0), max_abs / np.float32(7.0)).astype(np.float32)
        nib = (_rust_to_int(blocks / scale[:, None], -8.0, 7.0, np.int8) + 8).astype(np.uint8)
    nib.reshape(-1)[n:] = 0                              # padding of a partial last block
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
    with np.errstate(over="ignore"):
        out = np.concatenate([_f16_bytes(scale), packed], axis=1)
    return out.reshape(-1)


def decode_apr_q4(raw: np.ndarray, n: int) -> np.ndarray:
    blocks = raw.reshape(-1, APR_Q4_BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)[:, 0]
    bad = ~np.isfinite(scale) | (np.abs(scale) < APR_F16_MIN_NORMAL)
    scale = np.where(bad, np.float32(0), scale)
    packed = blocks[:, 2:]
    nib = np.empty((blocks.shape[0], APR_Q4_BLOCK), np.uint8)
    nib[:, 0::2] = packed & 0x0F
    nib[:, 1::2] = packed >> 4
    q = nib.astype(np.float32) - np.float32(8)
    return (q * scale[:, None]).reshape(-1)[:n]


# --------------------------------------------------------------------------- GGML K-quants
# gguf-py implements Q4_K / Q6_K dequantization only. These encoders are simple (one pass,
# no iterative search) and therefore not byte-identical to llama.cpp's quantize, but they
# produce valid blocks that llama.cpp and gguf-py decode to the same values as `decode`.

def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 (n_blocks, 256) -> uint8 (n_blocks, 144).

    Each of the 8 sub-blocks of 32 gets an affine map v = d*sc*q - dmin*m with q in 0..15;
    sc, m are 6-bit. d (dmin) is the f16 rounded up from max(sub-scale)/63 (max(sub-min)/63),
    sc and m are rounded up so that each sub-block's range is covered.
    """
    nb = x.shape[0]
    sub = x.reshape(nb, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0)
    hi = sub.max(axis=2)
    sub_scale = (hi - lo) / np.float32(15)
    sub_min = -lo
    d = _f16_round_up(sub_scale.max(axis=1) / np.float32(63))
    dmin = _f16_round_up(sub_min.max(axis=1) / np.float32(63))
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.ceil(sub_scale / d[:, None]), 0)
        m = np.where(dmin[:, None] > 0, np.ceil(sub_min / dmin[:, None]), 0)
        sc = np.clip(sc, 0, 63).astype(np.uint8)
        m = np.clip(m, 0, 63).astype(np.uint8)
        eff_scale = (d[:, None] * sc)[:, :, None]
        eff_min = (dmin[:, None] * m)[:, :, None]
        q = np.where(eff_scale > 0, np.rint((sub + eff_min) / eff_scale), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)                       # (nb, 8, 32)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(nb, 128)   # sub 2k low, 2k+1 high
    scales = np.empty((nb, 12), np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qs], axis=1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 (n_blocks, 256) -> uint8 (n_blocks, 210).

    Each of the 16 sub-blocks of 16 gets v = d*sc*(q - 32), q in 0..63, sc int8. A
    sub-block's scale is its signed extreme / -32 (as in llama.cpp); d is the f16 rounded up
    from max|scale|/127 and |sc| is rounded up so that the extreme fits.
    """
    nb = x.shape[0]
    sub = x.reshape(nb, 16, 16)
    idx = np.abs(sub).argmax(axis=2)[:, :, None]
    extreme = np.take_along_axis(sub, idx, axis=2)[:, :, 0]
    sub_scale = extreme / np.float32(-32)
    d = _f16_round_up(np.abs(sub_scale).max(axis=1) / np.float32(127))
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.sign(sub_scale) * np.ceil(np.abs(sub_scale) / d[:, None]), 0)
        sc = np.clip(sc, -128, 127).astype(np.int8)
        eff = (d[:, None] * sc)[:, :, None]
        q = np.where(eff != 0, np.rint(sub / eff), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(nb, 2, 128)   # halves of 128
    low = (q & 0x0F).reshape(nb, 2, 2, 64)
    ql = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(nb, 128)
    high = (q >> 4).reshape(nb, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6))
    return np.concatenate([ql, qh.reshape(nb, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)


_K_ENCODERS = {"Q4_K": _quantize_q4_k, "Q6_K": _quantize_q6_k}


def _encode_ggml(x: np.ndarray, dtype: DType) -> np.ndarray:
    """GGML block types: gguf-py's quantizer where it has one, else ours (K-quants)."""
    if x.size == 0:
        return np.zeros(0, np.uint8)
    rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    try:
        return np.ascontiguousarray(gguf_quants.quantize(rows, dtype.ggml)).reshape(-1)
    except NotImplementedError:
        pass
    encoder = _K_ENCODERS.get(dtype.name)
    if encoder is None:
        raise UnsupportedError(f"encoding to {dtype.name} is not implemented")
    return encoder(rows.reshape(-1, dtype.block_size)).reshape(-1)


# --------------------------------------------------------------------------- encode / decode

def _encode_plain(values: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype.is_float:
        src = values
        if dtype.numpy.itemsize < 4 and src.dtype.itemsize > 4:
            src = src.astype(np.float32)   # narrow through f32, as aprender does (from f32)
        with np.errstate(over="ignore"):
            return src.astype(dtype.numpy)
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise AprError(f"cannot store non-integer values as {dtype.name}")
    info = np.iinfo(dtype.numpy)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise AprError(f"values out of range for {dtype.name} [{info.min}, {info.max}]")
    return values.astype(dtype.numpy)


def encode(values: np.ndarray, dtype: DType) -> np.ndarray:
    """Float (or integer) values -> raw storage: a typed array with the same shape for plain
    dtypes, a flat uint8 array for quantized ones. F16/BF16 round to nearest even."""
    values = np.asarray(values)
    nbytes(dtype, values.shape)                       # rejects shapes the dtype cannot hold
    if dtype.numpy is not None:
        return _encode_plain(values, dtype)
    x = values.astype(np.float32)
    if dtype is APR_Q8:
        return encode_apr_q8(x)
    if dtype is APR_Q4:
        return encode_apr_q4(x)
    return _encode_ggml(x, dtype)


def decode(raw, dtype: DType, shape: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
    """Raw storage -> values with the logical shape: float32 for float and quantized types
    (float64 for F64, which float32 would round), the stored integer dtype for integer types.
    ``out``: a float32 array of that shape to write BF16, F16 or F32 values into (a buffer
    used again, which costs no page faults); ignored for the other types."""
    shape = tuple(int(d) for d in shape)
    data = _as_bytes(raw)
    expect = nbytes(dtype, shape)
    if data.size != expect:
        raise FormatError(f"{dtype.name} tensor of shape {list(shape)} needs {expect} bytes, "
                          f"got {data.size}")
    n = n_elements(shape)
    if out is not None and (out.dtype != np.float32 or out.shape != shape):
        raise ValueError(f"decode: out must be float32 of shape {list(shape)}")
    if dtype is BF16:           # the upper half of a float32: a shift (2x ml_dtypes' astype)
        bits = np.empty(shape, np.uint32) if out is None else out.view(np.uint32)
        np.left_shift(data.view("<u2").reshape(shape), 16, out=bits, dtype=np.uint32)
        return bits.view(np.float32) if out is None else out
    if dtype.numpy is not None:
        arr = data.view(dtype.numpy).reshape(shape)
        if not dtype.is_float or arr.dtype == np.float64:
            return arr
        if out is not None:
            np.copyto(out, arr)
            return out
        return arr.astype(np.float32)
    if n == 0:
        return np.zeros(shape, np.float32)
    if dtype is APR_Q8:
        return decode_apr_q8(data, n).reshape(shape)
    if dtype is APR_Q4:
        return decode_apr_q4(data, n).reshape(shape)
    rows = data.reshape(-1, shape[-1] // dtype.block_size * dtype.type_size)
    return np.asarray(gguf_quants.dequantize(rows, dtype.ggml), dtype=np.float32).reshape(shape)
