"""What `diff.compare` does to run its byte comparisons beside its parsing: stored bytes
compared in place through memory maps (`apr.model.SpanMaps`), A opened in a thread while B
is parsed, the tensors compared in a thread while the tokenizers are parsed
(`open_model(..., tokenizer_later=True)`). Each is checked against what the plain path gives
or against the files' bytes read directly, and for its errors and its order of warnings."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

import apr.model as M
import cli
from apr.dtypes import dtype_by_name
from apr.errors import AprError, FormatError
from apr.model import SpanMaps, TensorRef, open_model

F16 = dtype_by_name("F16")


def ref(path: Path, offset: int, nbytes: int, name: str = "t") -> TensorRef:
    return TensorRef(name=name, dtype=F16, shape=(nbytes // 2,), layout="row-major", source_name=name,
                     nbytes=nbytes, _raw=lambda: None, file_span=(path, offset))


@pytest.mark.parametrize("window", [M.MAP_WINDOW, 4096 + 3, 64])
def test_span_maps_equal_what_the_bytes_say(tmp_path, monkeypatch, window):
    """Spans of two files, equal or differing in one byte anywhere (first, last, a window's
    edge, the unaligned tail), against comparing the bytes read directly."""
    monkeypatch.setattr(M, "MAP_WINDOW", window)
    rng = np.random.default_rng(0)
    n = 3 * 4096 + 10                                   # not a multiple of 8 or of a window
    body = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 24 + body)
    for flip in [None, 0, n - 1, window - 1, window, n - 3, n // 2]:
        other = bytearray(body)
        if flip is not None and flip < n:
            other[flip] ^= 0x40
        b.write_bytes(b"yy" + bytes(other) + b"zz")      # another offset in the other file
        maps = SpanMaps()
        try:
            got = maps.equal(ref(a, 24, n), ref(b, 2, n))
        finally:
            maps.close()
        assert got == (a.read_bytes()[24:24 + n] == b.read_bytes()[2:2 + n]), flip
        # the tied-copy check answers the same through the maps as through its reads
        assert M._same_values(ref(a, 24, n), ref(b, 2, n)) == got


def test_span_maps_refuse_a_span_past_the_end_and_leave_unmappable_files_to_reads(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(bytes(100))
    maps = SpanMaps()
    try:
        with pytest.raises(FormatError, match="truncated"):
            maps.equal(ref(a, 0, 64), ref(a, 50, 64))
        empty = tmp_path / "empty.bin"
        empty.write_bytes(b"")
        assert maps.equal(ref(a, 0, 0), ref(empty, 0, 0)) is None    # empty files cannot be mapped
        assert maps.equal(ref(a, 0, 8), TensorRef(name="n", dtype=F16, shape=(4,), layout="row-major",
                                                  source_name="n", nbytes=8, _raw=lambda: None)) is None
    finally:
        maps.close()
    with pytest.raises(FormatError, match="truncated"):
        M._same_values(ref(a, 0, 64), ref(a, 50, 64))


def _vocab_gguf(path: Path, tokens: list[str], types: list[int]) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_tokenizer_parsed_later_raises_what_opening_would_have(tmp_path):
    bad = _vocab_gguf(tmp_path / "bad.gguf", ["a", "b", "ab"], [1, 1])     # 2 types, 3 tokens
    with pytest.raises(FormatError, match="token_type has 2 entries for 3 tokens"):
        open_model(bad)
    view = open_model(bad, tokenizer_later=True)
    with view:
        for _ in range(2):                               # and again at the next use
            with pytest.raises(FormatError, match="token_type has 2 entries for 3 tokens"):
                view.tokenizer
    good = _vocab_gguf(tmp_path / "good.gguf", ["a", "b", "ab"], [1, 1, 1])
    with open_model(good, tokenizer_later=True) as view:
        assert isinstance(view._tokenizer, M._Later)     # not parsed yet
        assert view.tokenizer.vocab == ["a", "b", "ab"] and view.tokenizer is view.tokenizer
    # the diff parses it while the tensors are compared, and still ends in one error line
    for a, b in [(good, bad), (bad, good)]:
        proc = subprocess.run([sys.executable, str(Path(cli.__file__)), "diff", str(a), str(b)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.splitlines() == [f"error: GGUF: tokenizer.ggml.token_type has 2 entries "
                                            f"for 3 tokens"], proc.stderr


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
    """A opens in a thread while B opens: A's warnings still come before B's, also when A
    takes longer to open (here made to), and through the CLI."""
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


def test_an_error_while_the_tensors_are_compared_is_raised_after_they_stop(tmp_path, monkeypatch):
    """The tensor thread is joined before compare returns or raises, whatever the main
    thread raises meanwhile, and its own error is raised when the main thread has none."""
    import time
    import diff.core as core
    a = _tied_but_different(tmp_path / "a", 1)
    done = []

    def slow(fail):
        def compare_tensors(va, vb, tick):
            time.sleep(0.3)
            done.append(fail)
            if fail:
                raise AprError("tensor thread failed")
            yield from ()
        return compare_tensors

    monkeypatch.setattr(core, "compare_tensors", slow(True))
    with pytest.raises(AprError, match="tensor thread failed"):
        core.compare(a, a, logits=False)
    assert done == [True]

    def tokenizers_fail(va, vb):
        raise AprError("tokenizer failed")
    monkeypatch.setattr(core, "compare_tensors", slow(False))
    monkeypatch.setattr(core, "compare_tokenizers", tokenizers_fail)
    with pytest.raises(AprError, match="tokenizer failed"):
        core.compare(a, a, logits=False)
    assert done == [True, False]                 # the thread had run to its end
