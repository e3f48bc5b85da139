"""apr.gguf_io's fast packing of long array values against the gguf library itself: the same
bytes as gguf.GGUFWriter's own packing, and gguf.GGUFReader reads a file written with it back
to the values (strings with non-ASCII, empty and repeated entries; ints at the INT32 edges;
floats that round in float32); values the fast path does not take are packed by the library."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from apr.errors import FormatError
from apr.gguf_io import GgufFile, _Writer, pack_array, write_gguf
from apr.tokenizer import _field_value

VT = gguf.GGUFValueType


def library_bytes(values: list) -> bytes:
    return gguf.GGUFWriter(None, "x")._pack_val(values, VT.ARRAY, add_vtype=False)


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.lists(TEXT, min_size=1, max_size=300),
                 st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=300),
                 st.lists(st.floats(-3e38, 3e38, allow_nan=False), min_size=1, max_size=300)))
def test_fast_packing_is_the_librarys(values):
    assert pack_array(values) == library_bytes(values)


@pytest.mark.parametrize("values", [
    [2**31, 1],                      # beyond INT32: the library raises, we do not pack
    [1.0, 1e39],                     # beyond float32
    [1, "a"], [True, False], [1, 2.0],
])
def test_values_outside_the_fast_path_go_to_the_library(values):
    assert pack_array(values) is None


def test_a_written_file_reads_back_through_gguf(tmp_path):
    tokens = ["", "a", "a", "é中😀", "<|pad_3|>"] * 1000 + [" " * 50]
    types = list(range(-5, 5)) * 500 + [2**31 - 1]
    scores = [0.1 * i for i in range(len(tokens))]
    write_gguf(tmp_path / "t.gguf", "llama", [("a.tokens", tokens, VT.ARRAY),
                                              ("a.types", types, VT.ARRAY),
                                              ("a.scores", scores, VT.ARRAY),
                                              ("a.short", [1, 2, 3], VT.ARRAY)], [])
    fields = gguf.GGUFReader(tmp_path / "t.gguf").fields
    assert _field_value(fields["a.tokens"]) == tokens
    assert _field_value(fields["a.types"]) == types
    assert np.array_equal(np.array(_field_value(fields["a.scores"]), dtype=np.float32),
                          np.array(scores, dtype=np.float32))
    assert _field_value(fields["a.short"]) == [1, 2, 3]
    assert issubclass(_Writer, gguf.GGUFWriter)


def _library_file(path, values: list[str]) -> bytes:
    w = gguf.GGUFWriter(str(path), "x")
    w.add_array("test.strings", values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path.read_bytes()


@settings(max_examples=25, deadline=None)
@given(st.lists(TEXT, min_size=1, max_size=200))
def test_string_arrays_read_back_as_the_library_wrote_them(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("s") / "s.gguf"
    _library_file(path, values)
    assert GgufFile(path).kv["test.strings"] == values


def test_string_array_overruns_and_bad_utf8_are_format_errors(tmp_path):
    path = tmp_path / "s.gguf"
    data = _library_file(path, ["alpha", "beta", "gamma"])
    at = data.index(b"gamma")
    path.write_bytes(data[:at + 2])                         # cut inside the last string
    with pytest.raises(FormatError, match="truncated"):
        GgufFile(path)
    path.write_bytes(data[:at - 4])                         # cut inside the last length
    with pytest.raises(FormatError, match="truncated"):
        GgufFile(path)
    bad = bytearray(data)
    bad[at - 8:at] = (2**40).to_bytes(8, "little")          # a length past the end of the file
    path.write_bytes(bytes(bad))
    with pytest.raises(FormatError, match="truncated"):
        GgufFile(path)
    bad = bytearray(data)
    bad[at] = 0xFF                                          # not UTF-8
    path.write_bytes(bytes(bad))
    with pytest.raises(FormatError, match="not UTF-8"):
        GgufFile(path)
