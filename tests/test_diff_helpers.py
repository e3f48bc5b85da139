"""Shared helpers of the diff tests (this module holds no tests): small clean models in every
format and dtype, built once per test session, and writers of corrupted copies (APR through
apr.container.write_apr, HF by rewriting model.safetensors and config.json, GGUF through
apr.convert from a corrupted APR, or apr.gguf_io.write_gguf for what convert would refuse)."""
from __future__ import annotations

import atexit
import itertools
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file

from apr import names
from apr.container import AprFile, tensor_source, write_apr
from apr.convert import convert
from apr.dtypes import dtype_by_name
from apr.gguf_io import GgufTensor, write_gguf
from apr.model import open_model
from apr.safetensors_io import StTensor, write_safetensors
from oracles import make_hf_model

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"

MODELS: dict[str, dict[str, Any]] = {
    # GQA 4/2, untied, no bias, rope 1e4: q/o square 64x64, k/v 32x64, gate/up 96x64, down 64x96
    "llama": dict(family="llama", hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=448,
                  tied=False, rope_theta=1e4, eps=1e-5, seed=1),
    # tied embeddings, q/k/v biases, rope 1e6
    "qwen2": dict(family="qwen2", hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=448,
                  tied=True, rope_theta=1e6, eps=1e-6, seed=2),
}
# clean conversions of the HF original: kind -> (suffix, convert dtype)
CLEAN_KINDS: dict[str, tuple[str, str | None]] = {
    "hf": ("", None),
    "apr": (".apr", None), "apr-f16": (".apr", "f16"), "apr-bf16": (".apr", "bf16"),
    "apr-q8_0": (".apr", "q8_0"),
    "gguf": (".gguf", None), "gguf-f16": (".gguf", "f16"), "gguf-bf16": (".gguf", "bf16"),
    "gguf-q8_0": (".gguf", "q8_0"),
    "hf-f32": ("", None), "hf-f16": ("", "f16"), "hf-bf16": ("", "bf16"),
}
_counter = itertools.count()


@lru_cache(maxsize=None)
def workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="apr-ref-diff-tests-"))
    atexit.register(shutil.rmtree, d, True)
    return d


def fresh(suffix: str = "") -> Path:
    """A new path in the work directory."""
    return workdir() / f"x{next(_counter)}{suffix}"


@lru_cache(maxsize=None)
def clean(family: str, kind: str = "hf") -> Path:
    """A valid model file: the HF original ("hf") or its conversion of that kind."""
    if kind == "hf":
        return make_hf_model(workdir() / family / "hf", **MODELS[family])
    suffix, dtype = CLEAN_KINDS[kind]
    dst = workdir() / family / f"{kind}{suffix}"
    convert(clean(family, "hf"), dst, dtype=dtype)
    return dst


def config(family: str):
    with open_model(clean(family, "apr")) as v:
        return v.config


@lru_cache(maxsize=None)
def _hf_state(family: str) -> dict[str, np.ndarray]:
    return load_file(str(clean(family, "hf") / "model.safetensors"))


def hf_tensors(family: str) -> dict[str, np.ndarray]:
    """The original's tensors (float32, HF order), as fresh copies to corrupt."""
    return {k: v.copy() for k, v in _hf_state(family).items()}


def layer_name(i: int, suffix: str) -> str:
    return f"model.layers.{i}.{suffix}"


# --------------------------------------------------------------------------- writers

def _apr_metadata(family: str, changes: Mapping[str, Any]) -> dict[str, Any]:
    with AprFile.open(clean(family, "apr")) as f:
        meta = dict(f.metadata)
    for field, value in changes.items():
        meta[names.TIED_KEY if field == "tie_word_embeddings" else field] = value
    return meta


def write_apr_variant(family: str, tensors: Mapping[str, np.ndarray], dst: Path,
                      changes: Mapping[str, Any] = {}, dtype: str = "F32",
                      meta_extra: Mapping[str, Any] = {}) -> Path:
    """An APR with these tensors (matrices stored as `dtype`) and the clean APR's metadata
    with config `changes` (ModelConfig field names). A tied APR gets lm_head as a copy of
    its embedding unless the tensors bring their own (aprender's convention)."""
    meta = _apr_metadata(family, changes)
    meta.update(meta_extra)
    tensors = dict(tensors)
    if meta.get(names.TIED_KEY) and LM_HEAD not in tensors and EMBED in tensors:
        tensors[LM_HEAD] = tensors[EMBED]
    dt = dtype_by_name(dtype)
    sources = [tensor_source(n, np.ascontiguousarray(a, np.float32), dt if a.ndim == 2 else None)
               for n, a in tensors.items()]
    write_apr(dst, meta, sources)
    return dst


def write_hf_variant(family: str, tensors: Mapping[str, np.ndarray], dst: Path,
                     changes: Mapping[str, Any] = {}, dtype: str = "F32") -> Path:
    """A copy of the HF original with these tensors and config.json `changes`."""
    shutil.copytree(clean(family, "hf"), dst)
    dt = dtype_by_name(dtype)
    st = []
    for n, a in tensors.items():
        t = dt if a.ndim == 2 else dtype_by_name("F32")
        arr = np.ascontiguousarray(a, np.float32).astype(t.numpy)
        st.append(StTensor(n, t, arr.shape, lambda arr=arr: arr))
    write_safetensors(dst / "model.safetensors", st)
    cfg = json.loads((dst / "config.json").read_text())
    for field, value in changes.items():
        cfg[names.HF_CONFIG_KEYS[field]] = value
        if field == "rope_theta" and isinstance(cfg.get("rope_parameters"), dict):
            cfg["rope_parameters"]["rope_theta"] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def write_gguf_variant(family: str, tensors: Mapping[str, np.ndarray], dst: Path,
                       changes: Mapping[str, Any] = {}, dtype: str = "F32") -> Path:
    """Through apr.convert from an APR variant: the GGUF writer's own layout (llama rotary
    order) is applied to whatever the APR holds."""
    tmp = write_apr_variant(family, tensors, fresh(".apr"), changes, dtype)
    convert(tmp, dst)
    return dst


WRITERS = {"apr": (write_apr_variant, ".apr"), "hf": (write_hf_variant, ""),
           "gguf": (write_gguf_variant, ".gguf")}


def write_variant(fmt: str, family: str, tensors: Mapping[str, np.ndarray],
                  changes: Mapping[str, Any] = {}, dtype: str = "F32") -> Path:
    writer, suffix = WRITERS[fmt]
    return writer(family, tensors, fresh(suffix), changes, dtype)


def rewrite_gguf(src: Path, dst: Path, kv_changes: Mapping[str, Any]) -> Path:
    """A copy of a GGUF with some key/values replaced (None: dropped), tensors byte for byte."""
    with open_model(src) as v:
        kv = [(k, kv_changes.get(k, val), None) for k, val in v.metadata.items()
              if not (k in kv_changes and kv_changes[k] is None)]
        arch = v.metadata["general.architecture"]
        tensors = [GgufTensor(t.source_name, t.dtype, t.shape, (lambda t=t: np.array(t.raw())), t.nbytes)
                   for t in v.tensors.values()]
        write_gguf(dst, arch, kv, tensors)
    return dst
