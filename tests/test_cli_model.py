"""The reference model on files: one model stored as APR, HF and GGUF (llama: rotary-permuted)
gives the same logits; and the `logits`, `run` and `bench` commands."""
from __future__ import annotations

import json

import numpy as np
import pytest

from apr.convert import convert
from oracles import hf_logits, make_hf_model
from ref.load import load_model
from test_cli_files import cli

IDS = [3, 141, 59, 26, 5, 35, 89, 79, 323, 84, 62, 64]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def stored(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(root / "hf", request.param, tied=request.param == "qwen2",
                       rope_theta=1e6 if request.param == "qwen2" else 1e4)
    convert(hf, root / "m.apr")
    convert(hf, root / "m.gguf")
    for dt in ("f16", "bf16", "q8_0"):
        convert(hf, root / f"m.{dt}.gguf", dtype=dt)
    return request.param, root


# relative to max |logit|: float64 reference on stored values vs float32 transformers
TOL = {"hf": 1e-5, "m.apr": 1e-5, "m.gguf": 1e-5, "m.f16.gguf": 2e-2, "m.bf16.gguf": 1e-1,
       "m.q8_0.gguf": 1e-1}


def test_same_logits_from_every_format(stored):
    family, root = stored
    want = hf_logits(root / "hf", IDS)
    scale = np.abs(want).max()
    for name, tol in TOL.items():
        model, view = load_model(root / name, dtype=np.float64)
        if name == "m.gguf":
            assert view.config.rope_type == ("adjacent" if family == "llama" else "halves")
        got = model.forward(np.array([IDS]))[0]
        assert np.abs(got - want).max() / scale <= tol, name


def test_logits_command(stored, tmp_path):
    family, root = stored
    out = tmp_path / "l.npy"
    r = cli("logits", root / "m.gguf", "--tokens", ",".join(map(str, IDS)), "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["tokens"] == IDS and doc["shape"] == [len(IDS), 448] and doc["finite"]
    got = np.load(out)
    want = hf_logits(root / "hf", IDS)
    assert np.abs(got - want).max() <= 1e-4
    assert [p["top"][0]["id"] for p in doc["positions"]] == want.argmax(-1).tolist()
    r = cli("logits", root / "m.gguf", "--tokens", "1,2", "-o", out)
    assert r.returncode == 2 and "--force" in r.stderr
    r = cli("logits", root / "m.apr", "--tokens", "1,99999")
    assert r.returncode == 2 and "outside the vocabulary" in r.stderr
    r = cli("logits", root / "m.apr", "--prompt", "def f(x):")
    assert r.returncode == 0 and "all finite" in r.stdout


def test_run_and_bench_commands(stored, tmp_path):
    family, root = stored
    r = cli("run", root / "m.apr", "import os", "--max-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["new_tokens"] == 5 and doc["stop_reason"] == "max_new_tokens"
    again = json.loads(cli("run", root / "m.gguf", "import os", "--max-tokens", "5", "--json").stdout)
    assert again["new_ids"] == doc["new_ids"]          # greedy: same model, same tokens
    r = cli("run", root / "hf", "x", "--temperature", "0.8", "--top-k", "5", "--seed", "3", "--json")
    assert r.returncode == 0, r.stderr
    r = cli("bench", root / "m.gguf", "--iterations", "2", "--gen-tokens", "4", "--prompt-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    for key in ("prefill_tokens_per_second", "decode_tokens_per_second", "time_to_first_token_ms"):
        assert b[key]["mean"] > 0 and b[key]["min"] <= b[key]["mean"] <= b[key]["max"]
    r = cli("run", root / "m.apr", "x", "--device", "cuda")
    assert r.returncode == 2 and "no usable GPU" in r.stderr and "Traceback" not in r.stderr


def test_model_without_tokenizer_needs_one(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "llama", tokenizer=False)
    convert(hf, tmp_path / "m.apr", allow_no_tokenizer=True)
    r = cli("run", tmp_path / "m.apr", "hello")
    assert r.returncode == 2 and "--tokenizer" in r.stderr
    from oracles import write_tokenizer
    write_tokenizer(tmp_path)
    r = cli("run", tmp_path / "m.apr", "hello", "--tokenizer", tmp_path / "tokenizer.json", "--max-tokens", "3")
    assert r.returncode == 0, r.stderr
