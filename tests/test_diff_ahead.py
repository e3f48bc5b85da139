"""`diff.ahead`: tensor bytes compared in a child process while both files are opened. Its
plan (where the tensors lie, from the indexes alone) is checked against the full open, on
our files and llama.cpp's converter's; its comparison against the bytes themselves; and every
report against the same comparison made without it, on clean and corrupted files, with
children that die, cannot read, or send a nonsense plan."""
from __future__ import annotations

import json
import os
import shutil
import struct
import threading

import gguf
import numpy as np
import pytest

import diff.ahead as ahead
from apr.errors import FormatError
from apr.gguf_io import GgufFile
from apr.model import open_model, stored_spans
from apr.tokenizer import from_gguf_fields
from diff import compare
from oracles import llama_cpp_convert, make_hf_model
from test_diff_helpers import clean, fresh, hf_tensors, write_variant


@pytest.fixture
def forced(monkeypatch):
    """The child for small files too, reading odd-sized blocks (a tail in every tensor), and
    despite the threads earlier tests may have left (thread pools; the rule itself is
    tested below)."""
    monkeypatch.setattr(ahead, "MIN_BYTES", 0)
    monkeypatch.setattr(ahead, "others_running", lambda: False)
    monkeypatch.setattr(ahead, "BLOCK", 4096 + 8)


@pytest.fixture(scope="module")
def llama_cpp_gguf(llama_cpp_src, tmp_path_factory):
    """A llama GGUF from llama.cpp's own converter (Q/K rows permuted, GPT-2's vocabulary)
    and the HF directory it came from."""
    tmp = tmp_path_factory.mktemp("ahead")
    tok = from_gguf_fields(gguf.GGUFReader(llama_cpp_src / "models" / "ggml-vocab-gpt-2.gguf"))
    rows = tok.vocab_size + (-tok.vocab_size % 64)
    hf = make_hf_model(tmp / "hf", "llama", hidden=32, layers=2, heads=4, kv_heads=2, ffn=64,
                       vocab=rows, tokenizer=False, seed=3)
    return hf, llama_cpp_convert(llama_cpp_src, hf, tmp / "llama-cpp.gguf", tok)


def findings(report) -> list:
    return ([(t.name, t.relation, t.defect, t.message) for t in report.tensors],
            [(c.key, c.message) for c in report.config], report.tokenizer, report.diagnosis.line)


def both_ways(a, b) -> tuple:
    """The report with the child and without it; they must agree."""
    on = compare(a, b, logits=False, ahead=True)
    off = compare(a, b, logits=False, ahead=False)
    assert findings(on) == findings(off)
    assert off.timings["answers_ahead"] == 0
    return on, off


def flipped(src, name: str, where: str):
    """A copy of a model file with one byte of tensor `name`'s stored data changed (an
    exponent bit of a float32: the value x4 or /4)."""
    dst = fresh(src.suffix)
    shutil.copyfile(src, dst)
    with open_model(dst) as v:
        path, offset = v.tensors[name].file_span
        n = v.tensors[name].nbytes
    pos = offset + {"first": 3, "middle": n // 2 // 4 * 4 + 3, "last": n - 1}[where]
    with open(dst, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes((byte ^ 0x01,)))
    return dst


# --------------------------------------------------------------------------- the plan

@pytest.mark.parametrize("family,kind", [("llama", "apr"), ("llama", "gguf"), ("qwen2", "apr-f16"),
                                         ("qwen2", "gguf-q8_0"), ("llama", "apr-q8_0"), ("qwen2", "hf"),
                                         ("llama", "hf-bf16")])
def test_stored_spans_are_where_the_full_open_finds_the_tensors(family, kind):
    path = clean(family, kind)
    spans = stored_spans(path)
    with open_model(path) as v:
        assert v.tensors
        for name, ref in v.tensors.items():
            s = spans[name]
            assert (str(s.path), s.offset, s.nbytes, s.dtype) == \
                (str(ref.file_span[0]), ref.file_span[1], ref.nbytes, ref.dtype.name)


def test_stored_spans_of_llama_cpps_converter_output(llama_cpp_gguf):
    _, path = llama_cpp_gguf
    spans = stored_spans(path)
    with open_model(path) as v:
        assert len(v.tensors) == 21
        assert {n: (s.offset, s.nbytes, s.dtype) for n, s in spans.items() if n in v.tensors} == \
            {n: (r.file_span[1], r.nbytes, r.dtype.name) for n, r in v.tensors.items()}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """An HF directory that transformers' save_pretrained splits into shards (an index and
    several files), and our APR of it."""
    import torch
    import transformers
    from apr.convert import convert
    src = clean("qwen2", "hf")
    d = tmp_path_factory.mktemp("sharded") / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(d, max_shard_size="60KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, d / f)
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) > 3
    apr_path = d.parent / "m.apr"
    convert(d, apr_path)
    return d, apr_path


def test_stored_spans_of_a_sharded_directory(sharded):
    d, _ = sharded
    spans = stored_spans(d)
    with open_model(d) as v:
        assert len({r.file_span[0] for r in v.tensors.values()}) > 3
        for name, ref in v.tensors.items():
            s = spans[name]
            assert (s.path, s.offset, s.nbytes) == (ref.file_span[0], ref.file_span[1], ref.nbytes)


def test_a_sharded_directory_against_its_apr(forced, sharded):
    d, apr_path = sharded
    on, _ = both_ways(d, apr_path)
    assert on.diagnosis.line.startswith("DIAGNOSIS: equivalent") and on.timings["answers_ahead"] > 20
    bad = flipped(apr_path, "model.layers.1.mlp.gate_proj.weight", "first")
    on, _ = both_ways(d, bad)
    assert [t.name for t in on.tensors if t.defect] == ["model.layers.1.mlp.gate_proj.weight"]


def _gguf_with_every_array(path):
    w = gguf.GGUFWriter(path, "llama")
    w.add_array("t.strings", ["a", "", "\u00e9\u4e2d", "x" * 300])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.nested_ints", [[1, 2], [3]])
    w.add_array("t.nested_strings", [["a", "bc"], ["d"]])
    w.add_uint32("t.scalar", 7)
    w.add_string("t.text", "after the arrays")
    w.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("v", np.ones(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_arrays_stepped_over_leave_the_same_tensors_and_scalars(tmp_path):
    """A file the gguf library writes, with arrays of every kind (nested ones too)."""
    path = _gguf_with_every_array(tmp_path / "arrays.gguf")
    full, skipped = GgufFile(path), GgufFile(path, arrays=False)
    assert full.kv["t.nested_strings"] == [["a", "bc"], ["d"]]     # the full read sees them
    assert skipped.entries == full.entries and len(full.entries) == 2
    assert skipped.kv == {k: v for k, v in full.kv.items() if not isinstance(v, list)}
    assert skipped.kv["t.text"] == "after the arrays"


def test_a_truncated_gguf_fails_alike_with_arrays_stepped_over(tmp_path):
    """Cut anywhere in its key/values and tensor infos: both reads raise FormatError."""
    whole = _gguf_with_every_array(tmp_path / "arrays.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    ends = len(whole) - 5 * 4 - 12 * 4     # the data (60 bytes, aligned) comes last
    for n in range(24, ends, 3):
        cut.write_bytes(whole[:n])
        for arrays in (True, False):
            with pytest.raises(FormatError):
                GgufFile(cut, arrays=arrays)


def test_a_string_array_longer_than_its_file_is_refused_when_stepped_over(tmp_path):
    """One string whose length field says 2^63 bytes, and a count of 2^40 strings."""
    whole = bytearray(_gguf_with_every_array(tmp_path / "arrays.gguf").read_bytes())
    at = whole.index(b"t.strings") + len(b"t.strings") + 4 + 4 + 8      # the first string's length
    for patch in [(at, struct.pack("<Q", 1 << 63)), (at - 8, struct.pack("<Q", 1 << 40))]:
        bad = bytearray(whole)
        bad[patch[0]:patch[0] + 8] = patch[1]
        (tmp_path / "bad.gguf").write_bytes(bytes(bad))
        for arrays in (True, False):
            with pytest.raises(FormatError):
                GgufFile(tmp_path / "bad.gguf", arrays=arrays)


def test_the_plan_pairs_by_canonical_name_in_model_order():
    a, b = clean("qwen2", "apr"), clean("qwen2", "gguf")
    pairs = ahead.plan(a, b)
    sa, sb = stored_spans(a), stored_spans(b)
    with open_model(a) as va:
        names = [n for n in va.tensors if n in sb]

    def pair(n):
        return (str(a), sa[n].offset, str(b), sb[n].offset, sa[n].nbytes)
    assert len(pairs) == len(names) > 20
    assert pairs[0] == pair("model.embed_tokens.weight")
    assert set(pairs) == {pair(n) for n in names}


# --------------------------------------------------------------------------- the comparison

@pytest.mark.parametrize("block", [4096 + 8, 8, 1 << 21])
def test_equal_spans_says_what_the_bytes_say(tmp_path, monkeypatch, block):
    monkeypatch.setattr(ahead, "BLOCK", block)
    rng = np.random.default_rng(1)
    n = 3 * 4096 + 10
    body = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 24 + body)
    bufs = (bytearray(block), bytearray(block))
    for flip in [None, 0, n - 1, block - 1, block, n // 2, n - 3]:
        other = bytearray(body)
        if flip is not None and flip < n:
            other[flip] ^= 0x40
        b.write_bytes(b"yy" + bytes(other) + b"zz")
        expected = ahead.EQUAL if a.read_bytes()[24:] == b.read_bytes()[2:2 + n] else ahead.DIFFERENT
        with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
            assert ahead.equal_spans(fa, fb, 24, 2, n, bufs) == expected, flip
            # past A's end: never EQUAL (a difference in a block before the short read may be
            # found first; the caller then reads the values itself and reports the truncation)
            past = ahead.equal_spans(fa, fb, 24, 2, n + 3, bufs)
            assert past == ahead.UNREADABLE if expected == ahead.EQUAL else past != ahead.EQUAL, flip


# --------------------------------------------------------------------------- whole reports

@pytest.mark.parametrize("family,a,b", [("qwen2", "apr", "gguf"), ("llama", "apr-f16", "gguf-f16"),
                                        ("llama", "gguf-q8_0", "apr-q8_0"), ("qwen2", "hf", "gguf")])
def test_clean_pairs_agree_and_use_the_answers(forced, family, a, b):
    on, _ = both_ways(clean(family, a), clean(family, b))
    assert on.diagnosis.line.startswith("DIAGNOSIS: equivalent")
    assert on.timings["answers_ahead"] > 0


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight",
                                  "model.norm.weight"])
def test_one_changed_byte_is_found_as_without_the_child(forced, name, where):
    a = clean("qwen2", "apr")
    b = flipped(clean("qwen2", "gguf"), name, where)
    on, _ = both_ways(a, b)
    assert on.timings["answers_ahead"] > 0
    bad = [t for t in on.tensors if t.defect is not None]
    assert [t.name for t in bad] == [name]
    assert name in on.diagnosis.line


def test_a_scaled_tensor_in_a_variant_file(forced):
    t = hf_tensors("llama")
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"] * np.float32(3)
    on, _ = both_ways(clean("llama", "apr"), write_variant("gguf", "llama", t))
    assert on.diagnosis.line.startswith("DIAGNOSIS: SCALED — model.layers.0.mlp.up_proj.weight")


def test_llama_cpps_permuted_rows_agree(forced, llama_cpp_gguf, tmp_path):
    """Q/K are stored permuted in llama.cpp's file: the plan pairs them (same size), the
    comparison never asks about them (other row order), the report is the same."""
    from apr.convert import convert
    hf, gg = llama_cpp_gguf
    apr_path = tmp_path / "m.apr"
    convert(hf, apr_path)
    on, _ = both_ways(apr_path, gg)
    assert on.diagnosis.line.startswith("DIAGNOSIS: equivalent")
    assert on.timings["answers_ahead"] == 21 - 4          # all but the 4 permuted Q/K


# --------------------------------------------------------------------------- children not trusted

def _dies(a_path, b_path, w):
    os._exit(3)


def _send(w, text: bytes) -> None:
    with os.fdopen(w, "wb") as out:
        out.write(ahead._LENGTH.pack(len(text)) + text)


def _unreadable(a_path, b_path, w):
    pairs = ahead.plan(a_path, b_path)
    os.write(w, ahead._LENGTH.pack(len(json.dumps(pairs))) + json.dumps(pairs).encode())
    os.write(w, bytes([ahead.UNREADABLE]) * len(pairs))


def _nonsense_length(a_path, b_path, w):
    os.write(w, ahead._LENGTH.pack(1 << 40) + bytes(100))


def _short_plan(a_path, b_path, w):
    text = json.dumps(ahead.plan(a_path, b_path)).encode()
    os.write(w, ahead._LENGTH.pack(len(text)) + text[:len(text) // 2])


def _not_json(a_path, b_path, w):
    _send(w, b"[[1, 2, 3")


def _wrong_entries(a_path, b_path, w):
    pairs = ahead.plan(a_path, b_path)
    _send(w, json.dumps([[p[1], p[0], p[3], p[2], p[4]] for p in pairs]).encode())


def _answers_stop_halfway(a_path, b_path, w):
    pairs = ahead.plan(a_path, b_path)
    os.write(w, ahead._LENGTH.pack(len(json.dumps(pairs))) + json.dumps(pairs).encode())
    os.write(w, bytes([ahead.EQUAL]) * (len(pairs) // 2))


@pytest.mark.parametrize("child", [_dies, _unreadable, _nonsense_length, _short_plan, _not_json,
                                   _wrong_entries])
def test_a_child_without_answers_leaves_the_comparison_to_this_process(forced, monkeypatch, child):
    monkeypatch.setattr(ahead, "_child", child)
    b = flipped(clean("qwen2", "gguf"), "model.layers.0.self_attn.v_proj.weight", "middle")
    on, _ = both_ways(clean("qwen2", "apr"), b)
    assert on.timings["answers_ahead"] == 0
    assert "model.layers.0.self_attn.v_proj.weight" in on.diagnosis.line


def test_no_process_to_be_had(forced, monkeypatch):
    def refuse():
        raise BlockingIOError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(ahead.os, "fork", refuse)
    fds = len(os.listdir("/proc/self/fd"))
    on, _ = both_ways(clean("qwen2", "apr"), flipped(clean("qwen2", "gguf"), "model.norm.weight", "first"))
    assert on.timings["answers_ahead"] == 0 and "model.norm.weight" in on.diagnosis.line
    assert len(os.listdir("/proc/self/fd")) == fds               # the pipe closed


def test_a_plan_longer_than_a_pipe_holds(forced, monkeypatch):
    """5,000 extra pairs in front (120 KB of plan, more answers than the pipe buffers before
    the parent reads): the child waits for the parent and the answers still line up."""
    real = ahead.plan
    monkeypatch.setattr(ahead, "plan", lambda a, b: [(str(a), 0, str(b), 0, 8 + k) for k in range(5000)]
                        + real(a, b))
    b = flipped(clean("qwen2", "gguf"), "model.layers.1.self_attn.o_proj.weight", "last")
    on, _ = both_ways(clean("qwen2", "apr"), b)
    assert on.timings["answers_ahead"] > 0
    assert [t.name for t in on.tensors if t.defect] == ["model.layers.1.self_attn.o_proj.weight"]


def test_a_plan_over_its_bound_is_sent_empty(forced, monkeypatch):
    monkeypatch.setattr(ahead, "MAX_PLAN_BYTES", 200)
    on, _ = both_ways(clean("qwen2", "apr"), flipped(clean("qwen2", "gguf"), "model.norm.weight", "last"))
    assert on.timings["answers_ahead"] == 0 and "model.norm.weight" in on.diagnosis.line


def test_answers_up_to_where_the_child_stopped(forced, monkeypatch):
    monkeypatch.setattr(ahead, "_child", _answers_stop_halfway)
    on, _ = both_ways(clean("qwen2", "apr"), clean("qwen2", "gguf"))
    n = len(ahead.plan(clean("qwen2", "apr"), clean("qwen2", "gguf")))
    assert 0 < on.timings["answers_ahead"] <= n // 2


def test_an_unopenable_file_errors_as_without_the_child_and_no_child_is_left(forced, monkeypatch, tmp_path):
    pids = []
    start = ahead.BytesAhead.__init__

    def spy(self, a, b):
        start(self, a, b)
        pids.append(self.pid)
    monkeypatch.setattr(ahead.BytesAhead, "__init__", spy)
    whole = clean("qwen2", "gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:len(whole) - 100])
    for a, b in [(clean("qwen2", "apr"), cut), (cut, clean("qwen2", "apr"))]:
        errors = []
        for flag in (True, False):
            with pytest.raises(FormatError) as e:
                compare(a, b, logits=False, ahead=flag)
            errors.append(str(e.value))
        assert errors[0] == errors[1] and "truncated" in errors[0]
    assert len(pids) == 2
    for pid in pids:                                # killed and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_no_fork_beside_another_thread(forced, monkeypatch):
    a, b = clean("qwen2", "apr"), clean("qwen2", "gguf")
    child = ahead.BytesAhead.start(a, b)
    assert child is not None
    child.close()
    monkeypatch.undo()
    before = threading.active_count()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert ahead.others_running() and threading.active_count() == before + 1
        monkeypatch.setattr(ahead, "MIN_BYTES", 0)
        assert ahead.BytesAhead.start(a, b) is None
    finally:
        stop.set()
        t.join()


def test_a_progress_bar_leaves_no_thread_behind():
    from apr.console import progress_bar
    before = threading.active_count()
    with progress_bar(True, total=10) as bar:
        bar.update(10)
    assert threading.active_count() == before


def test_small_files_are_compared_here():
    assert ahead.BytesAhead.start(clean("qwen2", "apr"), clean("qwen2", "gguf")) is None


# --------------------------------------------------------------------------- mutants

MUTANTS = 45         # per format, a fixed draw


@pytest.mark.parametrize("fmt", ["apr", "gguf", "hf"])
def test_mutants_get_the_same_report_or_error_with_and_without_the_child(forced, fmt, tmp_path):
    """The fuzz campaign's mutators (damaged headers, indexes, key/values, tensor bytes,
    truncations) on a clean file: the index read ahead returns or raises AprError, never
    anything else, and `compare` says the same with the child as without it."""
    import random

    from apr.errors import AprError
    from tests.fuzz.mutators import apr_mutators, gguf_mutators, hf_mutators
    seed = clean("qwen2", fmt)
    mutators = {"apr": apr_mutators, "gguf": gguf_mutators, "hf": hf_mutators}[fmt](seed)
    rng = random.Random(1234)
    outcomes = {"report": 0, "error": 0, "answered": 0}
    for i in range(MUTANTS):
        mutant = tmp_path / (f"m{i}" if fmt == "hf" else f"m{i}.{fmt}")
        rng.choice(mutators)(seed, mutant, rng)
        try:
            stored_spans(mutant)
        except AprError:
            pass
        results = []
        for flag in (True, False):
            try:
                r = compare(seed, mutant, logits=False, ahead=flag)
                results.append(("report", findings(r), r.timings["answers_ahead"]))
            except AprError as e:
                results.append(("error", str(e), 0))
        assert results[0][:2] == results[1][:2], (i, mutant)
        outcomes[results[0][0]] += 1
        outcomes["answered"] += results[0][2] > 0
    assert outcomes["report"] >= 5 and outcomes["error"] >= 5 and outcomes["answered"] >= 5, outcomes


def test_the_command_prints_the_same_with_the_child(tmp_path):
    """`cli.py diff` in a process of its own, the child forced on for small files: the same
    output and exit code as without it, nothing of the child's on either stream."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    a = clean("qwen2", "apr")
    b = flipped(clean("qwen2", "gguf"), "model.layers.0.mlp.up_proj.weight", "middle")
    script = ("import sys, diff.ahead as ahead\n"
              "ahead.MIN_BYTES = int(sys.argv[1])\n"
              "answers = sys.argv[2]\n"
              "import diff.core as core\n"
              "compare = core.compare\n"
              "def spy(*args, **kw):\n"
              "    r = compare(*args, **kw)\n"
              "    open(answers, 'w').write(str(r.timings['answers_ahead']))\n"
              "    return r\n"
              "core.compare = spy\n"
              "import cli\n"
              "sys.argv = ['cli.py', 'diff', sys.argv[3], sys.argv[4], '--json']\n"
              "cli.main()\n")
    runs = []
    for min_bytes in (0, 1 << 60):
        answers = tmp_path / f"answers-{min_bytes}"
        p = subprocess.run([sys.executable, "-c", script, str(min_bytes), str(answers), str(a), str(b)],
                           capture_output=True, text=True, cwd=root, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(root)})
        out = json.loads(p.stdout)
        out.pop("timings", None)                    # seconds differ from run to run
        runs.append((p.returncode, out, p.stderr, int(answers.read_text())))
    assert runs[0][:3] == runs[1][:3]
    assert runs[0][0] == 1 and "model.layers.0.mlp.up_proj.weight" in runs[0][1]["diagnosis"]["line"]
    assert runs[0][3] > 0 and runs[1][3] == 0
