"""Every command on the new families (Qwen3 with head_dim != hidden/heads and a sliding layer,
Mistral with its window, Llama with llama3 RoPE, Gemma 2, Gemma 3 with linear RoPE on its
global layers, Phi-3) built by transformers itself: inspect,
convert to APR/HF/GGUF in F32/F16/BF16/Q8_0 (or the refusal GGUF owes them), logits, run,
bench, qa, diff, and a fine-tune with pretrain --init that writes a checkpoint of the same
family which transformers loads back to our logits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from oracles import stdlib_files, write_tokenizer
from ref.load import load_model
from test_cli_files import cli
from test_families import hf_model

CASES = {
    # id: (family, ratio, kv_heads, tied, rope, head_dim, window, theta, gguf ok)
    "qwen3": ("qwen3", 2, 2, True, "yarn", 16, 4, 1e6, False),
    "mistral": ("mistral", 2, 2, False, "default", None, 6, 1e6, "listed change"),
    "llama3": ("llama", 2, 2, False, "llama3", None, None, 5e5, True),
    "gemma2": ("gemma2", 2, 2, True, "default", 16, 6, 1e4, True),
    "gemma3": ("gemma3", 2, 1, True, "linear", 16, 6, 1e6, True),
    "phi3": ("phi3", 2, 2, False, "default", None, None, 1e4, True),
}
EXTRA = {"gemma2": dict(query_pre_attn_scalar=16),
         "gemma3": dict(query_pre_attn_scalar=16, layer_types=["sliding_attention"] * 2)}
IDS = [5, 17, 3, 60, 2, 9, 33, 41, 8, 12]


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_every_command(case_id, tmp_path):
    family, ratio, kv, tied, rope_name, head_dim, window, theta, gguf_ok = CASES[case_id]
    hf = hf_model(family, ratio, kv, tied, rope_name, head_dim, window, theta, seed=4,
                  extra=EXTRA.get(case_id))
    hf.resize_token_embeddings(320)
    src = tmp_path / "hf"
    hf.float().save_pretrained(src)
    write_tokenizer(src, vocab_size=300)

    r = cli("inspect", src, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["family"] == family

    for dtype in ("f32", "f16", "bf16", "q8_0"):
        r = cli("convert", src, "-o", tmp_path / f"m-{dtype}.apr", "--dtype", dtype, "-q")
        assert r.returncode == 0, r.stderr
        r = cli("diff", src, tmp_path / f"m-{dtype}.apr")
        assert r.returncode == 0, r.stdout[-1500:] + r.stderr
        r = cli("convert", src, "-o", tmp_path / f"m-{dtype}.gguf", "--dtype", dtype, "-q")
        if gguf_ok is True:
            assert r.returncode == 0, r.stderr
            r = cli("diff", src, tmp_path / f"m-{dtype}.gguf")
            assert r.returncode == 0, r.stdout[-1500:]
        else:
            assert r.returncode == 2 and r.stderr.startswith("error: ")
            assert ("GGUF cannot hold" if gguf_ok is False else "--allow-changes") in r.stderr, r.stderr
            assert not (tmp_path / f"m-{dtype}.gguf").exists()
    apr = tmp_path / "m-f32.apr"
    r = cli("convert", apr, "-o", tmp_path / "back", "-q")
    assert r.returncode == 0, r.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    with torch.no_grad():
        want = hf.float()(input_ids=torch.tensor([IDS])).logits[0].numpy()
        got = back(input_ids=torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

    r = cli("logits", apr, "--tokens", ",".join(map(str, IDS)), "-o", tmp_path / "l.npy")
    assert r.returncode == 0, r.stderr
    assert np.abs(np.load(tmp_path / "l.npy").reshape(want.shape) - want).max() <= 1e-4 * np.abs(want).max()
    r = cli("run", apr, "hello", "--max-tokens", "4", "--seed", "1")
    assert r.returncode == 0, r.stderr
    r = cli("bench", apr, "--iterations", "1", "--gen-tokens", "4", "--prompt-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    r = cli("qa", apr, "--json", "--allow-untrained")   # random weights: no better than chance
    gates = {g["name"]: g for g in json.loads(r.stdout)["gates"]}
    assert all(g["passed"] for n, g in gates.items() if n != "gguf_export"), gates
    assert gates["gguf_export"]["passed"] == (gguf_ok is True)   # a listed change fails the gate
    assert r.returncode == (0 if gguf_ok is True else 1)

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in stdlib_files(8):
        (corpus / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    r = cli("pretrain", "--init", apr, "--dataset", corpus, "--run-dir", tmp_path / "run",
            "--steps", "2", "--batch-size", "2", "--seq-length", "16", "--val-batches", "2",
            "--val-fraction", "0.3", "--eval-every", "1", "--allow-data-starvation",
            "--allow-untrained-init", "--json", "-q")
    assert r.returncode == 0, r.stderr
    final = tmp_path / "run" / "ckpt" / "final.apr"
    tuned, view = load_model(final, dtype=np.float64)
    view.close()
    assert tuned.config.family == family and tuned.config.rope_scaling == load_model(apr)[0].config.rope_scaling
    r = cli("convert", final, "-o", tmp_path / "tuned", "-q")
    assert r.returncode == 0, r.stderr
    t2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", dtype=torch.float64)
    with torch.no_grad():
        theirs = t2(input_ids=torch.tensor([IDS])).logits[0].numpy()
    ours = tuned.forward(np.array([IDS]))[0]
    assert np.abs(ours - theirs).max() <= 1e-6 * np.abs(theirs).max()
