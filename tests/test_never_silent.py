"""Regression tests for inputs that once ran without a word and gave wrong logits: Qwen2 with
sliding-window attention, Llama with MLP biases, a Llama with another activation, a tied
config with a different stored lm_head; and conversions that changed a file silently
(renamed tokens, dropped tensors, dequantized blocks). Oracles: transformers and llama.cpp."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

import cli
from apr.container import TensorSource, write_apr
from apr.dtypes import dtype_by_name
from apr.model import open_model
from apr.tokenizer import (UNKNOWN, UNUSED, TokenizerData, from_hf_tokenizer_json,
                           renamed_tokens, to_apr_metadata)
from ref.load import load_model
from tests.oracles import (gguf_library_copy, hf_logits, llama_cpp_logits, randomize_params, tokenizer_json,
                           write_tokenizer)
from tests.test_model_vs_hf import hf_exact64  # noqa: F401  (fixture)

WINDOW, SEQ = 4, 30          # sequences of 7.5 windows


def run(*args) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli.main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def save(model: torch.nn.Module, directory: Path, seed: int = 0) -> Path:
    """Random non-trivial parameters (biases and norms too), saved with a tokenizer."""
    randomize_params(model, seed)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return directory


SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=448, max_position_embeddings=256,
             bos_token_id=0, eos_token_id=0)
IDS = [int(i) for i in np.random.default_rng(0).integers(1, 400, SEQ)]


def ours(path: Path, tmp: Path, *extra) -> np.ndarray:
    out = tmp / "ours.npy"
    code, _, err = run("logits", path, "--tokens", ",".join(map(str, IDS)), "-o", out, "--force", *extra)
    assert code == 0, err
    return np.load(out)


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------- sliding window

@pytest.fixture(scope="module")
def qwen2_sliding(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sliding") / "hf"
    cfg = transformers.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                   **SMALL)
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    torch.manual_seed(0)
    return save(transformers.Qwen2ForCausalLM(cfg), d)


def test_sliding_window_logits_and_conversions(qwen2_sliding, tmp_path):
    expected = hf_logits(qwen2_sliding, IDS)
    assert rel(ours(qwen2_sliding, tmp_path), expected) < 1e-4
    # beyond the window the sliding model really differs from full attention
    full = tmp_path / "full"
    shutil.copytree(qwen2_sliding, full)
    cfg = json.loads((full / "config.json").read_text())
    cfg.update(use_sliding_window=False, layer_types=["full_attention"] * 3)
    (full / "config.json").write_text(json.dumps(cfg))
    assert rel(hf_logits(full, IDS)[WINDOW + 1:], expected[WINDOW + 1:]) > 1e-2
    # HF -> APR -> HF keeps it, and the APR file runs it
    apr = tmp_path / "m.apr"
    assert run("convert", qwen2_sliding, "-o", apr, "-q")[0] == 0
    assert rel(ours(apr, tmp_path), expected) < 1e-4
    assert run("convert", apr, "-o", tmp_path / "back", "-q")[0] == 0
    assert rel(hf_logits(tmp_path / "back", IDS), expected) < 1e-5
    # llama.cpp's qwen2 has no sliding window: export is a listed change, refused by default
    code, _, err = run("export", apr, "-o", tmp_path / "m.gguf")
    assert code == 2 and f"slides a window of {WINDOW} tokens" in err and "--allow-changes" in err
    assert not (tmp_path / "m.gguf").exists()
    # diff: the converted file is equivalent; the full-attention config is not
    assert run("diff", qwen2_sliding, apr)[0] == 0
    code, out, _ = run("diff", qwen2_sliding, full)
    assert code == 1 and "DIAGNOSIS: CONFIG" in out, out


def test_sliding_window_kv_cache_decode_equals_forward(qwen2_sliding):
    model, _ = load_model(qwen2_sliding, dtype=np.float64)
    full = model.forward(np.array([IDS]))
    cache = model.new_kv_cache(1, SEQ)
    steps = [model.forward_step(np.array([IDS[:3]]), cache)]
    steps += [model.forward_step(np.array([[t]]), cache) for t in IDS[3:]]
    assert rel(np.concatenate(steps, axis=1), full) < 1e-12


# --------------------------------------------------------------------------- mlp_bias, hidden_act

def test_llama_mlp_bias_runs_in_reference_and_llama_cpp(tmp_path):
    torch.manual_seed(0)
    hf = save(transformers.LlamaForCausalLM(transformers.LlamaConfig(mlp_bias=True, **SMALL)), tmp_path / "hf")
    expected = hf_logits(hf, IDS)
    assert rel(ours(hf, tmp_path), expected) < 1e-4
    code, _, err = run("export", hf, "-o", tmp_path / "m.gguf", "-q")
    assert code == 0 and "dropped" not in err, err
    assert rel(llama_cpp_logits(tmp_path / "m.gguf", IDS), expected) < 1e-4
    assert open_model(tmp_path / "m.gguf").config.mlp_bias


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_llama_other_activation(act, tmp_path):
    torch.manual_seed(0)
    hf = save(transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_act=act, **SMALL)), tmp_path / "hf")
    expected = hf_logits(hf, IDS)
    assert rel(ours(hf, tmp_path), expected) < 1e-4
    code, _, err = run("export", hf, "-o", tmp_path / "m.gguf")
    assert code == 2 and "hidden_act" in err and not (tmp_path / "m.gguf").exists()


def test_unimplemented_activation_is_refused(tmp_path):
    torch.manual_seed(0)
    hf = save(transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_act="gelu_10", **SMALL)), tmp_path / "hf")
    code, _, err = run("logits", hf, "--tokens", "1,2")
    assert code == 2 and err.startswith("error: ") and "hidden_act" in err


def test_unknown_key_refused_and_ignorable(tmp_path):
    torch.manual_seed(0)
    hf = save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)), tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["my_new_scaling"] = 2.0
    (hf / "config.json").write_text(json.dumps(cfg))
    code, _, err = run("logits", hf, "--tokens", "1,2")
    assert code == 2 and "my_new_scaling" in err and "--ignore-key" in err
    assert run("logits", hf, "--tokens", "1,2", "--ignore-key", "my_new_scaling")[0] == 0


# --------------------------------------------------------------------------- tied, but a different lm_head

def test_tied_config_with_different_lm_head_follows_transformers(tmp_path):
    torch.manual_seed(0)
    hf = save(transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **SMALL)),
              tmp_path / "hf")
    from safetensors.numpy import load_file, save_file
    sd = load_file(hf / "model.safetensors")
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = np.random.default_rng(1).standard_normal((448, 64)).astype(np.float32) * 0.1
    save_file(sd, hf / "model.safetensors", metadata={"format": "pt"})
    expected = hf_logits(hf, IDS)                      # transformers runs the stored lm_head
    proc = subprocess.run([sys.executable, str(Path(cli.__file__)), "logits", str(hf), "--tokens",
                           ",".join(map(str, IDS)), "-o", str(tmp_path / "o.npy")],
                          capture_output=True, text=True, timeout=300)
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert proc.returncode == 0 and len(warning) == 1 and "lm_head" in warning[0], proc.stderr
    assert rel(np.load(tmp_path / "o.npy"), expected) < 1e-4
    code, _, err = run("export", hf, "-o", tmp_path / "m.gguf", "-q")
    assert code == 0 and "untied" in err
    assert rel(llama_cpp_logits(tmp_path / "m.gguf", IDS), expected) < 1e-4
    code, out, _ = run("qa", hf, "--no-gguf")
    assert code == 1 and "differs from the embedding" in out
    code, out, _ = run("diff", tmp_path / "m.gguf", hf)
    assert code == 1 and "TIED" in out.splitlines()[-1], out


# --------------------------------------------------------------------------- conversions that change a file

def test_repeated_token_string_renames_the_filler_not_the_real_token():
    td = TokenizerData(["a", "b", "<unk>", "<unk>"], [], token_type=[1, 1, UNUSED, UNKNOWN])
    assert renamed_tokens(td) == []
    td2 = TokenizerData(["a", "b", "a"], [], token_type=[1, 1, 1])
    assert renamed_tokens(td2) == [(2, "a", "<|pad_2|>")]


def _apr_with_tokenizer(path: Path, td: TokenizerData, extra_tensor: bool = False) -> Path:
    from apr.config import preset
    from ref.model import Model
    cfg = preset("llama-tiny")
    model = Model.init_random(cfg, seed=0)
    f32 = dtype_by_name("F32")
    tensors = [TensorSource(n, f32, a.shape, (lambda a=a: a)) for n, a in model.params.items()]
    if extra_tensor:
        tensors.append(TensorSource("model.layers.0.mlp.extra.weight", f32, (2, 2),
                                    lambda: np.ones((2, 2), np.float32)))
    write_apr(path, {"model_type": "llama", "name": "t", **cfg.to_apr_metadata(), **to_apr_metadata(td)},
              tensors)
    return path


def test_renaming_a_real_token_is_refused_unless_allowed(tmp_path):
    td = from_hf_tokenizer_json(tokenizer_json())
    vocab = list(td.vocab)
    vocab[300] = vocab[299]                              # two real tokens, one string
    src = _apr_with_tokenizer(tmp_path / "dup.apr", TokenizerData(vocab, td.merges, token_type=td.token_type))
    code, _, err = run("export", src, "-o", tmp_path / "m.gguf")
    assert code == 2 and "renames 1 tokens" in err and "300" in err and not (tmp_path / "m.gguf").exists()
    code, _, err = run("export", src, "-o", tmp_path / "m.gguf", "--allow-changes", "-q")
    assert code == 0 and "changed: renames 1 tokens" in err
    notes = open_model(tmp_path / "m.gguf").metadata["general.conversion_notes"]
    assert any("renames 1 tokens" in n for n in notes)


def test_dropping_tensors_is_refused_unless_allowed(tmp_path):
    td = from_hf_tokenizer_json(tokenizer_json())
    src = _apr_with_tokenizer(tmp_path / "x.apr", td, extra_tensor=True)
    code, _, err = run("convert", src, "-o", tmp_path / "m.gguf")
    assert code == 2 and "drops 1 tensors" in err and "mlp.extra" in err
    code, _, err = run("convert", src, "-o", tmp_path / "m.apr", "--allow-changes", "-q")
    assert code == 0 and "changed: drops 1 tensors" in err
    assert "model.layers.0.mlp.extra.weight" not in open_model(tmp_path / "m.apr").tensors


@pytest.mark.parametrize("qtype", ["q8_0"])
def test_dequantized_conversion_stays_equivalent(qtype, tmp_path):
    """HF F32 vs a Q8_0 GGUF is equivalent within Q8_0 rounding, and so is HF vs that GGUF
    converted to APR (F32) and on to HF: the files remember where the values came from."""
    torch.manual_seed(0)
    hf = save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)), tmp_path / "hf")
    assert run("convert", hf, "-o", tmp_path / "q.gguf", "--dtype", qtype, "-q")[0] == 0
    code, _, err = run("convert", tmp_path / "q.gguf", "-o", tmp_path / "q.apr", "-q")
    assert code == 0 and "Q8_0 -> F32" in err
    assert open_model(tmp_path / "q.apr").tensors["model.layers.0.mlp.up_proj.weight"].precision == "Q8_0"
    assert run("convert", tmp_path / "q.apr", "-o", tmp_path / "back", "-q")[0] == 0
    for other in ("q.gguf", "q.apr", "back"):
        code, out, _ = run("diff", hf, tmp_path / other)
        assert code == 0 and "within Q8_0 rounding" in out.splitlines()[-1], (other, out)
    assert run("diff", tmp_path / "q.gguf", tmp_path / "q.apr")[0] == 0


def test_bf16_model_with_f32_norms_is_equivalent(tmp_path):
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL))
    save(model.to(torch.bfloat16), tmp_path / "hf")
    for out in ("m.gguf", "m.apr"):
        code, _, err = run("convert", tmp_path / "hf", "-o", tmp_path / out, "-q")
        assert code == 0, err
    assert "BF16 -> F32" in run("convert", tmp_path / "hf", "-o", tmp_path / "m2.gguf", "-q")[2]
    assert run("convert", tmp_path / "m.gguf", "-o", tmp_path / "g.apr", "-q")[0] == 0
    for a, b in (("hf", "m.gguf"), ("hf", "g.apr"), ("m.apr", "g.apr")):
        code, out, _ = run("diff", tmp_path / a, tmp_path / b)
        assert code == 0, (a, b, out)


# --------------------------------------------------------------------------- closed world in APR and GGUF

def test_apr_and_gguf_keys_are_closed_world(tmp_path):
    td = from_hf_tokenizer_json(tokenizer_json())
    src = _apr_with_tokenizer(tmp_path / "a.apr", td)
    assert run("logits", src, "--tokens", "1,2")[0] == 0
    from apr.container import AprFile
    with AprFile.open(src) as f:
        meta = dict(f.metadata)
        tensors = [TensorSource(n, e.dtype, e.shape, (lambda n=n, f=f: np.array(f.raw(n))))
                   for n, e in f.tensors.items()]
        write_apr(tmp_path / "b.apr", {**meta, "rope_scaling_factor": 4.0}, tensors)
    code, _, err = run("logits", tmp_path / "b.apr", "--tokens", "1,2")
    assert code == 2 and "rope_scaling_factor" in err
    assert run("logits", tmp_path / "b.apr", "--tokens", "1,2", "--ignore-key", "rope_scaling_factor")[0] == 0
    # GGUF: an {arch}.* key nobody models, and a rope scaling type that is not "none"
    assert run("export", src, "-o", tmp_path / "a.gguf", "-q")[0] == 0
    for key, value in (("llama.attention.sliding_window", 4), ("llama.rope.scaling.type", "yarn"),
                       ("llama.rope.scaling.factor", 2.0)):
        out = tmp_path / f"{key}.gguf"
        _rewrite_gguf(tmp_path / "a.gguf", out, {key: value})
        code, _, err = run("logits", out, "--tokens", "1,2")
        assert code == 2 and key in err, err


def _rewrite_gguf(src: Path, dst: Path, extra: dict) -> None:
    """A copy of a GGUF with extra key/values (through the gguf library's reader and writer)."""
    gguf_library_copy(src, dst, extra)


def test_hf_round_trip_keeps_inert_keys(tmp_path):
    torch.manual_seed(0)
    hf = save(transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_dropout=0.25, initializer_range=0.05,
                                                                      **SMALL)), tmp_path / "hf")
    assert run("convert", hf, "-o", tmp_path / "back", "-q")[0] == 0
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["attention_dropout"] == 0.25 and cfg["initializer_range"] == 0.05


# --------------------------------------------------------------------------- gradients of the new terms

GRAD_CASES = {
    "llama-mlp_bias-gelu_tanh": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                                 dict(mlp_bias=True, hidden_act="gelu_pytorch_tanh", attention_bias=True)),
    "llama-relu2": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(hidden_act="relu2")),
    "qwen2-sliding-3": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                        dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
}


@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradients_with_new_terms_float64(name, hf_exact64):  # noqa: F811
    """Loss and every parameter's gradient against transformers' loss.backward(), with the
    config read from transformers' own config dict."""
    from apr.config import ModelConfig
    from ref.model import Model
    from tests.test_model_vs_hf import make_ids, make_targets, rel_err
    cfg_cls, model_cls, extra = GRAD_CASES[name]
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              attn_implementation="eager", **extra)
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(**kw)).double().eval()
    randomize_params(hf, 3)
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    assert cfg.mlp_bias == extra.get("mlp_bias", False)
    assert bool(cfg.layer_types) == ("use_sliding_window" in extra)
    sd = hf.state_dict()
    model = Model(cfg, {n: sd[n].numpy().copy() for n in cfg.tensor_shapes()}, dtype=np.float64)
    ids = make_ids(5) % 97
    targets = make_targets(ids)
    loss, grads = model.loss_and_grads(ids, targets)
    logits = hf(input_ids=torch.tensor(ids)).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), torch.tensor(targets).reshape(-1),
                                            ignore_index=-100)
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * abs(ref.item())
    params = dict(hf.named_parameters())
    assert sorted(grads) == sorted(params)
    for n, g in grads.items():
        assert rel_err(g, params[n].grad.numpy()) <= 1e-8, n


def test_unexpected_exception_is_one_line_exit_3(tmp_path, monkeypatch):
    import apr.model

    def boom(*a, **k):
        raise RuntimeError("something\nunexpected")
    monkeypatch.setattr(apr.model, "detect_format", boom)
    code, out, err = run("inspect", tmp_path)
    assert code == 3 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("error: internal error in inspect at test_never_silent.py:")
    assert err.strip().endswith("(please report): RuntimeError: something unexpected")
