"""Stock checkpoints as they are published: the `config.json` of real checkpoints
(tests/fixtures/stock_configs/OWNER--NAME/config.json, every key as the checkpoint ships it),
shrunk to tiny sizes (hidden size, layers, heads, intermediate size, vocabulary, head_dim,
windows; every other key kept), built by transformers' own classes from that file with random
float64 weights and saved with save_pretrained, the published keys written back over the
config.json transformers wrote. Each checkpoint then

* opens without flags and gives transformers' logits (float64, 1e-10 relative), or is
  refused with one `error:` line naming a computation the reference does not implement
  (REFUSED);
* converts HF -> APR -> HF, and transformers loads the result to the same logits;
* exports to GGUF exactly, or as a listed change (LISTED) that is refused without
  --allow-changes and written with it, the change recorded in `conversion_notes`;
* runs in llama.cpp (all exports in one child process) with transformers' logits: within
  1e-4 of the largest logit (Gemma: the FP16 GELU table's distance, see
  tests/test_families_llama_cpp.py) on an exact export, and over the first `window`
  positions on a listed sliding-window change ("identical up to N tokens of context").
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

import cli
from apr.llamacpp import llama_cpp_logits_many
from tests.oracles import randomize_params
from tests import test_model_vs_hf as exact64

FIXTURES = Path(__file__).parent / "fixtures" / "stock_configs"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())
# refused at open, for a computation the reference does not implement: the word the error names
REFUSED = {"microsoft--Phi-3.5-mini-instruct": "longrope"}
# exported as a listed change: llama.cpp does not apply these models' sliding window
WINDOW_CHANGE = "attends to all positions"
LISTED = {"mistralai--Mistral-7B-v0.1": WINDOW_CHANGE, "microsoft--Phi-3-mini-4k-instruct": WINDOW_CHANGE,
          "microsoft--Phi-3-medium-4k-instruct": WINDOW_CHANGE}
HIDDEN, HEADS, HEAD_DIM, FFN, VOCAB, WINDOW = 32, 4, 8, 48, 96, 5
IDS = [3, 17, 41, 5, 88, 60, 2, 9, 33, 71, 12, 50]          # longer than WINDOW
TOL = 1e-10
LLAMA_CPP_TOL = 1e-4
# ggml's GELU is a table of FP16 values (tests/test_families_llama_cpp.py: 1e-4 to 3.2e-4 with
# Gemma's own caps); Gemma 3 without a final cap keeps the table's error unscaled
LLAMA_CPP_TOL_GEMMA = 2e-3


def shrink(cfg: dict) -> dict:
    """The published config at tiny sizes; every other key as published. Token ids past the
    tiny vocabulary move to its last row; a query scale equal to head_dim follows it; Gemma 3
    keeps 6 layers (its 5 sliding and 1 full)."""
    out = dict(cfg)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    out.update(hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN, vocab_size=VOCAB,
               num_key_value_heads=HEADS if kv == heads else 1 if kv == 1 else 2)
    old_head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if "head_dim" in cfg:
        out["head_dim"] = HEAD_DIM
    if cfg.get("query_pre_attn_scalar") == old_head_dim:
        out["query_pre_attn_scalar"] = HEAD_DIM
    layers = 6 if cfg["model_type"] == "gemma3_text" else 2
    out["num_hidden_layers"] = layers
    if isinstance(cfg.get("layer_types"), list):
        out["layer_types"] = cfg["layer_types"][:layers]
    if isinstance(cfg.get("max_window_layers"), int):
        out["max_window_layers"] = min(cfg["max_window_layers"], layers)
    if isinstance(cfg.get("sliding_window"), int):
        out["sliding_window"] = WINDOW
    rs = cfg.get("rope_scaling")
    if isinstance(rs, dict) and "long_factor" in rs:
        out["rope_scaling"] = {**rs, "long_factor": rs["long_factor"][:HEAD_DIM // 2],
                               "short_factor": rs["short_factor"][:HEAD_DIM // 2]}

    def in_vocab(x):
        if isinstance(x, list):
            return [in_vocab(i) for i in x]
        return VOCAB - 1 - (x % 7) if isinstance(x, int) and x >= VOCAB else x
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in out:
            out[key] = in_vocab(out[key])
    return out


def build(directory: Path, published: dict, logits: bool = True) -> np.ndarray | None:
    """transformers' model from the shrunk published config.json, random float64 weights,
    saved; the published keys written back; transformers' logits of the saved directory."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(published, indent=2))
    config = transformers.AutoConfig.from_pretrained(directory)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    randomize_params(model, seed=0)
    model.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(published, indent=2))
    return hf_logits(directory) if logits else None


def hf_logits(directory: Path) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float64, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def invoke(*args: str):
    return CliRunner().invoke(cli.main, [*args])


def transformers_in_float64(mp: pytest.MonkeyPatch) -> None:
    """transformers' RoPE, norms and attention computed in float64 throughout (its RoPE
    frequencies are float32 otherwise): tests/test_model_vs_hf.py's hf_exact64."""
    for mod, prefix in exact64.HF_MODULES:
        mp.setattr(getattr(mod, prefix + "RMSNorm"), "forward",
                   exact64._gemma_rmsnorm_in_input_dtype if mod in exact64.GEMMA_MODULES
                   else exact64._rmsnorm_in_input_dtype)
        mp.setattr(getattr(mod, prefix + "RotaryEmbedding"), "forward", exact64._rotary_in_float64)
        mp.setattr(mod, "eager_attention_forward", exact64._eager_attention_in_input_dtype)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every checkpoint built and put through logits, APR and back, and GGUF export; then
    llama.cpp on every GGUF at once. {name: facts}."""
    with pytest.MonkeyPatch.context() as mp:
        transformers_in_float64(mp)
        return _corpus(tmp_path_factory.mktemp("stock"))


def _corpus(root: Path) -> dict[str, dict]:
    facts: dict[str, dict] = {}
    for name in NAMES:
        published = shrink(json.loads((FIXTURES / name / "config.json").read_text()))
        d = root / name
        # (no float64 formula for a RoPE the reference refuses: transformers' logits unused)
        f = facts[name] = {"expected": build(d / "hf", published, name not in REFUSED), "dir": d}
        r = invoke("logits", str(d / "hf"), "--tokens", ",".join(map(str, IDS)), "--dtype", "f64",
                   "-o", str(d / "logits.npy"))
        f["logits"] = (r.exit_code, r.stderr, np.load(d / "logits.npy") if r.exit_code == 0 else None)
        if r.exit_code != 0:
            continue
        steps = []
        for src, dst in ((d / "hf", d / "m.apr"), (d / "m.apr", d / "back")):
            r = invoke("convert", str(src), "-o", str(dst), "--allow-no-tokenizer", "--quiet")
            steps.append((r.exit_code, r.output))
        f["round_trip"] = steps, hf_logits(d / "back") if all(c == 0 for c, _ in steps) else None
        # F32, as llama.cpp runs it (it has no F64 kernels; stock checkpoints are BF16 anyway)
        plain = invoke("export", str(d / "m.apr"), "-o", str(d / "m.gguf"), "--dtype", "f32",
                       "--allow-no-tokenizer", "--quiet")
        f["export"] = (plain.exit_code, plain.stderr, (d / "m.gguf").exists())
        if plain.exit_code != 0:
            allowed = invoke("export", str(d / "m.apr"), "-o", str(d / "m.gguf"), "--dtype", "f32",
                             "--allow-no-tokenizer", "--allow-changes", "--quiet")
            f["allowed"] = (allowed.exit_code, allowed.stderr)
    ggufs = [n for n in NAMES if (facts[n]["dir"] / "m.gguf").exists()]
    for n, theirs in zip(ggufs, llama_cpp_logits_many([facts[n]["dir"] / "m.gguf" for n in ggufs], IDS)):
        facts[n]["llama_cpp"] = theirs
    return facts


def test_the_corpus_covers_every_family():
    families = {json.loads((FIXTURES / n / "config.json").read_text())["model_type"] for n in NAMES}
    assert len(NAMES) >= 25
    assert families == {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"}


@pytest.mark.parametrize("name", NAMES)
def test_stock_checkpoint(name, corpus):
    f = corpus[name]
    code, err, ours = f["logits"]
    if name in REFUSED:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert REFUSED[name] in lines[0], lines[0]
        return
    assert code == 0, f"{name}: logits refused: {err}"
    assert rel(ours, f["expected"]) < TOL, f"{name}: logits differ from transformers ({rel(ours, f['expected']):.3g})"

    steps, back = f["round_trip"]
    assert all(c == 0 for c, _ in steps), f"{name}: HF -> APR -> HF: {steps}"
    assert rel(back, f["expected"]) < TOL, f"{name}: HF -> APR -> HF changed transformers' logits"

    code, err, written = f["export"]
    path = f["dir"] / "m.gguf"
    if name in LISTED:
        lines = err.strip().splitlines()
        assert code == 2 and not written and len(lines) == 1, (code, err)
        assert LISTED[name] in lines[0] and "--allow-changes" in lines[0], lines[0]
        assert f["allowed"][0] == 0, f"{name}: --allow-changes: {f['allowed'][1]}"
        notes = gguf.GGUFReader(path).fields["general.conversion_notes"].contents()
        assert any(LISTED[name] in n and f"identical up to {WINDOW} tokens" in n for n in notes), notes
        positions = WINDOW            # llama.cpp attends to all positions: the same up to the window
    else:
        assert code == 0, f"{name}: GGUF export refused: {err}"
        positions = len(IDS)
    theirs, want = f["llama_cpp"][:positions], f["expected"][:positions]
    family = json.loads((f["dir"] / "hf" / "config.json").read_text())["model_type"]
    tol = LLAMA_CPP_TOL_GEMMA if family.startswith("gemma") else LLAMA_CPP_TOL
    print(f"{name}: llama.cpp vs transformers rel {rel(theirs, want):.3g} over {positions} positions")
    assert rel(theirs, want) <= tol, f"{name}: llama.cpp vs transformers rel {rel(theirs, want):.3g}"
    if name in LISTED:      # and past the window it is the other model: the change is real
        assert rel(f["llama_cpp"], f["expected"]) > 10 * tol
