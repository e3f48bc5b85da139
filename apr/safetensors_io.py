"""HF safetensors files and HF model directories.

Reading memory-maps the file and hands out views; writing streams tensor by tensor. The
`safetensors` package's NumPy API loads whole tensors into memory and has no bfloat16, so
the (tiny, documented) container is handled here directly; the package itself is the
oracle our tests read our files back with.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .dtypes import DType, dtype_by_name, nbytes
from .errors import ConfigError, FormatError, UnsupportedError
from .untrusted import (Values, check_offset, describe, is_file, load_json, load_json_object, path_kind,
                        read_text)

MAX_HEADER = 100 * 1024 * 1024
# safetensors dtype strings we read and write (our DType names coincide)
SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8")


@dataclass
class SafetensorsEntry:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int   # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One .safetensors file: header parsed at open, tensors as memory-mapped views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = str(self.path)
        if path_kind(self.path) != "file":
            raise FormatError(f"{where}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{where}: truncated: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"{where}: not a safetensors file (header length {n} "
                                  f"does not fit a {size}-byte file)")
            raw = f.read(n)
        header = load_json_object(raw, f"{where}: safetensors header", offset=8)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise FormatError(f"{where}: safetensors __metadata__ must map strings to strings")
        self.data_start = 8 + n
        self.size = size
        self.entries: dict[str, SafetensorsEntry] = {}
        for name, info in header.items():
            v = Values(info if isinstance(info, dict) else {}, f"{where}: tensor {name!r}")
            try:
                dt = v.get("dtype", str)
                shape = tuple(v.items("shape", int, default=[None]))
                offsets = v.get("data_offsets", list)
            except ConfigError as err:
                raise FormatError(str(err)) from None
            if dt is None or offsets is None or len(offsets) != 2 or None in shape or any(d < 0 for d in shape):
                raise FormatError(f"{where}: tensor {name!r}: malformed header entry") from None
            # byte offsets are 64-bit (a 5 GB shard), checked against the file's size below
            b, e = (check_offset(x, f"data_offsets[{i}]", f"{where}: tensor {name!r}")
                    for i, x in enumerate(offsets))
            if dt not in SAFETENSORS_DTYPES:
                raise UnsupportedError(f"{where}: tensor {name!r} has dtype {dt}, not supported")
            dtype = dtype_by_name(dt)
            expect = math.prod(shape) * dtype.numpy.itemsize          # Python ints: no wrap-around
            if e - b != expect:
                raise FormatError(f"{where}: tensor {name!r}: {e - b} bytes for shape {list(shape)} {dt} "
                                  f"(expected {expect})")
            if self.data_start + e > size:
                raise FormatError(f"{where}: truncated: tensor {name!r} ends at byte {self.data_start + e} "
                                  f"but the file has {size} bytes")
            self.entries[name] = SafetensorsEntry(name, dtype, shape, self.data_start + b, self.data_start + e)
        by_begin = sorted((x for x in self.entries.values() if x.end > x.begin), key=lambda x: x.begin)
        for x, y in zip(by_begin, by_begin[1:]):
            if x.end > y.begin:
                raise FormatError(f"{where}: tensors {x.name!r} and {y.name!r} overlap (data_offsets "
                                  f"[{x.begin - self.data_start}, {x.end - self.data_start}] and "
                                  f"[{y.begin - self.data_start}, {y.end - self.data_start}])")
        self._mm: np.memmap | None = None

    def raw(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of a tensor with its dtype and shape."""
        ent = self.entries[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        flat = self._mm[ent.begin:ent.end]
        return flat.view(ent.dtype.numpy).reshape(ent.shape)


@dataclass
class StTensor:
    """A tensor to write: name, dtype, shape and a function returning its array."""
    name: str
    dtype: DType
    shape: tuple[int, ...]
    data: Callable[[], np.ndarray]


def safetensors_header(tensors: list[StTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The first bytes of a safetensors file holding ``tensors`` in this order: the header's
    length (u64) and the header, space-padded to a multiple of 8. Offsets are exact Python
    ints (a shard of several GB has offsets past 2^32)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        if t.dtype.name not in SAFETENSORS_DTYPES:
            raise UnsupportedError(f"safetensors cannot store {t.dtype.name} (tensor {t.name!r})")
        n = nbytes(t.dtype, t.shape)
        header[t.name] = {"dtype": t.dtype.name, "shape": [int(d) for d in t.shape],
                          "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors(path: str | os.PathLike, tensors: Iterable[StTensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Stream tensors into a safetensors file at `path` (the caller makes it atomic)."""
    tensors = list(tensors)
    head = safetensors_header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for t in tensors:
            arr = np.asarray(t.data())
            if arr.dtype != t.dtype.numpy or tuple(arr.shape) != tuple(t.shape):
                raise FormatError(f"tensor {t.name!r}: got {arr.dtype} {list(arr.shape)}, "
                                  f"declared {t.dtype.name} {list(t.shape)}")
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)


def read_json(path: Path, what: str) -> Any:
    return load_json(read_text(path, what), str(path))


def hf_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF directory: a sharded index or a single file."""
    index = directory / "model.safetensors.index.json"
    if is_file(index):
        doc = read_json(index, "sharded weight index")
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index}: no weight_map object")
        files = set()
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or shard != Path(shard).name \
                    or shard in (".", ".."):
                raise FormatError(f"{index}: weight_map[{describe(name)}] is {describe(shard)}, "
                                  "expected the file name of a shard in the same directory")
            files.add(shard)
        for f in sorted(files):
            if not is_file(directory / f):
                raise FormatError(f"{index}: shard {f!r} is missing")
        return [directory / f for f in sorted(files)]
    single = directory / "model.safetensors"
    if is_file(single):
        return [single]
    found = sorted(p for p in directory.glob("*.safetensors") if is_file(p))
    if found:
        return found
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise UnsupportedError(f"{directory}: only pickle weights (*.bin/*.pt) found; "
                               "they are never loaded here, convert them to safetensors first")
    raise FormatError(f"{directory}: no safetensors weights (model.safetensors or an index)")
