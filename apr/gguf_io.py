"""GGUF files. Writing goes through the `gguf` library's GGUFWriter in its streaming mode (all
tensor infos first, then data one tensor at a time); the library's enums name value and
quantization types. Reading parses the header, key/values and tensor infos here (see
GgufFile for why) and memory-maps the data."""
from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import gguf
import numpy as np

from .dtypes import DType, dtype_from_ggml, nbytes
from .errors import FormatError, UnsupportedError
from .untrusted import check_shape, path_kind

logging.getLogger("gguf").setLevel(logging.WARNING)
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)

VT = gguf.GGUFValueType


@dataclass
class GgufEntry:
    name: str                 # name in the file
    dtype: DType
    shape: tuple[int, ...]    # row-major shape (the reversed `ne` list)
    offset: int               # absolute byte offset of the data in the file
    nbytes: int


# struct formats of the scalar value types (strings and arrays are handled apart)
_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
           VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q",
           VT.FLOAT64: "<d"}


MAX_ARRAY_DEPTH = 4     # GGUF arrays of arrays are rare; 100,000 deep is an attack


_U64 = struct.Struct("<Q")


class _Cursor:
    """Little-endian reads from a memory map; every overrun is a FormatError."""

    def __init__(self, buf: memoryview, where: str):
        self.buf, self.pos, self.where = buf, 0, where

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise FormatError(f"{self.where}: truncated: needs byte {end} but the file has {len(self.buf)}")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.where}: the string at byte {self.pos - n} is not UTF-8") from None

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row: the loop of `string` without a method call per element
        (a 150k-token vocabulary is read at every open)."""
        buf, pos, size = self.buf, self.pos, len(self.buf)
        unpack = _U64.unpack_from
        out = []
        append = out.append
        try:
            for _ in range(count):
                n = unpack(buf, pos)[0]
                pos += 8
                end = pos + n
                if end > size:
                    break
                append(str(buf[pos:end], "utf-8"))
                pos = end
        except struct.error:
            end = pos + 8
        except UnicodeDecodeError:
            raise FormatError(f"{self.where}: the string at byte {pos} is not UTF-8") from None
        if len(out) < count:
            raise FormatError(f"{self.where}: truncated: needs byte {end} but the file has {size}")
        self.pos = pos
        return out

    def value(self, vtype: int, depth: int = 0):
        if vtype == VT.STRING:
            return self.string()
        if vtype == VT.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise FormatError(f"{self.where}: arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {self.pos}")
            item, count = self.scalar("<I"), self.scalar("<Q")
            if count > len(self.buf) - self.pos:       # every element takes at least one byte
                raise FormatError(f"{self.where}: an array of {count} elements at byte {self.pos} "
                                  f"cannot fit the file")
            if item == VT.STRING:
                return self.strings(count)
            if item in _SCALAR:     # float32 elements as their exact float64 values
                dt = np.dtype(_SCALAR[item])
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).tolist()
            return [self.value(item, depth + 1) for _ in range(count)]
        if vtype in _SCALAR:
            v = self.scalar(_SCALAR[vtype])
            # the shortest decimal that is the same float32: 1e-06, not 9.999999974752427e-07
            return float(str(np.float32(v))) if vtype == VT.FLOAT32 else v
        raise FormatError(f"{self.where}: unknown value type {vtype} at byte {self.pos}")

    def skip_array(self, depth: int = 0) -> None:
        """Step over an array value (after its type) without building it: a string array's
        lengths are walked, a scalar array's bytes jumped."""
        if depth >= MAX_ARRAY_DEPTH:
            raise FormatError(f"{self.where}: arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {self.pos}")
        item, count = self.scalar("<I"), self.scalar("<Q")
        if count > len(self.buf) - self.pos:
            raise FormatError(f"{self.where}: an array of {count} elements at byte {self.pos} "
                              f"cannot fit the file")
        if item == VT.STRING:
            buf, pos, size, unpack = self.buf, self.pos, len(self.buf), _U64.unpack_from
            try:
                for _ in range(count):
                    pos += 8 + unpack(buf, pos)[0]
                    if pos > size:
                        break
            except struct.error:
                pos = size + 1
            if pos > size:
                raise FormatError(f"{self.where}: truncated: a string array runs past the end "
                                  f"of the file ({size} bytes)")
            self.pos = pos
        elif item in _SCALAR:
            self.take(count * struct.calcsize(_SCALAR[item]))
        elif item == VT.ARRAY:
            for _ in range(count):
                self.skip_array(depth + 1)
        else:
            for _ in range(count):
                self.value(item, depth + 1)


class GgufFile:
    """Header, key/values and tensor infos of a GGUF file, parsed at open; tensor data is
    memory-mapped or read on demand. (gguf's GGUFReader builds an array per token string:
    seconds for a 150k-token vocabulary, which every open of a Qwen2 GGUF would pay.)
    ``arrays=False`` steps over array values instead of building them (they are then absent
    from `kv`): the tensor infos of a large vocabulary's file in a few milliseconds."""

    def __init__(self, path: str | os.PathLike, arrays: bool = True):
        self.path = Path(path)
        where = str(self.path)
        if path_kind(self.path) != "file":
            raise FormatError(f"{where}: no such file")
        size = self.path.stat().st_size
        if size < 24:
            raise FormatError(f"{where}: truncated: {size} bytes is too short for GGUF")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        c = _Cursor(memoryview(self._mm), where)
        if bytes(c.take(4)) != b"GGUF":
            raise FormatError(f"{where}: not a GGUF file (bad magic)")
        self.version = c.scalar("<I")
        if self.version not in (2, 3):
            raise UnsupportedError(f"{where}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        if n_tensors > size // 24 or n_kv > size // 12:     # a tensor info / key-value's least size
            raise FormatError(f"{where}: {n_tensors} tensors and {n_kv} key/values cannot fit "
                              f"a {size}-byte file")
        self.kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key, vtype = c.string(), c.scalar("<I")
            if vtype == VT.ARRAY and not arrays:
                c.skip_array()
            else:
                self.kv[key] = c.value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            ndim = c.scalar("<I")
            if ndim > 8:
                raise FormatError(f"{where}: tensor {name!r} has {ndim} dimensions")
            ne = [c.scalar("<Q") for _ in range(ndim)]
            infos.append((name, ne, c.scalar("<I"), c.scalar("<Q")))
        align = self.kv.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or not 1 <= align <= 1 << 20 \
                or align & (align - 1):
            raise FormatError(f"{where}: general.alignment = {align!r} (expected a power of two)")
        data_start = -(-c.pos // align) * align
        self.entries: dict[str, GgufEntry] = {}
        for name, ne, ggml_type, offset in infos:
            dtype = dtype_from_ggml(ggml_type)
            shape = check_shape(tuple(int(d) for d in reversed(ne)), f"{where}: tensor {name!r}")
            n = nbytes(dtype, shape)              # Python ints; offsets are u64 in the file
            start = data_start + offset
            if start + n > size:
                raise FormatError(f"{where}: truncated: tensor {name!r} ends at byte {start + n} "
                                  f"but the file has {size} bytes")
            if offset % align:
                raise FormatError(f"{where}: tensor {name!r}: offset {offset} is not a multiple of "
                                  f"the alignment {align}")
            if name in self.entries:
                raise FormatError(f"{where}: tensor {name!r} appears twice")
            self.entries[name] = GgufEntry(name, dtype, shape, start, n)
        by_offset = sorted((e for e in self.entries.values() if e.nbytes), key=lambda e: e.offset)
        for a, b in zip(by_offset, by_offset[1:]):
            if a.offset + a.nbytes > b.offset:
                raise FormatError(f"{where}: tensors {a.name!r} and {b.name!r} overlap (bytes "
                                  f"{a.offset}-{a.offset + a.nbytes} and {b.offset}-{b.offset + b.nbytes})")

    def raw(self, name: str) -> np.ndarray:
        """Stored bytes, memory-mapped: a typed view with the row-major shape for plain dtypes,
        flat uint8 for block-quantized ones."""
        ent = self.entries[name]
        flat = self._mm[ent.offset:ent.offset + ent.nbytes]
        if ent.dtype.numpy is not None:
            return flat.view(ent.dtype.numpy).reshape(ent.shape)
        return flat


# --------------------------------------------------------------------------- writing

def value_type(value: Any) -> VT:
    if isinstance(value, bool):
        return VT.BOOL
    if isinstance(value, (int, np.integer)):
        return VT.UINT32 if value >= 0 else VT.INT32
    if isinstance(value, (float, np.floating)):
        return VT.FLOAT32
    if isinstance(value, str):
        return VT.STRING
    if isinstance(value, (list, tuple)):
        return VT.ARRAY
    raise TypeError(f"no GGUF type for {type(value).__name__}")


@dataclass
class GgufTensor:
    name: str                     # GGUF name
    dtype: DType
    shape: tuple[int, ...]        # row-major shape
    data: Callable[[], np.ndarray]  # stored bytes (typed array or flat uint8)
    nbytes: int


def pack_array(values: list) -> bytes | None:
    """The GGUF bytes of a long array value (element type, count, elements), as gguf's writer
    packs them, in one pass; None when it is not a list of str, of int (INT32 range) or of
    float (finite in float32), which the library then packs itself. gguf packs one element per
    Python call: a 151,936-token list took about a second."""
    if not values:
        return None
    first = type(values[0])
    if first is str and all(type(v) is str for v in values):
        length = struct.Struct("<Q").pack
        body = b"".join(length(len(b)) + b for b in (v.encode("utf-8") for v in values))
        return struct.pack("<IQ", VT.STRING, len(values)) + body
    if first is int and all(type(v) is int for v in values):
        arr = np.array(values, dtype=np.int64)
        if arr.min() < -2**31 or arr.max() >= 2**31:
            return None
        return struct.pack("<IQ", VT.INT32, len(values)) + arr.astype("<i4").tobytes()
    if first is float and all(type(v) is float for v in values):
        with np.errstate(over="ignore"):
            arr = np.array(values, dtype="<f4")
        if not np.isfinite(arr).all():
            return None
        return struct.pack("<IQ", VT.FLOAT32, len(values)) + arr.tobytes()
    return None


class _Writer(gguf.GGUFWriter):
    """gguf's writer, with long arrays packed by `pack_array` (the same bytes)."""

    def _pack_val(self, val: Any, vtype: VT, add_vtype: bool, sub_type: VT | None = None) -> bytes:
        if vtype == VT.ARRAY and sub_type is None and isinstance(val, list) and len(val) >= 64 \
                and self.endianess == gguf.GGUFEndian.LITTLE:
            packed = pack_array(val)
            if packed is not None:
                return (struct.pack("<I", vtype) if add_vtype else b"") + packed
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def write_gguf(path: str | os.PathLike, arch: str, kv: Iterable[tuple[str, Any, VT | None]],
               tensors: list[GgufTensor], progress: Callable[[GgufTensor], None] | None = None) -> None:
    """Write a GGUF file at `path`, streaming tensor data (the caller makes it atomic)."""
    w = _Writer(path, arch)
    try:
        for key, value, vtype in kv:
            if key == "general.architecture":
                continue
            vtype = vtype or value_type(value)
            if vtype == VT.ARRAY:
                w.add_array(key, list(value))
            else:
                w.add_key_value(key, value, vtype)
        for t in tensors:
            if t.dtype.numpy is not None:
                w.add_tensor_info(t.name, t.shape, t.dtype.numpy, t.nbytes, raw_dtype=t.dtype.ggml)
            else:
                row_bytes = t.nbytes // max(1, math.prod(t.shape[:-1]))
                w.add_tensor_info(t.name, (*t.shape[:-1], row_bytes), np.dtype(np.uint8), t.nbytes,
                                  raw_dtype=t.dtype.ggml)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            arr = np.ascontiguousarray(t.data())
            if arr.nbytes != t.nbytes:
                raise FormatError(f"tensor {t.name!r}: {arr.nbytes} bytes, declared {t.nbytes}")
            w.write_tensor_data(arr)
            if progress:
                progress(t)
        w.flush()
    finally:
        w.close()
