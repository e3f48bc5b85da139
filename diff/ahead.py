"""Byte comparisons done ahead, in a child process, while this process opens both files.

Opening two large files is mostly Python work (a GGUF's 150k-token vocabulary, an APR's
metadata JSON, both tokenizers) and comparing them is mostly memory traffic. On a machine
with two cores the two can only run side by side in two processes: one interpreter runs one
thread of Python at a time. So `compare` forks a child first. The child reads where the
tensors lie from the files' indexes alone (`apr.model.stored_spans`: an APR's index, a
GGUF's tensor infos, safetensors headers), pairs A's and B's tensors by canonical name, and
compares each pair's stored bytes. It sends its plan (the pairs' files and byte ranges, in
model order, as JSON), then one byte per pair as it goes: equal, different, or unreadable.

The answers are facts about byte ranges, so a plan that differs from what the full open
finds (a name mapped differently, a permuted Q/K) costs only wasted work: `equal` answers
only for the exact ranges of the two tensors it is asked about, and None for anything it has
no answer to, a child that failed, or a range it could not read (the caller then reads and
compares itself, and reports a truncated file as it always does). Nothing in the child can
reach the terminal: its output goes nowhere and it ends with `os._exit`.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import sys
import threading
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from apr.errors import AprError
from apr.model import TensorRef, detect_format, stored_spans
from apr.safetensors_io import hf_weight_files

from .reader import BLOCK_VALUES
from .tensors import model_order

EQUAL, DIFFERENT, UNREADABLE = 1, 0, 2
BLOCK = 2 * BLOCK_VALUES            # bytes per read: both blocks stay in the CPU cache
MIN_BYTES = 64 << 20                # below this, a fork costs more than it saves
MAX_PLAN_BYTES = 1 << 26            # about 400,000 pairs; a longer plan is sent empty
_LENGTH = struct.Struct("<Q")       # the plan's length in bytes, then the plan as JSON


Pair = tuple[str, int, str, int, int]     # A's file, offset, B's file, offset, bytes


def plan(a_path: Path, b_path: Path) -> list[Pair]:
    """Where the bytes of every name both models hold in the same dtype and size lie, in
    model order."""
    sa, sb = stored_spans(a_path), stored_spans(b_path)
    pairs = []
    for name in sorted(sa.keys() & sb.keys(), key=model_order):     # as compare_tensors asks
        x, y = sa[name], sb[name]
        if x.nbytes == y.nbytes and x.dtype == y.dtype and x.nbytes:
            pairs.append((str(x.path), x.offset, str(y.path), y.offset, x.nbytes))
    return pairs


def equal_spans(fa, fb, oa: int, ob: int, n: int, bufs: tuple[bytearray, bytearray]) -> int:
    """Whether n bytes at oa in fa equal n bytes at ob in fb: read block by block into two
    buffers and compared with memcmp (a bytearray's ==); UNREADABLE on a short read."""
    ba, bb = bufs
    fa.seek(oa)
    fb.seek(ob)
    while n > 0:
        k = min(n, BLOCK)
        if k < BLOCK:
            ba, bb = bytearray(k), bytearray(k)
        if fa.readinto(ba) != k or fb.readinto(bb) != k:
            return UNREADABLE
        if ba != bb:
            return DIFFERENT
        n -= k
    return EQUAL


def _child(a_path: Path, b_path: Path, w: int) -> None:
    """The child's whole life: plan, then answer pair by pair."""
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
    sys.stdout = sys.stderr = open(os.devnull, "w")
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    out = os.fdopen(w, "wb")            # buffered: a write of any size goes out whole
    try:
        pairs = plan(a_path, b_path)
    except Exception:                   # the full open reports what is wrong
        pairs = []
    text = json.dumps(pairs).encode("utf-8")
    if len(text) > MAX_PLAN_BYTES:
        pairs, text = [], b"[]"
    out.write(_LENGTH.pack(len(text)) + text)
    out.flush()
    bufs = (bytearray(BLOCK), bytearray(BLOCK))
    with ExitStack() as files:
        handles: dict[str, Any] = {}

        def handle(path: str):
            if path not in handles:
                handles[path] = files.enter_context(open(path, "rb", buffering=0))
            return handles[path]
        for pa, oa, pb, ob, n in pairs:
            try:
                answer = equal_spans(handle(pa), handle(pb), oa, ob, n, bufs)
            except OSError:
                answer = UNREADABLE
            out.write(bytes((answer,)))
            out.flush()


def _pair(p: Any) -> Pair:
    """A plan entry as the child wrote it, checked for its shape (else TypeError)."""
    if not (isinstance(p, list) and len(p) == 5 and isinstance(p[0], str) and isinstance(p[2], str)
            and all(type(p[k]) is int and p[k] >= 0 for k in (1, 3, 4))):
        raise TypeError(f"not a plan entry: {p!r}")
    return tuple(p)


def _weight_bytes(path: Path) -> int:
    """The size of a model file, or of an HF directory's weight files."""
    if detect_format(path) == "hf":
        return sum(f.stat().st_size for f in hf_weight_files(path))
    return path.stat().st_size


def others_running() -> bool:
    """Whether another Python thread runs in this process. A child forked beside one could
    inherit a lock that thread holds and wait on it forever, so there is no child then."""
    return threading.active_count() > 1


class BytesAhead:
    """A child process comparing A's and B's tensor bytes; `equal` asks it about one pair.
    (`start` decides whether there is one.)"""

    def __init__(self, a_path: Path, b_path: Path):
        r, w = os.pipe()
        try:
            self.pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            raise
        if self.pid == 0:                                   # the child
            try:
                os.close(r)
                _child(a_path, b_path, w)
            finally:
                os._exit(0)
        os.close(w)
        self._pipe = os.fdopen(r, "rb", buffering=0)
        self._index: dict[Pair, int] | None = None
        self._answers = bytearray()
        self.used = 0                                       # answers handed out

    @classmethod
    def start(cls, a_path, b_path) -> "BytesAhead | None":
        """A child for two large models, or None where a fork is unavailable or unsafe
        (another thread is running) or not worth it."""
        a, b = Path(a_path), Path(b_path)
        if not hasattr(os, "fork") or others_running():
            return None
        try:
            if _weight_bytes(a) + _weight_bytes(b) < MIN_BYTES:
                return None
        except (OSError, AprError):         # the open says what is wrong
            return None
        try:
            return cls(a, b)
        except OSError:                     # no process or pipe to be had: compared here
            return None

    def _read(self, n: int) -> bytes | None:
        data = bytearray()
        while len(data) < n:
            got = self._pipe.read(n - len(data))
            if not got:
                return None
            data += got
        return bytes(data)

    def _plan(self) -> dict[Pair, int]:
        if self._index is None:
            self._index = {}
            head = self._read(_LENGTH.size)
            size = _LENGTH.unpack(head)[0] if head else 0
            body = self._read(size) if 0 < size <= MAX_PLAN_BYTES else None
            try:
                pairs = json.loads(body) if body else []
                self._index = {_pair(p): i for i, p in enumerate(pairs)}
            except (ValueError, TypeError):
                self._index = {}
        return self._index

    def equal(self, ra: TensorRef, rb: TensorRef) -> bool | None:
        """Whether A's `ra` and B's `rb` store equal bytes, if the child compared exactly those
        ranges and could read them; else None."""
        if ra.file_span is None or rb.file_span is None or ra.nbytes != rb.nbytes:
            return None
        (pa, oa), (pb, ob) = ra.file_span, rb.file_span
        i = self._plan().get((str(pa), oa, str(pb), ob, ra.nbytes))
        if i is None:
            return None
        while len(self._answers) <= i:
            got = self._pipe.read(i + 1 - len(self._answers))
            if not got:                                     # the child ended early
                return None
            self._answers += got
        answer = self._answers[i]
        if answer == UNREADABLE:
            return None
        self.used += 1
        return answer == EQUAL

    def close(self) -> None:
        """Stop the child (if still working) and reap it."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.pid = 0
            self._pipe.close()

    def __enter__(self) -> "BytesAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
