"""Typed access to values read from files: every value from APR metadata, GGUF key/values,
config.json, tokenizer.json or a safetensors header is checked for its type and range here
before it is used, so a wrong one is one error that names the file, the key and what was
expected."""
from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, FormatError

# Counts and sizes beyond this are not a model a reference can run (and would wrap int64).
MAX_SIZE = 2 ** 31 - 1
# Elements of one tensor: 8-byte elements of this many still have a size numpy can hold.
MAX_ELEMENTS = 2 ** 59
# Byte offsets and byte sizes in a file are 64-bit (a published shard holds 2-5 GB); each
# reader also checks them against the file's real size (`check_offset`).
MAX_OFFSET = 2 ** 63 - 1

_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list", dict: "an object"}


def describe(value: Any, limit: int = 60) -> str:
    """A short repr of an untrusted value, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_value(value: Any, kind: type, key: str, where: str) -> Any:
    """``value`` as ``kind`` (int, float, bool, str, list, dict), or a ConfigError. An int
    is no bool, a float is any finite int or float, and every size lies in [0, MAX_SIZE]."""
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, (list, tuple)),
        dict: isinstance(value, Mapping),
    }[kind]
    if not ok:
        raise ConfigError(f"{where}: {key} is {describe(value)}, expected {_KIND_NAMES[kind]}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {key} is {value}, expected a finite number")
    if kind is int and not -MAX_SIZE <= value <= MAX_SIZE:
        raise ConfigError(f"{where}: {key} = {value} is out of range (|value| <= {MAX_SIZE})")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

# No format this tool reads nests deeper than a few levels (a tokenizer.json's Sequence of
# pre-tokenizers: 4) or holds an integer of more than 20 digits (2^64); a deeper document or a
# longer integer is hostile. Past these bounds Python's own limits raise errors no reader
# expects (RecursionError, the 4,300-digit limit of int(), OverflowError in float()).
MAX_JSON_DEPTH = 100
MAX_JSON_DIGITS = 100


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_DIGITS:
        raise FormatError(f"an integer of {len(digits.lstrip('-'))} digits (at most "
                          f"{MAX_JSON_DIGITS})")
    return int(digits)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise FormatError(f"the key {describe(key)} appears twice in one object (readers "
                          "disagree on which value counts)")
    return obj


def nested_too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the arrays and objects of a JSON text (as UTF-8 bytes) nest more than ``limit``
    deep (brackets inside strings do not count), found without parsing it: a few array
    operations over its bytes, so that no parser and no walk over the parsed document ever
    recurses that deep."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    import numpy as np
    if b"\\" in raw:      # an escape is two bytes: an escaped quote or backslash is blanked
        raw = raw.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    marks = np.frombuffer(raw.translate(_BRACKETS, _NOT_STRUCTURE), np.uint8)   # " [ ]
    quote = marks == 0x22
    outside = (np.cumsum(quote, dtype=np.int64) & 1 == 0) & ~quote
    steps = np.where(marks[outside] == 0x5B, 1, -1)
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')
_DIGIT_FLAGS = bytes(0x31 if 0x30 <= c <= 0x39 else 0x30 for c in range(256))


def _may_hold_long_integer(raw: bytes) -> bool:
    """A run of more than `MAX_JSON_DIGITS` digits somewhere (in a string, too): only then
    does the parser check each integer's length (a call per integer)."""
    return b"1" * (MAX_JSON_DIGITS + 1) in raw.translate(_DIGIT_FLAGS)


def load_json(text: str, where: str) -> Any:
    """A JSON document from untrusted text -- every JSON this tool reads goes through here.
    Invalid JSON, a byte-order mark, nesting deeper than `MAX_JSON_DEPTH`, an integer of more
    than `MAX_JSON_DIGITS` digits, a key twice in one object, or a string with a lone
    surrogate (not Unicode: no output can print it, no writer store it) is one FormatError
    naming ``where``."""
    raw = text.encode("utf-8", "surrogatepass")
    if nested_too_deep(raw):
        raise FormatError(f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    hooks: dict[str, Any] = {"object_pairs_hook": _unique_keys}
    if _may_hold_long_integer(raw):
        hooks["parse_int"] = _bounded_int
    try:
        doc = json.loads(text, **hooks)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: not valid JSON: {e.msg} at character {e.pos}") from None
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply") from None
    except (ValueError, TypeError) as e:     # any other refusal of the parser
        raise FormatError(f"{where}: not valid JSON: {describe(str(e), 120)}") from None
    if _SURROGATE_ESCAPE.search(text):       # the common case never pays for the walk below
        stack = [doc]
        while stack:
            x = stack.pop()
            if isinstance(x, str):
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    raise FormatError(f"{where}: the string {describe(x)} is not valid Unicode "
                                      "(a lone surrogate escape)") from None
            elif isinstance(x, dict):
                stack.extend(x)
                stack.extend(x.values())
            elif isinstance(x, list):
                stack.extend(x)
    return doc


def load_json_object(blob: bytes, where: str, offset: int = 0) -> dict[str, Any]:
    """A JSON object from untrusted bytes (a header or metadata section that starts at byte
    ``offset`` of its file): bytes that are not UTF-8, any error of `load_json`, or a document
    that is no object is one FormatError naming ``where`` (and, for UTF-8, the file's byte)."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where} is not valid UTF-8 (byte {offset + e.start})") from None
    doc = load_json(text, where)
    if not isinstance(doc, dict):
        raise FormatError(f"{where} is a JSON {type(doc).__name__}, not an object")
    return doc


def path_kind(path: str | os.PathLike) -> str | None:
    """"file", "dir" or None (nothing there). Anything else that is there -- a FIFO, socket or
    device (reading one blocks or never ends), a symbolic link loop -- is a FormatError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FormatError(f"{path}: a symbolic link to nothing ({os.readlink(path)})") from None
        return None
    except OSError as e:            # ELOOP, ENAMETOOLONG, EACCES, ...
        raise FormatError(f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    raise FormatError(f"{path}: not a regular file or directory (FIFOs, sockets and devices are "
                      "never read)")


def is_file(path: str | os.PathLike) -> bool:
    """True for a regular file, False for nothing there; a FormatError for anything else
    (so an optional file that is a FIFO or a directory is an error, not silently absent)."""
    kind = path_kind(path)
    if kind == "dir":
        raise FormatError(f"{path}: a directory where a file belongs")
    return kind == "file"


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a regular file (``what`` it is names it when it is missing)."""
    path = Path(path)
    if not is_file(path):
        raise FormatError(f"{path.parent}: no {path.name} ({what})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FormatError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_offset(value: Any, key: str, where: str, limit: int = MAX_OFFSET) -> int:
    """A byte offset or byte size read from a file, as an int (no bool) in [0, ``limit``]:
    a reader passes the size of the region the bytes must lie in (the file, its data
    section), not a plausibility bound, so a 5 GB shard's offsets pass and a value past the
    end of the file is one FormatError naming ``where`` and ``key``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{where}: {key} is {describe(value)}, expected a byte offset (an integer)")
    if not 0 <= value <= min(limit, MAX_OFFSET):
        raise FormatError(f"{where}: {key} = {value} is outside [0, {min(limit, MAX_OFFSET)}]")
    return value


def check_shape(shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """A tensor shape read from a file: every dimension in [0, MAX_SIZE], so that no product
    of dimensions wraps an int64 (a zero beside a 2^63 would pass every size check), and the
    product of its nonzero dimensions within what an array can hold (numpy refuses to shape
    even an empty array as [2^31 - 1, 2^31 - 1, 0])."""
    for d in shape:
        if not 0 <= d <= MAX_SIZE:
            raise FormatError(f"{where}: shape {list(shape)} has a dimension outside "
                              f"[0, {MAX_SIZE}]")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise FormatError(f"{where}: shape {list(shape)} has more than {MAX_ELEMENTS} elements "
                          "(its nonzero dimensions' product, empty or not)")
    return shape


class Values:
    """Typed getters over one untrusted mapping (``where`` names it in messages)."""

    def __init__(self, data: Mapping[str, Any], where: str):
        self.data = data
        self.where = where

    def get(self, key: str, kind: type, default: Any = None) -> Any:
        """The value of ``key`` checked as ``kind``; ``default`` when absent; None when null."""
        if key not in self.data:
            return default
        value = self.data[key]
        if value is None:
            return None
        return check_value(value, kind, key, self.where)

    def items(self, key: str, kind: type, default: Any = None) -> list | None:
        """A list whose every element is ``kind``; ``default`` when absent or null."""
        value = self.get(key, list)
        if value is None:
            return default
        found = set(map(type, value))       # the common case, a type test per element in C
        if kind is str and found <= {str}:
            return list(value)
        if kind is float and found <= {float} and all(map(math.isfinite, value)):
            return list(value)
        if kind is int and found <= {int} and \
                (not value or -MAX_SIZE <= min(value) and max(value) <= MAX_SIZE):
            return list(value)
        return [check_value(x, kind, f"{key}[{i}]", self.where) for i, x in enumerate(value)]

    def token_id(self, key: str, count: int) -> int | None:
        """An optional token id, which must lie in [0, count)."""
        value = self.get(key, int)
        if value is not None and not 0 <= value < count:
            raise ConfigError(f"{self.where}: {key} = {value} is outside the vocabulary [0, {count})")
        return value
