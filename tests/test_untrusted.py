"""Hostile inputs beyond the fuzz campaign's mutants: things that are not files (FIFOs,
symbolic link loops), JSON a stranger writes (lone surrogate escapes, nesting 100,000
deep, an index whose weight_map holds numbers or paths outside the directory), shapes
whose product wraps an int64, and weights that hold inf/nan. Each is one `error:` line and
exit 2, or for diff a diagnosis, with nothing else on stderr."""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from tests.fuzz.mutators import apr_tensors, write_apr_as_stranger
from tests.oracles import make_hf_model


def run(*args) -> tuple[int, str, str]:
    def hang(signum, frame):
        raise AssertionError(f"no result in 20 s: {args}")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        r = CliRunner().invoke(cli.main, [str(a) for a in args])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert r.exit_code in (0, 1, 2), (args, r.exit_code, r.stderr, r.exception)
    return r.exit_code, r.stdout, r.stderr


def one_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in err, (w, err)


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("m") / "hf", "llama", hidden=32, layers=1, heads=2,
                         kv_heads=1, ffn=48)


@pytest.fixture(scope="module")
def apr_file(hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a") / "m.apr"
    assert run("convert", hf, "-o", out, "-q")[0] == 0
    return out


def test_fifo_is_refused_not_read(hf, tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for args in (["inspect", fifo], ["diff", fifo, hf], ["convert", fifo, "-o", tmp_path / "o.apr"],
                 ["qa", fifo, "--no-gguf"]):
        one_error(*run(*args)[::2], "not a regular file")
    d = tmp_path / "hf"
    shutil.copytree(hf, d)
    os.remove(d / "tokenizer_config.json")
    os.mkfifo(d / "tokenizer_config.json")
    one_error(*run("inspect", d)[::2], "tokenizer_config.json", "not a regular file")
    assert not (tmp_path / "o.apr").exists()


def test_symlink_loops(hf, tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    one_error(*run("inspect", loop)[::2], "symbolic links")
    one_error(*run("convert", loop, "-o", tmp_path / "o.apr")[::2], "symbolic links")
    # as the output: it is there (a link), so it is not overwritten without --force
    one_error(*run("convert", hf, "-o", loop)[::2], "already exists")
    dangling = tmp_path / "d.apr"
    os.symlink(tmp_path / "nowhere", dangling)
    one_error(*run("inspect", dangling)[::2], "symbolic link to nothing")


@pytest.mark.parametrize("index,words", [
    ({"weight_map": {"model.embed_tokens.weight": 1}}, ["weight_map", "expected the file name"]),
    ({"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}, ["../../etc/passwd"]),
    ({"weight_map": {"x": "/etc/passwd"}}, ["/etc/passwd"]),
    ([1, 2], ["no weight_map"]),
    ({"weight_map": []}, ["no weight_map"]),
])
def test_hostile_shard_index(hf, tmp_path, index, words):
    d = tmp_path / "hf"
    shutil.copytree(hf, d)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    for args in (["inspect", d], ["diff", hf, d], ["convert", d, "-o", tmp_path / "o.apr"]):
        one_error(*run(*args)[::2], "model.safetensors.index.json", *words)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
def test_lone_surrogate_in_json_is_named(hf, tmp_path, name):
    d = tmp_path / "hf"
    shutil.copytree(hf, d)
    doc = json.loads((d / name).read_text())
    doc["extra_note"] = "\ud800"
    (d / name).write_text(json.dumps(doc))          # ensure_ascii: the escape "\ud800"
    assert "\\ud800" in (d / name).read_text()
    for args in (["inspect", d, "--json"], ["diff", hf, d], ["convert", d, "-o", tmp_path / "o.apr"]):
        one_error(*run(*args)[::2], name, "lone surrogate")


def test_lone_surrogate_in_apr_metadata_and_safetensors_header(hf, apr_file, tmp_path):
    from apr.container import AprFile
    with AprFile.open(apr_file) as f:
        meta = dict(f.metadata)
    meta["name"] = "\ud800"
    bad = tmp_path / "bad.apr"
    write_apr_as_stranger(bad, meta, apr_tensors(apr_file))
    assert b'"\\ud800"' in bad.read_bytes()
    for args in (["inspect", bad, "--json"], ["diff", apr_file, bad]):
        one_error(*run(*args)[::2], "bad.apr", "lone surrogate")

    st = tmp_path / "hf"
    shutil.copytree(hf, st)
    raw = (st / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", raw, 0)[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = {"format": "\ud800"}
    text = json.dumps(header).encode()
    (st / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    one_error(*run("inspect", st)[::2], "safetensors header", "lone surrogate")


def test_json_nested_too_deep(hf, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(hf, d)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    one_error(*run("inspect", d)[::2], "config.json", "nested too deeply")


def _patch_dims(data: bytearray, at: int, dims: tuple[int, int]) -> None:
    struct.pack_into("<QQ", data, at, *dims)


def test_shape_product_that_wraps_int64_is_refused(apr_file, tmp_path):
    """[0, 2^63] has zero elements and zero bytes: every size check passes, and an int64
    product of the dimensions overflows later."""
    from apr.container import AprFile, TensorSource
    from apr.dtypes import dtype_by_name
    with AprFile.open(apr_file) as f:
        meta = dict(f.metadata)
    sources = apr_tensors(apr_file) + [TensorSource("model.extra", dtype_by_name("F32"), (0, 2 ** 63),
                                                    lambda: np.zeros(0, np.uint8))]
    bad = tmp_path / "wrap.apr"
    write_apr_as_stranger(bad, meta, sources)
    for args in (["inspect", bad], ["convert", bad, "-o", tmp_path / "o.gguf"], ["diff", apr_file, bad]):
        one_error(*run(*args)[::2], "model.extra", "dimension outside")


def test_gguf_shape_product_that_wraps_int64_is_refused(hf, tmp_path):
    import gguf
    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((2, 3), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    i = data.index(b"token_embd.weight") + len(b"token_embd.weight")
    assert struct.unpack_from("<I", data, i)[0] == 2
    _patch_dims(data, i + 4, (0, 2 ** 63))
    path.write_bytes(bytes(data))
    one_error(*run("inspect", path)[::2], "token_embd.weight", "dimension outside")


def test_diff_names_inf_and_nan_weights_without_warnings(hf, tmp_path):
    from safetensors.numpy import load_file, save_file
    d = tmp_path / "hf"
    shutil.copytree(hf, d)
    t = load_file(d / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    t[name] = t[name].copy()
    t[name].flat[:3] = (np.inf, np.nan, -np.inf)
    t["model.norm.weight"] = np.full_like(t["model.norm.weight"], 3e38)   # finite, squares overflow
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    code, out, err = run("diff", hf, d)
    assert code == 1 and err == "", err
    diagnosis = out.strip().splitlines()[-1]
    assert diagnosis.startswith("DIAGNOSIS: NON-FINITE") and name in diagnosis, diagnosis
    assert "B 3 of" in out and "inf/nan logits" in out, out
    code, out, err = run("diff", hf, d, "--json")
    rep = json.loads(out)
    f = {x["name"]: x for x in rep["tensors"]}
    assert f[name]["defect"] == "NON-FINITE" and f[name]["stats"]["nonfinite_b"] == 3
    # the overflowing norm is compared in float64: a finite relation, not nan
    norm = f["model.norm.weight"]
    assert norm["defect"] not in (None, "NON-FINITE") and np.isfinite(norm["stats"]["rel_l2"]), norm
    # the same non-finite values on both sides are not a difference
    code, out, err = run("diff", d, d)
    assert code == 0 and err == "", (out, err)


def test_typed_lists_refuse_what_the_fast_path_lets_through_nowhere():
    """Values.items checks the element types of a whole list at once; what it refuses element
    by element (a bool among ints, NaN among floats, a number among strings, an int beyond
    the size bound) is still refused, naming the element."""
    from apr.errors import AprError
    from apr.untrusted import MAX_SIZE, Values
    v = Values({"s": ["a", "b"], "i": [1, 2, -3], "f": [0.5, 1.0], "e": [],
                "s_bad": ["a", 3], "i_bool": [1, True], "i_big": [1, MAX_SIZE + 1],
                "f_nan": [0.5, float("nan")], "f_int": [0.5, 1]}, "test")
    assert v.items("s", str) == ["a", "b"] and v.items("i", int) == [1, 2, -3]
    assert v.items("f", float) == [0.5, 1.0] and v.items("e", int) == []
    assert v.items("missing", int, default=[7]) == [7]
    for key, kind, where in [("s_bad", str, "s_bad[1]"), ("i_bool", int, "i_bool[1]"),
                             ("i_big", int, "i_big[1]"), ("f_nan", float, "f_nan[1]")]:
        with pytest.raises(AprError, match=re.escape(where)):
            v.items(key, kind)
    assert v.items("f_int", float) in ([0.5, 1.0], [0.5, 1])      # an int is a valid float


def test_equal_bytes_sees_one_differing_byte_anywhere():
    from apr.model import equal_bytes
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 4096, 4099):
        x = rng.integers(0, 256, n, dtype=np.uint8)
        assert equal_bytes(x, x.copy())
        if n == 0:
            continue
        assert not equal_bytes(x, x[:-1])
        for at in {0, n // 2, n - 1}:
            y = x.copy()
            y[at] ^= 1
            assert not equal_bytes(x, y)
            assert equal_bytes(x[at + 1:], y[at + 1:])      # unaligned views compare too
