"""The APR v2 container (no compression, no encryption): a streaming writer and a lazy,
memory-mapped reader. The byte layout, as aprender's format crate writes it:

    0             header, 64 bytes (header CRC over bytes 0..40 + 44..64)
    64            metadata: compact UTF-8 JSON, zero-padded to 64
    index_offset  tensor index, entries sorted byte-wise by name, zero-padded to 64
    data_offset   tensor data, each tensor zero-padded to 64, in index order
    EOF-4         footer: CRC32 of every byte before it
"""
from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from . import names
from .atomic import atomic_file
from .dtypes import DTYPES, DType, decode, dtype_from_apr_code, encode, nbytes
from .errors import AprError, ChecksumError, FormatError, UnsupportedError
from .untrusted import check_shape, load_json_object, path_kind

MAGIC = b"APR\x00"
VERSION = (2, 0)
HEADER_SIZE = 64
FOOTER_SIZE = 4
ALIGN = 64
MAX_NAME_BYTES = 256
MAX_NDIM = 8
MAX_METADATA_BYTES = 16 * 1024 * 1024

FLAG_LZ4 = 0x0001
FLAG_ZSTD = 0x0002
FLAG_ENCRYPTED = 0x0004
FLAG_SIGNED = 0x0008
FLAG_SHARDED = 0x0010
FLAG_QUANTIZED = 0x0020
FLAG_HAS_VOCAB = 0x0200
FLAG_ROW_MAJOR = 0x0400
FLAG_COLUMN_MAJOR = 0x0800

# magic, major, minor, flags, tensor count, metadata offset, metadata size, index offset,
# data offset, header CRC, 20 reserved bytes
_HEADER = struct.Struct("<4sBBHIQIQQI20s")
_ENTRY_FIXED = 2 + 1 + 1 + 8 + 8            # name length, dtype, ndim, offset, size
_ENTRY_MAX = _ENTRY_FIXED + MAX_NAME_BYTES + 8 * MAX_NDIM
_CRC_CHUNK = 16 * 1024 * 1024

# aprender serializes these known keys even when unset, with its serde defaults.
_APR_DEFAULTS: dict[str, Any] = {"model_type": "", "total_size": 0, "param_count": 0}


def pad64(n: int) -> int:
    """n rounded up to a multiple of 64."""
    return -(-n // ALIGN) * ALIGN


# --------------------------------------------------------------------------- metadata

def ordered_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata in aprender's order: known keys (names.APR_KNOWN_KEYS), then custom keys in
    their given order. `license`, `data_source`, `data_license` are always present (None when
    unset); `model_type`, `total_size`, `param_count` take aprender's defaults ("", 0, 0)
    when unset; other known keys are omitted when None."""
    out: dict[str, Any] = {}
    for key in names.APR_KNOWN_KEYS:
        value = meta.get(key)
        if value is not None:
            out[key] = value
        elif key in names.APR_ALWAYS_PRESENT:
            out[key] = None
        elif key in _APR_DEFAULTS:
            out[key] = _APR_DEFAULTS[key]
    known = set(names.APR_KNOWN_KEYS)
    out.update((k, v) for k, v in meta.items() if k not in known)
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def metadata_json(meta: Mapping[str, Any]) -> bytes:
    """The metadata section bytes: compact UTF-8 JSON of `ordered_metadata(meta)`."""
    try:
        text = json.dumps(ordered_metadata(meta), separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as e:
        raise AprError(f"metadata cannot be written as JSON: {e}") from None
    return text.encode("utf-8")


# --------------------------------------------------------------------------- index entries

@dataclass(frozen=True)
class TensorEntry:
    """One tensor index entry. `offset` is relative to the data section, as stored."""
    name: str
    dtype: DType
    shape: tuple[int, ...]
    offset: int
    size: int


def encode_entry(entry: TensorEntry) -> bytes:
    """Serialize one index entry."""
    name = entry.name.encode("utf-8")
    ndim = len(entry.shape)
    return (struct.pack("<H", len(name)) + name
            + struct.pack(f"<BB{ndim}QQQ", entry.dtype.apr_code, ndim, *entry.shape,
                          entry.offset, entry.size))


def _header_crc(header: bytes) -> int:
    return zlib.crc32(header[:40] + header[44:64])


def pack_header(flags: int, tensor_count: int, metadata_size: int, index_offset: int,
                data_offset: int) -> bytes:
    """The 64-byte header with its CRC filled in."""
    fields = [MAGIC, *VERSION, flags, tensor_count, HEADER_SIZE, metadata_size, index_offset,
              data_offset]
    crc = _header_crc(_HEADER.pack(*fields, 0, bytes(20)))
    return _HEADER.pack(*fields, crc, bytes(20))


# --------------------------------------------------------------------------- writer

@dataclass
class TensorSource:
    """A tensor to write. `data()` returns its raw storage (dtypes.encode's output, or the
    stored bytes as uint8); the writer calls it once, when the tensor's turn comes."""
    name: str
    dtype: DType
    shape: tuple[int, ...]
    data: Callable[[], np.ndarray]
    # (file, offset): the stored bytes are exactly that file's, from offset; the writer may
    # then copy them inside the kernel instead of calling data()
    span: tuple[Path, int] | None = None
    written: Callable[[], None] | None = None      # called once the tensor is in the file


def tensor_source(name: str, array: np.ndarray, dtype: DType | None = None) -> TensorSource:
    """Wrap an in-memory array of values. Without `dtype` the array's own (plain) dtype is
    stored; with one, the values are encoded to it when the writer asks for the data."""
    array = np.asarray(array)
    if dtype is None:
        dtype = next((d for d in DTYPES.values() if d.numpy == array.dtype), None)
        if dtype is None:
            raise UnsupportedError(f"tensor {name!r}: no APR dtype for numpy {array.dtype}")
        return TensorSource(name, dtype, tuple(array.shape), lambda: array)
    return TensorSource(name, dtype, tuple(array.shape), lambda: encode(array, dtype))


def _check_sources(sources: list[TensorSource]) -> None:
    """Reject what APR cannot hold, before anything is written or any data() is called."""
    seen: set[str] = set()
    for s in sources:
        if not isinstance(s.name, str) or not s.name:
            raise AprError(f"tensor name {s.name!r} is empty or not a string")
        try:
            encoded = s.name.encode("utf-8")
        except UnicodeEncodeError:
            raise AprError(f"tensor {s.name!r}: name is not valid Unicode") from None
        if len(encoded) > MAX_NAME_BYTES:
            raise AprError(f"tensor {s.name!r}: name is longer than {MAX_NAME_BYTES} UTF-8 bytes")
        if s.name in seen:
            raise AprError(f"duplicate tensor name {s.name!r}")
        seen.add(s.name)
        if len(s.shape) > MAX_NDIM:
            raise AprError(f"tensor {s.name!r}: {len(s.shape)} dimensions (APR allows {MAX_NDIM})")
        if any(int(d) < 0 for d in s.shape):
            raise AprError(f"tensor {s.name!r}: negative dimension in shape {list(s.shape)}")
        if s.dtype.apr_code is None:
            raise UnsupportedError(f"tensor {s.name!r}: {s.dtype.name} cannot be stored in APR")


def _plan(sources: list[TensorSource]) -> list[TensorEntry]:
    """Index entries in file order (byte-wise by UTF-8 name) with aligned offsets."""
    entries, offset = [], 0
    for s in sorted(sources, key=lambda s: s.name.encode("utf-8")):
        shape = tuple(int(d) for d in s.shape)
        size = nbytes(s.dtype, shape)
        entries.append(TensorEntry(s.name, s.dtype, shape, offset, size))
        offset += pad64(size)
    return entries


def _storage_bytes(arr: np.ndarray, entry: TensorEntry) -> memoryview:
    """The bytes of a data() result, after checking its dtype and length."""
    arr = np.asarray(arr)
    ok_dtype = arr.dtype == np.uint8 or (entry.dtype.numpy is not None and arr.dtype == entry.dtype.numpy)
    if not ok_dtype:
        raise AprError(f"tensor {entry.name!r}: data() returned {arr.dtype}, expected "
                       f"{entry.dtype.name} storage or uint8 bytes")
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if flat.size != entry.size:
        raise AprError(f"tensor {entry.name!r}: data() returned {flat.size} bytes, "
                       f"{entry.dtype.name} {list(entry.shape)} needs {entry.size}")
    return memoryview(flat)


class _CrcWriter:
    """Writes a file front to back while a thread computes the CRC32 of what is already on
    disk, read back from the written file (so the CRC is of the bytes the file holds, however
    they got there: written from memory, or copied from another file inside the kernel)."""

    _CHUNK = 8 << 20

    def __init__(self, f, path: Path):
        self.f, self.pos, self.crc = f, 0, 0
        self._done = 0                       # bytes flushed and handed to the CRC thread
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._reader = open(path, "rb", buffering=0)
        self._thread = threading.Thread(target=self._crc_loop, name="apr-crc", daemon=True)
        self._thread.start()

    def _crc_loop(self) -> None:
        buf = bytearray(self._CHUNK)
        at = 0
        try:
            while True:
                with self._cond:
                    while at >= self._done and not self._closed:
                        self._cond.wait()
                    end = self._done
                    if at >= end and self._closed:
                        return
                while at < end:
                    view = memoryview(buf)[:min(self._CHUNK, end - at)]
                    got = os.preadv(self._reader.fileno(), [view], at)
                    if got <= 0:
                        raise AprError("the output file shrank while it was written")
                    self.crc = zlib.crc32(view[:got], self.crc)
                    at += got
        except BaseException as e:     # handed to finish()
            self._error = e

    def _publish(self) -> None:
        self.f.flush()
        with self._cond:
            self._done = self.pos
            self._cond.notify()

    def write(self, data) -> None:
        self.f.write(data)
        self.pos += memoryview(data).nbytes
        if self.pos - self._done >= self._CHUNK:
            self._publish()

    def copy_from(self, span: tuple[Path, int], size: int) -> bool:
        """Copy ``size`` bytes of another file (from its offset) to the current position inside
        the kernel; False (nothing written) where the system cannot."""
        copy = getattr(os, "copy_file_range", None)
        if copy is None:
            return False
        self._publish()
        src_path, offset = span
        with open(src_path, "rb", buffering=0) as src:
            if os.fstat(src.fileno()).st_size < offset + size:
                raise FormatError(f"{src_path}: a tensor reaches past the end of the file")
            done = 0
            while done < size:
                try:
                    n = copy(src.fileno(), self.f.fileno(), size - done, offset + done, self.pos + done)
                except OSError:
                    if done == 0:
                        return False
                    raise
                if n == 0:
                    raise FormatError(f"{src_path}: file shrank while copying a tensor from it")
                done += n
        self.pos += size
        self.f.seek(self.pos)
        self._publish()
        return True

    def pad_to(self, pos: int) -> None:
        self.write(bytes(pos - self.pos))

    def finish(self) -> int:
        """The CRC32 of everything written (waits for the thread)."""
        self._publish()
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._reader.close()
        if self._error is not None:
            raise self._error
        return self.crc

    def abandon(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._reader.close()


def write_apr(path: str | os.PathLike, metadata: Mapping[str, Any],
              tensors: Iterable[TensorSource], flags: int = 0) -> None:
    """Write an APR v2 file atomically, streaming tensor data one tensor at a time.

    The index is built from names, dtypes and shapes before any data() is called; then each
    data() is called once, in index order, and written. Row-major (0x0400) is always set,
    has-vocabulary (0x0200) when metadata has `tokenizer.vocabulary`, quantized (0x0020) when
    a tensor dtype is quantized. On any error nothing is left at `path`.
    """
    sources = list(tensors)
    _check_sources(sources)
    if flags & (FLAG_LZ4 | FLAG_ZSTD | FLAG_ENCRYPTED | FLAG_COLUMN_MAJOR):
        raise AprError(f"flags 0x{flags:04x}: this writer cannot compress, encrypt or write "
                       "column-major files")
    entries = _plan(sources)
    by_name = {s.name: s for s in sources}
    meta = metadata_json(metadata)
    if len(meta) > MAX_METADATA_BYTES:
        raise AprError(f"metadata is {len(meta)} bytes, more than the 16 MiB APR allows")
    flags |= FLAG_ROW_MAJOR
    if "tokenizer.vocabulary" in metadata:
        flags |= FLAG_HAS_VOCAB
    if any(e.dtype.quantized for e in entries):
        flags |= FLAG_QUANTIZED
    index = b"".join(encode_entry(e) for e in entries)
    index_offset = HEADER_SIZE + pad64(len(meta))
    data_offset = index_offset + pad64(len(index))
    header = pack_header(flags, len(entries), len(meta), index_offset, data_offset)

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        w = _CrcWriter(f, tmp)
        try:
            w.write(header)
            w.write(meta)
            w.pad_to(index_offset)
            w.write(index)
            w.pad_to(data_offset)
            for e in entries:
                src = by_name[e.name]
                if src.span is None or not w.copy_from(src.span, e.size):
                    w.write(_storage_bytes(src.data(), e))
                w.pad_to(data_offset + e.offset + pad64(e.size))
                if src.written is not None:
                    src.written()
            crc = w.finish()
        except BaseException:
            w.abandon()
            raise
        f.write(crc.to_bytes(4, "little"))


# --------------------------------------------------------------------------- reader

def _describe_magic(head: bytes) -> str:
    """What a file that is not APR v2 appears to be, from its first bytes."""
    shown = f"magic {head[:4]!r} ({head[:4].hex(' ')})"
    if head.startswith(b"GGUF"):
        return f"{shown}; this looks like a GGUF file"
    if head.startswith(b"PK\x03\x04"):
        return f"{shown}; this looks like a zip archive (a PyTorch pickle checkpoint?)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"{shown}; this looks like a Python pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return f"{shown}; this looks like a safetensors file"
    if head.startswith(b"APR"):
        return f"{shown}; this looks like an APR file of another version"
    return shown


class AprFile:
    """An open APR v2 file: header, metadata and index are read at open, tensor data is
    memory-mapped on demand. Use `AprFile.open(path)`, ideally as a context manager."""

    def __init__(self, path: Path, header: tuple, metadata: dict[str, Any],
                 tensors: dict[str, TensorEntry], file_size: int, footer_crc: int):
        (_, major, minor, self.flags, _, _, self.metadata_size, self.index_offset,
         self.data_offset, self.header_crc, _) = header
        self.path = path
        self.version = (major, minor)
        self.metadata = metadata
        self.tensors = tensors
        self.file_size = file_size
        self.footer_crc_stored = footer_crc
        self._footer_crc_computed: int | None = None
        self._mm: np.memmap | None = None

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, metadata: bool = True) -> "AprFile":
        """Open and validate an APR v2 file (reads header, metadata and index only);
        ``metadata=False`` leaves the metadata JSON unparsed (`metadata` is then empty)."""
        path = Path(path)
        if path_kind(path) != "file":
            raise FormatError(f"{path}: no such file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_SIZE)
            header = _parse_header(path, head, size)
            metadata_size, index_offset, data_offset = header[6], header[7], header[8]
            f.seek(HEADER_SIZE)
            meta = _parse_metadata(path, f.read(metadata_size)) if metadata else {}
            f.seek(index_offset)
            index = f.read(data_offset - index_offset)
            f.seek(size - FOOTER_SIZE)
            footer = int.from_bytes(f.read(FOOTER_SIZE), "little")
        tensors = _parse_index(path, index, header[4], data_offset, size)
        return cls(path, header, meta, tensors, size, footer)

    # ---------------------------------------------------------------- data
    def _map(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise AprError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor, memory-mapped: typed with the logical shape for plain
        dtypes, flat uint8 for quantized ones."""
        e = self._entry(name)
        start = self.data_offset + e.offset
        flat = self._map()[start:start + e.size]
        if e.dtype.numpy is None:
            return flat
        return flat.view(e.dtype.numpy).reshape(e.shape)

    def array(self, name: str) -> np.ndarray:
        """A tensor's values (float32, or the integer dtype for integer tensors)."""
        e = self._entry(name)
        return decode(self.raw(name), e.dtype, e.shape)

    # ---------------------------------------------------------------- footer
    @property
    def footer_crc_computed(self) -> int:
        """CRC32 of every byte before the footer (computed once, in chunks)."""
        if self._footer_crc_computed is None:
            crc, left = 0, self.file_size - FOOTER_SIZE
            with open(self.path, "rb") as f:
                while left > 0:
                    chunk = f.read(min(_CRC_CHUNK, left))
                    if not chunk:
                        raise FormatError(f"{self.path}: file shrank while reading it")
                    crc = zlib.crc32(chunk, crc)
                    left -= len(chunk)
            self._footer_crc_computed = crc
        return self._footer_crc_computed

    def verify_footer(self) -> bool:
        """True when the stored footer CRC matches the file's bytes."""
        return self.footer_crc_computed == self.footer_crc_stored

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Drop this object's memory map (arrays already handed out stay valid)."""
        self._mm = None

    def __enter__(self) -> "AprFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AprFile({str(self.path)!r}, {len(self.tensors)} tensors)"


def verify(path: str | os.PathLike) -> AprFile:
    """Open a file and check its footer CRC too; raises ChecksumError on a mismatch."""
    f = AprFile.open(path)
    if not f.verify_footer():
        raise ChecksumError(f"{f.path}: footer CRC mismatch (stored 0x{f.footer_crc_stored:08X}, "
                            f"computed 0x{f.footer_crc_computed:08X})")
    return f


# --------------------------------------------------------------------------- parsing

def _parse_header(path: Path, head: bytes, size: int) -> tuple:
    """Validate the header against itself and the file size; returns its unpacked fields."""
    if len(head) >= 4 and head[:4] != MAGIC:
        raise FormatError(f"{path}: not an APR v2 file: {_describe_magic(head)}")
    if size < HEADER_SIZE + FOOTER_SIZE:
        raise FormatError(f"{path}: truncated: {size} bytes, shorter than the 64-byte header "
                          "plus the 4-byte footer")
    fields = _HEADER.unpack(head)
    (_, major, minor, flags, count, meta_off, meta_size, index_off, data_off, crc, _) = fields
    if major != VERSION[0]:
        raise FormatError(f"{path}: APR version {major}.{minor}; this reader handles 2.x")
    computed = _header_crc(head)
    if crc != computed:
        raise ChecksumError(f"{path}: header CRC mismatch (stored 0x{crc:08X}, "
                            f"computed 0x{computed:08X})")
    if flags & FLAG_COLUMN_MAJOR:
        raise FormatError(f"{path}: column-major layout flag (0x0800) is set; APR tensors must "
                          "be row-major (a dirty GGUF import?)")
    if flags & FLAG_ENCRYPTED:
        raise UnsupportedError(f"{path}: the file is encrypted (flag 0x0004); not supported")
    if flags & (FLAG_LZ4 | FLAG_ZSTD):
        raise UnsupportedError(f"{path}: the file is compressed (flags 0x{flags:04x}); "
                               "compressed APR files are not supported")
    if meta_off != HEADER_SIZE:
        raise FormatError(f"{path}: metadata offset is {meta_off}, must be 64")
    if meta_size > MAX_METADATA_BYTES:
        raise FormatError(f"{path}: metadata size {meta_size} bytes exceeds the 16 MiB limit")
    if index_off != HEADER_SIZE + pad64(meta_size):
        raise FormatError(f"{path}: tensor index offset is {index_off}, expected "
                          f"{HEADER_SIZE + pad64(meta_size)} (64 + padded metadata size)")
    if data_off < index_off or data_off % ALIGN:
        raise FormatError(f"{path}: data offset {data_off} is not a 64-aligned offset at or "
                          f"after the index offset {index_off}")
    if data_off > size - FOOTER_SIZE:
        raise FormatError(f"{path}: truncated: the data section starts at byte {data_off} but "
                          f"the file has {size} bytes")
    if count * _ENTRY_FIXED > data_off - index_off:
        raise FormatError(f"{path}: {count} tensors cannot fit in a {data_off - index_off}-byte "
                          "index")
    if data_off - index_off > pad64(count * _ENTRY_MAX):     # checked before the index is read
        raise FormatError(f"{path}: data offset {data_off} leaves a {data_off - index_off}-byte "
                          f"index, longer than {count} tensor entries can be")
    return fields


def _parse_metadata(path: Path, blob: bytes) -> dict[str, Any]:
    return load_json_object(blob, f"{path}: metadata", offset=HEADER_SIZE)


def _parse_entry(path: Path, buf: bytes, pos: int, k: int) -> tuple[TensorEntry, int]:
    """Parse index entry number k at buf[pos:]; returns it and the position after it."""
    where = f"{path}: tensor index entry {k}"
    if pos + 2 > len(buf):
        raise FormatError(f"{where} runs past the end of the index section")
    (name_len,) = struct.unpack_from("<H", buf, pos)
    if name_len > MAX_NAME_BYTES:
        raise FormatError(f"{where}: name length {name_len} exceeds {MAX_NAME_BYTES} bytes")
    if pos + 2 + name_len + 2 > len(buf):
        raise FormatError(f"{where} runs past the end of the index section")
    raw_name = buf[pos + 2:pos + 2 + name_len]
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{where}: name {raw_name!r} is not valid UTF-8") from None
    if not name:
        raise FormatError(f"{where}: empty tensor name")
    where = f"{path}: tensor {name!r}"
    pos += 2 + name_len
    code, ndim = buf[pos], buf[pos + 1]
    pos += 2
    if ndim > MAX_NDIM:
        raise FormatError(f"{where}: ndim {ndim} exceeds {MAX_NDIM}")
    if pos + 8 * ndim + 16 > len(buf):
        raise FormatError(f"{where}: index entry runs past the end of the index section")
    shape = struct.unpack_from(f"<{ndim}Q", buf, pos)
    offset, size = struct.unpack_from("<QQ", buf, pos + 8 * ndim)
    try:
        dtype = dtype_from_apr_code(code)
    except FormatError:
        raise FormatError(f"{where}: unknown dtype code {code}") from None
    return TensorEntry(name, dtype, tuple(shape), offset, size), pos + 8 * ndim + 16


def _check_entry(path: Path, e: TensorEntry, data_offset: int, file_size: int) -> None:
    where = f"{path}: tensor {e.name!r}"
    check_shape(e.shape, where)
    if e.offset % ALIGN:
        raise FormatError(f"{where}: offset {e.offset} is not a multiple of 64")
    try:
        expect = nbytes(e.dtype, e.shape)
    except UnsupportedError as err:
        raise FormatError(f"{where}: {err}") from None
    if e.size != expect:
        raise FormatError(f"{where}: size {e.size} bytes, but {e.dtype.name} "
                          f"{list(e.shape)} needs {expect}")
    end = data_offset + e.offset + e.size
    if end > file_size - FOOTER_SIZE:
        raise FormatError(f"{path}: truncated: tensor {e.name!r} ends at byte {end} but the "
                          f"file has {file_size} bytes (data must end before the 4-byte footer)")


def _parse_index(path: Path, buf: bytes, count: int, data_offset: int,
                 file_size: int) -> dict[str, TensorEntry]:
    """Parse and validate the whole index; entries keep their file order."""
    entries, pos = [], 0
    for k in range(count):
        entry, pos = _parse_entry(path, buf, pos, k)
        entries.append(entry)
    if pad64(pos) != len(buf):
        raise FormatError(f"{path}: data offset {data_offset} does not follow the {pos}-byte "
                          f"index (expected {data_offset - len(buf) + pad64(pos)})")
    for entry in entries:
        _check_entry(path, entry, data_offset, file_size)
    for a, b in zip(entries, entries[1:]):
        ka, kb = a.name.encode("utf-8"), b.name.encode("utf-8")
        if ka == kb:
            raise FormatError(f"{path}: duplicate tensor name {a.name!r} in the index")
        if kb < ka:
            raise FormatError(f"{path}: tensor index is not sorted: {b.name!r} comes after "
                              f"{a.name!r}")
    by_offset = sorted((e for e in entries if e.size), key=lambda e: e.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if a.offset + a.size > b.offset:
            raise FormatError(f"{path}: tensors {a.name!r} and {b.name!r} overlap in the data "
                              "section")
    return {e.name: e for e in entries}
