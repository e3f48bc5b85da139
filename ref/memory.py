"""Memory sizes: the machine's available memory, the budget a command may use, and sizes as
people write them ("4G", "512MiB", "1.5GB").

Every command that runs a model takes ``--max-memory SIZE``; without it the budget is
`default_budget()`, derived from the memory the machine has available when the command
starts, and the command says which it took (`describe_budget`)."""
from __future__ import annotations

import os
import re

from apr.errors import AprError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]?)(i?b?)\s*", re.IGNORECASE)
# the share of the available memory a command takes by default: the rest is the page cache
# the memory-mapped weights are read through, and whatever else the machine runs
DEFAULT_SHARE = 0.5
MIN_BUDGET = 64 << 20


def parse_size(text: str) -> int:
    """Bytes from "123", "64M", "4G", "4GiB", "1.5GB", "2t" (binary units: K = 1024)."""
    m = _SIZE.fullmatch(text or "")
    if not m:
        raise AprError(f"memory size {text!r}: expected a number with an optional unit "
                       "(K, M, G, T; e.g. 512M or 4G)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 0 < value < 1 << 60:
        raise AprError(f"memory size {text!r} is out of range")
    return int(value)


def format_size(n: float) -> str:
    """1536 -> "1.5 KiB", 3 * 2**30 -> "3.0 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"       # pragma: no cover (the loop returns at GiB)


def proc_bytes(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a /proc file in bytes (None where there is no such file or
    line: another system)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int:
    """Bytes of memory the machine can give without swapping: MemAvailable of
    /proc/meminfo, else the physical memory (sysconf), else 4 GiB where neither is known."""
    avail = proc_bytes("/proc/meminfo", "MemAvailable")
    if avail is not None:
        return avail
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def resolve_budget(text: str | None) -> tuple[int, str]:
    """(bytes, where it came from) for a --max-memory value or None (the default)."""
    if text is None:
        avail = available_memory()
        return (max(MIN_BUDGET, int(avail * DEFAULT_SHARE)),
                f"default: {DEFAULT_SHARE:.0%} of the {format_size(avail)} available")
    return parse_size(text), "--max-memory"
