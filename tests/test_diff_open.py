"""Opening both files of a diff: the tied-copy check's byte comparison (`apr.model._same_values`)
against the files' bytes read directly, and `diff.compare`'s order of warnings and errors:
A's before B's, also when A is slow to open."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import apr.model as M
import cli
from apr.dtypes import dtype_by_name
from apr.errors import FormatError
from apr.model import TensorRef

F16 = dtype_by_name("F16")


def ref(path: Path, offset: int, nbytes: int, name: str = "t") -> TensorRef:
    return TensorRef(name=name, dtype=F16, shape=(nbytes // 2,), layout="row-major", source_name=name,
                     nbytes=nbytes, _raw=lambda: None, file_span=(path, offset))


@pytest.mark.parametrize("chunk", [M.COMPARE_CHUNK, 4096 + 3, 64])
def test_tied_copy_check_equals_what_the_bytes_say(tmp_path, monkeypatch, chunk):
    """Spans of two files, equal or differing in one byte anywhere (first, last, a chunk's
    edge, the unaligned tail), against comparing the bytes read directly."""
    monkeypatch.setattr(M, "COMPARE_CHUNK", chunk)
    rng = np.random.default_rng(0)
    n = 3 * 4096 + 10                                   # not a multiple of 8 or of a chunk
    body = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 24 + body)
    for flip in [None, 0, n - 1, chunk - 1, chunk, n - 3, n // 2]:
        other = bytearray(body)
        if flip is not None and flip < n:
            other[flip] ^= 0x40
        b.write_bytes(b"yy" + bytes(other) + b"zz")      # another offset in the other file
        expected = a.read_bytes()[24:24 + n] == b.read_bytes()[2:2 + n]
        assert M._same_values(ref(a, 24, n), ref(b, 2, n)) == expected, flip


def test_a_span_past_the_end_is_a_truncated_tensor_and_an_empty_span_is_equal(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(bytes(100))
    with pytest.raises(FormatError, match="truncated"):
        M._same_values(ref(a, 0, 64), ref(a, 50, 64))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert M._same_values(ref(a, 0, 0), ref(empty, 0, 0)) is True


def _tied_but_different(directory: Path, seed: int) -> Path:
    """An HF checkpoint that declares tied embeddings and stores a different lm_head."""
    from safetensors.numpy import load_file, save_file
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True))
    model.save_pretrained(directory, safe_serialization=True)
    sd = load_file(directory / "model.safetensors")
    sd["lm_head.weight"] = np.random.default_rng(seed).standard_normal((96, 32)).astype(np.float32)
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_warnings_of_both_files_print_in_file_order(tmp_path, monkeypatch):
    """A's warnings come before B's, also when A takes longer to open (here made to), and
    through the CLI."""
    import time
    import warnings
    import diff.core as core
    a, b = _tied_but_different(tmp_path / "a", 1), _tied_but_different(tmp_path / "b", 2)
    real_open = core.open_model

    def open_a_slowly(path, **kw):
        if Path(path) == a:
            time.sleep(0.5)
        return real_open(path, **kw)
    monkeypatch.setattr(core, "open_model", open_a_slowly)
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kw: shown.append(str(message)))
        core.compare(a, b, logits=False)
    assert [m.split(":")[0] for m in shown] == [str(a), str(b)], shown
    for first, second in [(a, b), (b, a)]:
        proc = subprocess.run([sys.executable, str(Path(cli.__file__)), "diff", str(first), str(second)],
                              capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
        assert proc.returncode == 1 and len(lines) == 2, proc.stderr
        assert lines[0].startswith(f"warning: {first}") and lines[1].startswith(f"warning: {second}"), \
            proc.stderr


def test_errors_of_both_files_come_in_file_order(tmp_path):
    """The error reported is A's when both are bad, B's when only B is."""
    good = _tied_but_different(tmp_path / "good", 1)
    bad_a, bad_b = tmp_path / "bad_a.apr", tmp_path / "bad_b.gguf"
    bad_a.write_bytes(b"APR2" + bytes(60))
    bad_b.write_bytes(b"GGUF" + bytes(20))
    for a, b, named in [(bad_a, bad_b, bad_a), (bad_b, bad_a, bad_b), (good, bad_b, bad_b), (bad_a, good, bad_a)]:
        proc = subprocess.run([sys.executable, str(Path(cli.__file__)), "diff", str(a), str(b)],
                              capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
        assert len(errors) == 1 and str(named) in errors[0], proc.stderr
