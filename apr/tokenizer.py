"""The embedded tokenizer in every format: byte-level BPE (GPT-2 style: GPT-2, Llama-3, Qwen2)
and SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Phi-3, Gemma; see `apr.spm`).

One in-memory form, `TokenizerData`, is read from and written to

* HF ``tokenizer.json`` (+ ``tokenizer_config.json``): `from_hf_tokenizer_json`, `from_hf_dir`,
  `to_hf_files`;
* APR ``tokenizer.*`` custom metadata keys (see APR-FORMAT.md): `to_apr_metadata`,
  `from_apr_metadata`;
* GGUF ``tokenizer.ggml.*`` key/values: `to_gguf_fields`, `from_gguf_fields`;

and `build_tokenizer` turns it into a real `tokenizers.Tokenizer` that encodes and decodes like
the source tokenizer.

What a file stores is only the vocabulary, the merges, token types, special ids and the
pre-tokenizer's *name* (GGUF carries nothing but ``tokenizer.ggml.pre``). Everything else that
an exact tokenizer needs (split regex, normalizer, ``ignore_merges``, llama.cpp's default for
adding BOS) is derived from that name through one table, `PRE_TOKENIZERS`.

Conventions:

* Token types are llama.cpp's: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
  6 byte. HF added tokens with ``special=true`` become 3, other added tokens 4.
* Ids missing from an HF tokenizer (holes between the BPE vocabulary and the added tokens) are
  filled with ``"<unk>"`` of type 5 (unused), as the APR format asks.
* Rows that exist only because the embedding matrix is larger than the vocabulary (Qwen2.5 pads
  151665 tokens to 151936 rows) are *row pads*: type 5, named ``<|pad_{id}|>`` (or
  ``<|pad_{id}_{k}|>`` when that name is taken). llama.cpp's converter names them ``[PAD{id}]``
  (older versions typed them 4, user-defined); both spellings are read back as type 5. Row pads
  and gap fillers sit in the BPE vocabulary so that their ids decode, but no merge produces them
  and they are never matched in text, so they never change an encoding.
* Every writer makes token strings unique (llama.cpp asserts it): a repeated string (e.g. the
  gap filler ``<unk>``) is renamed to a row-pad name and typed 5.
"""
from __future__ import annotations

import contextlib
import functools
import json
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import gguf
import numpy as np
import tokenizers

from . import spm
from .errors import AprError, ConfigError, FormatError, UnsupportedError
from .untrusted import Values, describe, is_file, load_json, read_text

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
GAP_TOKEN = "<unk>"
MAX_TOKENS = 1 << 24          # no tokenizer has more (the largest have ~260k)


# ---------------------------------------------------------------------------------------------
# Known pre-tokenizers: the one place where a pre-tokenizer name becomes behaviour.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreTokenizerSpec:
    """How a named byte-level BPE pre-tokenizer behaves (HF semantics)."""

    name: str                      # tokenizer.ggml.pre as llama.cpp's converter writes it
    split_regex: str | None        # Split(regex, isolated) before ByteLevel; None: GPT-2's
    #                                built-in ByteLevel regex (ByteLevel(use_regex=True))
    normalizer: str | None = None  # "NFC" or None
    ignore_merges: bool = False    # BPE: a pre-token that is itself in the vocab wins outright
    add_bos: bool = False          # llama.cpp's default when tokenizer.ggml.add_bos_token is absent
    aliases: tuple[str, ...] = ()  # other names llama.cpp treats the same way


_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {s.name: s for s in (
    PreTokenizerSpec("gpt-2", None),
    PreTokenizerSpec("llama-bpe", _LLAMA3_REGEX, ignore_merges=True, add_bos=True,
                     aliases=("llama3", "llama-v3")),
    PreTokenizerSpec("qwen2", _QWEN2_REGEX, normalizer="NFC", aliases=("deepseek-r1-qwen",)),
    PreTokenizerSpec("qwen35", _QWEN35_REGEX),
)}
_SPEC_BY_ANY_NAME: dict[str, PreTokenizerSpec] = {
    n: s for s in PRE_TOKENIZERS.values() for n in (s.name, *s.aliases)}


def pre_tokenizer_spec(pre_type: str | None) -> PreTokenizerSpec | None:
    """The table entry for a pre-tokenizer name (or alias); None if unknown."""
    return _SPEC_BY_ANY_NAME.get(pre_type) if pre_type else None


# ---------------------------------------------------------------------------------------------
# The in-memory form
# ---------------------------------------------------------------------------------------------

MODEL_TYPES = ("BPE", "SPM")   # byte-level BPE; SentencePiece-style BPE (GGUF "llama")
# token types matched in text before the model runs (HF added tokens), and the flags such a
# token may carry (HF AddedToken's lstrip, rstrip, normalized)
ADDED_TYPES = (CONTROL, USER_DEFINED, UNKNOWN)
ADDED_TOKEN_FLAGS = ("lstrip", "rstrip", "normalized")


@dataclass
class TokenizerData:
    """A tokenizer as stored in a model file. ``vocab[i]`` is token id ``i``.

    ``model_type`` is "BPE" (byte-level) or "SPM" (SentencePiece-style: ``scores`` and/or
    ``merges`` give the merge order, ``space_prefix`` is "always", "first" or "never").

    ``token_type[i]`` is llama.cpp's type of token ``i`` (see the module notes); ``pre_type``
    names an entry of `PRE_TOKENIZERS` (or an alias); ``add_bos_token`` says whether the
    original tokenizer puts BOS in front when asked for special tokens (Llama-3 does, Qwen2 and
    GPT-2 do not).
    """

    vocab: list[str]
    merges: list[str]                    # "left right"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    padding_token_id: int | None = None
    model_type: str = "BPE"
    pre_type: str | None = None          # llama.cpp pre-tokenizer name; None: unknown
    token_type: list[int] = field(default_factory=list)  # empty: all normal
    add_bos_token: bool = False
    chat_template: str | None = None
    add_eos_token: bool = False          # EOS appended when special tokens are added
    scores: list[float] | None = None    # SPM: a score per piece (GGUF); None: unknown
    space_prefix: str = "always"         # SPM: see apr.spm
    unknown_token_id: int | None = None
    # added (control / user-defined) tokens that swallow the whitespace on their left / right
    # when matched in text (HF AddedToken lstrip / rstrip; Phi-3's <|user|> ... are rstrip)
    lstrip: frozenset[int] = frozenset()
    rstrip: frozenset[int] = frozenset()
    # added tokens that HF matches in the normalized text, not the raw text (AddedToken
    # normalized), kept only for a tokenizer that has a normalizer (without one the two are
    # the same); llama.cpp matches every added token in the raw text
    normalized: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise UnsupportedError(f"tokenizer model type {self.model_type!r} is not supported "
                                   f"(known: {', '.join(MODEL_TYPES)})")
        if self.space_prefix not in spm.PREFIX_MODES:
            raise ConfigError(f"tokenizer space prefix {self.space_prefix!r} is not one of "
                              f"{', '.join(spm.PREFIX_MODES)}")
        if self.scores is not None and len(self.scores) != len(self.vocab):
            raise ConfigError(f"tokenizer has {len(self.vocab)} tokens but "
                              f"{len(self.scores)} scores")
        if self.model_type == "SPM" and self.scores is None and not self.merges:
            raise ConfigError("SentencePiece tokenizer has neither scores nor merges")
        if not self.token_type:
            self.token_type = [NORMAL] * len(self.vocab)
        if len(self.token_type) != len(self.vocab):
            raise ConfigError(f"tokenizer has {len(self.vocab)} tokens but "
                              f"{len(self.token_type)} token types")
        for name in ADDED_TOKEN_FLAGS:
            ids = frozenset(getattr(self, name))
            setattr(self, name, ids)
            outside = [i for i in ids if not 0 <= i < len(self.vocab)]
            if outside:
                raise ConfigError(f"tokenizer {name} token id {outside[0]} is outside the "
                                  f"vocabulary (size {len(self.vocab)})")
            plain = sorted(i for i in ids if self.token_type[i] not in ADDED_TYPES)
            if plain:
                raise ConfigError(f"tokenizer {name} token id {plain[0]} ({self.vocab[plain[0]]!r}) "
                                  "is not an added (control, user-defined or unknown) token")
        for name in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < len(self.vocab):
                raise ConfigError(f"tokenizer {name} {value} is outside the vocabulary "
                                  f"(size {len(self.vocab)})")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def is_spm(self) -> bool:
        return self.model_type == "SPM"

    def effective_merges(self) -> list[str]:
        """The merges an encoder applies: the stored ones, or (SPM from GGUF) those the scores
        imply."""
        if self.merges or not self.is_spm:
            return self.merges
        return spm.merges_from_scores(self.vocab, self.scores, self.token_type)

    def effective_scores(self) -> list[float]:
        """SPM scores: the stored ones, or those that make llama.cpp merge as the merges do."""
        if self.scores is not None:
            return self.scores
        return spm.scores_from_merges(self.vocab, self.merges, self.token_type)


# ids of at most 12 digits: a longer run (from a hostile file) is no row pad, and never reaches int()
_PAD_PREFIXES = ("<|pad_", "[PAD")
_PAD_RE = re.compile(r"<\|pad_(\d{1,12})(?:_\d{1,12})?\|>|\[PAD(\d{1,12})\]")


def is_row_pad(token: str, token_id: int) -> bool:
    """True for a row-pad name of this id: ``<|pad_{id}|>``, ``<|pad_{id}_{k}|>``, ``[PAD{id}]``."""
    if token == f"<|pad_{token_id}|>":        # the common spelling and the common non-pad
        return True                            # are told apart without the regex
    if not token.startswith(_PAD_PREFIXES):
        return False
    m = _PAD_RE.fullmatch(token)
    return m is not None and int(m.group(1) or m.group(2)) == token_id


_PAD_HEAD, _PAD_TAIL = np.frombuffer(b"<|pad_", np.uint8), np.frombuffer(b"|>\0", np.uint8)


def _pad_names_utf8(ids: np.ndarray) -> bytes:
    """``"\0".join(f"<|pad_{i}|>" for i in ids).encode()`` for ascending ids >= 0, built
    by NumPy a digit column at a time for the ids of each length (formatting a name per id
    costs more than the rest of a vocabulary's row-pad check)."""
    parts, lo = [], 0
    for d in range(1, 20):                       # int64 ids have at most 19 digits
        hi = len(ids) if d == 19 else int(np.searchsorted(ids, 10 ** d))
        if hi > lo:
            group = ids[lo:hi]
            rows = np.empty((hi - lo, len(_PAD_HEAD) + d + len(_PAD_TAIL)), np.uint8)
            rows[:, :len(_PAD_HEAD)] = _PAD_HEAD
            for j in range(d):
                rows[:, len(_PAD_HEAD) + j] = group // 10 ** (d - 1 - j) % 10 + ord("0")
            rows[:, len(_PAD_HEAD) + d:] = _PAD_TAIL
            parts.append(rows.reshape(-1))
        lo = hi
    return np.concatenate(parts)[:-1].tobytes() if parts else b""


def _common_pad_names(tokens: Sequence[str], ids: np.ndarray) -> bool:
    """True when ``tokens[k] == f"<|pad_{ids[k]}|>"`` for every k (ids ascending): both
    joined at NULs and compared as UTF-8 in one comparison. The names hold no NUL, so the
    joins are equal only if no token holds one, and then piece for piece."""
    try:
        got = "\0".join(tokens).encode("utf-8")
    except UnicodeEncodeError:                  # a lone surrogate: no pad name
        return False
    return got == _pad_names_utf8(ids)


def row_pad_ids(vocab: Sequence[str]) -> list[int]:
    """The ids whose token is a row-pad name of that id (`is_row_pad`): the prefix is tested
    for every token at once, the common spelling for all that have it at once, and the name
    token by token only when some of them are spelled otherwise."""
    has_prefix = np.fromiter(map(str.startswith, vocab, itertools.repeat(_PAD_PREFIXES)),
                             dtype=bool, count=len(vocab))
    found = np.flatnonzero(has_prefix)
    ids = found.tolist()
    if _common_pad_names(list(map(vocab.__getitem__, ids)), found):
        return ids
    return [i for i in ids if vocab[i] == f"<|pad_{i}|>" or is_row_pad(vocab[i], i)]


def _trailing_run_start(values: Sequence[int], value: int) -> int:
    """Where the run of ``value`` that ends ``values`` begins: found from the last index of
    each other value (list.index, in C) when there are few of them, else element by element."""
    rev = list(values)[::-1]
    others = set(rev) - {value}
    if len(others) <= 8:                  # token types: a handful of values
        return len(rev) - min((rev.index(v) for v in others), default=len(rev))
    k = len(rev)
    while k and values[k - 1] == value:
        k -= 1
    return k


def row_pad_start(vocab: Sequence[str], token_type: Sequence[int]) -> int:
    """The id where the unused row pads at the end of the vocabulary begin (a GGUF pads its
    token list to the embedding's rows); ``len(vocab)`` if it does not end in one."""
    n = len(vocab)
    if len(token_type) != n:
        return n
    k = _trailing_run_start(token_type, UNUSED)
    if _common_pad_names(vocab[k:], np.arange(k, n)):     # the common spelling, at once
        return k
    while n and token_type[n - 1] == UNUSED and is_row_pad(vocab[n - 1], n - 1):
        n -= 1
    return n


def _pad_names(token_id: int) -> Iterator[str]:
    yield f"<|pad_{token_id}|>"
    k = 1
    while True:
        yield f"<|pad_{token_id}_{k}|>"
        k += 1


def _unique_tokens(td: TokenizerData, n_rows: int | None = None) -> tuple[list[str], list[int]]:
    """Token strings and types with every string unique, padded with row pads to ``n_rows``.
    Of a repeated string, a real token keeps it (the first one, if several are real) and
    unused entries (gap fillers) are renamed; `renamed_tokens` lists the real tokens renamed."""
    tokens, types = list(td.vocab), list(td.token_type)
    keeper: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        j = keeper.get(tok)
        if j is None or (types[j] == UNUSED and types[i] != UNUSED):
            keeper[tok] = i
    taken = set(tokens)

    def claim(i: int) -> str:
        name = next(n for n in _pad_names(i) if n not in taken)
        taken.add(name)
        return name
    for i in [i for i, tok in enumerate(tokens) if keeper[tok] != i]:
        tokens[i], types[i] = claim(i), UNUSED
    first = len(tokens)
    if n_rows is not None and n_rows > first:
        pads = [f"<|pad_{i}|>" for i in range(first, n_rows)]
        if not taken.isdisjoint(pads):         # a name is taken: claim them one by one
            pads = [claim(i) for i in range(first, n_rows)]
        tokens += pads
        types += [UNUSED] * len(pads)
    return tokens, types


def renamed_tokens(td: TokenizerData) -> list[tuple[int, str, str]]:
    """(id, string, new string) of every real token (not an unused gap filler) that a writer
    renames to keep token strings unique: two real tokens share a string."""
    tokens, _ = _unique_tokens(td)
    return [(i, old, new) for i, (old, new) in enumerate(zip(td.vocab, tokens))
            if old != new and td.token_type[i] != UNUSED]


def _spec_or_raise(td: TokenizerData, default_pre: str | None) -> PreTokenizerSpec | None:
    """The pre-tokenizer of a byte-level BPE tokenizer (None for SPM, which has none)."""
    if td.is_spm:
        return None
    spec = pre_tokenizer_spec(td.pre_type) or pre_tokenizer_spec(default_pre)
    if spec is None:
        known = ", ".join(PRE_TOKENIZERS)
        raise UnsupportedError(
            f"tokenizer pre-tokenizer {td.pre_type!r} is unknown (known: {known}); "
            "pass default_pre to choose one explicitly")
    return spec


# ---------------------------------------------------------------------------------------------
# the tokenizers library, behind one guard

# Exceptions a guard lets pass: the user's interrupt and an exit, never a library's failure.
_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)


@contextlib.contextmanager
def tokenizers_guard(what: str, error: type[AprError] = FormatError) -> Iterator[None]:
    """Around every call into the `tokenizers` library: whatever it raises becomes one
    ``error`` (a FormatError) that starts with ``what``. Its errors have no common base class, and where its Rust code
    panics (a ``continuing_subword_prefix`` it cannot apply, an added token that collides with
    a vocabulary entry) it raises ``pyo3_runtime.PanicException``, a BaseException that passes
    every ``except Exception``."""
    try:
        yield
    except (AprError, *_PASS_THROUGH):
        raise
    except BaseException as e:      # noqa: BLE001 - a panic is a BaseException
        text = " ".join(str(e).split()) or type(e).__name__
        raise error(f"{what}: {describe(text, 200)}") from None


class GuardedTokenizer:
    """A `tokenizers.Tokenizer` whose every method call goes through `tokenizers_guard`
    (``tokenizer`` is the library's own object, for what needs it unwrapped)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer,
                 what: str = "the tokenizers library failed on this tokenizer"):
        self.tokenizer = tokenizer
        self.what = what

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("tokenizer", "what"):   # copy, pickle: not there
            raise AttributeError(name)
        with tokenizers_guard(self.what):
            value = getattr(self.tokenizer, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def guarded(*args: Any, **kw: Any) -> Any:
            with tokenizers_guard(self.what):
                return value(*args, **kw)
        return guarded


def tokenizer_from_json(text: str, what: str, error: type[AprError] = FormatError) -> GuardedTokenizer:
    """``tokenizers.Tokenizer.from_str(text)`` behind the guard, as a `GuardedTokenizer`."""
    with tokenizers_guard(what, error):
        return GuardedTokenizer(tokenizers.Tokenizer.from_str(text))


# ---------------------------------------------------------------------------------------------
# tokenizers.Tokenizer and HF files
# ---------------------------------------------------------------------------------------------

def _byte_level(use_regex: bool, trim_offsets: bool = True) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": trim_offsets,
            "use_regex": use_regex}


def _tokenizer_json(td: TokenizerData, spec: PreTokenizerSpec | None, add_bos: bool,
                    add_eos: bool = False) -> dict[str, Any]:
    """The tokenizer.json document (as a dict) for ``td`` under ``spec`` (None for SPM)."""
    tokens, types = _unique_tokens(td)
    if spec is None:
        normalizer, pre_tokenizer = spm.normalizer_and_pre(td.space_prefix)
    elif spec.split_regex is None:
        pre_tokenizer = _byte_level(use_regex=True)
    else:
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": spec.split_regex}, "behavior": "Isolated",
             "invert": False},
            _byte_level(use_regex=False, trim_offsets=False)]}
    # Added tokens are matched in the raw text before the model runs. tokenizers ignores the
    # "id" of an added token that is not in the model vocabulary (it appends it instead), so
    # every token, added ones included, is in the BPE vocabulary at its own id.
    # llama.cpp matches unknown-typed tokens ("<unk>") in text as it does control tokens.
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": i in td.lstrip,
              "rstrip": i in td.rstrip, "normalized": i in td.normalized,
              "special": types[i] != USER_DEFINED}
             for i in range(len(tokens)) if types[i] in ADDED_TYPES]
    post_processor: dict[str, Any] | None = (
        None if spec is None else _byte_level(use_regex=False, trim_offsets=False))
    bos = tokens[td.bos_token_id] if add_bos and td.bos_token_id is not None else None
    eos = tokens[td.eos_token_id] if add_eos and td.eos_token_id is not None else None
    if bos is not None or eos is not None:
        def seq(part: str, type_id: int) -> list[dict[str, Any]]:
            return ([{"SpecialToken": {"id": bos, "type_id": type_id}}] if bos is not None else []) + \
                [{"Sequence": {"id": part, "type_id": type_id}}] + \
                ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if eos is not None else [])
        special = {t: {"id": t, "ids": [i], "tokens": [t]}
                   for t, i in ((bos, td.bos_token_id), (eos, td.eos_token_id)) if t is not None}
        template = {"type": "TemplateProcessing", "single": seq("A", 0),
                    "pair": seq("A", 0) + seq("B", 1), "special_tokens": special}
        post_processor = template if post_processor is None else {
            "type": "Sequence", "processors": [post_processor, template]}
    if spec is not None:
        normalizer = {"type": spec.normalizer} if spec.normalizer else None
    merges = td.effective_merges()
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": spm.decoder(td.space_prefix) if spec is None else {
            "type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None,
                  "unk_token": (tokens[td.unknown_token_id] if spec is None
                                and td.unknown_token_id is not None else None),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": spec is None, "byte_fallback": spec is None,
                  "ignore_merges": spec is not None and spec.ignore_merges,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }


def build_tokenizer(td: TokenizerData, *, add_bos: bool = False, add_eos: bool = False,
                    default_pre: str | None = None) -> GuardedTokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes like the source tokenizer (behind
    `tokenizers_guard`: a failure of the library is one AprError).

    SentencePiece-style BPE (`apr.spm`): byte fallback, the space prefix, merges from the scores
    when the file stores none. Byte-level BPE with the pre-tokenizer, normalizer and ``ignore_merges`` of ``td.pre_type``
    (see `PRE_TOKENIZERS`); control tokens are special added tokens, user-defined ones plain
    added tokens. ``encode(text)`` adds no BOS unless ``add_bos=True`` (then it adds
    ``td.bos_token_id`` when ``add_special_tokens`` is on, as HF does). An unknown ``pre_type``
    raises UnsupportedError unless ``default_pre`` names the pre-tokenizer to use instead.
    """
    spec = _spec_or_raise(td, default_pre)
    return tokenizer_from_json(json.dumps(_tokenizer_json(td, spec, add_bos, add_eos)),
                               "tokenizer cannot be built", ConfigError)


def to_hf_files(td: TokenizerData, *, model_max_length: int | None = None,
                default_pre: str | None = None) -> dict[str, str]:
    """Text of ``tokenizer.json`` and ``tokenizer_config.json`` for an HF model directory.

    The tokenizer adds BOS exactly when ``td.add_bos_token`` (both in tokenizer.json's
    post-processor and through ``add_bos_token`` in the config), as the original HF files do.
    """
    spec = _spec_or_raise(td, default_pre)
    doc = _tokenizer_json(td, spec, add_bos=td.add_bos_token, add_eos=td.add_eos_token)
    tokens, types = _unique_tokens(td)

    def token(i: int | None) -> str | None:
        return None if i is None else tokens[i]

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(td.bos_token_id),
        "eos_token": token(td.eos_token_id),
        "pad_token": token(td.padding_token_id),
        **({"unk_token": token(td.unknown_token_id)} if td.unknown_token_id is not None else {}),
        "add_bos_token": bool(td.add_bos_token and td.bos_token_id is not None),
        "add_eos_token": bool(td.add_eos_token and td.eos_token_id is not None),
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in (
            "content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for a in doc["added_tokens"]},
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if td.chat_template is not None:
        config["chat_template"] = td.chat_template
    return {"tokenizer.json": json.dumps(doc, ensure_ascii=False, indent=1),
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2)}


# ---------------------------------------------------------------------------------------------
# Reading HF tokenizer.json
# ---------------------------------------------------------------------------------------------

_KNOWN_BOS = ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>")
_KNOWN_EOS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")


def _load_json(text_or_path: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(text_or_path, Mapping):
        return dict(text_or_path)
    if isinstance(text_or_path, Path) or not str(text_or_path).lstrip().startswith("{"):
        text, where = read_text(text_or_path, "tokenizer JSON"), str(text_or_path)
    else:
        text, where = str(text_or_path), "tokenizer JSON"
    doc = load_json(text, where)
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: not a JSON object")
    return doc


def _flatten(component: Mapping[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A pre-tokenizer (``key="pretokenizers"``) or normalizer as a flat list of steps."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        return [s for sub in component.get(key, []) for s in _flatten(sub, key)]
    return [dict(component)]


def _detect_pre_type(doc: Mapping[str, Any]) -> str | None:
    """The name in `PRE_TOKENIZERS` whose behaviour the tokenizer.json has; None if none."""
    steps = _flatten(doc.get("pre_tokenizer"), "pretokenizers")
    norm = _flatten(doc.get("normalizer"), "normalizers")
    if len(norm) > 1 or (norm and norm[0].get("type") != "NFC"):
        return None
    normalizer = "NFC" if norm else None
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        return None
    if [s.get("type") for s in steps] == ["ByteLevel"] and steps[0].get("use_regex", True):
        regex = None
    elif ([s.get("type") for s in steps] == ["Split", "ByteLevel"]
          and not steps[1].get("use_regex", True)
          and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
          and "Regex" in steps[0].get("pattern", {})):
        regex = steps[0]["pattern"]["Regex"]
    else:
        return None
    ignore_merges = bool(doc.get("model", {}).get("ignore_merges", False))
    for spec in PRE_TOKENIZERS.values():
        if (spec.split_regex, spec.normalizer, spec.ignore_merges) == (
                regex, normalizer, ignore_merges):
            return spec.name
    return None


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict, or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _bos_from_post_processor(doc: Mapping[str, Any]) -> str | None:
    """The special token a TemplateProcessing post-processor puts before ``$A``, if any."""
    for step in _flatten(doc.get("post_processor"), "processors"):
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            if single and "SpecialToken" in single[0]:
                return single[0]["SpecialToken"]["id"]
    return None


def _chat_template(value: Any) -> str | None:
    """tokenizer_config.json's ``chat_template``: a string, null, or a list of named templates
    (``[{"name": "default", "template": "..."}, ...]``, as transformers saves several), of
    which the one named "default" or else the first is the model's."""
    where = "tokenizer_config.json"
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise FormatError(f"{where}: chat_template is {describe(value)}, expected a string or a "
                          "list of {\"name\": ..., \"template\": ...} objects")
    named: dict[str, str] = {}
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise FormatError(f"{where}: chat_template[{i}] is {describe(entry)}, expected an "
                              "object with a name and a template")
        v = Values(entry, f"{where}: chat_template[{i}]")
        name, template = v.get("name", str), v.get("template", str)
        if name is None or template is None:
            raise FormatError(f"{where}: chat_template[{i}] has no name or no template")
        named.setdefault(name, template)
    return named.get("default", next(iter(named.values()), None))


def from_hf_tokenizer_json(text_or_path: str | Path | Mapping[str, Any],
                           tokenizer_config: str | Path | Mapping[str, Any] | None = None,
                           ) -> TokenizerData:
    """Parse an HF tokenizer.json (text, path or parsed dict) of a byte-level BPE tokenizer.

    ``tokenizer_config`` (dict, path or JSON text of tokenizer_config.json) supplies bos/eos/pad
    tokens, ``add_bos_token`` and ``chat_template``; without it BOS comes from the
    post-processor's template and BOS/EOS from well-known token names.
    """
    doc = _load_json(text_or_path)
    model = doc.get("model")
    if isinstance(model, Mapping) and model.get("type") in (None, "BPE") and (
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        # refused before the library sees it: its BPE panics on a prefix longer than a token
        raise UnsupportedError("tokenizer BPE with a subword prefix/suffix is not supported")
    # the tokenizers library checks the whole structure and every type in it
    tokenizer_from_json(json.dumps(doc), "tokenizer.json is not a valid tokenizer")
    model = doc.get("model") or {}
    mtype = model.get("type") or ("BPE" if "merges" in model else "unknown")
    if mtype != "BPE":
        raise UnsupportedError(f"tokenizer model type {mtype!r} is not supported "
                               "(only BPE: byte-level or SentencePiece-style)")
    steps = _flatten(doc.get("pre_tokenizer"), "pretokenizers")
    prefix = None
    if model.get("byte_fallback") or not any(s.get("type") == "ByteLevel" for s in steps):
        prefix = spm.detect_prefix(doc) if model.get("byte_fallback") else None
        if prefix is not None and model.get("ignore_merges"):
            raise UnsupportedError(
                "tokenizer is a SentencePiece-style BPE with ignore_merges (a text part that is "
                "itself a token skips the merges); llama.cpp has no such rule and we do not "
                "reproduce it")
        if prefix is None:
            raise UnsupportedError(
                "tokenizer is a SentencePiece-style BPE whose normalizer/pre-tokenizer is not one "
                "we reproduce exactly (known: Prepend+Replace, Replace, Metaspace without split, "
                "all with byte_fallback)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UnsupportedError("tokenizer BPE with a subword prefix/suffix is not supported")

    by_id: dict[int, tuple[str, int]] = {int(i): (t, NORMAL) for t, i in model["vocab"].items()}
    strip: dict[str, set[int]] = {name: set() for name in ADDED_TOKEN_FLAGS}
    for a in doc.get("added_tokens") or []:
        by_id[int(a["id"])] = (a["content"], CONTROL if a.get("special") else USER_DEFINED)
        if a.get("single_word"):
            raise UnsupportedError(f"tokenizer added token {a['content']!r} is single_word "
                                   "(matched only as a whole word); that is not supported")
        for key in strip:
            if a.get(key) is True:
                strip[key].add(int(a["id"]))
    if not doc.get("normalizer"):           # matched in the raw text or the normalized one alike
        strip["normalized"] = set()
    n = max(by_id) + 1 if by_id else 0
    if n > min(MAX_TOKENS, 4 * len(by_id) + 65536):
        raise FormatError(f"tokenizer.json: token id {n - 1} is implausible for {len(by_id)} tokens "
                          "(the gaps up to it would be filled one by one)")
    vocab, token_type = [], []
    for i in range(n):
        tok, typ = by_id.get(i, (GAP_TOKEN, UNUSED))
        if typ == NORMAL and is_row_pad(tok, i):
            typ = UNUSED
        vocab.append(tok)
        token_type.append(typ)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    ids: dict[str, int] = {}
    for i, tok in enumerate(vocab):
        ids.setdefault(tok, i)
    config = _load_json(tokenizer_config) if tokenizer_config is not None else {}
    cv = Values(config, "tokenizer_config.json")
    add_bos_checked = cv.get("add_bos_token", bool)
    post_bos = _bos_from_post_processor(doc)
    # A key the config has (even as null) is authoritative; an absent one is guessed.
    if "bos_token" in config:
        bos = _token_content(config["bos_token"])
    else:
        bos = post_bos or next((t for t in _KNOWN_BOS if t in ids), None)
    if "eos_token" in config:
        eos = _token_content(config["eos_token"])
    else:
        eos = next((t for t in _KNOWN_EOS if t in ids), None)
    pad = _token_content(config.get("pad_token"))
    add_bos = add_bos_checked
    chat_template = config.get("chat_template")
    if add_bos is None:
        add_bos = post_bos is not None
    chat_template = _chat_template(chat_template)

    def token_id(tok: str | None, what: str) -> int | None:
        if tok is None:
            return None
        if tok not in ids:
            raise ConfigError(f"tokenizer {what} token {tok!r} is not in the vocabulary")
        return ids[tok]

    if prefix is not None:      # SentencePiece-style: unk from the model; no pre-tokenizer name
        unk = model.get("unk_token")
        unk = _token_content(config["unk_token"]) if "unk_token" in config else unk
        return TokenizerData(
            vocab=vocab, merges=merges, token_type=token_type, model_type="SPM",
            bos_token_id=token_id(bos, "bos"), eos_token_id=token_id(eos, "eos"),
            padding_token_id=token_id(pad, "pad"),
            unknown_token_id=token_id(unk if isinstance(unk, str) else None, "unk"),
            space_prefix=prefix, add_bos_token=bool(add_bos),
            chat_template=chat_template if isinstance(chat_template, str) else None,
            add_eos_token=bool(cv.get("add_eos_token", bool, default=False)),
            **strip)
    return TokenizerData(
        vocab=vocab, merges=merges, token_type=token_type,
        bos_token_id=token_id(bos, "bos"), eos_token_id=token_id(eos, "eos"),
        padding_token_id=token_id(pad, "pad"), model_type="BPE",
        pre_type=_detect_pre_type(doc), add_bos_token=bool(add_bos),
        chat_template=chat_template if isinstance(chat_template, str) else None,
        add_eos_token=bool(cv.get("add_eos_token", bool, default=False)),
        **strip)


def from_hf_dir(path: str | Path) -> TokenizerData | None:
    """The tokenizer of an HF model directory (tokenizer.json, tokenizer_config.json and
    chat_template.jinja when present); None if it has no tokenizer.json."""
    path = Path(path)
    if not is_file(path / "tokenizer.json"):
        return None
    config_path = path / "tokenizer_config.json"
    config = _load_json(config_path) if is_file(config_path) else None
    td = from_hf_tokenizer_json(path / "tokenizer.json", config)
    jinja = path / "chat_template.jinja"
    if td.chat_template is None and is_file(jinja):
        td.chat_template = read_text(jinja, "chat template")
    return td


# ---------------------------------------------------------------------------------------------
# APR metadata
# ---------------------------------------------------------------------------------------------

def to_apr_metadata(td: TokenizerData) -> dict[str, Any]:
    """The ``tokenizer.*`` custom metadata keys of an APR file (None values omitted). A
    SentencePiece-style tokenizer stores its merges (derived from the scores when it has none)
    and its scores (derived from the merges when it has none), so that either kind of reader
    finds what it needs."""
    meta: dict[str, Any] = {
        "tokenizer.vocabulary": list(td.vocab),
        "tokenizer.merges": list(td.effective_merges()),
        "tokenizer.vocab_size": td.vocab_size,
        "tokenizer.bos_token_id": td.bos_token_id,
        "tokenizer.eos_token_id": td.eos_token_id,
        "tokenizer.model_type": td.model_type,
        "tokenizer.pre_type": td.pre_type,
        "tokenizer.token_type": [int(t) for t in td.token_type],
        "tokenizer.padding_token_id": td.padding_token_id,
        "tokenizer.add_bos_token": bool(td.add_bos_token),
        "tokenizer.add_eos_token": True if td.add_eos_token else None,
        "tokenizer.chat_template": td.chat_template,
    }
    for name in ADDED_TOKEN_FLAGS:
        if getattr(td, name):
            meta[f"tokenizer.{name}_ids"] = sorted(getattr(td, name))
    if td.is_spm:
        meta.update({"tokenizer.scores": [float(x) for x in td.effective_scores()],
                     "tokenizer.space_prefix": td.space_prefix,
                     "tokenizer.unknown_token_id": td.unknown_token_id})
    return {k: v for k, v in meta.items() if v is not None}


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def from_apr_metadata(meta: Mapping[str, Any]) -> TokenizerData | None:
    """The tokenizer embedded in APR metadata; None if there is no ``tokenizer.vocabulary``.

    A missing ``tokenizer.add_bos_token`` takes the pre-tokenizer's llama.cpp default; a missing
    ``tokenizer.token_type`` makes every token normal except bos/eos/padding (control)."""
    if meta.get("tokenizer.vocabulary") is None:
        return None
    v = Values(meta, "APR metadata")
    vocab = v.items("tokenizer.vocabulary", str)
    stored_type = v.get("tokenizer.model_type", str, default="BPE") or "BPE"
    model_type = stored_type.upper()
    if model_type not in MODEL_TYPES:
        raise UnsupportedError(f"tokenizer model type {stored_type!r} is not supported "
                               f"(known: {', '.join(MODEL_TYPES)})")
    merges = v.items("tokenizer.merges", str)
    if merges is None and model_type == "SPM" and meta.get("tokenizer.scores") is not None:
        merges = []             # SentencePiece-style: the scores give the merge order
    if merges is None:
        raise ConfigError("APR tokenizer has tokenizer.vocabulary but no tokenizer.merges")
    size = v.get("tokenizer.vocab_size", int)
    if size is not None and size != len(vocab):
        raise ConfigError(f"tokenizer.vocab_size is {size} but tokenizer.vocabulary has "
                          f"{len(vocab)} tokens")
    pre_type = v.get("tokenizer.pre_type", str)
    add_bos = v.get("tokenizer.add_bos_token", bool)
    if add_bos is None:
        spec = pre_tokenizer_spec(pre_type)
        add_bos = spec.add_bos if spec else False
    special = {key: v.token_id(f"tokenizer.{key}", len(vocab))
               for key in ("bos_token_id", "eos_token_id", "padding_token_id")}
    spm_fields: dict[str, Any] = {}
    if model_type == "SPM":
        spm_fields = dict(
            scores=v.items("tokenizer.scores", float),
            space_prefix=v.get("tokenizer.space_prefix", str, default="always") or "always",
            unknown_token_id=v.token_id("tokenizer.unknown_token_id", len(vocab)))
    token_type = v.items("tokenizer.token_type", int, default=[])
    if not token_type:
        token_type = [NORMAL] * len(vocab)
        for i in special.values():
            if i is not None:
                token_type[i] = CONTROL
    strip = {name: v.items(f"tokenizer.{name}_ids", int, default=[])
             for name in ADDED_TOKEN_FLAGS}
    return TokenizerData(
        vocab=vocab, merges=merges, **special, **spm_fields, **strip,
        model_type=model_type, pre_type=pre_type or None,
        token_type=token_type, add_bos_token=bool(add_bos),
        chat_template=v.get("tokenizer.chat_template", str),
        add_eos_token=bool(v.get("tokenizer.add_eos_token", bool, default=False)))


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------

def to_gguf_fields(td: TokenizerData, n_rows: int
                   ) -> list[tuple[str, Any, gguf.GGUFValueType]]:
    """``(key, value, gguf.GGUFValueType)`` for the ``tokenizer.*`` keys of a GGUF file.

    ``tokenizer.ggml.tokens`` has exactly ``n_rows`` (embedding rows) unique entries: the
    vocabulary followed by row pads of type 5. A vocabulary longer than ``n_rows`` is a
    ConfigError. Arrays are written with value type ARRAY; their element type follows from the
    values (strings, or INT32 for token types, as llama.cpp reads them).

    A SentencePiece-style tokenizer is llama.cpp's "llama" model: scores instead of merges
    (derived from the merges when the source has none; row pads score -1000, as llama.cpp's
    converter writes them) and ``add_space_prefix`` (true for either Metaspace mode, which GGUF
    cannot say; `apr.convert` reports that as a change).
    """
    if td.vocab_size > n_rows:
        raise ConfigError(f"tokenizer has {td.vocab_size} tokens but the embedding has only "
                          f"{n_rows} rows")
    tokens, types = _unique_tokens(td, n_rows)
    t = gguf.GGUFValueType
    if td.is_spm:
        scores = list(td.effective_scores()) + [-1000.0] * (n_rows - td.vocab_size)
        wide = np.flatnonzero(np.abs(np.asarray(scores, np.float64)) > np.finfo(np.float32).max)
        if wide.size:           # finite in JSON's float64, not in GGUF's float32
            raise ConfigError(f"tokenizer score of token {int(wide[0])} ({scores[wide[0]]:g}) "
                              "does not fit GGUF's float32 scores")
        fields: list[tuple[str, Any, gguf.GGUFValueType]] = [
            ("tokenizer.ggml.model", "llama", t.STRING),
            ("tokenizer.ggml.pre", "default", t.STRING),
            ("tokenizer.ggml.tokens", tokens, t.ARRAY),
            ("tokenizer.ggml.scores", [float(x) for x in scores], t.ARRAY),
            ("tokenizer.ggml.token_type", [int(x) for x in types], t.ARRAY),
            ("tokenizer.ggml.add_space_prefix", td.space_prefix != "never", t.BOOL),
        ]
    else:
        fields = [
            ("tokenizer.ggml.model", "gpt2", t.STRING),
            ("tokenizer.ggml.pre", td.pre_type or "default", t.STRING),
            ("tokenizer.ggml.tokens", tokens, t.ARRAY),
            ("tokenizer.ggml.token_type", [int(x) for x in types], t.ARRAY),
            ("tokenizer.ggml.merges", list(td.merges), t.ARRAY),
        ]
    for key, value in (("bos_token_id", td.bos_token_id), ("eos_token_id", td.eos_token_id),
                       ("unknown_token_id", td.unknown_token_id),
                       ("padding_token_id", td.padding_token_id)):
        if value is not None:
            fields.append((f"tokenizer.ggml.{key}", int(value), t.UINT32))
    fields.append(("tokenizer.ggml.add_bos_token", bool(td.add_bos_token), t.BOOL))
    if td.add_eos_token:
        fields.append(("tokenizer.ggml.add_eos_token", True, t.BOOL))
    if td.chat_template is not None:
        fields.append(("tokenizer.chat_template", td.chat_template, t.STRING))
    return fields


_GGUF_MODEL_NAMES = {"bert": "WordPiece (bert)",
                     "t5": "Unigram (t5)", "rwkv": "RWKV", "plamo2": "PLaMo-2"}


def _field_value(f: Any) -> Any:
    """A GGUFReader field's value: scalar, str, or list (gguf's ``contents()`` if present)."""
    if hasattr(f, "contents"):
        return f.contents()

    def one(part: Any, vtype: Any) -> Any:
        if vtype == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [one(f.parts[i], f.types[-1]) for i in f.data]
    return one(f.parts[f.data[0]], f.types[0])


def from_gguf_fields(reader: Any) -> TokenizerData | None:
    """The tokenizer of a `gguf.GGUFReader`; None if it has no ``tokenizer.ggml.tokens``."""
    return from_gguf_kv({k: _field_value(f) for k, f in reader.fields.items()
                         if k.startswith("tokenizer.") or k == "general.name"})


def llama_cpp_rstrip(name: str | None, vocab: list[str], token_type: list[int]) -> frozenset[int]:
    """The tokens llama.cpp makes swallow the whitespace after them, which no GGUF field says:
    it decides by the model's ``general.name``. A name containing "phi-3" or "phi3" makes every
    control, user-defined and unknown token rstrip, and "</s>", but not "<unk>", "<s>" or
    "<|endoftext|>" (Phi-3's tokenizer.json flags); any other name, none."""
    lowered = (name or "").lower()
    if "phi-3" not in lowered and "phi3" not in lowered:
        return frozenset()
    out = {i for i, t in enumerate(token_type) if t in ADDED_TYPES}
    ids = {tok: i for i, tok in enumerate(vocab)}
    if "</s>" in ids:
        out.add(ids["</s>"])
    return frozenset(out - {ids[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in ids})


def from_gguf_kv(kv: Mapping[str, Any]) -> TokenizerData | None:
    """The tokenizer of GGUF key/values (plain Python values); None if it has no
    ``tokenizer.ggml.tokens``.

    ``[PAD{id}]`` / ``<|pad_{id}|>`` row pads are typed 5 (unused) whatever the file says;
    a pre-tokenizer of ``"default"`` reads as None (unknown). Which tokens strip the whitespace
    after them follows llama.cpp's rule on ``general.name`` (`llama_cpp_rstrip`).
    """
    v = Values(kv, "GGUF")
    if kv.get("tokenizer.ggml.tokens") is None:
        return None
    tokens = v.items("tokenizer.ggml.tokens", str)
    model = v.get("tokenizer.ggml.model", str)
    if model not in ("gpt2", "llama"):
        what = _GGUF_MODEL_NAMES.get(model, repr(model))
        raise UnsupportedError(f"GGUF tokenizer model {what} is not supported (only "
                               "tokenizer.ggml.model 'gpt2', byte-level BPE, and 'llama', "
                               "SentencePiece-style BPE)")
    types = v.items("tokenizer.ggml.token_type", int) or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise FormatError(f"GGUF: tokenizer.ggml.token_type has {len(types)} entries for "
                          f"{len(tokens)} tokens")
    types = list(types)
    for i in row_pad_ids(tokens):
        types[i] = UNUSED
    rstrip = llama_cpp_rstrip(v.get("general.name", str), tokens, types)
    if model == "llama":
        return _spm_from_gguf(v, tokens, types, rstrip)
    merges = v.items("tokenizer.ggml.merges", str)
    if merges is None:
        raise FormatError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    pre = v.get("tokenizer.ggml.pre", str)
    pre_type = None if pre in (None, "", "default") else pre
    add_bos = v.get("tokenizer.ggml.add_bos_token", bool)
    if add_bos is None:
        spec = pre_tokenizer_spec(pre_type)
        add_bos = spec.add_bos if spec else False
    return TokenizerData(
        vocab=tokens, merges=merges, token_type=types,
        bos_token_id=v.token_id("tokenizer.ggml.bos_token_id", len(tokens)),
        eos_token_id=v.token_id("tokenizer.ggml.eos_token_id", len(tokens)),
        padding_token_id=v.token_id("tokenizer.ggml.padding_token_id", len(tokens)),
        model_type="BPE", pre_type=pre_type, add_bos_token=bool(add_bos),
        chat_template=v.get("tokenizer.chat_template", str),
        add_eos_token=bool(v.get("tokenizer.ggml.add_eos_token", bool, default=False)),
        rstrip=rstrip)


def _spm_from_gguf(v: Values, tokens: list[str], types: list[int],
                   rstrip: frozenset[int]) -> TokenizerData:
    """llama.cpp's "llama" tokenizer: scores (all 0 when absent, as llama.cpp reads them), BOS
    added and a space prefixed unless the file says otherwise."""
    scores = v.items("tokenizer.ggml.scores", float)
    if scores is None:
        scores = [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise FormatError(f"GGUF: tokenizer.ggml.scores has {len(scores)} entries for "
                          f"{len(tokens)} tokens")
    if v.get("tokenizer.ggml.remove_extra_whitespaces", bool):
        raise UnsupportedError("GGUF SentencePiece tokenizer with remove_extra_whitespaces is "
                               "not supported")
    prefix = v.get("tokenizer.ggml.add_space_prefix", bool, default=True)
    return TokenizerData(
        vocab=tokens, merges=[], scores=scores, token_type=types, model_type="SPM",
        space_prefix="always" if prefix in (True, None) else "never",
        bos_token_id=v.token_id("tokenizer.ggml.bos_token_id", len(tokens)),
        eos_token_id=v.token_id("tokenizer.ggml.eos_token_id", len(tokens)),
        unknown_token_id=v.token_id("tokenizer.ggml.unknown_token_id", len(tokens)),
        padding_token_id=v.token_id("tokenizer.ggml.padding_token_id", len(tokens)),
        add_bos_token=bool(v.get("tokenizer.ggml.add_bos_token", bool, default=True)),
        add_eos_token=bool(v.get("tokenizer.ggml.add_eos_token", bool, default=False)),
        chat_template=v.get("tokenizer.chat_template", str), rstrip=rstrip)
