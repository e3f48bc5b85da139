"""What the key maps of the three formats share (`apr.config_hf`, `apr.config_apr`,
`apr.config_gguf`): the closed-world check of a file's config keys, with the keys the user
said to skip (--ignore-key), the bounds of the sizes (checked as soon as a reader has them),
and the sliding-window layouts that HF config.json and GGUF spell alike.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterable, Iterator, Mapping

from .errors import ConfigError, UnsupportedError
from .names import FULL_ATTENTION, SLIDING_ATTENTION
from .untrusted import Values, describe

# the largest plausible value of each size (a model beyond them is a damaged file)
SIZE_LIMITS = {"hidden_size": 1 << 20, "num_layers": 4096, "num_heads": 1 << 16, "num_kv_heads": 1 << 16,
               "intermediate_size": 1 << 22, "vocab_size": 1 << 24, "head_dim": 1 << 16,
               "max_position_embeddings": 1 << 31}


def check_sizes(vals: Mapping[str, Any], where: str) -> None:
    """The sizes read so far within `SIZE_LIMITS`, checked as soon as they are read: a
    reader derives per-layer lists (sliding-window layouts) before `ModelConfig.validate`
    runs, and a damaged layer count of 2^30 must not become a list of 2^30 entries."""
    bad = [f"{name}={vals[name]} is implausible (more than {limit})"
           for name, limit in SIZE_LIMITS.items()
           if isinstance(vals.get(name), int) and vals[name] > limit]
    if bad:
        raise ConfigError(f"{where}: " + "; ".join(bad))


# keys the user said to skip (--ignore-key): see `ignoring_keys`
_IGNORED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("ignored_keys",
                                                                         default=frozenset())


@contextlib.contextmanager
def ignoring_keys(keys: Iterable[str]) -> Iterator[None]:
    """Within the block, unknown or default-only config keys named here are skipped instead of
    refused (the CLI's --ignore-key)."""
    token = _IGNORED.set(frozenset(keys))
    try:
        yield
    finally:
        _IGNORED.reset(token)


def check_closed_world(data: Mapping[str, Any], where: str, modeled: Iterable[str],
                       inert: Iterable[str] = (), default_only: Mapping[str, Any] | None = None,
                       inert_prefixes: tuple[str, ...] = (), ignore: Iterable[str] | None = None) -> None:
    """Refuse every key of ``data`` that is not modeled, inert, or default-only at its
    default, unless it is ignored. One error names the key and its value."""
    modeled, inert = set(modeled), set(inert)
    default_only = default_only or {}
    ignored = set(_IGNORED.get() if ignore is None else ignore)
    for key, value in data.items():
        if key in modeled or key in inert or key.startswith(inert_prefixes) or key in ignored:
            continue
        hint = f"; pass --ignore-key {key} if you know it does not change the logits"
        if key in default_only:
            default = default_only[key]
            if value == default or (default is None and (value in (None, {}, []) or value is False)):
                continue
            raise UnsupportedError(f"{where}: {key} = {describe(value)} is not supported "
                                   f"(only {default!r}){hint}")
        raise UnsupportedError(f"{where}: unknown key {key!r} (= {describe(value)}): the reference "
                               f"does not know whether it changes the computation{hint}")


def gemma_pattern(num_layers: int, pattern: int) -> tuple[str, ...]:
    """Gemma's layer types: every ``pattern``-th layer full, the others sliding (Gemma 2: 2,
    Gemma 3: 6; transformers' default and llama.cpp's)."""
    return tuple(SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION
                 for i in range(num_layers))


def mistral_window(v: Values, vals: dict[str, Any], default: int | None) -> None:
    """Mistral's (and Phi-3's) sliding_window (null: none) applies to every layer."""
    size = v.get("sliding_window", int, default=default)
    vals["layer_types"] = (SLIDING_ATTENTION,) * vals["num_layers"] if size else ()
    vals["sliding_window"] = size or 0
