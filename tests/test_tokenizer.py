"""apr.tokenizer against real tokenizers: llama.cpp's ggml-vocab-*.gguf files with their
tokenization vectors (.inp/.out, written by HF tokenizers with add_special_tokens=False),
transformers' AutoTokenizer, llama.cpp's converter (pre-tokenizer hashes) and llama.cpp itself
(vocab-only load of a GGUF we write)."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
import struct
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import gguf
import pytest
import tokenizers
from hypothesis import given, settings, strategies as st
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from apr.errors import ConfigError, UnsupportedError
from apr.tokenizer import (CONTROL, NORMAL, UNUSED, USER_DEFINED, TokenizerData, build_tokenizer,
                           from_apr_metadata, from_gguf_fields, from_hf_dir,
                           from_hf_tokenizer_json, is_row_pad, row_pad_start, to_apr_metadata,
                           to_gguf_fields, to_hf_files)

VOCABS = ["qwen2", "llama-bpe", "gpt-2", "qwen35"]
# ggml-vocab-qwen35.gguf is byte for byte ggml-vocab-qwen2.gguf but for tokenizer.ggml.pre
# (checked in _load); parsing it again would cost seconds, so the qwen35 vectors run against the
# qwen2 data with pre_type "qwen35".
SAME_DATA_AS = {"qwen35": "qwen2"}
SEPARATOR = "\n__ggml_vocab_test__\n"


# ---------------------------------------------------------------------------------------------
# Fixtures: each vocab GGUF is parsed once per session (GGUFReader is slow on 150k strings).
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _reader(path: str) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


@lru_cache(maxsize=None)
def _load(path: str) -> TokenizerData:
    name = Path(path).name[len("ggml-vocab-"):-len(".gguf")]
    if name in SAME_DATA_AS:
        other_path = path.replace(name, SAME_DATA_AS[name])
        pre = {n: b"tokenizer.ggml.pre" + struct.pack("<IQ", gguf.GGUFValueType.STRING,
                                                      len(n)) + n.encode()
               for n in (name, SAME_DATA_AS[name])}
        data = Path(path).read_bytes()
        assert data.count(pre[name]) == 1
        assert data.replace(pre[name], pre[SAME_DATA_AS[name]]) == Path(other_path).read_bytes()
        return dataclasses.replace(_load(other_path), pre_type=name)
    td = from_gguf_fields(_reader(path))
    assert td is not None
    return td


@lru_cache(maxsize=None)
def _built(path: str) -> tokenizers.Tokenizer:
    return build_tokenizer(_load(path))


@pytest.fixture(scope="session")
def models_dir(llama_cpp_src: Path) -> Path:
    return llama_cpp_src / "models"


def vocab_path(models_dir: Path, name: str) -> str:
    return str(models_dir / f"ggml-vocab-{name}.gguf")


def read_vectors(models_dir: Path, name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test vectors: .inp holds texts each followed by SEPARATOR, .out one line of
    space-separated ids per text."""
    inp = (models_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    out = (models_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8")
    assert inp.endswith(SEPARATOR) and out.endswith("\n")
    texts = inp.split(SEPARATOR)[:-1]
    ids = [[int(x) for x in line.split()] for line in out.split("\n")[:-1]]
    assert len(texts) == len(ids) > 40
    return list(zip(texts, ids))


def encode_all(tok: tokenizers.Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------
# Real vocabularies
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VOCABS)
def test_vectors_encode_exactly_and_decode_back(models_dir, name):
    vectors = read_vectors(models_dir, name)
    tok = _built(vocab_path(models_dir, name))
    texts = [t for t, _ in vectors]
    assert encode_all(tok, texts) == [ids for _, ids in vectors]
    for text, ids in vectors:
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_qwen2_normalizes_nfc_and_qwen35_does_not(models_dir):
    decomposed = "re\u0301sume\u0301"       # 'résumé' with combining accents
    composed = "r\u00e9sum\u00e9"
    qwen2 = _built(vocab_path(models_dir, "qwen2"))
    qwen35 = _built(vocab_path(models_dir, "qwen35"))
    assert qwen2.encode(decomposed).ids == qwen2.encode(composed).ids
    assert qwen35.encode(decomposed).ids != qwen35.encode(composed).ids


@pytest.mark.parametrize("name, bos, eos, add_bos, n_control, n_unused", [
    ("qwen2", 151643, 151643, False, 3, 290),
    ("llama-bpe", 128000, 128001, True, 256, 0),
    ("gpt-2", 50256, 50256, False, 1, 0),
])
def test_gguf_metadata_is_read(models_dir, name, bos, eos, add_bos, n_control, n_unused):
    td = _load(vocab_path(models_dir, name))
    assert (td.pre_type, td.bos_token_id, td.eos_token_id, td.add_bos_token) == (
        name, bos, eos, add_bos)
    assert td.token_type.count(CONTROL) == n_control
    assert td.token_type.count(UNUSED) == n_unused          # qwen2's [PAD151646].. rows
    assert td.token_type.count(USER_DEFINED) == 0
    assert td.model_type == "BPE" and td.vocab_size == len(td.vocab) == len(td.token_type)
    if name == "qwen2":
        assert td.chat_template and "<|im_start|>" in td.chat_template
        assert td.vocab[151646] == "[PAD151646]" and td.padding_token_id == 151643


def test_bos_only_when_asked():
    td = from_hf_tokenizer_json(trained("llama-bpe").to_str(), {"bos_token": "<|pad|>"})
    plain, with_bos = build_tokenizer(td), build_tokenizer(td, add_bos=True)
    ids = trained("llama-bpe").encode("def f(x)").ids
    assert plain.encode("def f(x)").ids == ids
    assert with_bos.encode("def f(x)").ids == [1] + ids
    assert with_bos.encode("def f(x)", add_special_tokens=False).ids == ids


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe", "gpt-2"])
def test_apr_metadata_round_trip(models_dir, name):
    td = _load(vocab_path(models_dir, name))
    meta = json.loads(json.dumps(to_apr_metadata(td)))   # as stored in the APR JSON header
    assert meta["tokenizer.vocab_size"] == td.vocab_size
    assert meta["tokenizer.model_type"] == "BPE" and meta["tokenizer.pre_type"] == name
    assert all(v is not None for v in meta.values())
    assert from_apr_metadata(meta) == td
    vectors = read_vectors(models_dir, name)
    assert encode_all(_built_via_apr(vocab_path(models_dir, name)), [t for t, _ in vectors]) == [
        ids for _, ids in vectors]


@lru_cache(maxsize=None)
def _built_via_apr(path: str) -> tokenizers.Tokenizer:
    """The tokenizer rebuilt from the APR metadata (through its JSON spelling) of a vocab."""
    meta = json.loads(json.dumps(to_apr_metadata(_load(path))))
    return build_tokenizer(from_apr_metadata(meta))


@pytest.fixture(scope="session")
def hf_export(models_dir, tmp_path_factory):
    """name -> (directory written by to_hf_files, AutoTokenizer loaded from it); cached."""
    from transformers import AutoTokenizer

    cache: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"hf-{name}")
            td = _load(vocab_path(models_dir, name))
            for file, text in to_hf_files(td, model_max_length=4096).items():
                (out / file).write_text(text, encoding="utf-8")
            cache[name] = out, AutoTokenizer.from_pretrained(out)
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe", "gpt-2"])
def test_hf_files_round_trip(models_dir, hf_export, name):
    td = _load(vocab_path(models_dir, name))
    out, hf = hf_export(name)
    assert from_hf_dir(out) == td
    vectors = read_vectors(models_dir, name)
    texts = [t for t, _ in vectors]
    expected = [ids for _, ids in vectors]
    raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert encode_all(raw, texts) == expected
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == expected
    bos = [td.bos_token_id] if td.add_bos_token else []
    assert hf.encode("Hello world") == bos + hf.encode("Hello world", add_special_tokens=False)
    assert raw.encode("Hello world").ids == hf.encode("Hello world")
    assert hf.bos_token_id == td.bos_token_id and hf.eos_token_id == td.eos_token_id
    assert hf.model_max_length == 4096
    assert len(hf) == td.vocab_size


def _converter_hashes(llama_cpp_src: Path) -> tuple[str, dict[str, set[str]]]:
    """chktxt and {pre-tokenizer name: known sha256} from llama.cpp's convert_hf_to_gguf
    (get_vocab_base_pre lives in convert_hf_to_gguf.py or, in newer trees, conversion/)."""
    candidates = [llama_cpp_src / "convert_hf_to_gguf.py",
                  *sorted((llama_cpp_src / "conversion").glob("*.py"))]
    for path in candidates:
        src = path.read_text(encoding="utf-8") if path.exists() else ""
        if "def get_vocab_base_pre" in src:
            break
    else:
        raise AssertionError(f"no get_vocab_base_pre in {llama_cpp_src} (convert_hf_to_gguf.py "
                             "or conversion/*.py): the llama.cpp tree is incomplete")
    chktxt = ast.literal_eval(re.search(r"^\s*chktxt = ('.*')\s*$", src, re.M).group(1))
    known: dict[str, set[str]] = {}
    for digest, name in re.findall(
            r'if chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', src):
        known.setdefault(name, set()).add(digest)
    assert len(known) > 20 and "chktxt" not in chktxt
    return chktxt, known


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe", "gpt-2"])
def test_llama_cpp_converter_recognizes_exported_tokenizer(llama_cpp_src, hf_export, name):
    """convert_hf_to_gguf.py refuses a tokenizer whose sha256(str(encode(chktxt))) it does not
    know (AutoTokenizer's encode, BOS included); our HF export must hash to the name the vocab
    came from."""
    chktxt, known = _converter_hashes(llama_cpp_src)
    ids = hf_export(name)[1].encode(chktxt)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    assert digest in known[name], (name, [n for n, d in known.items() if digest in d])


_LLAMA_CPP_TOKENIZE = textwrap.dedent("""
    import json, sys
    import llama_cpp
    llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
    texts = json.load(open(sys.argv[2], encoding="utf-8"))
    plain = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    print(json.dumps({"plain": plain, "add_special": llm.tokenize(b"Hello world", add_bos=True),
                      "n_vocab": llm.n_vocab()}))
""")


def test_llama_cpp_tokenizes_our_padded_gguf(models_dir, tmp_path):
    """Write a GGUF with the qwen2 vocabulary padded to more rows than it has, load it in
    llama.cpp (vocab only, in a subprocess: a GGML assert would kill us) and tokenize."""
    name, n_rows = "qwen2", 152064
    src = _reader(vocab_path(models_dir, name))
    td = _load(vocab_path(models_dir, name))
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, src.fields["general.architecture"].contents())
    for key, f in src.fields.items():
        if not key.startswith(("GGUF.", "general.architecture", "tokenizer.")):
            writer.add_key_value(key, f.contents(), f.types[0])
    for key, value, vtype in to_gguf_fields(td, n_rows):
        writer.add_key_value(key, value, vtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()

    vectors = read_vectors(models_dir, name)
    (tmp_path / "texts.json").write_text(json.dumps([t for t, _ in vectors]), encoding="utf-8")
    run = subprocess.run([sys.executable, "-c", _LLAMA_CPP_TOKENIZE, str(path),
                          str(tmp_path / "texts.json")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["n_vocab"] == n_rows
    assert result["plain"] == [ids for _, ids in vectors]
    assert result["add_special"] == [9707, 1879]        # qwen2 adds no BOS


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
       | st.text(alphabet=" \t\n\r'sSdD3x0éeÉ\u0301😀我-=!.", max_size=40))
def test_qwen2_apr_round_trip_agrees_on_random_text(qwen2_variants, text):
    direct, via_apr, via_hf = qwen2_variants
    ids = direct.encode(text).ids
    assert via_apr.encode(text).ids == ids
    assert via_hf.encode(text).ids == ids


@pytest.fixture(scope="session")
def qwen2_variants(models_dir):
    path = vocab_path(models_dir, "qwen2")
    via_hf = tokenizers.Tokenizer.from_str(to_hf_files(_load(path))["tokenizer.json"])
    return _built(path), _built_via_apr(path), via_hf


# ---------------------------------------------------------------------------------------------
# Small tokenizers trained with the `tokenizers` library
# ---------------------------------------------------------------------------------------------

_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|pad|>"]


def _stdlib(*names: str) -> str:
    import importlib

    return "".join(Path(importlib.import_module(n).__file__).read_text(encoding="utf-8")
                   for n in names)


@lru_cache(maxsize=None)
def trained(style: str) -> tokenizers.Tokenizer:
    """A ~400-token byte-level BPE trained on a few stdlib modules, pre-tokenized like
    ``style``; two special tokens and one user-defined (non-special) added token."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_REGEX

    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=style == "llama-bpe"))
    if style == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = {"qwen2": QWEN2_REGEX, "llama-bpe": _LLAMA3_REGEX}[style]
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_stdlib("textwrap", "shlex", "fnmatch")], trainer=trainer)
    tok.add_tokens([tokenizers.AddedToken("<tool>", normalized=False)])
    return tok


@lru_cache(maxsize=None)
def held_out() -> str:
    """Text none of the trained tokenizers saw, with a special and a user-defined token."""
    return _stdlib("calendar") + "<|endoftext|>" + _stdlib("colorsys") + " <tool> é"


@pytest.mark.parametrize("style", ["gpt-2", "qwen2", "llama-bpe"])
def test_trained_tokenizer_rebuilds_exactly(style):
    original = trained(style)
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "pad_token": {"content": "<|pad|>", "special": True}}
    td = from_hf_tokenizer_json(original.to_str(), config)
    assert td.pre_type == style
    assert 390 <= td.vocab_size <= 402 and td.vocab_size == original.get_vocab_size()
    assert td.token_type[:2] == [CONTROL, CONTROL] and td.token_type[-1] == USER_DEFINED
    assert set(td.token_type[2:-1]) == {NORMAL}
    assert (td.bos_token_id, td.eos_token_id, td.padding_token_id) == (0, 0, 1)
    rebuilt = build_tokenizer(td)
    text = held_out()
    ids = original.encode(text).ids
    assert rebuilt.encode(text).ids == ids and len(ids) > 1000
    assert ids.count(0) == 1 and ids.count(td.vocab_size - 1) == 1
    assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(
        ids, skip_special_tokens=False)


def test_hf_save_pretrained_round_trip(tmp_path):
    """transformers re-saves our export (chat template into chat_template.jinja); reading that
    directory gives the same TokenizerData back."""
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|pad|>\n{% endfor %}")
    td = from_hf_tokenizer_json(trained("qwen2").to_str(),
                                {"eos_token": "<|endoftext|>", "chat_template": template})
    for file, text in to_hf_files(td).items():
        (tmp_path / file).write_text(text, encoding="utf-8")
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|endoftext|>user\nhi<|pad|>\n")
    hf.save_pretrained(tmp_path / "resaved")
    assert from_hf_dir(tmp_path / "resaved") == td


def test_gguf_file_round_trip_with_padding(tmp_path):
    td = from_hf_tokenizer_json(trained("qwen2").to_str(), {"eos_token": "<|endoftext|>"})
    td.chat_template = "{{ messages }}"
    n_rows = td.vocab_size + 37
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    for key, value, vtype in to_gguf_fields(td, n_rows):
        writer.add_key_value(key, value, vtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert reader.fields["tokenizer.ggml.token_type"].types[-1] == gguf.GGUFValueType.INT32
    back = from_gguf_fields(reader)
    assert back.vocab[:td.vocab_size] == td.vocab and back.vocab_size == n_rows
    assert back.token_type == td.token_type + [UNUSED] * 37
    assert (back.eos_token_id, back.bos_token_id, back.chat_template) == (
        0, None, "{{ messages }}")
    text = held_out()
    assert build_tokenizer(back).encode(text).ids == trained("qwen2").encode(text).ids


# ---------------------------------------------------------------------------------------------
# Padding, gaps and uniqueness
# ---------------------------------------------------------------------------------------------

def _tiny(vocab: list[str], types: list[int] | None = None) -> TokenizerData:
    return TokenizerData(vocab=vocab, merges=[], token_type=types or [], pre_type="gpt-2")


def _fields(td: TokenizerData, n_rows: int) -> dict:
    return {k: (v, t) for k, v, t in to_gguf_fields(td, n_rows)}


def test_padding_gives_unique_unused_rows():
    td = _tiny(["a", "b", "<|pad_4|>", "<unk>", "<unk>"])     # a duplicate and a taken pad name
    fields = _fields(td, 9)
    tokens, _ = fields["tokenizer.ggml.tokens"]
    types, _ = fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 9 and len(set(tokens)) == 9
    assert tokens[:4] == td.vocab[:4]
    assert tokens[4] == "<|pad_4_1|>" and tokens[5:] == [f"<|pad_{i}|>" for i in range(5, 9)]
    assert types == [NORMAL] * 4 + [UNUSED] * 5
    assert all(is_row_pad(t, i) for i, t in enumerate(tokens) if i >= 4)
    assert fields["tokenizer.ggml.model"][0] == "gpt2"
    assert fields["tokenizer.ggml.pre"][0] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][1] == gguf.GGUFValueType.ARRAY
    assert fields["tokenizer.ggml.add_bos_token"] == (False, gguf.GGUFValueType.BOOL)
    assert "tokenizer.ggml.bos_token_id" not in fields
    assert "tokenizer.chat_template" not in fields
    assert _fields(_tiny(["a"]), 1)["tokenizer.ggml.tokens"][0] == ["a"]
    td.pre_type = None
    assert _fields(td, 5)["tokenizer.ggml.pre"][0] == "default"


def test_vocab_longer_than_rows_is_an_error():
    with pytest.raises(ConfigError, match=r"5 tokens.*only 4 rows"):
        to_gguf_fields(_tiny(list("abcde")), 4)


def test_row_pads_do_not_change_encoding():
    """Row pads and gap fillers sit in the BPE vocabulary; even with ignore_merges (a whole
    pre-token found in the vocabulary wins) no text reaches them."""
    original = trained("llama-bpe")
    td = from_hf_tokenizer_json(original.to_str())
    n = td.vocab_size
    td.vocab += ["<unk>", "<unk>"]
    td.token_type += [UNUSED, UNUSED]
    fields = _fields(td, n + 8)
    padded = dataclasses.replace(td, vocab=fields["tokenizer.ggml.tokens"][0],
                                 token_type=fields["tokenizer.ggml.token_type"][0])
    assert padded.vocab[n:n + 3] == ["<unk>", f"<|pad_{n + 1}|>", f"<|pad_{n + 2}|>"]
    tok = build_tokenizer(padded)
    text = f"<|pad_{n + 1}|> [PAD{n + 3}] <unk> <|pad_{n}|>[PAD1] def f(x):\n    return x"
    assert tok.encode(text).ids == original.encode(text).ids
    assert tok.decode([n + 3]) == f"<|pad_{n + 3}|>"
    assert tok.token_to_id("<unk>") == n


def test_hf_gaps_are_filled_and_unique_on_export():
    base = trained("gpt-2")
    doc = json.loads(base.to_str())
    n = base.get_vocab_size()
    doc["added_tokens"][-1]["id"] = n + 2                     # holes at n-1, n, n+1
    td = from_hf_tokenizer_json(doc)
    assert td.vocab_size == n + 3
    assert td.vocab[n - 1:n + 2] == ["<unk>"] * 3 and td.token_type[n - 1:n + 2] == [UNUSED] * 3
    assert td.vocab[n + 2] == "<tool>" and td.token_type[n + 2] == USER_DEFINED
    tokens = _fields(td, n + 3)["tokenizer.ggml.tokens"][0]
    assert len(set(tokens)) == n + 3 and tokens[n - 1] == "<unk>"
    tok = build_tokenizer(td)
    assert tok.token_to_id("<tool>") == n + 2
    assert tok.encode("x <tool>").ids[-1] == n + 2


# ---------------------------------------------------------------------------------------------
# What is refused
# ---------------------------------------------------------------------------------------------

def _json(model, pre=None) -> str:
    tok = tokenizers.Tokenizer(model)
    if pre is not None:
        tok.pre_tokenizer = pre
    return tok.to_str()


@pytest.mark.parametrize("doc, word", [
    (_json(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), "WordPiece"),
    (_json(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0)), "Unigram"),
    (_json(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")), "WordLevel"),
    (_json(models.BPE({"a": 0, "▁": 1}, [], byte_fallback=True),
           pre_tokenizers.Metaspace()), "SentencePiece"),
])
def test_non_byte_level_hf_tokenizers_are_unsupported(doc, word):
    with pytest.raises(UnsupportedError, match=word):
        from_hf_tokenizer_json(doc)


def test_non_bpe_gguf_is_unsupported(tmp_path):
    path = tmp_path / "wpm.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["<unk>", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(UnsupportedError, match="WordPiece"):
        from_gguf_fields(gguf.GGUFReader(path))


def test_unknown_pre_tokenizer_needs_explicit_choice():
    tok = tokenizers.Tokenizer.from_str(trained("gpt-2").to_str())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    td = from_hf_tokenizer_json(tok.to_str())
    assert td.pre_type is None
    with pytest.raises(UnsupportedError, match="pre-tokenizer None is unknown"):
        build_tokenizer(td)
    assert build_tokenizer(td, default_pre="gpt-2").encode("def f").ids == trained(
        "gpt-2").encode("def f").ids


def test_absent_tokenizer_is_none(tmp_path):
    assert from_hf_dir(tmp_path) is None
    assert from_apr_metadata({"general.name": "x"}) is None
    path = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    assert from_gguf_fields(gguf.GGUFReader(path)) is None


def test_apr_metadata_without_token_types_marks_specials_control():
    td = from_hf_tokenizer_json(trained("gpt-2").to_str(), {"eos_token": "<|endoftext|>"})
    meta = {k: v for k, v in to_apr_metadata(td).items() if k != "tokenizer.token_type"}
    back = from_apr_metadata(meta)
    assert back.token_type[0] == CONTROL and set(back.token_type[1:]) == {NORMAL}
    assert back.add_bos_token is False and back.pre_type == "gpt-2"


def test_inconsistent_apr_metadata_is_an_error():
    meta = to_apr_metadata(_tiny(["a", "b"]))
    with pytest.raises(ConfigError, match="vocab_size is 3"):
        from_apr_metadata({**meta, "tokenizer.vocab_size": 3})
    with pytest.raises(ConfigError, match="no tokenizer.merges"):
        from_apr_metadata({k: v for k, v in meta.items() if k != "tokenizer.merges"})
    with pytest.raises(ConfigError, match="bos_token_id = 7 is outside"):
        from_apr_metadata({**meta, "tokenizer.bos_token_id": 7})
    with pytest.raises(UnsupportedError, match="'WordPiece'"):
        from_apr_metadata({**meta, "tokenizer.model_type": "WordPiece"})


# ---------------------------------------------------------------------------------------------
# Row pads: recognized by name and id, and never changing how text encodes
# ---------------------------------------------------------------------------------------------

def test_row_pad_names_and_where_they_start():
    assert is_row_pad("<|pad_7|>", 7) and is_row_pad("<|pad_7_2|>", 7) and is_row_pad("[PAD7]", 7)
    assert not is_row_pad("<|pad_7|>", 8) and not is_row_pad("[PAD7]", 70)
    assert not is_row_pad("<|pad|>", 7) and not is_row_pad("<|pad_7|> ", 7) and not is_row_pad("", 0)
    # a hostile file's 5,000-digit "id" is no pad (and never reaches int(), which refuses it)
    assert not is_row_pad("<|pad_" + "9" * 5000 + "|>", 5) and not is_row_pad("[PAD" + "1" * 5000 + "]", 1)
    vocab = ["a", "b", "<|pad_2|>", "[PAD3]", "<|pad_4_1|>"]
    assert row_pad_start(vocab, [NORMAL, NORMAL, UNUSED, UNUSED, UNUSED]) == 2
    assert row_pad_start(vocab, [NORMAL, NORMAL, UNUSED, NORMAL, UNUSED]) == 4   # typed normal
    assert row_pad_start(vocab + ["c"], [NORMAL] * 2 + [UNUSED] * 3 + [NORMAL]) == 6
    assert row_pad_start(vocab, []) == 5                                          # types unknown
    assert row_pad_start(["<|pad_0|>"], [UNUSED]) == 0


def test_bulk_row_pad_paths_equal_their_per_token_definition():
    """row_pad_ids and row_pad_start take shortcuts (a prefix test in bulk, the common spelling
    compared at once); on random vocabularies mixing every spelling, pads at the wrong id,
    lookalikes and typed-normal pads, they equal the token-by-token definition."""
    import random
    from apr.tokenizer import row_pad_ids
    rng = random.Random(3)
    spellings = [lambda i: f"<|pad_{i}|>", lambda i: f"[PAD{i}]", lambda i: f"<|pad_{i}_2|>",
                 lambda i: f"<|pad_{i + 1}|>", lambda i: f"<|pad_{i}|> ", lambda i: "<|pad|>",
                 lambda i: f"tok{i}", lambda i: "[PAD" + "9" * 40 + "]",
                 lambda i: f"<|pad_{i}|>\0<|pad_{i + 1}|>", lambda i: f"<|pad_{i}|>\0",
                 lambda i: f"<|pad_{i}|>\0<|pad_{i + 1}", lambda i: "|>", lambda i: "\0",
                 lambda i: "\ud800", lambda i: f"<|pad_0{i}|>"]
    for trial in range(300):
        n = rng.randint(0, 40)
        cut = rng.randint(0, n)                   # real tokens, then a tail of mostly pads
        vocab = [rng.choice(spellings)(i) if i < cut or rng.random() < 0.2 else f"<|pad_{i}|>"
                 for i in range(n)]
        types = [UNUSED if (i >= cut and rng.random() < 0.9) or rng.random() < 0.1 else NORMAL
                 for i in range(n)]
        assert row_pad_ids(vocab) == [i for i, t in enumerate(vocab) if is_row_pad(t, i)]
        k = n
        while k and types[k - 1] == UNUSED and is_row_pad(vocab[k - 1], k - 1):
            k -= 1
        assert row_pad_start(vocab, types) == k, (vocab, types)
    # the common spelling is checked by joining the names at NULs: tokens that hold NULs and
    # join to the expected text are no pads
    spliced = ["<|pad_0|>\0<|pad_1", "|>", "<|pad_2|>"]      # joins like pads 0, 1, 2
    assert row_pad_ids(spliced) == [2] and row_pad_start(spliced, [UNUSED] * 3) == 2
    # every id length, across each power of ten: the names built digit by digit
    import numpy as np
    from apr.tokenizer import _pad_names_utf8
    ids = [0, 1, 9, 10, 11, 99, 100, 999, 1000, 123456, 10 ** 12 - 1, 10 ** 12, 2 ** 63 - 1]
    assert _pad_names_utf8(np.array(ids)) == "\0".join(f"<|pad_{i}|>" for i in ids).encode()
    assert _pad_names_utf8(np.array([], np.int64)) == b""
    vocab = ["a"] * 5 + [f"<|pad_{i}|>" for i in range(5, 1234)]
    assert row_pad_ids(vocab) == list(range(5, 1234))
    assert row_pad_start(vocab, [NORMAL] * 5 + [UNUSED] * 1229) == 5
    # many distinct types (a hostile file): the run is still found, without a search per value
    from apr.tokenizer import _trailing_run_start
    values = list(range(1000)) + [UNUSED] * 5
    assert _trailing_run_start(values, UNUSED) == 1000 and _trailing_run_start([UNUSED] * 3, UNUSED) == 0
    assert _trailing_run_start([], UNUSED) == 0 and _trailing_run_start([UNUSED, 1], UNUSED) == 2


def test_diff_skips_probing_a_pad_only_difference_and_its_tokenizers_do_agree(models_dir, monkeypatch):
    """A GGUF pads the token list up to the embedding rows; diff does not build and probe two
    tokenizers that differ only by that. The premise, checked here on the real qwen2
    vocabulary: the padded tokenizer encodes the probe set and the vectors exactly as the
    unpadded one; and a real difference on top of the pads is still probed."""
    from diff import meta
    td = _load(vocab_path(models_dir, "qwen2"))
    fields = _fields(td, td.vocab_size + 300)
    tokens, types = fields["tokenizer.ggml.tokens"][0], fields["tokenizer.ggml.token_type"][0]
    padded = dataclasses.replace(td, vocab=tokens, token_type=types)
    assert padded.vocab_size == td.vocab_size + 300 and padded != td
    texts = meta.probe_texts(td, padded) + [t for t, _ in read_vectors(models_dir, "qwen2")]
    plain, with_pads = build_tokenizer(td), build_tokenizer(padded)
    assert [with_pads.encode(t).ids for t in texts] == [plain.encode(t).ids for t in texts]

    def refuse(*a, **k):
        raise AssertionError("probed")
    monkeypatch.setattr(meta, "build_tokenizer", refuse)
    assert meta._behaviour_findings(td, padded) == [] and meta._behaviour_findings(padded, td) == []
    changed = dataclasses.replace(padded, merges=padded.merges[:-1])
    with pytest.raises(AssertionError, match="probed"):
        meta._behaviour_findings(td, changed)
