"""Where a reference model's parameters are while it runs.

A model whose parameters fit its memory budget holds them all, converted to the compute
dtype, in a dict (`ref.load.model_from_view`). One that does not gets a `StreamedWeights`:
the parameters stay in the file in their stored dtype (F32, BF16, F16, quantized blocks),
and a decoder layer's are converted (dequantized) when the layer runs and dropped when the
next layer starts. The two vocabulary-sized matrices are never converted whole: the
embedding gives the rows of the tokens asked for, the output projection blocks of rows
(`RowReader`). The model reads both kinds through the same Mapping (``params[name]``), and
the ops never know where a weight came from. On a GPU a layer's weights are copied to the
device when it runs.

Streamed values are the same numbers as loaded ones: each tensor is converted by the same
function (`TensorRef.numpy`), a row or a block of rows of it by the same elementwise
conversion, so logits, hidden states and decoded tokens are bit-identical.
"""
from __future__ import annotations

import math
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from apr import names
from apr.config import ModelConfig
from apr.errors import AprError

from .backend import Backend
from .memory import format_size

if TYPE_CHECKING:
    from apr.model import ModelView

EMBED, LM_HEAD = names.EMBED, names.LM_HEAD
# the output projection is multiplied a block of rows at a time, each at most this large
HEAD_BLOCK_BYTES = 32 << 20


@dataclass
class MemoryPlan:
    """How a model's parameters will be held, and why: ``streamed`` when their compute-dtype
    size exceeds the budget."""
    budget: int
    source: str              # where the budget came from ("--max-memory", "default: ...")
    total: int               # every parameter in the compute dtype
    largest_layer: int       # the largest decoder layer's parameters in the compute dtype
    head_block: int          # a block of the output projection's rows (`RowReader.blocks`)
    streamed: bool
    read_ahead: bool = True  # allow the next layer's read in a thread when two layers fit

    @classmethod
    def of(cls, config: ModelConfig, dtype: Any, budget: int, source: str,
           read_ahead: bool = True) -> "MemoryPlan":
        size = np.dtype(dtype).itemsize
        per_layer: dict[int | None, int] = {}
        for name, shape in config.tensor_shapes().items():
            layer = names.layer_of(name)
            per_layer[layer] = per_layer.get(layer, 0) + math.prod(shape) * size
        total = sum(per_layer.values())
        largest = max((n for layer, n in per_layer.items() if layer is not None), default=0)
        head = min(HEAD_BLOCK_BYTES, config.vocab_size * config.hidden_size * size)
        return cls(budget, source, total, largest, head, total > budget, read_ahead)

    @property
    def prefetch(self) -> bool:
        """Streamed with room for two layers: the next layer is read and converted in a
        thread while this one runs."""
        return self.streamed and self.read_ahead and \
            2 * self.largest_layer + self.head_block <= self.budget

    @property
    def peak_weights(self) -> int:
        """Weight bytes held at once: all of them, or one layer (two when prefetching) plus a
        block of the output projection."""
        if not self.streamed:
            return self.total
        return (2 if self.prefetch else 1) * self.largest_layer + self.head_block

    def describe(self) -> str:
        what = (f"parameters {format_size(self.total)} > budget {format_size(self.budget)} "
                f"({self.source}): streamed from the file a layer at a time"
                f"{' (the next read ahead)' if self.prefetch else ''}, about "
                f"{format_size(self.peak_weights)} of weights held at once"
                if self.streamed else
                f"parameters {format_size(self.total)} within budget {format_size(self.budget)} "
                f"({self.source}): held in memory")
        if self.streamed and self.largest_layer > self.budget:
            what += f" (one layer, {format_size(self.largest_layer)}, is more than the budget)"
        return "memory: " + what


class RowReader:
    """A (rows, columns) matrix of the file, read a row or a block of rows at a time in the
    compute dtype: ``reader[ids]`` gathers rows (an embedding lookup), ``blocks()`` yields
    consecutive blocks (an output projection)."""

    def __init__(self, ref, backend: Backend, dtype: Any):
        self.ref, self.backend, self.dtype = ref, backend, np.dtype(dtype)
        self.shape = tuple(ref.shape)
        self.ndim = len(self.shape)

    def __getitem__(self, ids: Any) -> Any:
        host = np.asarray(self.backend.to_numpy(ids)).astype(np.int64, copy=False)
        unique, inverse = np.unique(host.reshape(-1), return_inverse=True)
        rows = np.empty((len(unique), self.shape[1]), dtype=self.dtype)
        for j, i in enumerate(unique.tolist()):
            rows[j] = self.ref.numpy_rows(i, i + 1, self.dtype)[0]
        return self.backend.to_device(rows[inverse.reshape(host.shape)], self.dtype)

    def blocks(self) -> Iterator[Any]:
        """Consecutive blocks of rows, in order, each at most HEAD_BLOCK_BYTES, on the device."""
        n, width = self.shape
        step = max(1, HEAD_BLOCK_BYTES // max(1, width * self.dtype.itemsize))
        for start in range(0, n, step):
            yield self.backend.to_device(self.ref.numpy_rows(start, min(n, start + step), self.dtype),
                                         self.dtype)


class HostBuffers:
    """Host arrays handed back by a layer that is done, kept for the next layer of the same
    shapes. A fresh array costs a page fault per page on first write, which takes longer than
    the conversion itself (a 470 MB float32 matrix from BF16: 0.20 s into a new array, 0.045 s
    into one used before), and a streamed forward converts the whole model. An array is taken
    back only when nothing but the caller holds it, so a weight someone kept is never
    overwritten."""
    # references to an array given back that nothing else holds: give()'s argument, the
    # caller's variable, and getrefcount's own argument
    SOLE_REFERENCES = 3

    def __init__(self) -> None:
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.reused = 0                # arrays handed out again (tests)

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        key = (tuple(shape), np.dtype(dtype))
        with self._lock:
            free = self._free.get(key)
            if free:
                self.reused += 1
                return free.pop()
        return np.empty(key[0], key[1])

    def give(self, array: Any) -> None:
        if not isinstance(array, np.ndarray) or array.base is not None \
                or sys.getrefcount(array) > self.SOLE_REFERENCES:
            return                     # a view, a device array, or held elsewhere: dropped
        with self._lock:
            self._free.setdefault((array.shape, array.dtype), []).append(array)


# stored dtypes `decode` writes into a given float32 array (others decode into new arrays)
INTO_DTYPES = ("F32", "F16", "BF16")


class StreamedWeights(Mapping):
    """The parameters of ``config.tensor_shapes()`` read from ``view`` when used: a decoder
    layer's converted on first use and kept until a parameter of another layer is asked for;
    the embedding and output projection as `RowReader`s; the rest (the final norm) converted
    once. With ``prefetch``, the next layer (after the last, the first: the next decode
    step's) is converted in a thread while this one runs. Read-only: a streamed model is for
    inference."""
    streamed = True             # what `ref.model.Model` asks of its parameters

    def __init__(self, view: "ModelView", config: ModelConfig, backend: Backend, dtype: Any,
                 prefetch: bool = False):
        self.view, self.config, self.backend, self.dtype = view, config, backend, np.dtype(dtype)
        self.shapes = config.tensor_shapes()
        missing = [n for n in self.shapes if n not in view.tensors]
        if missing:
            raise AprError(f"parameters do not match the config: missing {len(missing)} "
                           f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        self.layer_of = {name: names.layer_of(name) for name in self.shapes}
        self.layer_names: dict[int, list[str]] = {}
        for name, layer in self.layer_of.items():
            if layer is not None:
                self.layer_names.setdefault(layer, []).append(name)
        self.readers = {name: RowReader(view.tensors[name], backend, dtype)
                        for name in (EMBED, LM_HEAD) if name in self.shapes}
        self.resident = {name: self._convert(name) for name, layer in self.layer_of.items()
                         if layer is None and name not in self.readers}
        self.layer: int | None = None        # the layer whose parameters are in `current`
        self.current: dict[str, Any] = {}
        self.loads = 0                       # layers converted so far (tests, progress)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weights") if prefetch else None
        self._ahead: tuple[int, Future] | None = None     # (layer, its conversion under way)
        self.buffers = HostBuffers()
        # one read buffer serves every tensor of a layer: the largest one's size
        self.scratch_bytes = max((view.tensors[n].nbytes for group in self.layer_names.values()
                                  for n in group), default=0)

    def _convert(self, name: str, reuse: bool = False) -> Any:
        """``name``'s parameter in the compute dtype on the device; with ``reuse``, read and
        decoded into host buffers used before (a decoder layer's, given back on leaving it)."""
        ref = self.view.tensors[name]
        if not (reuse and self.dtype == np.float32 and ref.dtype.name in INTO_DTYPES
                and ref.file_span is not None):
            return self.backend.to_device(ref.numpy(self.dtype, order="stored"), self.dtype)
        scratch = self.buffers.take((self.scratch_bytes,), np.uint8)
        out = self.buffers.take(ref.shape, np.float32)
        host = ref.numpy(self.dtype, order="stored", out=out, scratch=scratch)
        self.buffers.give(scratch)
        if host is not out:                  # a new array (a stored offset subtracted)
            self.buffers.give(out)
        scratch = out = None
        device = self.backend.to_device(host, self.dtype)
        if device is not host:               # copied to the device: the host array is free
            self.buffers.give(host)
        return device

    def _load(self, layer: int) -> dict[str, Any]:
        return {name: self._convert(name, reuse=True) for name in self.layer_names[layer]}

    def _release(self) -> None:
        """Leave the current layer: its arrays go back to `buffers` (those nothing else holds)."""
        done, self.current = self.current, {}
        while done:
            array = done.popitem()[1]
            self.buffers.give(array)
            array = None

    def _enter(self, layer: int) -> None:
        self._release()                      # the previous layer's arrays go before the next come
        self.layer = None
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == layer:
            self.current = ahead[1].result()     # its error, if any, raised here
        else:
            if ahead is not None:            # another layer was asked for: let that one finish
                ahead[1].cancel() or ahead[1].exception()
            self.current = self._load(layer)
        self.layer = layer
        self.loads += 1
        if self._pool is not None:
            following = (layer + 1) % self.config.num_layers
            self._ahead = (following, self._pool.submit(self._load, following))

    def __getitem__(self, name: str) -> Any:
        if name in self.resident:
            return self.resident[name]
        if name in self.readers:
            return self.readers[name]
        layer = self.layer_of[name]          # KeyError for a name the config does not have
        if layer != self.layer:
            self._enter(layer)
        return self.current[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)
