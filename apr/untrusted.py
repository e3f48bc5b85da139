"""Typed access to values read from files: every value from APR metadata, GGUF key/values,
config.json, tokenizer.json or a safetensors header is checked for its type and range here
before it is used, so a wrong one is one error that names the file, the key and what was
expected."""
from __future__ import annotations

import math
from typing import Any, Mapping

from .errors import ConfigError

# Counts and sizes beyond this are not a model a reference can run (and would wrap int64).
MAX_SIZE = 2 ** 31 - 1

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
        if kind is str and all(type(x) is str for x in value):     # the common case, fast
            return list(value)
        if kind is int and all(type(x) is int for x in value) and \
                (not value or -MAX_SIZE <= min(value) and max(value) <= MAX_SIZE):
            return list(value)
        return [check_value(x, kind, f"{key}[{i}]", self.where) for i, x in enumerate(value)]

    def token_id(self, key: str, count: int) -> int | None:
        """An optional token id, which must lie in [0, count)."""
        value = self.get(key, int)
        if value is not None and not 0 <= value < count:
            raise ConfigError(f"{self.where}: {key} = {value} is outside the vocabulary [0, {count})")
        return value
