"""GGUF through the `gguf` library: reading with GGUFReader (memory-mapped), writing with
GGUFWriter in its streaming mode (all tensor infos first, then data one tensor at a time)."""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import gguf
import numpy as np

from .dtypes import DType, dtype_from_ggml
from .errors import FormatError

logging.getLogger("gguf").setLevel(logging.WARNING)
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
logging.getLogger("gguf.gguf_reader").setLevel(logging.WARNING)

VT = gguf.GGUFValueType


@dataclass
class GgufEntry:
    name: str                 # name in the file
    dtype: DType
    shape: tuple[int, ...]    # row-major shape (the reversed `ne` list)
    tensor: Any               # gguf.ReaderTensor


class GgufFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, IndexError, OSError, struct.error, UnicodeDecodeError) as e:
            raise FormatError(f"{self.path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else e.__class__.__name__})") from None
        self.kv: dict[str, Any] = {}
        for name, field in self.reader.fields.items():
            if name.startswith("GGUF."):
                continue
            self.kv[name] = field_value(field)
        self.entries: dict[str, GgufEntry] = {}
        for t in self.reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.entries[t.name] = GgufEntry(t.name, dtype_from_ggml(t.tensor_type), shape, t)
        self.version = int(field_value(self.reader.fields["GGUF.version"])) \
            if "GGUF.version" in self.reader.fields else None

    def raw(self, name: str) -> np.ndarray:
        """Stored bytes: a typed view with the row-major shape for plain dtypes,
        flat uint8 for block-quantized ones."""
        ent = self.entries[name]
        data = ent.tensor.data
        flat = data.reshape(-1).view(np.uint8)
        if ent.dtype.numpy is not None:
            return flat.view(ent.dtype.numpy).reshape(ent.shape)
        return flat


def field_value(field) -> Any:
    """Python value of a GGUF key/value field (lists for arrays)."""
    value = field.contents()
    if field.types and field.types[0] == VT.FLOAT32:
        # the shortest decimal that is the same float32: 1e-06, not 9.999999974752427e-07
        return float(str(np.float32(value)))
    if isinstance(value, np.generic):
        value = value.item()
    return value


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


def write_gguf(path: str | os.PathLike, arch: str, kv: Iterable[tuple[str, Any, VT | None]],
               tensors: list[GgufTensor], progress: Callable[[GgufTensor], None] | None = None) -> None:
    """Write a GGUF file at `path`, streaming tensor data (the caller makes it atomic)."""
    w = gguf.GGUFWriter(path, arch)
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
                row_bytes = t.nbytes // max(1, int(np.prod(t.shape[:-1], dtype=np.int64)))
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
