"""SentencePiece-style BPE (Llama 2, Mistral, Phi-3, Gemma): what differs from byte-level BPE.

Such a tokenizer works on characters, not bytes: spaces become ``"▁"`` (U+2581), optionally
one ``"▁"`` is put in front of the text (the *space prefix*), pieces are merged pairwise, and a
character no piece covers falls back to its UTF-8 bytes as ``<0xXX>`` tokens.

The formats store the merge order differently:

* GGUF (``tokenizer.ggml.model = "llama"``) stores a *score* per piece and no merges: llama.cpp
  merges, again and again, the adjacent pair whose concatenation is a piece with the highest
  score (leftmost first among equals), for every pair whose concatenation is in the vocabulary;
* HF ``tokenizer.json`` stores a BPE model with ``byte_fallback`` and an explicit merge list.

`merges_from_scores` turns scores into the equivalent merge list (every split of a piece into two
pieces, ranked by the piece's score), `scores_from_merges` the other way. The space prefix has
four modes (special tokens split the text first; each mode acts on the parts between them):

* ``"always"``: every part gets a ``"▁"`` in front (llama.cpp's ``add_space_prefix``; HF's
  Prepend normalizer, the layout of Llama 2 / Mistral / Phi-3 tokenizer.json files);
* ``"never"``: no part does (Gemma);
* ``"metaspace"``: every part that does not already start with a space (HF's Metaspace
  ``prepend_scheme="always"``, what transformers 5 builds for ``legacy=True``);
* ``"metaspace-first"``: only the part at the start of the text, and only if it does not start
  with a space (Metaspace ``prepend_scheme="first"``, transformers' default).

GGUF can say only the first two; writing either Metaspace mode to GGUF changes how text that
starts with a space (or follows a special token) is tokenized, and is reported as a change.
"""
from __future__ import annotations

from typing import Any, Mapping

SPACE = "\u2581"
PREFIX_MODES = ("always", "never", "metaspace", "metaspace-first")
GGUF_PREFIX_MODES = ("always", "never")
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def merges_from_scores(vocab: list[str], scores: list[float], token_type: list[int]) -> list[str]:
    """The merge list ("left right") that encodes like llama.cpp's score-driven merging: every
    split of a normal piece into two normal pieces, best piece score first (ties: lower ids)."""
    ids: dict[str, int] = {}
    for i, piece in enumerate(vocab):
        if token_type[i] == NORMAL:
            ids.setdefault(piece, i)
    found = []
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                found.append((-scores[i], i, ids[left], ids[right], left, right))
    found.sort()
    return [f"{left} {right}" for *_, left, right in found]


def scores_from_merges(vocab: list[str], merges: list[str], token_type: list[int]) -> list[float]:
    """Scores under which llama.cpp merges as ``merges`` do: a piece made by merge ``k`` (its
    first) scores ``-k``; every other piece (characters, bytes, special tokens) 0, since only the
    scores of merge results are ever compared."""
    first: dict[str, int] = {}
    for k, m in enumerate(merges):
        first.setdefault(m.replace(" ", "", 1), k)
    return [float(-first[t]) if token_type[i] == NORMAL and t in first else 0.0
            for i, t in enumerate(vocab)]


def normalizer_and_pre(prefix: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """tokenizer.json's normalizer and pre-tokenizer for a space-prefix mode (see the module
    notes)."""
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if prefix == "always":
        return {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE}, replace]}, None
    if prefix.startswith("metaspace"):
        scheme = "first" if prefix == "metaspace-first" else "always"
        return None, {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": scheme,
                      "split": False}
    return replace, None


def decoder(prefix: str) -> dict[str, Any]:
    steps = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
             {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix != "never":
        steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"type": "Sequence", "decoders": steps}


def _steps(component: Mapping[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not component:
        return []
    if component.get("type") == "Sequence":
        return [s for sub in component.get(key) or [] for s in _steps(sub, key)]
    return [dict(component)]


def detect_prefix(doc: Mapping[str, Any]) -> str | None:
    """The space-prefix mode of a byte-fallback BPE tokenizer.json, or None when its normalizer
    and pre-tokenizer are not one of the SentencePiece layouts we can reproduce exactly."""
    norm = _steps(doc.get("normalizer"), "normalizers")
    pre = _steps(doc.get("pre_tokenizer"), "pretokenizers")
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}

    def is_replace(step: Mapping[str, Any]) -> bool:
        return {k: step.get(k) for k in replace} == replace

    # Gemma: a Split on " " after the normalizer has replaced every space splits nothing
    pre = [s for s in pre if not (s.get("type") == "Split" and s.get("pattern") == {"String": " "}
                                  and norm and is_replace(norm[-1]))]
    if not pre and len(norm) == 2 and norm[0].get("type") == "Prepend" \
            and norm[0].get("prepend") == SPACE and is_replace(norm[1]):
        return "always"
    if not pre and len(norm) == 1 and is_replace(norm[0]):
        return "never"
    if not norm and len(pre) == 1 and pre[0].get("type") == "Metaspace" \
            and pre[0].get("replacement") == SPACE and not pre[0].get("split", True):
        return {"always": "metaspace", "first": "metaspace-first", "never": "never"}.get(
            pre[0].get("prepend_scheme", "always"))
    return None
