"""Conversions between APR, GGUF and HF directories, through the canonical view.

Rules every direction follows:
- data is never transposed; GGUF gets the reversed dimension list only;
- APR and HF hold Q/K rows in HF (halves) rotary order; GGUF llama holds them in llama.cpp's
  adjacent-pair order (Q permuted with the head count, K with the KV-head count);
- tied embeddings: APR writes lm_head.weight as a copy of the embedding plus
  `tied_embeddings: true`; GGUF and HF omit lm_head;
- norms and biases (1-D tensors) stay F32 in GGUF and whenever the rest is quantized;
- a tensor whose dtype and row order do not change is copied byte for byte.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import names, spm
from .atomic import atomic_dir, atomic_file, check_output, checked_before_commit
from .console import progress_bar, utc_timestamp
from .config import ModelConfig
from .container import TensorSource, write_apr
from .dtypes import DTYPES, DType, dtype_by_name, encode, nbytes
from .errors import AprError, ConfigError, UnsupportedError
from .gguf_io import GgufTensor, write_gguf
from .layout import adjacent_to_halves, halves_to_adjacent
from .model import ModelView, TensorRef, open_model
from .safetensors_io import StTensor, write_safetensors
from .tokenizer import llama_cpp_rstrip, renamed_tokens, to_apr_metadata, to_gguf_fields, to_hf_files

CONVERT_DTYPES = ("f32", "f16", "bf16", "q8_0")
# what each target format can store; anything else is dequantized to F32
STORABLE = {
    "apr": {"F32", "F16", "BF16", "F64", "Q4_K", "Q6_K", "APR_Q4", "APR_Q8"},
    "gguf": {"F32", "F16", "BF16", "F64"} | {d.name for d in DTYPES.values() if d.ggml is not None
                                              and d.quantized},
    "hf": {"F32", "F16", "BF16", "F64"},
}
# a container of bare tensors (no model architecture) also keeps integer tensors
STORABLE_TENSORS = {
    "apr": STORABLE["apr"] | {"I32", "I64", "I8", "U8"},
    "gguf": STORABLE["gguf"] | {"I32", "I64", "I8"},
    "safetensors": STORABLE["hf"] | {"I32", "I64", "I8", "U8"},
}
# --dtype name -> stored dtype per target format
REQUESTED = {
    "f32": {"apr": "F32", "gguf": "F32", "hf": "F32"},
    "f16": {"apr": "F16", "gguf": "F16", "hf": "F16"},
    "bf16": {"apr": "BF16", "gguf": "BF16", "hf": "BF16"},
    "q8_0": {"apr": "APR_Q8", "gguf": "Q8_0"},
}
GGUF_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
                  "Q2_K": 10, "Q3_K": 11, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25,
                  "BF16": 32}
HF_TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def target_format(dst: str | os.PathLike) -> str:
    s = str(dst)
    if s.endswith(".apr"):
        return "apr"
    if s.endswith(".gguf"):
        return "gguf"
    if s.endswith(".safetensors"):
        return "safetensors"
    if Path(s).suffix and not Path(s).is_dir():
        raise UnsupportedError(f"{dst}: unknown output format {Path(s).suffix!r} "
                               "(use .apr, .gguf, or a directory for HF)")
    return "hf"


@dataclass
class Planned:
    """One output tensor: where it comes from and how it is stored."""
    name: str                  # canonical HF name
    src: TensorRef
    dtype: DType               # target dtype
    rotary: str | None         # None, or "to_adjacent"/"to_halves" with heads
    heads: int = 0
    requested: bool = False    # the dtype is the one --dtype asked for
    offset: float = 0.0        # stored = value + offset (Gemma norms in GGUF: 1 + w)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.src.shape

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    def verbatim(self) -> bool:
        """The output bytes are the source's bytes, unchanged."""
        src = self.src
        return (src.dtype == self.dtype and src.rotary_heads is None and self.rotary is None
                and src.offset == self.offset)

    def apr_source(self, tick: Callable[[Any], None]) -> TensorSource:
        """This tensor for `write_apr`: a verbatim one names its bytes in the source file, so
        that the writer may copy them inside the kernel."""
        span = self.src.file_span if self.verbatim() else None
        return TensorSource(self.name, self.dtype, self.shape, self.data, span=span,
                            written=lambda: tick(self))

    def data(self) -> np.ndarray:
        """Stored bytes of the output tensor, computed from the source on demand."""
        src = self.src
        same_offset = src.offset == self.offset
        if self.verbatim():
            return src.read()                          # byte-for-byte copy
        if src.dtype == self.dtype and self.dtype.numpy is not None and same_offset:
            values = src.read()                        # plain dtype: reorder rows exactly
        else:
            values = src.numpy(np.float32)             # the values (a stored fold undone) ...
            if self.offset:                            # ... folded as the target stores them
                values = values + np.float32(self.offset)
        if src.rotary_heads:
            values = adjacent_to_halves(values, src.rotary_heads)
        if self.rotary == "to_adjacent":
            values = halves_to_adjacent(values, self.heads)
        if self.dtype.numpy is not None and values.dtype == self.dtype.numpy:
            return np.require(values, requirements="C")
        return encode(values, self.dtype)


@dataclass
class ConvertReport:
    src: str
    dst: str
    src_format: str
    dst_format: str
    tensors: int = 0
    bytes_written: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # lossless changes, said
    changes: list[str] = field(default_factory=list)    # changes to the model, refused unless allowed
    dequantized: dict[str, str] = field(default_factory=dict)  # tensor -> lossy dtype it came from


def _account(view: ModelView, config: ModelConfig | None, planned: list["Planned"], fmt: str,
             report: ConvertReport) -> None:
    """Everything the output will hold differently from the source: dropped tensors and
    renamed tokens (changes), dequantized or upcast tensors (exact: notes and a record of the
    lossy dtype the values came from, so that diff still allows that dtype's rounding)."""
    if report.dropped:
        report.changes.append(f"drops {len(report.dropped)} tensors the architecture does not use: "
                              + ", ".join(report.dropped[:5]) + (" ..." if len(report.dropped) > 5 else ""))
    if view.tokenizer is not None and config is not None:
        renamed = renamed_tokens(view.tokenizer)
        if renamed:
            report.changes.append(
                f"renames {len(renamed)} tokens whose strings repeat an earlier token's: "
                + ", ".join(f"{i} {old!r} -> {new!r}" for i, old, new in renamed[:4])
                + (" ..." if len(renamed) > 4 else ""))
        prefix = view.tokenizer.space_prefix
        if fmt == "gguf" and view.tokenizer.is_spm and prefix not in spm.GGUF_PREFIX_MODES:
            report.changes.append(
                f"changes the tokenizer: the source's space prefix is HF Metaspace's ({prefix!r}: "
                "none in front of text that starts with a space"
                + (", none after special tokens" if prefix == "metaspace-first" else "")
                + "); GGUF can only say add_space_prefix, so llama.cpp would put one in front of "
                "every part of the text")
        tok = view.tokenizer
        kept = llama_cpp_rstrip(_source_name(view), tok.vocab, tok.token_type)
        if fmt == "gguf" and (tok.lstrip or tok.rstrip != kept):
            lost = sorted(tok.lstrip | (tok.rstrip ^ kept))
            report.changes.append(
                f"changes the tokenizer: {len(lost)} added tokens strip whitespace differently "
                f"in llama.cpp (e.g. {tok.vocab[lost[0]]!r}): GGUF cannot say lstrip/rstrip, "
                "llama.cpp decides by the model's name")
        if fmt == "gguf" and tok.normalized:
            shown = sorted(tok.normalized)
            report.changes.append(
                f"changes the tokenizer: {len(shown)} added tokens are matched in the normalized "
                f"text (e.g. {tok.vocab[shown[0]]!r}); GGUF cannot say so, and llama.cpp matches "
                "every added token in the raw text")
        pads = config.vocab_size - view.tokenizer.vocab_size
        if fmt == "gguf" and pads > 0:
            report.notes.append(f"token list padded with {pads} unused row pads to the embedding's "
                                f"{config.vocab_size} rows")
    if fmt == "gguf" and config is not None:     # what llama.cpp computes otherwise
        report.changes.extend(config.gguf_changes())
    if any(m.kind == "tied" for m in view.mismatches()):
        report.notes.append("the source declares tied embeddings but stores a different lm_head.weight; "
                            "written untied with that lm_head (what transformers runs)")
    moved: dict[tuple[str, str], int] = {}
    for p in planned:
        src = p.src
        if p.dtype.name == src.dtype.name:
            if src.origin_dtype is not None:
                report.dequantized[p.name] = src.origin_dtype.name
            continue
        exact = p.dtype.name in ("F32", "F64")            # every stored dtype decodes exactly to these
        if exact and (src.dtype.numpy is None or src.origin_dtype is not None):
            report.dequantized[p.name] = src.precision
        if p.requested:
            continue
        moved[(src.dtype.name, p.dtype.name)] = moved.get((src.dtype.name, p.dtype.name), 0) + 1
    for (a, b), n in sorted(moved.items()):
        why = (f"{fmt.upper()} cannot hold {a}" if a not in STORABLE.get(fmt, STORABLE_TENSORS.get(fmt, ()))
               else "norms and biases stay F32" if b == "F32" else "block size")
        report.notes.append(f"{n} tensors {a} -> {b} ({why}; the values are kept exactly)"
                            if b in ("F32", "F64") else f"{n} tensors {a} -> {b} ({why})")


def _choose_dtype(ref: TensorRef, fmt: str, requested: str | None, notes: list[str]) -> DType:
    one_d = len(ref.shape) <= 1
    if requested is None:
        name = ref.dtype.name if ref.dtype.name in STORABLE[fmt] else "F32"
        if fmt == "gguf" and one_d:
            name = "F32"
        return dtype_by_name(name)
    target = REQUESTED[requested].get(fmt)
    if target is None:
        raise UnsupportedError(f"--dtype {requested} cannot be stored in {fmt.upper()} "
                               f"(choose from {', '.join(k for k, v in REQUESTED.items() if fmt in v)})")
    dt = dtype_by_name(target)
    if one_d and (fmt == "gguf" or dt.numpy is None):
        return dtype_by_name("F32")
    if dt.numpy is None and ref.shape[-1] % dt.block_size:
        notes.append(f"{ref.name}: row length {ref.shape[-1]} is not a multiple of "
                     f"{dt.block_size}; stored F32")
        return dtype_by_name("F32")
    return dt


def plan_tensors(view: ModelView, fmt: str, requested: str | None, report: ConvertReport) -> list[Planned]:
    """A container without a model architecture: every tensor under its own name and shape,
    in its own dtype where the target can store it (F32 otherwise: lossless for U8 and the
    dequantized blocks); --dtype applies to floating-point matrices."""
    planned = []
    for name, ref in {**view.tensors, **view.training}.items():
        name_ = ref.dtype.name if ref.dtype.name in STORABLE_TENSORS[fmt] else "F32"
        if requested and len(ref.shape) >= 2 and ref.dtype.is_float:
            name_ = REQUESTED[requested].get(fmt if fmt != "safetensors" else "hf", name_)
            if dtype_by_name(name_).numpy is None and ref.shape[-1] % dtype_by_name(name_).block_size:
                name_ = "F32"
        if name_ != ref.dtype.name and ref.dtype.name not in STORABLE_TENSORS[fmt]:
            report.notes.append(f"{name}: {ref.dtype.name} cannot be stored in {fmt.upper()}; "
                                f"written as {name_}")
        planned.append(Planned(name, ref, dtype_by_name(name_), None))
    return planned


def plan(view: ModelView, fmt: str, requested: str | None, report: ConvertReport) -> tuple[ModelConfig, list[Planned]]:
    config = view.check_runnable()
    report.dropped = sorted(m.name for m in view.mismatches() if m.kind == "unexpected")
    out_config = config.replace(rope_type=names.ROPE_HALVES)
    family = names.FAMILIES[config.family]
    wanted = out_config.tensor_shapes(include_lm_head=(fmt == "apr") or not config.tie_word_embeddings)
    planned = []
    for name in wanted:
        src = view.tensors.get(name)
        if src is None:        # tied and absent: APR stores a copy of the embedding
            src = view.tensors[names.EMBED]
        rotary, heads = None, 0
        fld = names.rotary_head_field(name)
        if fmt == "gguf" and family.gguf_rope_permuted and fld:
            rotary, heads = "to_adjacent", getattr(config, fld)
        dt = _choose_dtype(src, fmt, requested, report.notes)
        asked = requested is not None and dt.name == REQUESTED[requested].get(fmt)
        fold = family.norm_offset if fmt == "gguf" and family.gguf_norm_fold and names.is_norm(name) else 0.0
        planned.append(Planned(name, src, dt, rotary, heads, requested=asked, offset=fold))
    if fmt == "gguf" and family.gguf_rope_permuted:
        out_config = out_config.replace(rope_type=names.ROPE_ADJACENT)
    return out_config, planned


def _custom_keys(view: ModelView) -> dict[str, Any]:
    """Custom metadata worth carrying over from an APR source (provenance and the like)."""
    if view.format != "apr":
        return {}
    skip = set(names.APR_KNOWN_KEYS) | {names.TIED_KEY, names.ATTENTION_BIAS_KEY}
    for aliases in names.APR_KEY_ALIASES.values():
        skip.update(aliases)
    return {k: v for k, v in view.metadata.items() if k not in skip and not k.startswith("tokenizer.")}


def _source_name(view: ModelView) -> str:
    if view.format == "apr" and view.metadata.get("name"):
        return str(view.metadata["name"])
    if view.format == "gguf" and view.metadata.get("general.name"):
        return str(view.metadata["general.name"])
    p = view.path
    return (p.name if p.is_dir() else p.stem) or "model"


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
            force: bool = False, allow_no_tokenizer: bool = False,
            progress: bool = False, allow_changes: bool = False) -> ConvertReport:
    """Convert `src` (any format) to `dst` (.apr, .gguf, or a directory for HF). A source
    without a model architecture converts as bare tensors (to .apr, .gguf or .safetensors).
    A conversion that would change the model (drop tensors, rename tokens) is refused unless
    ``allow_changes``; what it changes, exactly or not, is in the report and the output's
    metadata."""
    if dtype is not None and dtype not in CONVERT_DTYPES:
        raise UnsupportedError(f"--dtype {dtype}: choose from {', '.join(CONVERT_DTYPES)}")
    fmt = target_format(dst)
    dst_path = check_output(dst, force)
    if os.path.realpath(src) == os.path.realpath(dst_path):
        raise AprError(f"{dst}: output would overwrite the input")
    # the input's checksum is computed while the output is written; the output is renamed into
    # place only if it holds (an APR footer CRC mismatch leaves nothing behind)
    with open_model(src, verify="background") as view, checked_before_commit(view.verified):
        report = ConvertReport(str(src), str(dst), view.format, fmt)
        if view.config is None:            # bare tensors: names, shapes and bytes carried over
            if fmt == "hf":
                raise UnsupportedError(f"{src}: holds no model architecture "
                                       f"({view.info.get('config_note')}), so it cannot become an HF "
                                       "model directory; write NAME.safetensors, .apr or .gguf")
            out_config, planned = None, plan_tensors(view, fmt, dtype, report)
        else:
            if fmt == "safetensors":
                raise UnsupportedError(f"{dst}: write an HF model as a directory (config.json, "
                                       "model.safetensors, tokenizer.json), not a lone .safetensors file")
            if view.tokenizer is None and not allow_no_tokenizer:
                raise AprError(f"{src}: has no tokenizer; the {fmt.upper()} file would not be "
                               "self-contained (pass --allow-no-tokenizer to write it anyway)")
            out_config, planned = plan(view, fmt, dtype, report)
        refusals = out_config.gguf_refusals() if out_config is not None and fmt == "gguf" else []
        if refusals:
            raise UnsupportedError(f"{src}: GGUF cannot hold this model exactly: " + "; ".join(refusals))
        _account(view, out_config, planned, fmt, report)
        if report.changes and not allow_changes:
            raise AprError(f"{src} -> {dst}: the conversion " + "; ".join(report.changes)
                           + " (pass --allow-changes to write it anyway, with each change listed)")
        for p in planned:
            report.dtypes[p.dtype.name] = report.dtypes.get(p.dtype.name, 0) + 1
        report.tensors = len(planned)
        report.bytes_written = sum(p.nbytes for p in planned)
        with progress_bar(progress, total=report.bytes_written, unit="B", unit_scale=True,
                          desc=f"writing {Path(dst).name}") as bar:
            tick = lambda p: bar.update(p.nbytes)        # noqa: E731
            if out_config is None:
                _write_tensors(view, fmt, planned, dst_path, tick)
            else:
                {"apr": _write_apr, "gguf": _write_gguf, "hf": _write_hf}[fmt](
                    view, out_config, planned, dst_path, report, tick)
    return report


# --------------------------------------------------------------------------- writers

def _ticking(p: Planned, tick: Callable[[Any], None]) -> Callable[[], np.ndarray]:
    """p.data, advancing the progress bar once the tensor is computed."""
    def data() -> np.ndarray:
        arr = p.data()
        tick(p)
        return arr
    return data


def _write_tensors(view: ModelView, fmt: str, planned: list[Planned], dst: Path, tick) -> None:
    """Bare tensors to APR (source APR metadata kept), GGUF or a .safetensors file."""
    name = _source_name(view)
    if fmt == "apr":
        meta = dict(view.metadata) if view.format == "apr" else {"model_type": "tensors", "name": name}
        meta.setdefault("original_format", view.format)
        write_apr(dst, meta, [p.apr_source(tick) for p in planned])
        return
    with atomic_file(dst) as tmp:
        if fmt == "gguf":
            arch = str(view.metadata.get("model_type") or view.metadata.get("general.architecture")
                       or "tensors")
            write_gguf(tmp, arch, [("general.name", name, None)],
                       [GgufTensor(p.name, p.dtype, p.shape, p.data, p.nbytes) for p in planned], tick)
        else:
            write_safetensors(tmp, [StTensor(p.name, p.dtype, p.shape, _ticking(p, tick)) for p in planned])


def _write_apr(view, config, planned, dst, report, tick) -> None:
    meta: dict[str, Any] = {
        "model_type": config.family,
        "name": _source_name(view),
        "source": str(view.path.name),
        "original_format": view.format,
        "created_at": utc_timestamp(),
        "total_size": report.bytes_written,
        "param_count": config.param_count(),
    }
    if view.format == "apr":
        for k in ("description", "author", "license", "data_source", "data_license", "version",
                  "chat_template", "chat_format", "special_tokens"):
            if view.metadata.get(k) is not None:
                meta[k] = view.metadata[k]
    meta.update(config.to_apr_metadata())
    meta.update(_custom_keys(view))
    meta.pop(names.NOTES_KEY, None)
    meta.pop(names.DEQUANTIZED_KEY, None)
    if report.notes or report.changes:
        meta[names.NOTES_KEY] = report.changes + report.notes
    if report.dequantized:
        meta[names.DEQUANTIZED_KEY] = report.dequantized
    if view.tokenizer is not None:
        meta.update(to_apr_metadata(view.tokenizer))
        if view.tokenizer.vocab_size > config.vocab_size:
            raise ConfigError(f"{view.path}: tokenizer has {view.tokenizer.vocab_size} tokens but the "
                              f"embedding has {config.vocab_size} rows")

    # write_apr is atomic itself (temporary file, fsync, rename)
    write_apr(dst, meta, [p.apr_source(tick) for p in planned])


def _write_gguf(view, config, planned, dst, report, tick) -> None:
    fam = names.FAMILIES[config.family]
    if not fam.gguf_free_head_dim and config.head_dim * config.num_heads != config.hidden_size:
        raise UnsupportedError(f"{view.path}: llama.cpp's {fam.gguf_arch} needs head_dim x num_heads "
                               f"== hidden_size, but head_dim {config.head_dim} x {config.num_heads} "
                               f"heads != {config.hidden_size}")
    kv: list[tuple[str, Any, Any]] = [("general.name", _source_name(view), None)]
    types = {p.dtype.name for p in planned if len(p.shape) > 1}
    main = types.pop() if len(types) == 1 else ("Q8_0" if "Q8_0" in types else "F32")
    kv.append(("general.file_type", GGUF_FILE_TYPE.get(main, 0), None))
    if any(p.dtype.numpy is None for p in planned):
        kv.append(("general.quantization_version", 2, None))
    for key, value in config.to_gguf_kv().items():
        kv.append((key, value, None))
    if report.notes or report.changes:
        kv.append((names.GGUF_NOTES_KEY, report.changes + report.notes, None))
    if report.dequantized:
        kv.append((names.GGUF_DEQUANTIZED_KEY, json.dumps(report.dequantized), None))
    if view.tokenizer is not None:
        kv.extend(to_gguf_fields(view.tokenizer, config.vocab_size))
    else:   # llama.cpp refuses a file without tokenizer.ggml.model; "none" loads, with no vocab
        kv.append(("tokenizer.ggml.model", "none", None))
        report.notes.append("no tokenizer: tokenizer.ggml.model is 'none' (llama.cpp loads it "
                            "for token ids only)")
    tensors = [GgufTensor(names.hf_to_gguf_name(p.name, config.family), p.dtype, p.shape, p.data, p.nbytes)
               for p in planned]
    freqs = config.gguf_rope_freqs()
    if freqs is not None:      # llama3 RoPE: llama.cpp's per-pair divisors
        tensors.append(GgufTensor(names.GGUF_ROPE_FREQS, dtype_by_name("F32"), freqs.shape,
                                  lambda: freqs, freqs.nbytes))
    with atomic_file(dst) as tmp:
        write_gguf(tmp, fam.gguf_arch, kv, tensors, tick)


def _write_hf(view, config, planned, dst, report, tick) -> None:
    dtypes = {p.dtype.name for p in planned if len(p.shape) > 1}
    torch_dtype = HF_TORCH_DTYPE.get(dtypes.pop() if len(dtypes) == 1 else "F32", "float32")
    hf_cfg = config.to_hf_config(torch_dtype)
    # the padding row, always stated (a config class default such as Phi-3's 32000 may lie past
    # the vocabulary, and transformers then refuses the model): the config's where the source
    # says it (config.json or its class default, an APR's pad_token_id key), else the
    # tokenizer's padding id (a GGUF, an APR written without the key)
    if view.format == "gguf" or (view.format == "apr" and names.PAD_KEY not in view.metadata):
        hf_cfg["pad_token_id"] = view.tokenizer.padding_token_id if view.tokenizer is not None else None
    if view.format == "hf":     # inert keys as the source said them (ids, dropout, init range...)
        for key, value in view.metadata.items():
            if key in names.HF_INERT_KEYS and key not in names.HF_REWRITTEN_KEYS:
                hf_cfg[key] = value
    tok = view.tokenizer
    if tok is not None:
        if tok.bos_token_id is not None:
            hf_cfg["bos_token_id"] = tok.bos_token_id
        if tok.eos_token_id is not None:
            hf_cfg["eos_token_id"] = tok.eos_token_id

    with atomic_dir(dst) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
        if tok is not None:
            for fname, text in to_hf_files(tok).items():
                (tmp / fname).write_text(text, encoding="utf-8")
            gen = {k: v for k, v in (("bos_token_id", tok.bos_token_id),
                                     ("eos_token_id", tok.eos_token_id)) if v is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        st_meta = {"format": "pt"}
        if report.notes or report.changes:
            st_meta[names.NOTES_KEY] = json.dumps(report.changes + report.notes)
        if report.dequantized:
            st_meta[names.DEQUANTIZED_KEY] = json.dumps(report.dequantized)
        write_safetensors(tmp / "model.safetensors",
                          [StTensor(p.name, p.dtype, p.shape, _ticking(p, tick)) for p in planned],
                          st_meta)
