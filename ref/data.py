"""Training data: a corpus tokenized into uint32 shards, and the batches a run reads from them.

Preparing (`prepare_dataset`, CLI ``prepare-data``):

* A corpus is a directory (walked recursively, in sorted order; hidden entries and
  ``__pycache__`` skipped) or a single file. Every text/code file (`TEXT_SUFFIXES`) is one
  document; every line of a ``.jsonl`` file is one document, its ``"text"`` field. Files that
  are not UTF-8, are binary, are empty or have another suffix are skipped and counted in the
  manifest, never dropped without a trace.
* A document goes to the validation split when the hash of its id (its path relative to the
  corpus, plus ``:LINE`` for jsonl) falls below ``val_fraction`` (`is_validation`): the split is
  by document, deterministic, and a document never moves when others are added or removed.
* Each split is one token stream: every document's tokens followed by the EOS token. Streams
  are cut into ``train-NNNNNN.npy`` / ``val-NNNNNN.npy`` shards (uint32, ``np.save``; loaded with
  ``allow_pickle=False``). ``manifest.json`` records token and document counts, the skipped
  files, the tokenizer's hash and a content hash of the token bytes. The directory is written
  atomically (temporary directory, then rename).

Reading (`open_prepared`, `TrainBatches`, `validation_batches`):

* A batch is (batch, seq + 1) tokens: windows of the stream starting at multiples of seq, so
  that every token is a target once per pass (inputs = ``[:, :-1]``, targets = ``[:, 1:]``).
* Training takes the windows of a pass in a seeded random order (``default_rng([seed, pass])``:
  the order is a function of seed and pass alone, so a resumed run reads the same batches);
  the windows left over when fewer than a batch remain are skipped for that pass.
* When a pass is used up the iterator either wraps to the next pass (counted; the caller is
  told through ``on_wrap``) or, with ``wrap=False``, raises `DataExhaustedError`. It never
  yields a placeholder batch.
* Validation batches are fixed: the same evenly spaced windows of the validation split every
  time they are asked for.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from apr.console import progress_bar, utc_timestamp
from apr.atomic import atomic_dir
from apr.errors import AprError, ConfigError, FormatError, OutputExistsError
from apr.untrusted import load_json
from apr.tokenizer import (UNUSED, TokenizerData, build_tokenizer, from_hf_dir,
                           from_hf_tokenizer_json, row_pad_start)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "apr-ref-tokens/1"
TOKEN_DTYPE = np.uint32
DEFAULT_SHARD_TOKENS = 1 << 24          # 64 MiB of uint32 per shard
DEFAULT_VAL_FRACTION = 0.1
ENCODE_CHUNK = 256                      # documents per encode_batch call

TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
    ".java", ".js", ".ts", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".html", ".css",
    ".tex"})
JSONL_SUFFIXES = frozenset({".jsonl"})
SKIPPED_DIRS = frozenset({"__pycache__"})


class DataError(AprError):
    """The data cannot supply what a run asks for, or is not what it claims to be."""


class DataExhaustedError(DataError):
    """The train split ran out and wrapping around was not allowed."""


# --------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str | os.PathLike) -> TokenizerData:
    """A tokenizer from an HF ``tokenizer.json`` (with ``tokenizer_config.json`` beside it when
    present), an HF directory, or a model file (APR, GGUF) that embeds one."""
    p = Path(path)
    if p.is_dir():
        td = from_hf_dir(p)
        if td is None:
            raise ConfigError(f"{p}: no tokenizer.json in this directory")
        return td
    if not p.exists():
        raise ConfigError(f"{p}: no such tokenizer file or directory")
    if p.suffix == ".json":
        config = p.with_name("tokenizer_config.json")
        return from_hf_tokenizer_json(p, config if config.is_file() else None)
    from apr.model import open_model
    with open_model(p) as view:
        if view.tokenizer is None:
            raise ConfigError(f"{p}: the model file embeds no tokenizer; pass a tokenizer.json")
        return view.tokenizer


def tokenizer_hash(td: TokenizerData) -> str:
    """sha256 of what decides how a corpus is encoded here: tokens, merges, token types, the
    EOS that joins documents and the pre-tokenizer (not BOS: documents are encoded without it). Tokens that can never be produced (unused gap fillers and the row pads
    that a GGUF appends up to the embedding size) do not count, so one tokenizer hashes the
    same read from tokenizer.json, APR or GGUF."""
    n = row_pad_start(td.vocab, td.token_type)
    tokens, types = list(td.vocab[:n]), list(td.token_type[:n])
    tokens = ["" if t == UNUSED else tok for tok, t in zip(tokens, types)]
    doc = {"tokens": tokens, "types": types, "merges": list(td.effective_merges()),
           "eos": td.eos_token_id, "pre": td.pre_type,
           "model": td.model_type.upper()}
    if td.lstrip or td.rstrip:
        doc.update(lstrip=sorted(td.lstrip), rstrip=sorted(td.rstrip))
    if td.normalized:
        doc.update(normalized=sorted(td.normalized))
    if td.is_spm:       # SentencePiece-style: the merge order may come from scores (GGUF)
        doc.update(prefix=td.space_prefix, unk=td.unknown_token_id)
    blob = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- documents

@dataclass(frozen=True)
class Document:
    id: str      # path relative to the corpus root (POSIX), plus ":LINE" for a jsonl line
    text: str


@dataclass
class CorpusScan:
    """What walking a corpus found besides documents: files read and files skipped, by reason."""
    files_read: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, rel: str) -> None:
        self.skipped.setdefault(reason, []).append(rel)


def corpus_files(corpus: Path) -> list[tuple[Path, str]]:
    """(path, id) for every file under ``corpus`` (or ``corpus`` itself), sorted by id."""
    if corpus.is_file():
        return [(corpus, corpus.name)]
    if not corpus.is_dir():
        raise DataError(f"{corpus}: no such corpus file or directory")
    found = []
    for root, dirs, files in os.walk(corpus):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS]
        for name in files:
            if not name.startswith("."):
                path = Path(root) / name
                found.append((path, path.relative_to(corpus).as_posix()))
    return sorted(found, key=lambda pr: pr[1])


def _read_text(path: Path, rel: str, scan: CorpusScan) -> str | None:
    """The file's text, or None (counted in ``scan``) when it is binary or not UTF-8."""
    data = path.read_bytes()
    if b"\x00" in data:
        scan.skip("binary (NUL bytes)", rel)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        scan.skip("not UTF-8", rel)
        return None


def _jsonl_documents(text: str, rel: str) -> Iterator[Document]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = load_json(line, f"{rel}:{lineno}")
        except FormatError as e:
            raise DataError(str(e)) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f'{rel}:{lineno}: no string "text" field; every jsonl line must be '
                            '{"text": ...}')
        if obj["text"]:
            yield Document(f"{rel}:{lineno}", obj["text"])


def iter_documents(corpus: str | os.PathLike, scan: CorpusScan | None = None) -> Iterator[Document]:
    """Every document of the corpus in a fixed order (see the module notes); skipped files
    are recorded in ``scan``."""
    scan = scan if scan is not None else CorpusScan()
    for path, rel in corpus_files(Path(corpus)):
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES and suffix not in JSONL_SUFFIXES:
            scan.skip(f"suffix {suffix or '(none)'} not read", rel)
            continue
        text = _read_text(path, rel, scan)
        if text is None:
            continue
        if not text.strip():
            scan.skip("empty", rel)
            continue
        scan.files_read += 1
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(text, rel)
        else:
            yield Document(rel, text)


def split_key(doc_id: str) -> float:
    """A number in [0, 1) fixed by the document id alone (sha256 of it)."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """The split rule: a document is held out when its `split_key` is below the fraction."""
    return split_key(doc_id) < val_fraction


# --------------------------------------------------------------------------- manifest

@dataclass
class ShardInfo:
    file: str
    tokens: int


@dataclass
class SplitInfo:
    documents: int = 0
    tokens: int = 0          # EOS tokens included
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class Manifest:
    source: str
    tokenizer_hash: str
    tokenizer_vocab_size: int
    eos_token_id: int
    val_fraction: float
    train: SplitInfo
    val: SplitInfo
    content_hash: str        # sha256 over both splits' token bytes
    files_read: int
    skipped_files: dict[str, list[str]]
    created_at: str
    max_token_id: int
    format: str = MANIFEST_FORMAT
    dtype: str = "uint32"
    split_rule: str = ("validation when the first 8 bytes of sha256(document id), big-endian, "
                       "/ 2^64 < val_fraction")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        doc = load_json(text, where)
        try:
            if doc.get("format") != MANIFEST_FORMAT:
                raise FormatError(f"{where}: format {doc.get('format')!r}, expected "
                                  f"{MANIFEST_FORMAT!r}; re-run prepare-data")
            for split in ("train", "val"):
                s = doc[split]
                doc[split] = SplitInfo(s["documents"], s["tokens"],
                                       [ShardInfo(**sh) for sh in s["shards"]])
            return cls(**doc)
        except (KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{where}: not a valid manifest ({type(e).__name__}: {e}); "
                              "re-run prepare-data") from None

    def summary(self) -> dict[str, Any]:
        """Counts without the shard lists and skipped-file names (for reports)."""
        return {"source": self.source, "train_tokens": self.train.tokens,
                "train_documents": self.train.documents, "val_tokens": self.val.tokens,
                "val_documents": self.val.documents, "val_fraction": self.val_fraction,
                "files_read": self.files_read,
                "files_skipped": {k: len(v) for k, v in self.skipped_files.items()},
                "content_hash": self.content_hash, "tokenizer_hash": self.tokenizer_hash}


def is_prepared(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by `prepare_dataset`."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(directory: str | os.PathLike) -> Manifest:
    path = Path(directory) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read the manifest ({e.strerror}); run prepare-data") from None
    return Manifest.from_json(text, str(path))


# --------------------------------------------------------------------------- writing shards

class ShardWriter:
    """Collects one split's token stream and writes it as fixed-size .npy shards,
    hashing the bytes as they go."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.info = SplitInfo()
        self.sha = hashlib.sha256()
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add_document(self, ids: list[int], eos: int) -> None:
        arr = np.empty(len(ids) + 1, dtype=TOKEN_DTYPE)
        arr[:-1] = ids
        arr[-1] = eos
        self._pending.append(arr)
        self._pending_tokens += arr.size
        self.info.documents += 1
        if self._pending_tokens >= self.shard_tokens:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        stream = np.concatenate(self._pending) if self._pending else np.empty(0, TOKEN_DTYPE)
        while stream.size >= self.shard_tokens or (final and stream.size):
            n = min(self.shard_tokens, stream.size)
            self._write_shard(stream[:n])
            stream = stream[n:]
        self._pending = [stream] if stream.size else []
        self._pending_tokens = stream.size

    def _write_shard(self, tokens: np.ndarray) -> None:
        name = f"{self.split}-{len(self.info.shards):06d}.npy"
        np.save(self.directory / name, tokens, allow_pickle=False)
        self.sha.update(tokens.tobytes())
        self.info.shards.append(ShardInfo(name, int(tokens.size)))
        self.info.tokens += int(tokens.size)

    def close(self) -> SplitInfo:
        self._flush(final=True)
        return self.info


def _encoded_chunks(docs: Iterable[Document], tokenizer) -> Iterator[tuple[Document, list[int]]]:
    """(document, token ids) pairs, encoded ENCODE_CHUNK documents at a time (no BOS/EOS)."""
    chunk: list[Document] = []

    def encode(batch: list[Document]):
        encodings = tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False)
        return zip(batch, (e.ids for e in encodings))

    for doc in docs:
        chunk.append(doc)
        if len(chunk) == ENCODE_CHUNK:
            yield from encode(chunk)
            chunk = []
    if chunk:
        yield from encode(chunk)


def prepare_dataset(corpus: str | os.PathLike, td: TokenizerData, out_dir: str | os.PathLike,
                    val_fraction: float = DEFAULT_VAL_FRACTION,
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, force: bool = False,
                    progress: bool = False) -> Manifest:
    """Tokenize ``corpus`` into ``out_dir`` (shards + manifest.json); see the module notes."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens {shard_tokens}: must be positive")
    if td.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; documents are joined with EOS, so "
                          "pass a tokenizer that defines one (tokenizer_config.json eos_token)")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(f"{out} already exists and is not empty (use --force to replace it)")
    corpus = Path(corpus)
    tokenizer = build_tokenizer(td, default_pre="gpt-2")
    scan = CorpusScan()
    bar = progress_bar(progress, unit="tok", unit_scale=True, desc=f"tokenizing {corpus.name}")
    max_id = -1
    with atomic_dir(out) as tmp:
        writers = {"train": ShardWriter(tmp, "train", shard_tokens),
                   "val": ShardWriter(tmp, "val", shard_tokens)}
        for doc, ids in _encoded_chunks(iter_documents(corpus, scan), tokenizer):
            split = "val" if is_validation(doc.id, val_fraction) else "train"
            writers[split].add_document(ids, td.eos_token_id)
            max_id = max(max_id, max(ids, default=-1))
            bar.update(len(ids) + 1)
        train, val = writers["train"].close(), writers["val"].close()
        if train.tokens == 0:
            raise DataError(f"{corpus}: no training documents found ({scan.files_read} files "
                            f"read, skipped: {_skip_counts(scan)}); readable suffixes: "
                            f"{', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))}")
        manifest = Manifest(
            source=str(corpus.resolve()), tokenizer_hash=tokenizer_hash(td),
            tokenizer_vocab_size=td.vocab_size, eos_token_id=td.eos_token_id,
            val_fraction=val_fraction, train=train, val=val,
            content_hash=_content_hash(writers["train"].sha, writers["val"].sha),
            files_read=scan.files_read, skipped_files=scan.skipped,
            created_at=utc_timestamp(),
            max_token_id=max(max_id, td.eos_token_id))
        (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    bar.close()
    return manifest


def _content_hash(train_sha, val_sha) -> str:
    h = hashlib.sha256(b"train:" + train_sha.digest() + b"val:" + val_sha.digest())
    return "sha256:" + h.hexdigest()


def _skip_counts(scan: CorpusScan) -> str:
    return ", ".join(f"{len(v)} {k}" for k, v in scan.skipped.items()) or "none"


# --------------------------------------------------------------------------- reading

class TokenStream:
    """One split's tokens: its shards, memory-mapped, addressed as one long array."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        sizes = [s.size for s in shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length], gathered across shard boundaries."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window {start}..{start + length} outside a stream of {len(self)}")
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[i])
        shard = self.shards[i]
        if offset + length <= shard.size:
            return shard[offset:offset + length]
        parts, left = [], length
        while left:
            piece = self.shards[i][offset:offset + left]
            parts.append(piece)
            left -= piece.size
            i, offset = i + 1, 0
        return np.concatenate(parts)


@dataclass
class PreparedData:
    directory: Path
    manifest: Manifest
    train: TokenStream
    val: TokenStream


def _load_split(directory: Path, info: SplitInfo, sha) -> TokenStream:
    shards = []
    for sh in info.shards:
        path = directory / sh.file
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot load the shard ({e}); re-run prepare-data") from None
        if arr.dtype != TOKEN_DTYPE or arr.ndim != 1 or arr.size != sh.tokens:
            raise DataError(f"{path}: holds {arr.dtype} {list(arr.shape)}, the manifest says "
                            f"uint32 [{sh.tokens}]; re-run prepare-data")
        if sha is not None:
            sha.update(np.ascontiguousarray(arr).tobytes())
        shards.append(arr)
    return TokenStream(shards)


def open_prepared(directory: str | os.PathLike, verify: bool = True) -> PreparedData:
    """The manifest and both splits of a prepared directory. ``verify`` recomputes the
    content hash (one read of every shard) and raises on a mismatch."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    train_sha = hashlib.sha256() if verify else None
    val_sha = hashlib.sha256() if verify else None
    train = _load_split(directory, manifest.train, train_sha)
    val = _load_split(directory, manifest.val, val_sha)
    if verify and _content_hash(train_sha, val_sha) != manifest.content_hash:
        raise DataError(f"{directory}: the shards do not match the manifest's content hash "
                        "(modified or corrupted after prepare-data); re-run prepare-data")
    return PreparedData(directory, manifest, train, val)


# --------------------------------------------------------------------------- batches

@dataclass
class DataPosition:
    """Where the train iterator stands: ``epoch`` passes started before the current one
    (= wrap-arounds so far) and ``batch`` batches already taken from the current pass."""
    epoch: int = 0
    batch: int = 0


@dataclass(frozen=True)
class Batch:
    tokens: np.ndarray      # (batch, seq + 1) int64
    epoch: int              # the pass it came from (0 = first)
    index: int              # its index within the pass

    @property
    def inputs(self) -> np.ndarray:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> np.ndarray:
        return self.tokens[:, 1:]


def windows_in(n_tokens: int, seq_length: int) -> int:
    """How many windows of seq_length + 1 tokens start at multiples of seq_length."""
    return max(0, (n_tokens - 1) // seq_length)


class TrainBatches:
    """Training batches in a seeded order, pass after pass (see the module notes)."""

    def __init__(self, stream: TokenStream, batch_size: int, seq_length: int, seed: int,
                 wrap: bool = True, on_wrap: Callable[[int], None] | None = None,
                 position: DataPosition | None = None):
        self.stream, self.batch_size, self.seq_length = stream, batch_size, seq_length
        self.seed, self.wrap, self.on_wrap = seed, wrap, on_wrap
        self.windows_per_epoch = windows_in(len(stream), seq_length)
        self.batches_per_epoch = self.windows_per_epoch // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the train split has {len(stream):,} tokens, fewer than one batch of "
                f"{batch_size} x {seq_length + 1}: add data or lower --batch-size/--seq-length")
        self.position = DataPosition(**asdict(position)) if position else DataPosition()
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    @property
    def tokens_per_epoch(self) -> int:
        return self.batches_per_epoch * self.batch_size * self.seq_length

    @property
    def wraps(self) -> int:
        return self.position.epoch

    @property
    def epochs(self) -> float:
        """Passes completed, as a fraction (2.5 = two passes and half of the third)."""
        return self.position.epoch + self.position.batch / self.batches_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """Window indices of pass ``epoch`` in the order they are read."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._order_epoch = rng.permutation(self.windows_per_epoch), epoch
        return self._order

    def _start_next_epoch(self) -> None:
        if not self.wrap:
            raise DataExhaustedError(
                f"the train split is used up after {self.batches_per_epoch} batches (one pass "
                f"over {self.tokens_per_epoch:,} tokens) and --no-wrap is set: add data, lower "
                "--steps, or drop --no-wrap to reuse it (wraps are counted)")
        self.position = DataPosition(self.position.epoch + 1, 0)
        if self.on_wrap is not None:
            self.on_wrap(self.position.epoch)

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> Batch:
        if self.position.batch >= self.batches_per_epoch:
            self._start_next_epoch()
        epoch, b = self.position.epoch, self.position.batch
        picked = self.order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]
        t = self.seq_length
        tokens = np.stack([self.stream.window(int(w) * t, t + 1) for w in picked])
        self.position.batch += 1
        return Batch(tokens.astype(np.int64), epoch, b)


def validation_batches(stream: TokenStream, batch_size: int, seq_length: int,
                       n_batches: int) -> list[np.ndarray]:
    """``n_batches`` fixed (batch, seq + 1) int64 arrays: evenly spaced windows of the
    validation split. Raises DataError when the split holds fewer than that many."""
    available = windows_in(len(stream), seq_length)
    need = n_batches * batch_size
    if n_batches < 1:
        raise DataError(f"--val-batches {n_batches}: at least one validation batch is needed")
    if available < need:
        raise DataError(
            f"the validation split has {len(stream):,} tokens = {available} windows of "
            f"{seq_length + 1}, fewer than --val-batches {n_batches} x --batch-size {batch_size} "
            f"= {need}: raise --val-fraction, add data, or lower --val-batches/--seq-length")
    starts = (np.arange(need, dtype=np.int64) * available // need) * seq_length
    rows = np.stack([stream.window(int(s), seq_length + 1) for s in starts]).astype(np.int64)
    return [rows[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def required_steps(tokens: float, batch_size: int, seq_length: int) -> int:
    """The fewest steps of batch x seq tokens that reach ``tokens``."""
    return int(math.ceil(tokens / (batch_size * seq_length)))
