"""qa gates: a good checkpoint passes every gate; each defect fails the gate that owns it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from apr.container import AprFile, TensorSource, write_apr
from apr.convert import convert
from oracles import make_hf_model
from test_cli_files import cli


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    hf = make_hf_model(root / "hf", "qwen2", tied=True, rope_theta=1e6)
    convert(hf, root / "good.apr")
    return root / "good.apr"


def rewrite(src, dst, meta_changes=None, drop_meta=(), tensor_fn=None):
    """Copy an APR file with metadata changed and tensors optionally transformed."""
    with AprFile.open(src) as f:
        meta = {k: v for k, v in f.metadata.items() if k not in drop_meta}
        meta.update(meta_changes or {})
        arrays = {n: np.array(f.raw(n)) for n in f.tensors}
        dtypes = {n: e.dtype for n, e in f.tensors.items()}
    if tensor_fn:
        tensor_fn(arrays)
    write_apr(dst, meta, [TensorSource(n, dtypes[n], a.shape, (lambda a=a: a)) for n, a in arrays.items()])
    return dst


def gates(path, *args):
    r = cli("qa", path, "--json", *args)
    doc = json.loads(r.stdout)
    assert doc["passed"] is (r.returncode == 0)
    return {g["name"]: g for g in doc["gates"]}, r.returncode


def test_good_checkpoint_passes_every_gate(good):
    g, rc = gates(good)
    assert rc == 0
    assert list(g) == ["format", "metadata", "tokenizer", "tensors", "tied_embeddings", "forward",
                       "golden_output", "throughput", "gguf_export"]
    assert all(x["passed"] and not x["skipped"] for x in g.values()), g
    assert g["gguf_export"]["value"] <= 1e-3
    for x in g.values():
        assert set(x) == {"name", "passed", "skipped", "message", "value", "threshold", "duration_ms"}


def test_each_defect_fails_its_gate(good, tmp_path):
    cases = {
        "tokenizer": rewrite(good, tmp_path / "notok.apr",
                             drop_meta=[k for k in AprFile.open(good).metadata if k.startswith("tokenizer.")]),
        "metadata": rewrite(good, tmp_path / "rope.apr", {"rope_theta": 10000.0}),
        "tied_embeddings": rewrite(good, tmp_path / "tied.apr",
                                   tensor_fn=lambda a: a.__setitem__("lm_head.weight", a["lm_head.weight"] * 2)),
        "tensors": rewrite(good, tmp_path / "nan.apr", tensor_fn=lambda a: a["model.norm.weight"].__setitem__(3, np.nan)),
    }
    for gate, path in cases.items():
        g, rc = gates(path, "--no-gguf")
        assert rc == 1, gate
        assert not g[gate]["passed"], (gate, g[gate])
        others = [n for n, x in g.items() if not x["passed"] and n != gate and n != "forward"]
        assert not others, (gate, others)
    g, _ = gates(cases["metadata"], "--no-gguf")
    assert "1e+06" in g["metadata"]["message"] or "1e6" in g["metadata"]["message"]


def test_thresholds(good):
    g, rc = gates(good, "--max-ppl", "1e9", "--min-tps", "1", "--no-gguf")
    assert rc == 0 and g["golden_output"]["threshold"] == 1e9 and g["gguf_export"]["skipped"]
    g, rc = gates(good, "--max-ppl", "2", "--no-gguf")
    assert rc == 1 and not g["golden_output"]["passed"] and g["golden_output"]["value"] > 2
    g, rc = gates(good, "--min-tps", "1e12", "--no-gguf")
    assert rc == 1 and not g["throughput"]["passed"]


def test_corrupt_file_fails_format_and_skips_the_rest(good, tmp_path):
    bad = tmp_path / "bad.apr"
    data = bytearray(good.read_bytes())
    data[-200] ^= 1
    bad.write_bytes(bytes(data))
    g, rc = gates(bad)
    assert rc == 1 and not g["format"]["passed"] and "CRC" in g["format"]["message"]


def test_missing_file_is_bad_input(tmp_path):
    r = cli("qa", tmp_path / "nope.apr")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope.apr'}: no such file or directory"


def test_pickle_or_text_is_bad_input_not_a_failed_gate(tmp_path):
    pkl = tmp_path / "model.bin"
    pkl.write_bytes(b"\x80\x04\x95" + b"\x00" * 32)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello, not a model\n")
    for path, what in ((pkl, "pickle"), (txt, "not a model file")):
        r = cli("qa", path)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("error: ") and what in r.stderr
