"""Dtype table, sizes, encode/decode round trips, and aprender's APR_Q4 / APR_Q8 bit layout."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML
from gguf import quants as gguf_quants
from hypothesis import given, settings
from hypothesis import strategies as st

from apr.dtypes import (DTYPES, decode, dtype_by_name, dtype_from_apr_code, dtype_from_ggml,
                        encode, nbytes)
from apr.errors import AprError, FormatError, UnsupportedError


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# --------------------------------------------------------------------------- table

def test_table_matches_the_format_page():
    # name: (APR code, GGML type, block size, bytes per block)
    expected = {
        "F32": (0, GGML.F32, 1, 4), "F16": (1, GGML.F16, 1, 2), "BF16": (30, GGML.BF16, 1, 2),
        "F64": (3, GGML.F64, 1, 8), "I32": (4, GGML.I32, 1, 4), "I64": (5, GGML.I64, 1, 8),
        "I8": (6, GGML.I8, 1, 1), "U8": (7, None, 1, 1), "Q4_K": (12, GGML.Q4_K, 256, 144),
        "Q6_K": (14, GGML.Q6_K, 256, 210), "APR_Q4": (128, None, 32, 18),
        "APR_Q8": (129, None, 1, 1), "Q8_0": (None, GGML.Q8_0, 32, 34),
        "Q4_0": (None, GGML.Q4_0, 32, 18),
    }
    # and every other GGML block type the gguf library decodes (apr/dtypes.py probes it),
    # read-only for APR (no code): the ones gguf 0.19 decodes
    decoded = ("Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS",
               "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4",
               "NVFP4")
    from gguf import GGML_QUANT_SIZES
    for name in decoded:
        expected[name] = (None, GGML[name], *GGML_QUANT_SIZES[GGML[name]])
    assert set(DTYPES) == set(expected)
    for name, (code, ggml, block, size) in expected.items():
        dt = DTYPES[name]
        assert (dt.apr_code, dt.ggml, dt.block_size, dt.type_size) == (code, ggml, block, size)
        assert (dt.numpy is None) == (block > 1 or name == "APR_Q8")
    assert DTYPES["BF16"].numpy == np.dtype(ml_dtypes.bfloat16)


def test_lookups():
    assert dtype_by_name("q4_k") is DTYPES["Q4_K"] and dtype_by_name("Apr_Q8") is DTYPES["APR_Q8"]
    with pytest.raises(UnsupportedError, match="Q7_X"):
        dtype_by_name("Q7_X")
    assert dtype_from_apr_code(30) is DTYPES["BF16"]
    assert dtype_from_apr_code(8) is DTYPES["APR_Q4"] and dtype_from_apr_code(9) is DTYPES["APR_Q8"]
    for code in (2, 13, 31, 130, 255):
        with pytest.raises(FormatError, match=f"code {code}"):
            dtype_from_apr_code(code)
    assert dtype_from_ggml(GGML.Q8_0) is DTYPES["Q8_0"]
    assert dtype_from_ggml(int(GGML.Q6_K)) is DTYPES["Q6_K"]
    assert dtype_from_ggml(GGML.Q5_K) is DTYPES["Q5_K"]
    with pytest.raises(UnsupportedError, match="Q8_1"):      # gguf cannot decode it
        dtype_from_ggml(GGML.Q8_1)


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("name,shape,size", [
    ("Q4_K", (4, 512), 4 * 2 * 144), ("Q4_K", (256,), 144), ("Q4_K", (0, 256), 0),
    ("Q6_K", (3, 256), 3 * 210), ("Q6_K", (2, 2, 512), 4 * 2 * 210),
    ("Q8_0", (2, 64), 2 * 2 * 34), ("Q4_0", (32,), 18),
    ("APR_Q4", (33,), 36), ("APR_Q4", (2, 16), 18), ("APR_Q4", (1,), 18), ("APR_Q4", (0, 7), 0),
    ("APR_Q4", (), 18),
    ("APR_Q8", (3, 5), 19), ("APR_Q8", (), 5), ("APR_Q8", (0,), 0),
    ("F32", (3, 5), 60), ("BF16", (7,), 14), ("F64", (), 8), ("U8", (2, 0), 0),
])
def test_nbytes(name, shape, size):
    assert nbytes(DTYPES[name], shape) == size


@pytest.mark.parametrize("name,shape", [("Q4_K", (4, 100)), ("Q6_K", (256, 3)), ("Q8_0", (33,)),
                                        ("Q4_0", ())])
def test_nbytes_rejects_rows_that_are_not_whole_blocks(name, shape):
    with pytest.raises(UnsupportedError, match=rf"{name}.*shape {list(shape)}".replace("[", r"\[")):
        nbytes(DTYPES[name], shape)


# --------------------------------------------------------------------------- round trips

TOLERANCES = {"F32": 0.0, "F64": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q4_0": 0.15,
              "Q4_K": 0.15, "Q6_K": 0.03, "APR_Q8": 1e-2, "APR_Q4": 0.15}


@pytest.mark.parametrize("name", sorted(TOLERANCES))
def test_float_round_trip_within_tolerance(name):
    dt = DTYPES[name]
    x = np.random.default_rng(7).standard_normal((4, 512)).astype(np.float32)
    raw = encode(x, dt)
    assert raw.nbytes == nbytes(dt, x.shape)
    if dt.numpy is None:
        assert raw.dtype == np.uint8 and raw.ndim == 1
    else:
        assert raw.dtype == dt.numpy and raw.shape == x.shape
    y = decode(raw, dt, x.shape)
    assert y.shape == x.shape and y.dtype == (np.float64 if name == "F64" else np.float32)
    err = rel_l2(y, x)
    assert err <= TOLERANCES[name]
    if TOLERANCES[name]:
        assert err > 0                 # it really went through the lossy encoding


@pytest.mark.parametrize("name,lo,hi", [("I8", -128, 127), ("U8", 0, 255),
                                        ("I32", -2**31, 2**31 - 1), ("I64", -2**63, 2**63 - 1)])
def test_integer_round_trip_exact(name, lo, hi):
    dt = DTYPES[name]
    x = np.array([[lo, hi, 0], [1, lo + 1, hi - 1]], dtype=dt.numpy)
    y = decode(encode(x, dt), dt, x.shape)
    assert y.dtype == dt.numpy
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(decode(encode(np.array([3.0, 4.0]), dt), dt, (2,)), [3, 4])
    with pytest.raises(AprError, match=name):
        encode(np.array([0.5]), dt)


def test_f16_and_bf16_round_to_nearest_even():
    ties = np.array([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11)], np.float32)
    assert decode(encode(ties, DTYPES["F16"]), DTYPES["F16"], (3,)).tolist() == \
        [1.0, 1 + 2**-9, -1.0]
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32)
    assert decode(encode(ties, DTYPES["BF16"]), DTYPES["BF16"], (2,)).tolist() == [1.0, 1 + 2**-6]


def test_k_quant_sub_block_scales_are_placed_right():
    # sub-blocks whose magnitudes differ by up to 4x (within what 6-bit / 8-bit sub-block
    # scales can express): a scale put on the wrong sub-block shows up as an O(1) error
    rng = np.random.default_rng(3)
    for name, sub, tol in (("Q4_K", 32, 0.15), ("Q6_K", 16, 0.03)):
        mags = np.repeat(2.0 ** rng.integers(-1, 2, 256 // sub), sub)
        x = (rng.standard_normal((3, 256)) * mags).astype(np.float32)
        y = decode(encode(x, DTYPES[name]), DTYPES[name], x.shape)
        for r in range(3):
            for j in range(0, 256, sub):
                assert rel_l2(y[r, j:j + sub], x[r, j:j + sub]) < 2 * tol, (name, r, j)


def test_quantized_encoding_of_odd_shapes():
    x = np.arange(35, dtype=np.float32).reshape(5, 7)
    for name in ("APR_Q4", "APR_Q8"):
        y = decode(encode(x, DTYPES[name]), DTYPES[name], x.shape)
        assert y.shape == (5, 7) and rel_l2(y, x) < TOLERANCES[name]
    with pytest.raises(UnsupportedError, match=r"shape \[5, 7\]"):
        encode(x, DTYPES["Q4_K"])
    for name in ("APR_Q4", "APR_Q8", "Q8_0"):
        assert encode(np.zeros((0, 32)), DTYPES[name]).size == 0
        assert decode(b"", DTYPES[name], (0, 32)).shape == (0, 32)


def test_decode_rejects_wrong_byte_count():
    with pytest.raises(FormatError, match="needs 18 bytes, got 17"):
        decode(np.zeros(17, np.uint8), DTYPES["APR_Q4"], (32,))


# --------------------------------------------------------------------------- GGUF oracle

@pytest.mark.parametrize("name", ["Q8_0", "Q4_0"])
def test_gguf_block_decode_matches_gguf(name):
    dt = DTYPES[name]
    x = np.random.default_rng(5).standard_normal((3, 2, 64)).astype(np.float32)
    blocks = gguf_quants.quantize(x, dt.ggml)
    assert np.array_equal(encode(x, dt), blocks.reshape(-1))
    np.testing.assert_array_equal(decode(blocks.reshape(-1), dt, x.shape),
                                  gguf_quants.dequantize(blocks, dt.ggml))


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_k_quant_decode_matches_gguf_on_arbitrary_blocks(name):
    dt = DTYPES[name]
    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, (6, dt.type_size), dtype=np.uint8)
    f16 = rng.uniform(0.01, 1, (6, 2)).astype("<f2").view(np.uint8)
    if name == "Q4_K":
        blocks[:, 0:4] = f16.reshape(6, 4)           # d, dmin
    else:
        blocks[:, -2:] = f16[:, :2]                  # d
    rows = blocks.reshape(2, -1)                     # 2 rows of 3 super-blocks
    want = gguf_quants.dequantize(rows, dt.ggml)
    assert want.shape == (2, 768)
    np.testing.assert_array_equal(decode(blocks.reshape(-1), dt, (2, 768)), want)
    encoded = encode(want, dt)                       # our encoder, decoded by gguf-py
    assert rel_l2(gguf_quants.dequantize(encoded.reshape(2, -1), dt.ggml), want) < TOLERANCES[name]


# --------------------------------------------------------------------------- APR_Q4 / APR_Q8
# Expected bytes are worked out by hand from aprender's rule (see apr.dtypes.encode_apr_q4):
# scale = max|v|/7 (f32; 1.0 for a zero block) stored as f16; q = round-half-away(v/scale)
# clamped to [-8, 7]; nibble q+8, element 2i low; partial block padded with nibble 0.

def test_apr_q4_golden_bytes():
    x = np.array([1.0, -2.5, 0.5, 3.5, -7.0, 0.0, 0.25, 1.75, 6.5], np.float32)
    # scale 7/7 = 1.0 -> f16 0x3C00; q = 1 -3 1 4 -7 0 0 2 7; nibbles 9 5 9 C 1 8 8 A F
    want = bytes([0x00, 0x3C, 0x59, 0xC9, 0x81, 0xA8, 0x0F]) + bytes(11)
    assert encode(x, DTYPES["APR_Q4"]).tobytes() == want
    assert decode(want, DTYPES["APR_Q4"], (9,)).tolist() == [1, -3, 1, 4, -7, 0, 0, 2, 7]


def test_apr_q4_golden_two_blocks_zero_block_and_scale_two():
    x = np.concatenate([np.zeros(32, np.float32), np.array([14.0, -3.0, 5.0], np.float32)])
    # block 0: all zero -> scale 1.0, every nibble 8; block 1: scale 14/7 = 2.0 -> f16 0x4000,
    # q = 7, round(-1.5) = -2, round(2.5) = 3 -> nibbles F 6 B
    want = (bytes([0x00, 0x3C]) + bytes([0x88]) * 16
            + bytes([0x00, 0x40, 0x6F, 0x0B]) + bytes(14))
    assert encode(x, DTYPES["APR_Q4"]).tobytes() == want
    assert decode(want, DTYPES["APR_Q4"], (35,)).tolist() == [0.0] * 32 + [14.0, -4.0, 6.0]


def test_apr_q4_decode_zeroes_bad_scales():
    nibbles = bytes([0xF0]) * 16                      # q = -8, 7 alternating
    for bits, zero in ((0x0001, True), (0x03FF, True), (0x7C00, True), (0x7E00, True),
                       (0x0400, False)):
        y = decode(bits.to_bytes(2, "little") + nibbles, DTYPES["APR_Q4"], (32,))
        assert (not y.any()) == zero, hex(bits)
    y = decode((0x0400).to_bytes(2, "little") + nibbles, DTYPES["APR_Q4"], (2,))
    assert y.tolist() == [-8 * 2.0**-14, 7 * 2.0**-14]


def test_apr_q8_golden_bytes():
    dt = DTYPES["APR_Q8"]
    # scale 127/127 = 1.0 (f32 00 00 80 3F); q = 127, round(-63.5) = -64, 1, -1, round(2.5) = 3
    x = np.array([127.0, -63.5, 0.5, -1.0, 2.5], np.float32)
    want = bytes([0x00, 0x00, 0x80, 0x3F, 0x7F, 0xC0, 0x01, 0xFF, 0x03])
    assert encode(x, dt).tobytes() == want
    assert decode(want, dt, (5,)).tolist() == [127, -64, 1, -1, 3]
    # one scale for the whole tensor: 254/127 = 2.0 (00 00 00 40); -1/2 -> -1, 3/2 -> 2
    x = np.array([[254.0, -1.0], [3.0, 0.0]], np.float32)
    want = bytes([0x00, 0x00, 0x00, 0x40, 0x7F, 0xFF, 0x02, 0x00])
    assert encode(x, dt).tobytes() == want
    assert decode(want, dt, (2, 2)).tolist() == [[254, -2], [4, 0]]
    assert encode(np.zeros(3), dt).tobytes() == bytes([0, 0, 0x80, 0x3F, 0, 0, 0])
    assert encode(np.zeros(0), dt).tobytes() == b""


FINITE = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=100, deadline=None)
@given(st.lists(FINITE, min_size=1, max_size=200))
def test_apr_q8_error_is_at_most_half_a_step(values):
    x = np.array(values, np.float32)
    raw = encode(x, DTYPES["APR_Q8"])
    scale = raw[:4].view("<f4")[0]
    max_abs = np.abs(x).max()
    assert scale == (np.float32(max_abs) / np.float32(127) if max_abs else 1.0)
    y = decode(raw, DTYPES["APR_Q8"], x.shape)
    assert np.all(np.abs(y - x) <= scale * 0.5001 + 1e-30)


@settings(max_examples=100, deadline=None)
@given(st.lists(FINITE, min_size=1, max_size=100))
def test_apr_q4_error_is_bounded_per_block(values):
    x = np.array(values, np.float32)
    raw = encode(x, DTYPES["APR_Q4"]).reshape(-1, 18)
    y = decode(raw.reshape(-1), DTYPES["APR_Q4"], x.shape)
    for b in range(raw.shape[0]):
        xs, ys = x[32 * b:32 * b + 32], y[32 * b:32 * b + 32]
        s32 = np.abs(xs).max() / np.float32(7) if np.abs(xs).max() else np.float32(1)
        s16 = float(raw[b, :2].view("<f2")[0])
        if s16 < 6.1e-5:                             # decoded as zero by aprender's guard
            assert not ys.any()
            continue
        bound = 0.5 * s32 + 8 * abs(s32 - s16) + 1e-6 * np.abs(xs)
        assert np.all(np.abs(ys - xs) <= bound)
