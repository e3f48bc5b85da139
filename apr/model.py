"""The canonical model view: one shape for an APR file, a GGUF file, a .safetensors file
or an HF directory.

    view = open_model("model.gguf")
    view.config            # ModelConfig (None for a container that holds no model)
    view.tokenizer         # TokenizerData or None
    view.tensors["model.layers.0.self_attn.q_proj.weight"].numpy(order="hf")

Tensors are keyed by canonical HF name with their HF shape, their stored dtype, and their
layout as stored (for example GGUF llama rotary order). Nothing is read until asked for.
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import names
from .config import Mismatch, ModelConfig
from .container import AprFile
from .dtypes import DTYPES as DTYPES_BY_NAME, DType, _as_bytes, decode, nbytes as stored_nbytes
from .errors import AprError, AprWarning, ConfigError, FormatError
from .gguf_io import GgufFile
from .layout import adjacent_to_halves
from .safetensors_io import SafetensorsFile, hf_weight_files, read_json
from .tokenizer import TokenizerData, from_apr_metadata, from_gguf_kv, from_hf_dir
from .untrusted import is_file, load_json, path_kind

FORMATS = ("apr", "gguf", "safetensors", "hf")


@dataclass
class TensorRef:
    name: str                       # canonical name (HF for model tensors)
    dtype: DType                    # as stored
    shape: tuple[int, ...]          # HF row-major shape
    layout: str                     # how the data sits in the file (names.LAYOUT_*)
    source_name: str                # the name in the file
    nbytes: int
    _raw: Callable[[], np.ndarray] = field(repr=False)
    rotary_heads: int | None = None  # rows in adjacent-pair rotary order, permuted with this head count
    # (file, absolute byte offset) when the stored bytes are one contiguous range of a file
    file_span: tuple[Path, int] | None = field(default=None, repr=False)
    # the lossy dtype these values were dequantized from by an earlier conversion (recorded in
    # the file's metadata): their rounding is that dtype's, not the stored one's
    origin_dtype: DType | None = None
    # the file stores value + offset (a Gemma norm weight that llama.cpp folds into 1 + w);
    # `numpy` gives the values, raw() and read() the stored data
    offset: float = 0.0

    @property
    def precision(self) -> str:
        """Name of the dtype whose rounding bounds these values (origin, else stored)."""
        return (self.origin_dtype or self.dtype).name

    def raw(self) -> np.ndarray:
        """Stored data, no copy: typed array with the HF shape, or flat uint8 for block types
        (a view of the memory-mapped file)."""
        return self._raw()

    def read(self, into: np.ndarray | None = None) -> np.ndarray:
        """Stored data like `raw()`, but as a private copy read from the file. Streaming code
        uses it so that pages of a large file do not stay resident once a tensor is done.
        ``into``: a flat uint8 buffer of at least `nbytes` to read into (used again)."""
        if self.file_span is None:
            return np.array(self._raw())
        flat = self._read_span(0, self.nbytes, into)
        if self.dtype.numpy is None:
            return flat
        return flat.view(self.dtype.numpy).reshape(self.shape)

    def _read_span(self, start: int, size: int, into: np.ndarray | None = None) -> np.ndarray:
        """``size`` stored bytes from byte ``start`` of the tensor, read from its file (into
        the first ``size`` bytes of ``into`` where given)."""
        path, offset = self.file_span
        flat = np.empty(size, dtype=np.uint8) if into is None else into[:size]
        with open(path, "rb", buffering=0) as f:
            got = f.readinto(flat) if f.seek(offset + start) == offset + start else 0
        if got != size:
            raise FormatError(f"{path}: tensor {self.source_name!r} is truncated")
        return flat

    def numpy_rows(self, start: int, stop: int, dtype=np.float32) -> np.ndarray:
        """Rows ``start`` .. ``stop`` - 1 of a 2-D tensor, decoded as `numpy` decodes them
        (stored row order), reading only those rows' bytes where the storage keeps rows apart
        (plain dtypes, GGML blocks, APR_Q4 with whole blocks per row); the same values as
        ``numpy(dtype)[start:stop]``."""
        rows, width = self.shape
        one = stored_nbytes(self.dtype, (1, width))
        if one * rows != self.nbytes:            # blocks or a scale that span rows (APR_Q8)
            return self.numpy(dtype)[start:stop]
        if self.file_span is not None:
            data = self._read_span(start * one, (stop - start) * one)
        else:
            data = _as_bytes(self._raw())[start * one:stop * one]
        values = decode(data, self.dtype, (stop - start, width))
        if dtype is not None and values.dtype != dtype:
            values = values.astype(dtype)
        if self.offset:
            values = values - values.dtype.type(self.offset)
        return values

    def numpy(self, dtype=np.float32, order: str = "stored", out: np.ndarray | None = None,
              scratch: np.ndarray | None = None) -> np.ndarray:
        """Decoded values with the HF shape. order="hf" undoes a stored rotary permutation so
        the rows are in HF order; order="stored" keeps the file's row order. ``out`` (float32,
        the HF shape) and ``scratch`` (flat uint8, at least `nbytes`): buffers to decode and
        read into, used again by streaming code (see `decode`; the result may be ``out``)."""
        if order not in ("stored", "hf"):
            raise ValueError(f"order must be 'stored' or 'hf', not {order!r}")
        values = decode(self.read(scratch), self.dtype, self.shape, out)
        if dtype is not None and values.dtype != dtype:
            values = values.astype(dtype)
        if self.offset:
            values = values - values.dtype.type(self.offset)
        if order == "hf" and self.rotary_heads:
            values = adjacent_to_halves(values, self.rotary_heads)
        return values

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class ModelView:
    path: Path
    format: str
    config: ModelConfig | None
    tokenizer: TokenizerData | None
    metadata: dict[str, Any]
    tensors: dict[str, TensorRef]
    training: dict[str, TensorRef] = field(default_factory=dict)   # APR __training__. tensors
    info: dict[str, Any] = field(default_factory=dict)             # version, checksums, size...
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    declared_tied: bool | None = None    # the file says tied embeddings (None: no config)
    _pending_checks: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def verified(self) -> None:
        """Wait for checks started by ``open_model(verify="background")``; raise on a failure."""
        for check in self._pending_checks:
            check()

    def close(self) -> None:
        for c in self._closers:
            c()
        self._closers.clear()

    def __enter__(self) -> "ModelView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def mismatches(self) -> list[Mismatch]:
        """Every way this view's tensors differ from its config (missing, wrong shape, not
        implied), and a declared tie the stored lm_head breaks; each caller decides whether
        to raise or report. Empty without a config."""
        if self.config is None:
            return []
        found = self.config.mismatches({n: r.shape for n, r in self.tensors.items()})
        if self.declared_tied and not self.config.tie_word_embeddings:
            found.append(Mismatch("tied", names.LM_HEAD))
        return found

    def check_runnable(self) -> ModelConfig:
        """The config, if every tensor it implies is there with its shape; else the first
        mismatch as a ConfigError naming the file."""
        config = self.require_config()
        for m in self.mismatches():
            if m.kind in ("missing", "shape"):
                raise ConfigError(f"{self.path}: {m}")
        return config

    def require_config(self) -> ModelConfig:
        if self.config is None:
            raise AprError(f"{self.path}: holds no model architecture "
                           f"({self.info.get('config_note', 'no architecture metadata')})")
        return self.config


def _resolve_tied(view: ModelView) -> ModelView:
    """A file that declares tied embeddings but stores a different lm_head.weight runs with
    the stored lm_head, as transformers does; the view says so (an AprWarning, and
    ``declared_tied`` stays True for qa and diff to flag)."""
    cfg = view.config
    if cfg is None:
        return view
    view.declared_tied = cfg.tie_word_embeddings
    head, emb = view.tensors.get(names.LM_HEAD), view.tensors.get(names.EMBED)
    if not cfg.tie_word_embeddings or head is None or emb is None or head.shape != emb.shape:
        return view
    same = _same_values(head, emb)
    view.info["tied_copy_equal"] = same     # checked once here; diff and qa need not read it again
    if not same:
        view.config = cfg.replace(tie_word_embeddings=False)
        msg = (f"{view.path}: declares tied embeddings but stores an lm_head.weight that differs from "
               "the embedding; like transformers, the stored lm_head is used (untied)")
        view.info.setdefault("warnings", []).append(msg)
        warnings.warn(msg, AprWarning, stacklevel=3)
    return view


# bytes of each tensor compared at a time: small enough that a chunk is still in the CPU cache
# when it is compared after its read (16 MiB chunks compared at half the speed of 2 MiB ones)
COMPARE_CHUNK = 1 << 21


def equal_bytes(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether two uint8 arrays hold the same bytes, compared 8 bytes at a time."""
    if x.size != y.size:
        return False
    n8 = x.size // 8 * 8
    return bool(np.array_equal(x[:n8].view(np.uint64), y[:n8].view(np.uint64))
                and np.array_equal(x[n8:], y[n8:]))


def _same_values(a: TensorRef, b: TensorRef) -> bool:
    """Whether two tensors of one shape hold the same values: their bytes, slice by slice,
    when they are stored alike (an APR's lm_head copy), else the decoded values."""
    if a.dtype != b.dtype or a.nbytes != b.nbytes or a.rotary_heads != b.rotary_heads:
        return bool(np.array_equal(a.numpy(np.float32), b.numpy(np.float32)))
    if a.file_span is None or b.file_span is None:
        ra, rb = (np.asarray(t.raw()).reshape(-1).view(np.uint8) for t in (a, b))
        return all(equal_bytes(ra[i:i + COMPARE_CHUNK], rb[i:i + COMPARE_CHUNK])
                   for i in range(0, ra.size, COMPARE_CHUNK))
    # read, not mapped: pages of a large file do not stay resident once compared
    bufs = [bytearray(min(COMPARE_CHUNK, a.nbytes)) for _ in range(2)]
    with open(a.file_span[0], "rb", buffering=0) as fa, open(b.file_span[0], "rb", buffering=0) as fb:
        fa.seek(a.file_span[1])
        fb.seek(b.file_span[1])
        left = a.nbytes
        while left > 0:
            n = min(left, COMPARE_CHUNK)
            va, vb = memoryview(bufs[0])[:n], memoryview(bufs[1])[:n]
            if fa.readinto(va) != n or fb.readinto(vb) != n:
                raise FormatError(f"{a.file_span[0]}: tensor {a.source_name!r} or {b.source_name!r} is truncated")
            if not equal_bytes(np.frombuffer(va, np.uint8), np.frombuffer(vb, np.uint8)):
                return False
            left -= n
    return True


def detect_format(path: Path) -> str:
    kind = path_kind(path)
    if kind == "dir":
        return "hf"
    if kind is None:
        raise AprError(f"{path}: no such file or directory")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"APR\x00":
        return "apr"
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n < 100 * 1024 * 1024 and head[8:9] == b"{":
            return "safetensors"
    if path.suffix == ".apr":
        raise FormatError(f"{path}: not an APR file (magic {head[:4]!r}, expected b'APR\\x00')")
    if path.suffix == ".gguf":
        raise FormatError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise FormatError(f"{path}: looks like a pickle/zip checkpoint; pickles are never loaded "
                          "(convert it to safetensors first)")
    raise FormatError(f"{path}: not a model file (APR, GGUF or safetensors; starts with {head[:8]!r})")


@dataclass(frozen=True)
class StoredSpan:
    """Where a tensor's bytes lie."""
    path: Path
    offset: int           # absolute byte offset in `path`
    nbytes: int
    dtype: str


def stored_spans(path: str | os.PathLike) -> dict[str, StoredSpan]:
    """Where each tensor of a model lies, by canonical name, read from the files' indexes alone
    (an APR's index without its metadata JSON, a GGUF's tensor infos with its key/value
    arrays stepped over, safetensors headers; no config): for work done ahead of
    `open_model`, which stays the reader that validates. Raises AprError for a malformed
    index."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "apr":
        f = AprFile.open(p, metadata=False)
        return {n: StoredSpan(p, f.data_offset + e.offset, e.size, e.dtype.name) for n, e in f.tensors.items()}
    if fmt == "gguf":
        g = GgufFile(p, arrays=False)
        arch = g.kv.get("general.architecture")
        family = names.family_of_gguf_arch(arch if isinstance(arch, str) else None)
        return {names.gguf_to_hf_name(n, family) or n: StoredSpan(p, e.offset, e.nbytes, e.dtype.name)
                for n, e in g.entries.items()}
    files = [SafetensorsFile(p)] if fmt == "safetensors" else [SafetensorsFile(f) for f in hf_weight_files(p)]
    return {n: StoredSpan(st.path, e.begin, e.end - e.begin, e.dtype.name)
            for st in files for n, e in st.entries.items()}


def open_model(path: str | os.PathLike, verify: bool | str = False) -> ModelView:
    """Open any supported model file or HF directory. `verify` also checks whole-file
    checksums where the format has them (APR's footer CRC) and raises on a mismatch;
    ``verify="background"`` computes it in a thread while the caller goes on, and
    `ModelView.verified` waits for it (and raises on a mismatch): a converter commits its
    output only after that (`apr.atomic.checked_before_commit`)."""
    p = Path(path)
    fmt = detect_format(p)
    view = {"apr": _open_apr, "gguf": _open_gguf, "safetensors": _open_safetensors,
            "hf": _open_hf}[fmt](p, verify)
    try:
        return _resolve_tied(view)
    except BaseException:
        view.close()
        raise


# --------------------------------------------------------------------------- APR

def _open_apr(path: Path, verify: bool) -> ModelView:
    f = AprFile.open(path)
    info: dict[str, Any] = {"version": ".".join(map(str, f.version)), "flags": f.flags, "size_bytes": f.file_size,
                            "header_crc_valid": True}
    mismatch = (f"{path}: footer CRC mismatch: the file was modified or corrupted after it "
                "was written")
    pending = None
    if verify == "background":
        pending = _in_background(f.verify_footer)
    elif verify:
        info["checksum_valid"] = f.verify_footer()
        if not info["checksum_valid"]:
            f.close()
            raise FormatError(mismatch)
    meta = dict(f.metadata)
    config, note = None, None
    if any(k in meta for k in ("architecture", "hf_architecture", "hidden_size")):
        config = ModelConfig.from_apr_metadata(meta, where=str(path))
    else:
        note = "no architecture keys in the metadata"
    layout_q = names.LAYOUT_ROPE_ADJACENT if config and config.rope_type == names.ROPE_ADJACENT \
        else names.LAYOUT_ROW_MAJOR
    tensors, training = {}, {}
    for name, e in f.tensors.items():
        heads = _rotary_heads(config, name)
        ref = TensorRef(name=name, dtype=e.dtype, shape=tuple(e.shape),
                        layout=layout_q if heads else names.LAYOUT_ROW_MAJOR,
                        source_name=name, nbytes=e.size, _raw=_bind(f.raw, name),
                        rotary_heads=heads, file_span=(path, f.data_offset + e.offset))
        (training if name.startswith(names.TRAINING_PREFIX) else tensors)[name] = ref
    _apply_origins(tensors, meta.get(names.DEQUANTIZED_KEY), path)
    view = ModelView(path, "apr", config, from_apr_metadata(meta), meta, tensors, training, info,
                     [f.close])
    if pending is not None:
        def wait() -> None:
            view.info["checksum_valid"] = pending()
            if not view.info["checksum_valid"]:
                raise FormatError(mismatch)
        view._pending_checks.append(wait)
    if note:
        view.info["config_note"] = note
    return view


def _in_background(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` in a daemon thread (zlib's CRC releases the GIL, so it overlaps the caller's
    reads and writes); the returned function waits for it and returns its result or raises
    its exception."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:       # handed to the waiter
            result["error"] = e
    thread = threading.Thread(target=work, name="apr-verify", daemon=True)
    thread.start()

    def wait() -> Any:
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]
    return wait


def _apply_origins(tensors: dict[str, TensorRef], recorded: Any, path: Path) -> None:
    """Set origin_dtype from a file's record of dequantized tensors ({name: dtype name})."""
    if recorded is None:
        return
    if isinstance(recorded, str):          # safetensors metadata holds strings only
        recorded = load_json(recorded, f"{path}: {names.DEQUANTIZED_KEY}")
    if not isinstance(recorded, dict):
        raise FormatError(f"{path}: {names.DEQUANTIZED_KEY} must map tensor names to dtype names")
    for name, dtype_name in recorded.items():
        if name in tensors:
            if not isinstance(dtype_name, str) or dtype_name not in DTYPES_BY_NAME:
                raise FormatError(f"{path}: {names.DEQUANTIZED_KEY}[{name!r}] = {dtype_name!r} "
                                  "is not a dtype name")
            tensors[name].origin_dtype = DTYPES_BY_NAME[dtype_name]


def _rotary_heads(config: ModelConfig | None, name: str) -> int | None:
    """Head count to undo the rotary permutation of a tensor, if its rows are permuted."""
    if config is None or config.rope_type != names.ROPE_ADJACENT:
        return None
    fld = names.rotary_head_field(name)
    return getattr(config, fld) if fld else None


def _bind(fn, name):
    return lambda: fn(name)


# --------------------------------------------------------------------------- GGUF

def _gguf_norm_offset(family: str | None, name: str) -> float:
    """What llama.cpp added to this tensor's values at conversion (Gemma's norms: 1)."""
    fam = names.FAMILIES.get(family or "")
    return fam.norm_offset if fam is not None and fam.gguf_norm_fold and names.is_norm(name) else 0.0


def _gguf_rope_freqs(g: GgufFile, entry, path: Path) -> list[float] | None:
    """The values of llama.cpp's rope_freqs.weight (per-pair RoPE divisors): part of the
    config, not a parameter. A vector of at most 2^15 F32/F16 values."""
    if entry is None:
        return None
    if len(entry.shape) != 1 or not 0 < entry.shape[0] <= 1 << 15 or \
            entry.dtype.name not in ("F32", "F16"):
        raise FormatError(f"{path}: {names.GGUF_ROPE_FREQS} must be a vector of F32 values, "
                          f"got {entry.dtype.name} {list(entry.shape)}")
    return [float(x) for x in np.asarray(g.raw(names.GGUF_ROPE_FREQS), dtype=np.float64)]


def _open_gguf(path: Path, verify: bool) -> ModelView:
    g = GgufFile(path)
    entries = dict(g.entries)
    rope_freqs = _gguf_rope_freqs(g, entries.pop(names.GGUF_ROPE_FREQS, None), path)
    arch = g.kv.get("general.architecture")
    family = names.family_of_gguf_arch(arch if isinstance(arch, str) else None)
    hf_names = {}
    for gname in entries:
        hf_names[gname] = names.gguf_to_hf_name(gname, family) or gname
    shapes = {hf_names[n]: e.shape for n, e in entries.items()}
    kv = dict(g.kv)
    emb = shapes.get(names.EMBED)
    config, note = None, None
    if not entries:
        note = "no tensors (a vocabulary-only GGUF)"
    else:
        try:
            config = ModelConfig.from_gguf_kv(kv, shapes, where=str(path), rope_freqs=rope_freqs)
        except AprError as e:
            if names.family_from_any(str(kv.get("general.architecture", ""))):
                raise          # a model we support, but broken: say so
            note = str(e)      # some other architecture: still inspectable
    layout = names.LAYOUT_GGUF_LLAMA_ROPE
    tensors = {}
    for gname, e in entries.items():
        name = hf_names[gname]
        heads = _rotary_heads(config, name)
        folded = _gguf_norm_offset(family, name)
        tensors[name] = TensorRef(name=name, dtype=e.dtype, shape=e.shape,
                                  layout=(layout if heads else names.LAYOUT_GGUF_NORM_FOLD if folded
                                          else names.LAYOUT_GGUF), source_name=gname,
                                  nbytes=e.nbytes, _raw=_bind(g.raw, gname),
                                  rotary_heads=heads, file_span=(path, e.offset), offset=folded)
    _apply_origins(tensors, kv.get(names.GGUF_DEQUANTIZED_KEY), path)
    tok = from_gguf_kv(g.kv)
    info = {"version": g.version, "size_bytes": path.stat().st_size,
            "embedding_rows": emb[0] if emb else None}
    if note:
        info["config_note"] = note
    refused = config.gguf_refusals() if config is not None else []
    if refused:     # what llama.cpp would not load (rope_freqs it ignores, biases it lacks...)
        msg = f"{path}: llama.cpp would refuse this file or compute it otherwise: " + "; ".join(refused)
        info.setdefault("warnings", []).append(msg)
        warnings.warn(msg, AprWarning, stacklevel=3)
    return ModelView(path, "gguf", config, tok, kv, tensors, {}, info, [])


# --------------------------------------------------------------------------- safetensors / HF

def _st_tensors(files: list[SafetensorsFile]) -> dict[str, TensorRef]:
    tensors = {}
    for st in files:
        for name, e in st.entries.items():
            if name in tensors:
                raise FormatError(f"{st.path}: tensor {name!r} also appears in {tensors[name].layout}")
            tensors[name] = TensorRef(name=name, dtype=e.dtype, shape=e.shape,
                                      layout=names.LAYOUT_ROW_MAJOR, source_name=name,
                                      nbytes=e.end - e.begin, _raw=_bind(st.raw, name),
                                      file_span=(st.path, e.begin))
    return tensors


def _open_safetensors(path: Path, verify: bool) -> ModelView:
    st = SafetensorsFile(path)
    cfg_path = path.parent / "config.json"
    config, note = None, None
    if is_file(cfg_path):
        config = ModelConfig.from_hf_config(read_json(cfg_path, "model config"), where=str(cfg_path))
    else:
        note = "a lone .safetensors file carries no architecture (no config.json beside it)"
    tensors = _st_tensors([st])
    _apply_origins(tensors, st.metadata.get(names.DEQUANTIZED_KEY), path)
    view = ModelView(path, "safetensors", config, from_hf_dir(path.parent) if config else None,
                     dict(st.metadata), tensors, {}, {"size_bytes": st.size}, [])
    if note:
        view.info["config_note"] = note
    return view


def _open_hf(path: Path, verify: bool) -> ModelView:
    cfg_path = path / "config.json"
    if not is_file(cfg_path):
        raise FormatError(f"{path}: not an HF model directory (no config.json)")
    raw_cfg = read_json(cfg_path, "model config")
    config = ModelConfig.from_hf_config(raw_cfg, where=str(cfg_path))
    files = [SafetensorsFile(f) for f in hf_weight_files(path)]
    tensors = _st_tensors(files)
    for f in files:
        _apply_origins(tensors, f.metadata.get(names.DEQUANTIZED_KEY), f.path)
    for name in list(tensors):
        if names.HF_NON_PARAMETERS.search(name):
            del tensors[name]
    size = sum(f.size for f in files)
    return ModelView(path, "hf", config, from_hf_dir(path), raw_cfg, tensors, {},
                     {"size_bytes": size, "files": [f.path.name for f in files]}, [])
