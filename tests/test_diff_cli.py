"""`apr-ref diff A B` on the command line: table, summary, the final DIAGNOSIS line, --json,
--all / --filter / --limit, --tokens / --prompt / --no-logits, and exit codes (0 equivalent,
1 defect, 2 unreadable input with one `error: ...` line)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from test_diff_helpers import clean, hf_tensors, write_variant

ROOT = Path(__file__).resolve().parents[1]
REGISTER = "import sys, cli; sys.argv[0] = 'apr-ref'; cli.main()"
DOWN = "model.layers.1.mlp.down_proj.weight"


def run(*args: object):
    """Through the real CLI group."""
    return CliRunner().invoke(cli.main, ["diff", *map(str, args)])


def subprocess_diff(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", REGISTER, "diff", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def transposed() -> Path:
    t = hf_tensors("llama")
    t[DOWN] = np.ascontiguousarray(t[DOWN].T).reshape(t[DOWN].shape)
    return write_variant("apr", "llama", t)


def test_equivalent_exit_0_and_final_line():
    r = run(clean("llama", "hf"), clean("llama", "gguf-f16"))
    assert r.exit_code == 0, r.output
    lines = r.output.rstrip("\n").splitlines()
    assert lines[-1].startswith("DIAGNOSIS: equivalent — max |Δ| ")
    assert lines[-1].count("DIAGNOSIS:") == 1 and "within F16 rounding" in lines[-1]
    assert any("within dtype rounding" in line and "--all to list them" in line for line in lines)
    assert any(line.startswith("logits: ") for line in lines)


def test_defect_exit_1_table_and_diagnosis(transposed):
    r = run(clean("llama", "gguf"), transposed)
    assert r.exit_code == 1, r.output
    lines = r.output.rstrip("\n").splitlines()
    assert lines[-1].startswith(f"DIAGNOSIS: LAYOUT transposed — {DOWN}")
    row = next(line for line in lines if DOWN in line and "LAYOUT transposed" in line)
    assert "F32" in row
    assert any("first divergent" in line and "layer 1" in line for line in lines)


def test_json_document(transposed):
    r = run(clean("llama", "apr"), transposed, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.output)
    assert doc["diagnosis"]["class"] == "LAYOUT transposed"
    assert doc["diagnosis"]["tensors"] == [DOWN]
    assert doc["diagnosis"]["message"].startswith(f"LAYOUT transposed — {DOWN}")
    assert doc["equivalent"] is False
    rec = {t["name"]: t for t in doc["tensors"]}
    assert rec[DOWN]["defect"] == "LAYOUT transposed" and rec[DOWN]["relation"] == "transposed"
    assert set(rec[DOWN]["stats"]) >= {"max_abs", "mean_abs", "rmse", "cosine", "rel_l2"}
    assert rec["model.norm.weight"]["relation"] == "identical"
    lg = doc["logits"]
    assert lg["ran"] and not lg["agree"] and lg["first_divergent_layer"] == 1
    assert lg["culprit_tensors"] == [DOWN]
    assert {"max_abs", "kl_mean", "top1_agreement", "stages"} <= set(lg)
    assert doc["a"]["format"] == "apr" and doc["b"]["format"] == "apr"


def test_all_filter_limit(transposed):
    a = clean("llama", "apr")
    default = run(a, transposed).output
    every = run(a, transposed, "--all").output
    assert "model.norm.weight" not in default and "model.norm.weight" in every
    only = run(a, transposed, "--all", "--filter", r"layers\.0\.mlp").output
    listed = [line for line in only.splitlines() if line.startswith("  model.")]
    assert listed and all("layers.0.mlp" in line for line in listed)
    limited = run(a, transposed, "--all", "--limit", "3").output
    assert len([line for line in limited.splitlines() if line.startswith("  model.")]) == 3
    assert "more (--limit)" in limited
    assert limited.splitlines()[-1] == default.splitlines()[-1]     # the diagnosis is the same


def test_tokens_prompt_and_no_logits():
    a, b = clean("qwen2", "apr"), clean("qwen2", "gguf")
    doc = json.loads(run(a, b, "--json", "--tokens", "5,6,7").output)
    assert doc["logits"]["tokens"] == [5, 6, 7]
    doc = json.loads(run(a, b, "--json", "--prompt", "def f(x):\n    return x").output)
    from apr.model import open_model
    from apr.tokenizer import build_tokenizer
    with open_model(a) as v:
        want = build_tokenizer(v.tokenizer).encode("def f(x):\n    return x").ids
    assert doc["logits"]["tokens"] == want and len(want) > 3
    r = run(a, b, "--json", "--no-logits")
    assert r.exit_code == 0
    doc = json.loads(r.output)
    assert doc["logits"]["ran"] is False and "skipped" in doc["logits"]["note"]


@pytest.mark.parametrize("args,message", [
    (["--tokens", "1,99999"], "token ids must be in [0, 448)"),
    (["--tokens", "1,2", "--prompt", "x"], "give --tokens or --prompt, not both"),
    (["--filter", "("], "--filter"),
])
def test_bad_options_exit_2(args, message):
    r = run(clean("llama", "apr"), clean("llama", "gguf"), *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_unreadable_inputs_exit_2_in_a_subprocess(tmp_path):
    good = clean("llama", "apr")
    junk = tmp_path / "junk.apr"
    junk.write_bytes(b"NOPE" + bytes(100))
    pickle = tmp_path / "model.bin"
    pickle.write_bytes(b"\x80\x04" + bytes(100))
    for a, b in ((good, tmp_path / "missing.gguf"), (junk, good), (good, pickle)):
        p = subprocess_diff(a, b)
        assert p.returncode == 2, (p.stdout, p.stderr)
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), p.stderr
        assert "Traceback" not in p.stderr and p.stdout == ""


def test_subprocess_exit_codes(transposed):
    ok = subprocess_diff(clean("qwen2", "hf"), clean("qwen2", "apr-bf16"))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1].startswith("DIAGNOSIS: equivalent — ")
    bad = subprocess_diff(clean("llama", "hf"), transposed, "--json")
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["diagnosis"]["class"] == "LAYOUT transposed"


def test_config_defect_on_the_command_line():
    b = write_variant("hf", "qwen2", hf_tensors("qwen2"), {"rms_norm_eps": 1e-5})
    r = run(clean("qwen2", "gguf"), b)
    assert r.exit_code == 1
    last = r.output.rstrip("\n").splitlines()[-1]
    assert last.startswith("DIAGNOSIS: CONFIG — rms_norm_eps: A 1e-06, B 1e-05")
    assert "confirmed" in last and "layer 0" in last
