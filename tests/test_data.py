"""ref.data: a corpus tokenized into shards with a manifest and a validation split by
document; the batch iterator's windows, epochs, wrap-arounds and --no-wrap; fixed validation
batches; the prepare-data command."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from apr.errors import OutputExistsError
from apr.tokenizer import build_tokenizer, from_apr_metadata, to_apr_metadata
from oracles import tokenizer_json
from ref.data import (DataError, DataExhaustedError, DataPosition, TokenStream, TrainBatches,
                      is_validation, iter_documents, load_tokenizer, open_prepared,
                      prepare_dataset, split_key, tokenizer_hash, validation_batches)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()


def _text(i: int) -> str:
    """A small document, different for each i."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(20 + i % 13)]
    return f"# document {i}\ndef f{i}(x):\n    return x * {i}  # " + " ".join(words) + "\n"


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(tokenizer_json(400), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def td(tok_path):
    return load_tokenizer(tok_path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """30 code/text files in nested directories, a jsonl file, and files that must be skipped."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        sub = root / f"pkg{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.{'py' if i % 4 else 'md'}").write_text(_text(i), encoding="utf-8")
    (root / "docs.jsonl").write_text(
        json.dumps({"text": _text(100)}) + "\n\n" + json.dumps({"text": _text(101), "id": 7}) + "\n",
        encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (root / "blob.txt").write_bytes(b"text\x00with a NUL")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.md").write_text("  \n", encoding="utf-8")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.py").write_text("never read", encoding="utf-8")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.py").write_text("never read", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def prepared(corpus, td, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare_dataset(corpus, td, out, val_fraction=0.3)
    return out


def _encode(td, text: str) -> list[int]:
    return build_tokenizer(td).encode(text, add_special_tokens=False).ids


# --------------------------------------------------------------------------- preparing

def test_manifest_counts_and_split_by_document(corpus, td, prepared):
    data = open_prepared(prepared)
    m = data.manifest
    docs = list(iter_documents(corpus))
    assert len(docs) == 32                           # 30 files + 2 jsonl lines
    assert not any(d.id.startswith((".hidden", "__pycache__")) for d in docs)
    eos = td.eos_token_id
    expected = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    for d in docs:
        split = "val" if is_validation(d.id, 0.3) else "train"
        expected[split] += _encode(td, d.text) + [eos]
        counts[split] += 1
    assert counts["val"] and counts["train"]          # both splits hold documents
    assert (m.train.documents, m.val.documents) == (counts["train"], counts["val"])
    assert (m.train.tokens, m.val.tokens) == (len(expected["train"]), len(expected["val"]))
    # the streams are exactly the documents of each split, in corpus order, joined with EOS
    assert np.array_equal(data.train.window(0, len(data.train)), expected["train"])
    assert np.array_equal(data.val.window(0, len(data.val)), expected["val"])
    assert m.tokenizer_hash == tokenizer_hash(td) and m.eos_token_id == eos
    assert m.max_token_id == max(expected["train"] + expected["val"])
    assert m.files_read == 31 and m.content_hash.startswith("sha256:")
    assert m.skipped_files == {"binary (NUL bytes)": ["blob.txt"], "empty": ["empty.md"],
                               "suffix .png not read": ["image.png"], "not UTF-8": ["latin1.txt"]}
    for shard in m.train.shards + m.val.shards:
        arr = np.load(prepared / shard.file, allow_pickle=False)
        assert arr.dtype == np.uint32 and arr.size == shard.tokens


def test_split_rule_depends_only_on_the_document_id():
    ids = [f"dir/file{i}.py" for i in range(4000)]
    held = [i for i in ids if is_validation(i, 0.1)]
    assert 300 < len(held) < 500                      # about 10%
    assert held == [i for i in ids if is_validation(i, 0.1)]
    assert set(held) <= {i for i in ids if is_validation(i, 0.2)}   # monotone in the fraction
    assert all(0 <= split_key(i) < 1 for i in ids[:50])


def test_content_hash_is_deterministic_and_tracks_content(corpus, td, tmp_path):
    a = prepare_dataset(corpus, td, tmp_path / "a", val_fraction=0.3)
    b = prepare_dataset(corpus, td, tmp_path / "b", val_fraction=0.3)
    assert a.content_hash == b.content_hash
    changed = tmp_path / "corpus"
    changed.mkdir()
    (changed / "one.py").write_text(_text(1), encoding="utf-8")
    (changed / "two.py").write_text(_text(2), encoding="utf-8")
    c1 = prepare_dataset(changed, td, tmp_path / "c1", val_fraction=0.0)
    (changed / "two.py").write_text(_text(3), encoding="utf-8")
    c2 = prepare_dataset(changed, td, tmp_path / "c2", val_fraction=0.0)
    assert c1.content_hash != c2.content_hash


def test_shards_and_windows_across_shard_boundaries(corpus, td, tmp_path):
    m = prepare_dataset(corpus, td, tmp_path / "d", val_fraction=0.3, shard_tokens=100)
    assert len(m.train.shards) > 3
    assert all(s.tokens == 100 for s in m.train.shards[:-1]) and 0 < m.train.shards[-1].tokens <= 100
    data = open_prepared(tmp_path / "d")
    whole = np.concatenate([np.load(tmp_path / "d" / s.file) for s in m.train.shards])
    for start, length in ((0, 1), (95, 10), (99, 102), (150, 250), (len(whole) - 7, 7)):
        assert np.array_equal(data.train.window(start, length), whole[start:start + length])
    with pytest.raises(IndexError):
        data.train.window(len(whole) - 3, 4)


def test_tampered_shard_is_detected(corpus, td, tmp_path):
    prepare_dataset(corpus, td, tmp_path / "d", val_fraction=0.3)
    shard = tmp_path / "d" / "train-000000.npy"
    arr = np.load(shard)
    arr[5] += 1
    np.save(shard, arr)
    with pytest.raises(DataError, match="content hash"):
        open_prepared(tmp_path / "d")


def test_jsonl_documents_and_errors(td, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": ""}\n',
                                            encoding="utf-8")
    assert [(d.id, d.text) for d in iter_documents(tmp_path / "c")] == [("a.jsonl:1", "one"),
                                                                        ("a.jsonl:3", "two")]
    (tmp_path / "c" / "b.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r'b\.jsonl:2: no string "text" field'):
        prepare_dataset(tmp_path / "c", td, tmp_path / "out")
    assert not (tmp_path / "out").exists()            # nothing half-written


def test_prepare_refuses_bad_input(corpus, td, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        prepare_dataset(corpus, td, tmp_path / "out")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="no training documents"):
        prepare_dataset(tmp_path / "bin", td, tmp_path / "o2")
    with pytest.raises(DataError, match="no such corpus"):
        prepare_dataset(tmp_path / "missing", td, tmp_path / "o3")


def test_tokenizer_hash_survives_apr_metadata(td):
    back = from_apr_metadata(to_apr_metadata(td))
    assert tokenizer_hash(back) == tokenizer_hash(td)
    other = from_apr_metadata({**to_apr_metadata(td), "tokenizer.merges": td.merges[:-1]})
    assert tokenizer_hash(other) != tokenizer_hash(td)


def test_sentencepiece_tokenizer_hash_tracks_scores_and_prefix():
    """A GGUF SentencePiece tokenizer stores no merges: its scores decide the encoding, so two
    that differ only in scores (or in the space prefix) hash differently, and the APR copy of
    one (which stores the merges the scores imply) hashes the same."""
    from apr.tokenizer import TokenizerData
    vocab = ["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁a", "ba"]
    types = [2, 3, 3, 1, 1, 1, 1, 1, 1]

    def make(scores, prefix="always"):
        return TokenizerData(vocab=vocab, merges=[], scores=scores, token_type=types,
                             model_type="SPM", space_prefix=prefix, eos_token_id=2)
    base = make([0, 0, 0, -1, -2, -3, -4, -5, -6.0])
    assert tokenizer_hash(make([0, 0, 0, -1, -2, -3, -6, -5, -4.0])) != tokenizer_hash(base)
    assert tokenizer_hash(make(base.scores, "never")) != tokenizer_hash(base)
    assert tokenizer_hash(from_apr_metadata(to_apr_metadata(base))) == tokenizer_hash(base)


# --------------------------------------------------------------------------- batches

def _stream(n: int, shard: int = 37) -> TokenStream:
    tokens = np.arange(n, dtype=np.uint32)
    return TokenStream([tokens[i:i + shard] for i in range(0, n, shard)])


def test_windows_are_contiguous_and_cover_a_pass():
    b, t = 3, 8
    it = TrainBatches(_stream(1000), b, t, seed=0)
    assert it.windows_per_epoch == 999 // 8 and it.batches_per_epoch == 124 // 3
    starts = []
    for _ in range(it.batches_per_epoch):
        batch = next(it)
        assert batch.tokens.shape == (b, t + 1) and batch.tokens.dtype == np.int64
        assert np.array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
        for row in batch.tokens:                       # a contiguous slice at a multiple of t
            assert row[0] % t == 0 and np.array_equal(row, np.arange(row[0], row[0] + t + 1))
            starts.append(int(row[0]))
    assert len(set(starts)) == len(starts) == it.batches_per_epoch * b   # no window twice
    assert starts != sorted(starts)                    # a shuffled order
    assert it.wraps == 0 and it.epochs == 1.0


def test_epochs_and_wraps_are_counted():
    wraps = []
    it = TrainBatches(_stream(200), 2, 8, seed=1, on_wrap=wraps.append)
    per = it.batches_per_epoch
    first = [next(it).tokens[:, 0].tolist() for _ in range(per)]
    assert wraps == []
    batch = next(it)
    assert wraps == [1] and it.wraps == 1 and batch.epoch == 1 and batch.index == 0
    second = [batch.tokens[:, 0].tolist()] + [next(it).tokens[:, 0].tolist() for _ in range(per - 1)]
    assert first != second                             # each pass has its own order
    assert it.epochs == 2.0
    next(it)
    assert wraps == [1, 2] and it.epochs == pytest.approx(2 + 1 / per)


def test_no_wrap_stops_with_an_error_after_one_pass():
    it = TrainBatches(_stream(200), 2, 8, seed=0, wrap=False)
    for _ in range(it.batches_per_epoch):
        next(it)
    with pytest.raises(DataExhaustedError, match="--no-wrap"):
        next(it)


def test_a_resumed_iterator_continues_the_same_sequence():
    a = TrainBatches(_stream(300), 2, 8, seed=5)
    taken = [next(a).tokens for _ in range(a.batches_per_epoch + 3)]
    b = TrainBatches(_stream(300), 2, 8, seed=5, position=DataPosition(1, 3))
    for _ in range(10):
        assert np.array_equal(next(a).tokens, next(b).tokens)
    assert len(taken) == a.batches_per_epoch + 3
    c = TrainBatches(_stream(300), 2, 8, seed=6)
    assert not np.array_equal(next(c).tokens, taken[0])


def test_too_little_data_for_one_batch():
    with pytest.raises(DataError, match="fewer than one batch"):
        TrainBatches(_stream(20), 4, 8, seed=0)


def test_validation_batches_are_fixed_and_sized():
    s = _stream(1000)
    first = validation_batches(s, 4, 8, 5)
    again = validation_batches(s, 4, 8, 5)
    assert len(first) == 5 and all(x.shape == (4, 9) for x in first)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    starts = np.concatenate([x[:, 0] for x in first])
    assert len(set(starts.tolist())) == 20 and starts.max() > 800   # spread over the split
    with pytest.raises(DataError, match=r"fewer than --val-batches 40 x --batch-size 4"):
        validation_batches(s, 4, 8, 40)


# --------------------------------------------------------------------------- command

def _cli(*args):
    from ref.commands import prepare_data_command
    return CliRunner().invoke(prepare_data_command, [str(a) for a in args])


def test_prepare_data_command(corpus, tok_path, tmp_path):
    r = _cli(corpus, "--tokenizer", tok_path, "-o", tmp_path / "d", "--val-fraction", "0.3", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["train"]["documents"] + doc["val"]["documents"] == 32
    assert doc["content_hash"] == json.loads((tmp_path / "d" / "manifest.json").read_text())["content_hash"]
    r = _cli(corpus, "--tokenizer", tok_path, "-o", tmp_path / "d")
    assert r.exit_code == 2 and "already exists" in r.stderr and "--force" in r.stderr
    r = _cli(corpus, "--tokenizer", tok_path, "-o", tmp_path / "d", "--force")
    assert r.exit_code == 0 and "train tokens" in r.stdout


def test_prepare_data_through_cli_main(corpus, tok_path, tmp_path):
    code = "import cli; cli.main()"
    r = subprocess.run([sys.executable, "-c", code, "prepare-data", str(corpus), "--tokenizer",
                        str(tmp_path / "missing.json"), "-o", str(tmp_path / "d")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
