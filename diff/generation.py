"""Generation settings of the two files: where generation stops, and the defaults a runtime
starts from.

Each side's settings are read from every place its format states them:

    HF      config.json (eos/bos/pad_token_id; eos may be a list) and generation_config.json
            (the same ids, and the sampling defaults: do_sample, temperature, top_k, ...)
    GGUF    tokenizer.ggml.{eos,eot,eom,bos,padding}_token_id, general.sampling.*
    APR     tokenizer.{eos,bos,padding}_token_id

The stop ids of a side are every end-of-generation id it states (eos, eot, eom, wherever
stated), together with the tokens that llama.cpp ends generation at by their text
(`LLAMA_CPP_EOG_TEXTS`, from its src/llama-vocab.cpp): a runtime that recognizes those
stops there whatever either file states, so they are a common base rather than a
difference. Stop ids that differ change where generation ends: a GENERATION finding. Other
differences (bos, pad, sampling defaults) change nothing a model computes: notes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apr.errors import AprError
from apr.model import ModelView
from apr.safetensors_io import read_json
from apr.untrusted import describe, is_file

from .report import GENERATION, ConfigFinding

# token texts llama.cpp's vocabulary loader marks end-of-generation (llama-vocab.cpp)
LLAMA_CPP_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
STOP_KEYS = ("eos_token_id",)                      # HF keys whose ids end generation
ID_KEYS = ("bos_token_id", "pad_token_id")         # HF keys of other ids
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p",
                 "repetition_penalty", "max_new_tokens", "max_length", "no_repeat_ngram_size")
GGUF_STOP = {"tokenizer.ggml.eos_token_id": "eos", "tokenizer.ggml.eot_token_id": "eot",
             "tokenizer.ggml.eom_token_id": "eom"}
GGUF_IDS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.padding_token_id": "pad_token_id"}
GGUF_SAMPLING = "general.sampling."
APR_STOP = {"tokenizer.eos_token_id": "eos"}
APR_IDS = {"tokenizer.bos_token_id": "bos_token_id", "tokenizer.padding_token_id": "pad_token_id"}
MAX_ID = 2 ** 31 - 1


@dataclass
class Settings:
    """What one file states: stop ids (id -> where stated), other ids and sampling defaults
    (name -> (value, where)), and what could not be read."""
    stop: dict[int, list[str]] = field(default_factory=dict)
    values: dict[str, tuple[Any, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add_stop(self, value: Any, where: str) -> None:
        for i in self._ids(value, where):
            self.stop.setdefault(i, []).append(where)

    def add_id(self, name: str, value: Any, where: str) -> None:
        ids = self._ids(value, where)
        if ids and name not in self.values:
            self.values[name] = (ids[0] if len(ids) == 1 else ids, where)

    def _ids(self, value: Any, where: str) -> list[int]:
        """Token ids from an int or a list of ints; anything else is a problem, not an id."""
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        ok = [v for v in items if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ID]
        if len(ok) != len(items):
            self.problems.append(f"{where} is not a token id or a list of them: {describe(value)}")
            return []
        return ok


def _hf_dir(view: ModelView) -> Path | None:
    if view.format == "hf":
        return view.path
    if view.format == "safetensors" and is_file(view.path.parent / "config.json"):
        return view.path.parent
    return None


def _read_hf(view: ModelView, s: Settings) -> None:
    root = _hf_dir(view)
    if root is None:
        return
    docs: list[tuple[str, Any]] = []
    if view.format == "hf":
        docs.append(("config.json", view.metadata))
    for name in ("config.json", "generation_config.json") if view.format != "hf" else ("generation_config.json",):
        if is_file(root / name):
            try:
                docs.append((name, read_json(root / name, name)))
            except AprError as e:
                s.problems.append(f"{name} cannot be read: {e}")
    for name, doc in docs:
        if not isinstance(doc, dict):
            s.problems.append(f"{name} is not a JSON object")
            continue
        for key in STOP_KEYS:
            s.add_stop(doc.get(key), f"{name} {key}")
        for key in ID_KEYS:
            s.add_id(key, doc.get(key), f"{name} {key}")
        if name == "generation_config.json":
            for key in SAMPLING_KEYS:
                if doc.get(key) is not None:
                    s.values[key] = (doc[key], f"{name} {key}")


def _read_keys(view: ModelView, s: Settings, stop: dict[str, str], ids: dict[str, str]) -> None:
    meta = view.metadata
    for key in stop:
        s.add_stop(meta.get(key), key)
    for key, name in ids.items():
        s.add_id(name, meta.get(key), key)


def _by_text(view: ModelView) -> set[int]:
    td = view.tokenizer
    if td is None:
        return set()
    return {i for i, t in enumerate(td.vocab) if t in LLAMA_CPP_EOG_TEXTS}


def read_settings(view: ModelView) -> Settings:
    s = Settings()
    if view.format in ("hf", "safetensors"):
        _read_hf(view, s)
    elif view.format == "gguf":
        _read_keys(view, s, GGUF_STOP, GGUF_IDS)
        for key, value in view.metadata.items():
            if isinstance(key, str) and key.startswith(GGUF_SAMPLING):
                s.values[key[len(GGUF_SAMPLING):]] = (value, key)
    elif view.format == "apr":
        _read_keys(view, s, APR_STOP, APR_IDS)
    return s


def _where(s: Settings, ids: list[int]) -> str:
    return ", ".join(f"{i} ({'; '.join(dict.fromkeys(s.stop[i]))})" for i in ids)


def compare_generation(va: ModelView, vb: ModelView) -> tuple[list[ConfigFinding], list[str]]:
    """(GENERATION findings, notes) for two files that both hold a model."""
    if va.config is None or vb.config is None:
        return [], []
    sa, sb = read_settings(va), read_settings(vb)
    notes = [f"{side}: {p}" for side, s in (("A", sa), ("B", sb)) for p in s.problems]
    base = _by_text(va) | _by_text(vb)
    stop_a, stop_b = set(sa.stop) | base, set(sb.stop) | base
    findings = []
    if stop_a != stop_b and (sa.stop or sb.stop):
        only_b, only_a = sorted(stop_b - stop_a), sorted(stop_a - stop_b)
        parts = []
        if only_b:
            parts.append(f"B also stops at {_where(sb, only_b)}")
        if only_a:
            parts.append(f"A stops at {_where(sa, only_a)}, B does not")
        findings.append(ConfigFinding("eos_token_id", sorted(sa.stop), sorted(sb.stop), GENERATION,
                                      "generation stops at other ids: " + "; ".join(parts)))
    for name in sorted(set(sa.values) & set(sb.values)):
        (x, wx), (y, wy) = sa.values[name], sb.values[name]
        if x != y:
            notes.append(f"generation setting {name}: A {describe(x)} ({wx}), B {describe(y)} ({wy}) "
                         "(changes no logit)")
    return findings, notes
