"""APR v2 container: golden bytes, round trips, streaming, atomic writes, corruption checks."""
from __future__ import annotations

import json
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apr.container import (AprFile, TensorSource, metadata_json, ordered_metadata,
                           tensor_source, verify, write_apr)
from apr.dtypes import DTYPES, dtype_by_name, nbytes
from apr.errors import AprError, ChecksumError, FormatError, UnsupportedError
from apr.names import APR_KNOWN_KEYS

# --------------------------------------------------------------------------- helpers
# An independent, deliberately permissive APR builder: it writes whatever it is told, so
# tests can produce files the real writer refuses to make.


def pad64(n: int) -> int:
    return (n + 63) // 64 * 64


def header_crc(header: bytes) -> int:
    return zlib.crc32(header[:40] + header[44:64])


def raw_header(flags=0x0400, count=0, meta_size=0, index_offset=64, data_offset=64,
               version=(2, 0), meta_offset=64, magic=b"APR\x00") -> bytes:
    h = bytearray(struct.pack("<4sBBHIQIQQI20s", magic, *version, flags, count, meta_offset,
                              meta_size, index_offset, data_offset, 0, bytes(20)))
    h[40:44] = header_crc(bytes(h)).to_bytes(4, "little")
    return bytes(h)


def raw_entry(name: bytes, code: int, shape, offset: int, size: int) -> bytes:
    return (struct.pack("<H", len(name)) + name + bytes([code, len(shape)])
            + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<QQ", offset, size))


def build_raw(meta: bytes, entries: list[bytes], data: bytes, flags=0x0400,
              meta_size: int | None = None) -> bytes:
    """A complete file from parts, with correct offsets, header CRC and footer CRC."""
    index = b"".join(entries)
    index_offset = 64 + pad64(len(meta))
    data_offset = index_offset + pad64(len(index))
    h = raw_header(flags, len(entries), len(meta) if meta_size is None else meta_size,
                   index_offset, data_offset)
    body = (h + meta.ljust(pad64(len(meta)), b"\0") + index.ljust(pad64(len(index)), b"\0")
            + data)
    return body + zlib.crc32(body).to_bytes(4, "little")


def set_header_field(blob: bytes, offset: int, fmt: str, value, fix_crc=True) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, offset, value)
    if fix_crc:
        b[40:44] = header_crc(bytes(b[:64])).to_bytes(4, "little")
    return bytes(b)


def sample_file(tmp_path: Path) -> Path:
    """A small valid file: three F32 tensors and one APR_Q8 tensor."""
    path = tmp_path / "model.apr"
    rng = np.random.default_rng(1)
    write_apr(path, {"model_type": "llama", "name": "sample"}, [
        tensor_source("a", rng.standard_normal((3, 5)).astype(np.float32)),
        tensor_source("b", rng.standard_normal(7).astype(np.float32)),
        tensor_source("c", rng.standard_normal((2, 40)), DTYPES["APR_Q8"]),
        tensor_source("d", rng.standard_normal(4).astype(np.float32)),
    ])
    return path


def open_error(path: Path, blob: bytes, exc=FormatError) -> str:
    path.write_bytes(blob)
    with pytest.raises(exc) as info:
        AprFile.open(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


# --------------------------------------------------------------------------- golden file

GOLDEN_META = ('{"model_type":"linear_regression","name":"golden-v2","license":null,'
               '"data_source":null,"data_license":null,"version":"0.0.0-golden",'
               '"created_at":"1700000000","total_size":0,"param_count":8}').encode()
GOLDEN_WEIGHTS = np.array([1, 2, 0.5, -0.5, 4, -2, 0.25, 8], np.float32)
GOLDEN_BIAS = np.array([0.125], np.float32)


def write_golden(path: Path) -> bytes:
    meta = {"model_type": "linear_regression", "name": "golden-v2", "version": "0.0.0-golden",
            "created_at": "1700000000", "total_size": 0, "param_count": 8}
    write_apr(path, meta, [tensor_source("weights", GOLDEN_WEIGHTS),
                           tensor_source("bias", GOLDEN_BIAS)])
    return path.read_bytes()


def test_golden_worked_example_bytes(tmp_path):
    blob = write_golden(tmp_path / "golden.apr")
    assert len(GOLDEN_META) == 189
    assert len(blob) == 516
    assert blob[:8] == b"APR\x00\x02\x00\x00\x04"           # magic, v2.0, flags 0x0400
    assert struct.unpack_from("<IQIQQ", blob, 8) == (2, 64, 189, 256, 384)
    assert blob[40:44] == (0x3BC08C02).to_bytes(4, "little")
    assert blob[44:64] == bytes(20)
    assert blob[64:64 + 189] == GOLDEN_META
    assert blob[64 + 189:256] == bytes(3)
    index = raw_entry(b"bias", 0, [1], 0, 4) + raw_entry(b"weights", 0, [8], 64, 32)
    assert len(index) == 67
    assert blob[256:256 + 67] == index and blob[256 + 67:384] == bytes(128 - 67)
    assert blob[384:388] == GOLDEN_BIAS.tobytes() and blob[388:448] == bytes(60)
    assert blob[448:480] == GOLDEN_WEIGHTS.tobytes() and blob[480:512] == bytes(32)
    assert blob[512:] == (0x550F3F35).to_bytes(4, "little")
    # and the independent builder agrees with the writer byte for byte
    assert build_raw(GOLDEN_META, [raw_entry(b"bias", 0, [1], 0, 4),
                                   raw_entry(b"weights", 0, [8], 64, 32)],
                     GOLDEN_BIAS.tobytes().ljust(64, b"\0")
                     + GOLDEN_WEIGHTS.tobytes().ljust(64, b"\0")) == blob


def test_golden_worked_example_reads_back(tmp_path):
    write_golden(tmp_path / "golden.apr")
    with AprFile.open(tmp_path / "golden.apr") as f:
        assert f.version == (2, 0) and f.flags == 0x0400 and f.file_size == 516
        assert f.header_crc == 0x3BC08C02 and f.footer_crc_stored == 0x550F3F35
        assert f.verify_footer()
        assert list(f.tensors) == ["bias", "weights"]
        assert f.tensors["weights"].offset == 64 and f.tensors["weights"].size == 32
        assert f.data_offset == 384 and f.index_offset == 256
        np.testing.assert_array_equal(f.array("weights"), GOLDEN_WEIGHTS)
        np.testing.assert_array_equal(f.raw("bias"), GOLDEN_BIAS)
        assert json.dumps(f.metadata, separators=(",", ":")).encode() == GOLDEN_META


# --------------------------------------------------------------------------- metadata order

def test_ordered_metadata_order_defaults_and_custom_keys():
    meta = {"zeta": 1, "hidden_size": 64, "name": "m", "model_type": "qwen2", "alpha": [1.5],
            "description": None, "rope_theta": 1e6, "rms_norm_eps": 1e-06, "custom_none": None}
    out = ordered_metadata(meta)
    assert list(out) == ["model_type", "name", "license", "data_source", "data_license",
                         "total_size", "param_count", "hidden_size", "rope_theta",
                         "rms_norm_eps", "zeta", "alpha", "custom_none"]
    assert out["license"] is None and out["total_size"] == 0 and out["param_count"] == 0
    text = metadata_json(meta).decode()
    assert text.startswith('{"model_type":"qwen2","name":"m","license":null,')
    assert '"rms_norm_eps":1e-06' in text and " " not in text
    assert json.loads(text)["rms_norm_eps"] == 1e-06


def test_metadata_is_utf8_not_escaped(tmp_path):
    path = tmp_path / "m.apr"
    write_apr(path, {"model_type": "x", "tokenizer.vocabulary": ["é", "中文", "<unk>"]}, [])
    assert "中文".encode() in path.read_bytes()
    with AprFile.open(path) as f:
        assert f.metadata["tokenizer.vocabulary"] == ["é", "中文", "<unk>"]
        assert f.flags == 0x0400 | 0x0200 and f.tensors == {}


def test_quantized_flag(tmp_path):
    path = tmp_path / "q.apr"
    write_apr(path, {}, [tensor_source("w", np.ones((2, 32)), DTYPES["APR_Q4"])])
    assert AprFile.open(path).flags == 0x0400 | 0x0020


# --------------------------------------------------------------------------- round trips

APR_DTYPES = [d for d in DTYPES.values() if d.apr_code is not None]
NAME_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


@st.composite
def tensor_specs(draw):
    dtype = draw(st.sampled_from(APR_DTYPES))
    ndim = draw(st.integers(0, 4))
    dims = draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim))
    if dtype.name in ("Q4_K", "Q6_K"):
        if ndim == 0:
            dims = [256]
        else:
            dims[-1] = 256 * draw(st.integers(0, 2))
    shape = tuple(dims)
    seed = draw(st.integers(0, 2**32 - 1))
    raw = np.random.default_rng(seed).integers(0, 256, nbytes(dtype, shape), dtype=np.uint8)
    return dtype, shape, raw


@st.composite
def model_contents(draw):
    names = draw(st.lists(st.text(NAME_CHARS, min_size=1, max_size=12), min_size=0, max_size=5,
                          unique=True))
    names = [n for n in names if len(n.encode()) <= 256]
    specs = [draw(tensor_specs()) for _ in names]
    known = draw(st.fixed_dictionaries({}, optional={
        "model_type": st.text(max_size=8), "name": st.text(max_size=8),
        "license": st.none() | st.text(max_size=5), "hidden_size": st.integers(0, 10**6),
        "rope_theta": st.floats(1, 1e7), "rms_norm_eps": st.sampled_from([1e-5, 1e-06, 1e-12]),
    }))
    custom = draw(st.dictionaries(st.text(NAME_CHARS, max_size=10).filter(
        lambda k: k not in APR_KNOWN_KEYS), JSON_VALUES, max_size=4))
    return list(zip(names, specs)), {**custom, **known}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_contents())
def test_round_trip_bit_for_bit(contents):
    tensors, meta = contents
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rt.apr"
        write_apr(path, meta, [TensorSource(n, dt, shape, (lambda r=raw: r))
                               for n, (dt, shape, raw) in tensors])
        with AprFile.open(path) as f:
            assert f.verify_footer()
            assert f.metadata == ordered_metadata(meta)
            assert list(f.metadata) == list(ordered_metadata(meta))
            assert list(f.tensors) == sorted((n for n, _ in tensors), key=str.encode)
            for name, (dt, shape, raw) in tensors:
                e = f.tensors[name]
                assert e.dtype is dt and e.shape == shape and e.size == raw.size
                stored = f.raw(name)
                if dt.numpy is not None:
                    assert stored.dtype == dt.numpy and stored.shape == shape
                assert np.ascontiguousarray(stored).tobytes() == raw.tobytes()
                assert (f.data_offset + e.offset) % 64 == 0


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["F32", "F16", "BF16", "F64"]),
       st.lists(st.integers(0, 4), min_size=0, max_size=4))
def test_round_trip_values_through_tensor_source(dtype_name, dims):
    dt = dtype_by_name(dtype_name)
    values = np.random.default_rng(len(dims)).standard_normal(dims).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v.apr"
        write_apr(path, {}, [tensor_source("x", values, dt)])
        with AprFile.open(path) as f:
            got = f.array("x")
    assert got.shape == values.shape and got.dtype == (np.float64 if dtype_name == "F64" else np.float32)
    np.testing.assert_array_equal(got, values.astype(dt.numpy).astype(np.float32))


def test_index_order_is_bytewise_utf8(tmp_path):
    names = ["b", "a", "ab", "a.b", "B", "é", "z", "中", "_x"]
    path = tmp_path / "o.apr"
    write_apr(path, {}, [tensor_source(n, np.full(3, i, np.float32)) for i, n in enumerate(names)])
    expected = sorted(names, key=lambda n: n.encode("utf-8"))
    assert expected[:4] == ["B", "_x", "a", "a.b"]
    with AprFile.open(path) as f:
        assert list(f.tensors) == expected
        offsets = [f.tensors[n].offset for n in expected]
        assert offsets == [64 * i for i in range(len(names))]
        for i, n in enumerate(names):
            assert f.array(n)[0] == i


def test_writer_rejects_gguf_only_dtype_and_bad_names(tmp_path):
    path = tmp_path / "x.apr"
    with pytest.raises(UnsupportedError, match="Q8_0 cannot be stored in APR"):
        write_apr(path, {}, [tensor_source("w", np.ones(32), DTYPES["Q8_0"])])
    with pytest.raises(AprError, match="longer than 256"):
        write_apr(path, {}, [tensor_source("n" * 257, np.ones(1, np.float32))])
    with pytest.raises(AprError, match="duplicate"):
        write_apr(path, {}, [tensor_source("a", np.ones(1, np.float32))] * 2)
    with pytest.raises(AprError, match="empty"):
        write_apr(path, {}, [tensor_source("", np.ones(1, np.float32))])
    with pytest.raises(AprError, match="9 dimensions"):
        write_apr(path, {}, [tensor_source("a", np.ones((1,) * 9, np.float32))])
    with pytest.raises(AprError, match="16 MiB"):
        write_apr(path, {"big": "x" * (16 * 1024 * 1024)}, [])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- streaming

def test_writer_streams_each_tensor_once_in_index_order(tmp_path):
    calls: list[str] = []
    order = ["w2", "w0", "w1", "a"]
    arrays = {n: np.full((4, 4), i, np.float32) for i, n in enumerate(order)}

    def source(name):
        def data():
            assert name not in calls, f"data() of {name} called twice"
            calls.append(name)
            return arrays[name]
        return TensorSource(name, DTYPES["F32"], (4, 4), data)

    path = tmp_path / "s.apr"
    write_apr(path, {}, [source(n) for n in order])
    assert calls == ["a", "w0", "w1", "w2"]
    with AprFile.open(path) as f:
        for n in order:
            np.testing.assert_array_equal(f.array(n), arrays[n])


def test_writer_validates_everything_before_reading_data(tmp_path):
    called = []

    def data():
        called.append(1)
        return np.zeros(4, np.float32)

    with pytest.raises(UnsupportedError, match="multiple of 256"):
        write_apr(tmp_path / "x.apr", {}, [TensorSource("a", DTYPES["F32"], (4,), data),
                                           TensorSource("b", DTYPES["Q4_K"], (3, 100), data)])
    assert called == []


# --------------------------------------------------------------------------- atomic writes

def test_failing_data_leaves_no_file(tmp_path):
    def boom():
        raise RuntimeError("source exploded")

    good = tensor_source("a", np.ones(3, np.float32))
    with pytest.raises(RuntimeError, match="exploded"):
        write_apr(tmp_path / "x.apr", {}, [good, TensorSource("b", DTYPES["F32"], (3,), boom)])
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_data_leaves_no_file(tmp_path):
    bad = TensorSource("weights.bad", DTYPES["F32"], (4,), lambda: np.ones(3, np.float32))
    with pytest.raises(AprError, match=r"'weights.bad'.*12 bytes.*needs 16"):
        write_apr(tmp_path / "x.apr", {}, [bad])
    assert list(tmp_path.iterdir()) == []


def test_wrong_dtype_data_is_rejected(tmp_path):
    bad = TensorSource("w", DTYPES["F32"], (4,), lambda: np.ones(4, np.int32))
    with pytest.raises(AprError, match="'w'.*int32"):
        write_apr(tmp_path / "x.apr", {}, [bad])
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_existing_file(tmp_path):
    path = tmp_path / "x.apr"
    write_golden(path)
    before = path.read_bytes()
    with pytest.raises(AprError):
        write_apr(path, {}, [TensorSource("w", DTYPES["F32"], (4,), lambda: np.ones(1, np.float32))])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.apr"]


# --------------------------------------------------------------------------- corruption

def test_truncated_file(tmp_path):
    blob = sample_file(tmp_path).read_bytes()
    msg = open_error(tmp_path / "t.apr", blob[:-100])
    assert "truncated" in msg and "ends at byte" in msg
    msg = open_error(tmp_path / "t.apr", blob[:30])
    assert "truncated" in msg


def test_header_bit_flip(tmp_path):
    blob = bytearray(sample_file(tmp_path).read_bytes())
    blob[8] ^= 0x04                                            # tensor count
    msg = open_error(tmp_path / "h.apr", bytes(blob), ChecksumError)
    assert "header CRC mismatch" in msg and "stored 0x" in msg and "computed 0x" in msg


def test_data_bit_flip_fails_footer_only(tmp_path):
    path = sample_file(tmp_path)
    with AprFile.open(path) as f:
        where = f.data_offset + f.tensors["b"].offset + 5
    blob = bytearray(path.read_bytes())
    blob[where] ^= 0x10
    path.write_bytes(bytes(blob))
    with AprFile.open(path) as f:
        assert not f.verify_footer()
        assert f.footer_crc_computed != f.footer_crc_stored
    with pytest.raises(ChecksumError, match="footer CRC mismatch"):
        verify(path)


def test_verify_passes_on_a_good_file(tmp_path):
    f = verify(sample_file(tmp_path))
    assert f.verify_footer()


def test_wrong_magic(tmp_path):
    blob = sample_file(tmp_path).read_bytes()
    msg = open_error(tmp_path / "m.apr", b"XYZW" + blob[4:])
    assert "not an APR v2 file" in msg and "XYZW" in msg
    msg = open_error(tmp_path / "m.gguf", b"GGUF" + struct.pack("<I", 3) + bytes(100))
    assert "GGUF" in msg
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    msg = open_error(tmp_path / "m.st", struct.pack("<Q", len(header)) + header + bytes(4))
    assert "safetensors" in msg
    msg = open_error(tmp_path / "m.pt", b"PK\x03\x04" + bytes(100))
    assert "zip" in msg


def test_version_3_is_rejected(tmp_path):
    blob = set_header_field(sample_file(tmp_path).read_bytes(), 4, "<B", 3)
    assert "version 3.0" in open_error(tmp_path / "v.apr", blob)


def test_column_major_flag(tmp_path):
    blob = sample_file(tmp_path).read_bytes()
    flags = struct.unpack_from("<H", blob, 6)[0]
    blob = set_header_field(blob, 6, "<H", flags | 0x0800)
    assert "column-major" in open_error(tmp_path / "c.apr", blob)


@pytest.mark.parametrize("flag,phrase", [(0x0001, "compressed"), (0x0002, "compressed"),
                                         (0x0004, "encrypted")])
def test_compressed_and_encrypted_flags(tmp_path, flag, phrase):
    blob = set_header_field(sample_file(tmp_path).read_bytes(), 6, "<H", 0x0400 | flag)
    assert phrase in open_error(tmp_path / "f.apr", blob, UnsupportedError)


def test_unsorted_index(tmp_path):
    data = bytes(128)
    blob = build_raw(b"{}", [raw_entry(b"b", 0, [1], 0, 4), raw_entry(b"a", 0, [1], 64, 4)], data)
    assert "not sorted" in open_error(tmp_path / "u.apr", blob)
    blob = build_raw(b"{}", [raw_entry(b"a", 0, [1], 0, 4), raw_entry(b"a", 0, [1], 64, 4)], data)
    assert "duplicate" in open_error(tmp_path / "u.apr", blob)


def test_overlapping_tensors(tmp_path):
    blob = build_raw(b"{}", [raw_entry(b"a", 0, [32], 0, 128), raw_entry(b"b", 0, [1], 64, 4)],
                     bytes(192))
    assert "overlap" in open_error(tmp_path / "o.apr", blob)


def test_offset_past_eof(tmp_path):
    blob = build_raw(b"{}", [raw_entry(b"a", 0, [1], 0, 4), raw_entry(b"b", 0, [1], 64 * 100, 4)],
                     bytes(128))
    msg = open_error(tmp_path / "e.apr", blob)
    assert "'b' ends at byte" in msg and f"the file has {len(blob)} bytes" in msg


def test_tensor_running_into_the_footer(tmp_path):
    blob = build_raw(b"{}", [raw_entry(b"a", 0, [1], 0, 4)], b"")   # its 4 bytes are the CRC
    msg = open_error(tmp_path / "f.apr", blob)
    assert "truncated" in msg and "'a' ends at byte" in msg


def test_misaligned_offset_and_wrong_size(tmp_path):
    blob = build_raw(b"{}", [raw_entry(b"a", 0, [1], 8, 4)], bytes(64))
    assert "not a multiple of 64" in open_error(tmp_path / "a.apr", blob)
    blob = build_raw(b"{}", [raw_entry(b"a", 0, [2], 0, 4)], bytes(64))
    assert "needs 8" in open_error(tmp_path / "a.apr", blob)


def test_bad_dtype_code(tmp_path):
    blob = build_raw(b"{}", [raw_entry(b"w", 99, [1], 0, 4)], bytes(64))
    msg = open_error(tmp_path / "d.apr", blob)
    assert "'w'" in msg and "dtype code 99" in msg


def test_legacy_dtype_codes_read_as_apr_quant(tmp_path):
    q8 = bytes(4 + 3)
    blob = build_raw(b"{}", [raw_entry(b"q4", 8, [2], 0, 18), raw_entry(b"q8", 9, [3], 64, 7)],
                     bytes(18).ljust(64, b"\0") + q8.ljust(64, b"\0"))
    (tmp_path / "l.apr").write_bytes(blob)
    with AprFile.open(tmp_path / "l.apr") as f:
        assert f.tensors["q4"].dtype.name == "APR_Q4" and f.tensors["q8"].dtype.name == "APR_Q8"


def test_name_too_long(tmp_path):
    blob = build_raw(b"{}", [raw_entry(b"n" * 300, 0, [1], 0, 4)], bytes(64))
    msg = open_error(tmp_path / "n.apr", blob)
    assert "name length 300 exceeds 256" in msg


def test_name_not_utf8(tmp_path):
    blob = build_raw(b"{}", [raw_entry(b"\xff\xfe", 0, [1], 0, 4)], bytes(64))
    assert "not valid UTF-8" in open_error(tmp_path / "n.apr", blob)


def test_ndim_over_8(tmp_path):
    blob = build_raw(b"{}", [raw_entry(b"w", 0, [1] * 9, 0, 4)], bytes(64))
    assert "ndim 9 exceeds 8" in open_error(tmp_path / "d.apr", blob)


def test_oversize_metadata_size_field(tmp_path):
    blob = sample_file(tmp_path).read_bytes()
    blob = set_header_field(blob, 20, "<I", 16 * 1024 * 1024 + 1)
    assert "exceeds the 16 MiB limit" in open_error(tmp_path / "m.apr", blob)


def test_metadata_not_json_or_not_object(tmp_path):
    blob = build_raw(b"{not json", [], b"")
    assert "not valid JSON" in open_error(tmp_path / "j.apr", blob)
    blob = build_raw(b"[1,2]", [], b"")
    assert "not an object" in open_error(tmp_path / "j.apr", blob)
    blob = build_raw(b'{"a":"\xff"}', [], b"")
    assert "not valid UTF-8" in open_error(tmp_path / "j.apr", blob)


def test_inconsistent_section_offsets(tmp_path):
    blob = sample_file(tmp_path).read_bytes()
    assert "metadata offset" in open_error(tmp_path / "x.apr", set_header_field(blob, 12, "<Q", 128))
    index_offset = struct.unpack_from("<Q", blob, 24)[0]
    msg = open_error(tmp_path / "x.apr", set_header_field(blob, 24, "<Q", index_offset + 64))
    assert "tensor index offset" in msg
    data_offset = struct.unpack_from("<Q", blob, 32)[0]
    msg = open_error(tmp_path / "x.apr", set_header_field(blob, 32, "<Q", data_offset + 64))
    assert "does not follow" in msg


def test_missing_tensor_name_is_an_error(tmp_path):
    with AprFile.open(sample_file(tmp_path)) as f:
        with pytest.raises(AprError, match="no tensor named 'zz'"):
            f.raw("zz")
