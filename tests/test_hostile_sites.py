"""The sites a campaign written apart from ours found (45,980 runs over mutants of Llama 3,
Mistral, Phi-3, Gemma and Qwen files, raw writers, FIFOs, loops and full disks), each as the
input that reached it: every one must be one `error:` line and exit code 2 (or a success),
never a traceback, exit 3, a hang, or a directory left behind. The mutants are made by the
fuzz campaign's own mutators where one makes them (`tests/fuzz/mutators.py`)."""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.fuzz import mutators as m
from tests.test_untrusted import one_error, run

HUGE = "9" * 5000           # past int()'s 4,300-digit limit


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    """A Qwen2 saved by transformers (HF directory and APR) and a two-layer Gemma 2 written
    by our writers (HF directory, APR and GGUF)."""
    from tests.fuzz.campaign import write_gemma2_seed
    from tests.oracles import make_hf_model
    d = tmp_path_factory.mktemp("seeds")
    out = {"hf": make_hf_model(d / "hf", "qwen2", hidden=32, layers=1, heads=2, kv_heads=1, ffn=48),
           "hf gemma2": write_gemma2_seed(d / "hf-gemma2")}
    for key, fmt in (("apr", "apr"), ("apr gemma2", "apr"), ("gguf gemma2", "gguf")):
        src = out["hf gemma2" if "gemma2" in key else "hf"]
        out[key] = d / f"{key.replace(' ', '-')}.{fmt}"
        assert run("convert", src, "-o", out[key], "-q")[0] == 0
    return out


def _hf_copy(seeds, tmp_path, key="hf") -> Path:
    d = tmp_path / "mutant"
    shutil.copytree(seeds[key], d)
    return d


def _apr_with(src: Path, dst: Path, change) -> Path:
    from apr.container import AprFile, write_apr
    with AprFile.open(src) as f:
        meta = dict(f.metadata)
    change(meta)
    write_apr(dst, meta, m.apr_tensors(src))
    return dst


# --------------------------------------------------------------------------- 1, 2: JSON

def _splice_huge(text: str) -> str:
    return text.replace("{", '{"apr_ref_huge": ' + HUGE + ", ", 1)


@pytest.mark.parametrize("where", ["config.json", "tokenizer.json", "tokenizer_config.json",
                                   "safetensors header", "shard index", "APR metadata"])
def test_1_integer_of_5000_digits_in_any_json(seeds, tmp_path, where):
    if where == "APR metadata":
        from apr.container import AprFile
        with AprFile.open(seeds["apr"]) as f:
            meta = dict(f.metadata)
        mutant = tmp_path / "m.apr"
        m.write_apr_as_stranger(mutant, meta, m.apr_tensors(seeds["apr"]),
                                _splice_huge(json.dumps(meta)))
    else:
        mutant = _hf_copy(seeds, tmp_path)
        if where == "safetensors header":
            data = (mutant / "model.safetensors").read_bytes()
            n = struct.unpack_from("<Q", data, 0)[0]
            header = _splice_huge(data[8:8 + n].decode()).encode()
            (mutant / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                                      + data[8 + n:])
        elif where == "shard index":
            (mutant / "model.safetensors.index.json").write_text(
                '{"metadata": {"total_size": ' + HUGE + '}, "weight_map": {}}')
        else:
            path = mutant / where
            path.write_text(_splice_huge(path.read_text()))
    for args in (["inspect", mutant], ["diff", seeds["apr"], mutant]):
        one_error(*run(*args)[::2], "5000 digits")


def test_2_dequantized_from_nested_2000_deep(seeds, tmp_path):
    """safetensors metadata holds strings only, so dequantized_from is JSON inside JSON: the
    inner parse goes through the same bounded parser."""
    mutant = _hf_copy(seeds, tmp_path)
    data = (mutant / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", data, 0)[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = {"format": "pt", "dequantized_from": '{"a":' * 2000 + '"F16"' + "}" * 2000}
    text = json.dumps(header).encode()
    (mutant / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    for args in (["inspect", mutant], ["logits", mutant, "--tokens", "1,2", "--json"]):
        one_error(*run(*args)[::2], "dequantized_from", "nested too deeply")


@pytest.mark.parametrize("text,words", [
    ('{"a": 1, "a": 2}', ["'a' appears twice"]),
    ("\ufeff{}", ["BOM"]),
    ("[" * 101 + "]" * 101, ["nested too deeply"]),
    ('{"x": -' + "9" * 101 + "}", ["101 digits"]),
])
def test_1_2_the_json_parser_bounds(text, words):
    """The one parser every reader uses: its bounds, each one FormatError."""
    from apr.errors import FormatError
    from apr.untrusted import load_json
    with pytest.raises(FormatError) as e:
        load_json(text, "x.json")
    assert str(e.value).startswith("x.json: ") and all(w in str(e.value) for w in words), e.value
    # inside those bounds: brackets in strings are no nesting, 100 levels and 100 digits pass
    doc = load_json('["' + "[" * 500 + '\\"", ' + "[" * 99 + "9" * 100 + "]" * 99 + "]", "x")
    assert doc[0] == "[" * 500 + '"'


def test_no_json_parse_bypasses_load_json():
    """Every JSON the tool reads goes through apr.untrusted.load_json (the exceptions: the
    diff child's answers and the chat sandbox's, which the tool itself wrote)."""
    import re
    root = Path(__file__).resolve().parents[1]
    allowed = {"apr/untrusted.py", "apr/llamacpp.py", "diff/ahead.py", "diff/chat.py"}
    found = []
    for pkg in ("apr", "ref", "diff"):
        for path in (root / pkg).rglob("*.py"):
            rel = str(path.relative_to(root))
            if rel not in allowed and re.search(r"json\.loads?\(", path.read_text()):
                found.append(rel)
    assert (root / "cli.py").read_text().count("json.load") == 0
    assert found == [], found


# --------------------------------------------------------------------------- 3: derived sizes

def test_3_gemma2_gguf_with_no_heads_and_27b_layer_count(seeds, tmp_path):
    mutant = tmp_path / "m.gguf"
    m.gguf_set(seeds["gguf gemma2"], mutant, {
        "gemma2.block_count": 46, "gemma2.attention.head_count": 0,
        "gemma2.rope.dimension_count": None})
    for args in (["inspect", mutant], ["convert", mutant, "-o", tmp_path / "o.apr"]):
        one_error(*run(*args)[::2], "num_heads=0")



@pytest.mark.parametrize("key", ["gguf gemma2", "hf gemma2", "hf"])
def test_3_a_layer_count_of_2_30_is_refused_before_any_per_layer_list(seeds, tmp_path, key):
    """A layer count of 2^30 + 2 (a header bit flip the campaign made): the sliding-window
    layouts (Gemma's pattern, Qwen2's max_window_layers) are lists of one entry per layer, so
    the count is checked against its bound as soon as it is read, not at validation: one
    error line under the campaign's 2 GiB bound, from every reader."""
    from tests.fuzz.campaign import memory_bound
    layers = (1 << 30) + 2
    if key.startswith("gguf"):
        mutant = tmp_path / "m.gguf"
        m.gguf_set(seeds[key], mutant, {"gemma2.block_count": layers})
    else:
        mutant = _hf_copy(seeds, tmp_path, key)
        cfg = json.loads((mutant / "config.json").read_text())
        cfg.update(num_hidden_layers=layers, **({} if "gemma2" in key else {"use_sliding_window": True}))
        (mutant / "config.json").write_text(json.dumps(cfg))
    with memory_bound():
        result = run("inspect", mutant)
    one_error(result[0], result[2], f"num_layers={layers} is implausible (more than 4096)")


# --------------------------------------------------------------------------- 4: the tokenizers library

@pytest.mark.parametrize("key,value", [("continuing_subword_prefix", "##"),
                                       ("end_of_word_suffix", "</w>")])
def test_4_tokenizer_options_the_library_panics_on(seeds, tmp_path, key, value):
    for seed in ("hf", "hf gemma2"):
        mutant = _hf_copy(seeds, tmp_path / seed, seed)
        doc = json.loads((mutant / "tokenizer.json").read_text())
        doc["model"][key] = value
        (mutant / "tokenizer.json").write_text(json.dumps(doc))
        for args in (["inspect", mutant], ["logits", mutant, "--prompt", "the cat", "--json"]):
            one_error(*run(*args)[::2], "subword prefix/suffix")


def test_4_a_panic_of_the_library_is_one_error(seeds, monkeypatch):
    """The guard around every tokenizers call: a real PanicException (a BaseException) from
    the library, wherever it arises, is one error line; an interrupt still passes."""
    import tokenizers

    from apr import tokenizer as T
    panic = None
    try:
        doc = json.loads((seeds["hf"] / "tokenizer.json").read_text())
        doc["model"]["continuing_subword_prefix"] = "##"
        tokenizers.Tokenizer.from_str(json.dumps(doc))
    except BaseException as e:          # noqa: BLE001 - the library's panic, caught to reuse
        panic = e
    assert panic is not None and not isinstance(panic, Exception), type(panic)

    class Panicking:
        def encode(self, *a, **kw):
            raise panic

        def get_vocab_size(self):
            raise KeyboardInterrupt
    tok = T.GuardedTokenizer(Panicking())
    with pytest.raises(T.FormatError, match="tokenizers library failed"):
        tok.encode("x")
    with pytest.raises(KeyboardInterrupt):
        tok.get_vocab_size()
    from types import SimpleNamespace
    monkeypatch.setattr(T, "tokenizers", SimpleNamespace(
        Tokenizer=SimpleNamespace(from_str=lambda text: Panicking())))
    one_error(*run("logits", seeds["apr"], "--prompt", "the cat", "--json")[::2], "tokenizers library failed")


def test_4_a_panic_nobody_guarded_is_an_internal_error_line():
    """The last resort: a panic that escapes every guard is still one line (exit 3)."""
    import click
    from click.testing import CliRunner

    from apr.console import handle_errors
    PanicException = type("PanicException", (BaseException,), {"__module__": "pyo3_runtime"})

    @click.command()
    @handle_errors
    def cmd():
        raise PanicException("index out of bounds")
    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 3 and r.stderr.startswith("error: internal error") and \
        len(r.stderr.splitlines()) == 1, r.stderr


# --------------------------------------------------------------------------- 5: chat template

@pytest.mark.parametrize("template,ok", [
    ([{"name": {"x": 1}, "template": "{{ messages }}"}], False),
    ([{"name": "default", "template": 7}], False),
    ([3], False),
    (5, False),
    ([{"name": "tool_use", "template": "A"}, {"name": "default", "template": "B"}], True),
])
def test_5_chat_template_list_with_an_object_for_a_name(seeds, tmp_path, template, ok):
    mutant = _hf_copy(seeds, tmp_path)
    cfg = json.loads((mutant / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (mutant / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, out, err = run("inspect", mutant, "--json")
    if ok:
        assert code == 0, err
        from apr.tokenizer import from_hf_dir
        assert from_hf_dir(mutant).chat_template == "B"
    else:
        one_error(code, err, "chat_template")


# --------------------------------------------------------------------------- 6, 7: values and shapes

def test_6_score_beyond_float32_on_gguf_export(seeds, tmp_path):
    def change(meta):
        meta["tokenizer.scores"] = [*meta["tokenizer.scores"][:-1], -1e308]
    mutant = _apr_with(seeds["apr gemma2"], tmp_path / "m.apr", change)
    one_error(*run("convert", mutant, "-o", tmp_path / "o.gguf")[::2], "float32")
    assert not (tmp_path / "o.gguf").exists()
    assert run("convert", mutant, "-o", tmp_path / "o.apr", "-q")[0] == 0     # APR keeps it


@pytest.mark.parametrize("shape", [(2 ** 31 - 1, 2 ** 31 - 1, 0), (0, 2 ** 31 - 1, 2 ** 31 - 1, 3)])
def test_7_empty_bare_tensor_of_impossible_shape(tmp_path, shape):
    from apr.container import TensorSource, write_apr
    from apr.dtypes import DTYPES
    mutant = tmp_path / "bare.apr"
    write_apr(mutant, {"name": "bare"}, [
        TensorSource("plain", DTYPES["F32"], (2, 3), lambda: np.arange(6, dtype=np.float32)),
        TensorSource("empty", DTYPES["F32"], shape, lambda: np.zeros(0, np.uint8))])
    for args in (["inspect", mutant], ["convert", mutant, "-o", tmp_path / "o.safetensors"],
                 ["convert", mutant, "-o", tmp_path / "o.gguf"], ["diff", mutant, mutant]):
        one_error(*run(*args)[::2], "'empty'", "elements")


def test_7_the_bare_mutator_reaches_both_outcomes(tmp_path):
    rng = random.Random(0)
    codes = set()
    for i in range(12):
        mutant = tmp_path / f"b{i}.apr"
        m.apr_bare(mutant, mutant, rng)
        codes.add(run("convert", mutant, "-o", tmp_path / f"o{i}.safetensors", "-q")[0])
    assert codes == {0, 2}, codes


# --------------------------------------------------------------------------- 8, 9, 10, 14: commands

def test_8_diff_of_a_symlink_loop(seeds, tmp_path):
    loop = tmp_path / "loop.apr"
    os.symlink(loop.name, loop)
    for args in (["diff", seeds["apr"], loop], ["diff", loop, seeds["apr"], "--json"],
                 ["diff", seeds["apr"], loop, "--report", tmp_path / "r" / "x.html"]):
        one_error(*run(*args)[::2], "symbolic links")
    assert not (tmp_path / "r").exists()


def test_9_prompt_of_bytes_that_are_not_utf8(seeds, tmp_path):
    """The shell passes the bytes; Python holds them as surrogate escapes (as click gets
    them from sys.argv); the process itself is run once too."""
    import subprocess
    import sys
    bad = "caf\udce9 \udcff"
    one_error(*run("logits", seeds["apr"], "--prompt", bad, "--json")[::2], "not UTF-8", "0xE9")
    one_error(*run("run", seeds["apr"], bad, "--max-tokens", "2", "--json")[::2], "not UTF-8", "0xE9")
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "cli.py"), "run", str(seeds["apr"]),
                        b"caf\xe9 \xff", "--max-tokens", "2", "--json"], capture_output=True, timeout=120)
    assert p.returncode == 2 and p.stderr.decode().startswith("error: ") and \
        len(p.stderr.splitlines()) == 1, p.stderr


@pytest.mark.parametrize("seed", ["-1", str(-2 ** 64)])
def test_10_run_with_a_seed_out_of_range(seeds, seed):
    code, _, err = run("run", seeds["apr"], "the cat", "--seed", seed, "--temperature", "1",
                       "--max-tokens", "2")
    assert code == 2 and "--seed" in err and "Traceback" not in err, err


def test_14_more_tokens_than_the_context(seeds):
    from apr.model import open_model
    context = open_model(seeds["apr"]).config.max_position_embeddings
    code, _, err = run("run", seeds["apr"], "the cat", "--max-tokens", "100000", "--json")
    one_error(code, err, f"context is {context}", "--max-tokens")
    code, out, err = run("run", seeds["apr"], "the cat", "--max-tokens", "3", "--json")
    assert code == 0 and len(json.loads(out)["new_ids"]) <= 3, err


# --------------------------------------------------------------------------- 11: qa's tensor check

def test_11_qa_tensor_check_is_linear_in_the_missing_tensors(seeds, tmp_path, monkeypatch):
    """A config of 4,096 layers over a file of one: qa compares the ~37,000 missing names once
    each, not each against all (counted, not timed: every read of a mismatch's name)."""
    import dataclasses

    from apr.config import Mismatch
    from apr.model import ModelView
    reads = [0]

    @dataclasses.dataclass(frozen=True)
    class Counted(Mismatch):
        def __getattribute__(self, key):
            if key == "name":
                reads[0] += 1
            return object.__getattribute__(self, key)
    mismatches = ModelView.mismatches
    found = []

    def counted(self):
        found[:] = [Counted(**dataclasses.asdict(x)) for x in mismatches(self)]
        return list(found)
    monkeypatch.setattr(ModelView, "mismatches", counted)
    mutant = _hf_copy(seeds, tmp_path)
    cfg = json.loads((mutant / "config.json").read_text())
    cfg["num_hidden_layers"] = 64
    (mutant / "config.json").write_text(json.dumps(cfg))
    code, out, err = run("qa", mutant, "--no-gguf", "--json")
    assert code == 1 and "missing" in out, (code, err)
    assert len(found) > 500 and reads[0] <= 8 * len(found), (reads[0], len(found))
    cfg["num_hidden_layers"] = 4096
    (mutant / "config.json").write_text(json.dumps(cfg))
    reads[0] = 0
    assert run("qa", mutant, "--no-gguf", "--json")[0] == 1
    assert reads[0] <= 8 * len(found), (reads[0], len(found))


# --------------------------------------------------------------------------- 12: directories left

def test_12_bad_crc_found_at_commit_leaves_no_directory(seeds, tmp_path):
    mutant = tmp_path / "m.apr"
    data = bytearray(seeds["apr"].read_bytes())
    data[-10] ^= 0xFF               # tensor bytes: found by the checksum verified while writing
    mutant.write_bytes(bytes(data))
    for out in ("new/a/o.gguf", "new/a/o.apr", "new/a/hf"):
        one_error(*run("convert", mutant, "-o", tmp_path / out)[::2])
        assert not (tmp_path / "new").exists(), out


def test_12_failed_encode_and_full_disk_leave_no_directory(tmp_path, monkeypatch):
    import errno

    from apr.atomic import atomic_dir, atomic_file
    from apr.errors import AprError
    for atomic in (atomic_file, atomic_dir):
        with pytest.raises(AprError, match="encoding failed"):
            with atomic(tmp_path / "new" / "a" / "b" / "out"):
                raise AprError("encoding failed")
        assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()                # a directory that was there stays

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    for atomic in (atomic_file, atomic_dir):
        with pytest.raises(AprError, match="No space left"):
            with atomic(tmp_path / "kept" / "new" / "out") as tmp:
                (tmp / "x" if tmp.is_dir() else tmp).write_bytes(b"x")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
        assert list((tmp_path / "kept").iterdir()) == []


# --------------------------------------------------------------------------- 13: one line

@pytest.mark.parametrize("bad", ["\n", "\r", "\u2028", "\x1b[31m"])
def test_13_names_from_files_are_quoted_on_one_line(seeds, tmp_path, bad):
    from apr.container import AprFile, TensorSource, write_apr
    from apr.dtypes import DTYPES
    # a config key, a tensor name, a path
    mutant = _hf_copy(seeds, tmp_path)
    cfg = json.loads((mutant / "config.json").read_text())
    cfg[f"odd{bad}key"] = 1
    (mutant / "config.json").write_text(json.dumps(cfg))
    escaped = bad.encode("unicode_escape").decode()
    code, _, err = run("inspect", mutant)
    one_error(code, err, f"odd{escaped}key")
    with AprFile.open(seeds["apr"]) as f:
        meta = dict(f.metadata)
    sources = m.apr_tensors(seeds["apr"]) + [TensorSource(
        f"extra{bad}.weight", DTYPES["F32"], (2 ** 31 - 1, 2 ** 31 - 1, 0), lambda: np.zeros(0, np.uint8))]
    write_apr(tmp_path / "t.apr", meta, sources)
    code, _, err = run("logits", tmp_path / "t.apr", "--tokens", "1", "--json")
    one_error(code, err, f"'extra{escaped}.weight'")
    path = tmp_path / f"a{bad}b.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 20)
    one_error(*run("inspect", path)[::2], escaped)


def test_13_the_error_printer_is_the_backstop(capsys):
    import click
    from click.testing import CliRunner

    from apr.console import handle_errors, one_line
    from apr.errors import AprError
    assert one_line("plain: 'x' at 3") == "plain: 'x' at 3"
    assert one_line("a\nb\rc\u2028d\u2029e\x85f\x0bg\x1bh\udcff") == \
        "a\\nb\\rc\\u2028d\\u2029e\\x85f\\x0bg\\x1bh\\udcff"

    @click.command()
    @handle_errors
    def cmd():
        import warnings
        warnings.warn("warned\nabout")
        raise AprError("two\nlines\u2028three")
    from apr.console import show_warnings_as_lines
    show_warnings_as_lines()
    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 2 and r.stderr.splitlines()[-1] == "error: two\\nlines\\u2028three", r.stderr
    assert len(r.stderr.splitlines()) == 2 and "warned\\nabout" in r.stderr, r.stderr


def test_10_pretrain_with_a_seed_out_of_range(seeds, tmp_path):
    """The same class as run's: numpy's generators take no negative seed."""
    from tests.fuzz.campaign import write_corpus
    corpus = write_corpus(tmp_path / "corpus")
    code, _, err = run("pretrain", "--init", seeds["apr"], "--dataset", corpus, "--run-dir",
                       tmp_path / "run", "--steps", "1", "--batch-size", "1", "--seq-length", "8",
                       "--val-batches", "1", "--allow-data-starvation", "--allow-untrained-init",
                       "-q", "--seed", "-1")
    assert code == 2 and "--seed" in err and "internal error" not in err, err
