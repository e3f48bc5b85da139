"""qa gates: a trained checkpoint passes every gate; each defect fails the gate that owns it; a
random init and a layout defect that make the model predict no better than chance fail the
forward and golden-output gates, unless --allow-untrained."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from apr.container import AprFile, TensorSource, write_apr
from apr.convert import convert
from oracles import make_hf_model
from test_cli_files import cli


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small Qwen2 trained by the reference trainer on a few standard-library modules (about
    20 s on a CPU): its loss on qa's sample text is well below ln(vocab)."""
    from oracles import write_stdlib_corpus, write_tokenizer
    from ref.train import RunConfig, start_run, train
    root = tmp_path_factory.mktemp("qa")
    corpus = write_stdlib_corpus(root / "corpus")
    write_tokenizer(root)
    cfg = RunConfig(dataset=str(corpus), run_dir=str(root / "run"), tokenizer=str(root / "tokenizer.json"),
                    arch="qwen2-tiny", shape=dict(vocab_size=448), steps=300, batch_size=8,
                    seq_length=64, lr=3e-3, eval_every=300, save_every=300, val_batches=4,
                    val_fraction=0.3, device="cpu", allow_data_starvation=True)
    summary = train(start_run(cfg, progress=False, log=lambda s: None), progress=False, log=lambda s: None)
    return Path(summary.checkpoints["final"])


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
    assert g["forward"]["value"] < math.log(448) - 1.5, g["forward"]     # clears the bar by a margin
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
        # a NaN weight makes every logit NaN: the forward and golden-output gates fail with it
        collateral = {"forward"} | ({"golden_output"} if gate == "tensors" else set())
        others = [n for n, x in g.items() if not x["passed"] and n != gate and n not in collateral]
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


def test_a_model_no_better_than_chance_fails(good, tmp_path):
    """transformers' random-initialized Qwen2 (every structural gate passes) fails the forward
    gate: its loss on the sample text is not 1 nat below ln(vocab); --allow-untrained passes it."""
    hf = make_hf_model(tmp_path / "hf", "qwen2", tied=True, rope_theta=1e6)
    g, rc = gates(hf, "--no-gguf")
    assert rc == 1 and not g["forward"]["passed"], g["forward"]
    assert g["forward"]["value"] > math.log(448) - 1 and "no better than chance" in g["forward"]["message"]
    assert all(x["passed"] for n, x in g.items() if n not in ("forward", "golden_output")), g
    g, rc = gates(hf, "--no-gguf", "--allow-untrained")
    assert rc == 0 and "allowed by --allow-untrained" in g["forward"]["message"], g["forward"]


def test_a_layout_defect_fails_forward_and_golden_output(good, tmp_path):
    """The trained model with every down_proj holding the bytes of its transpose (the classic
    layout defect: shapes right, values scrambled)."""
    def transpose_down(a):
        for n in [n for n in a if n.endswith("mlp.down_proj.weight")]:
            a[n] = np.ascontiguousarray(a[n].T).reshape(a[n].shape)
    bad = rewrite(good, tmp_path / "down.apr", tensor_fn=transpose_down)
    g, rc = gates(bad, "--no-gguf")
    assert rc == 1 and not g["forward"]["passed"], g["forward"]
    assert not g["golden_output"]["passed"] and "over and over" in g["golden_output"]["message"], g["golden_output"]
    assert all(x["passed"] for n, x in g.items() if n not in ("forward", "golden_output")), g


def test_golden_output_fails_on_ids_outside_the_tokenizer(good, tmp_path):
    """Embedding rows beyond the tokenizer's 400 tokens (tied, so also output rows) made large:
    greedy decoding emits ids no token string stands for."""
    def loud_padding(a):
        for n in ("model.embed_tokens.weight", "lm_head.weight"):
            a[n][400:] = 3 * np.abs(a[n]).max()
    bad = rewrite(good, tmp_path / "pad.apr", tensor_fn=loud_padding)
    g, rc = gates(bad, "--no-gguf")
    assert rc == 1 and not g["golden_output"]["passed"], g["golden_output"]
    assert "outside the tokenizer's 400 tokens" in g["golden_output"]["message"], g["golden_output"]
    g, rc = gates(bad, "--no-gguf", "--allow-untrained")
    assert g["golden_output"]["passed"] and "allowed by --allow-untrained" in g["golden_output"]["message"]
