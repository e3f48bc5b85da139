"""The closed world, tested from transformers' side: every attribute of a default-constructed
LlamaConfig / Qwen2Config (enumerated from transformers itself, so a new release adds cases)
is set to a non-default value on a small random model saved by ``save_pretrained``; the
reference must then either give transformers' logits (float64, 1e-10 relative) or refuse with
exit code 2 and an error that names the key. There is no third outcome.

The oracle is the model transformers loads back from the saved directory, so a value that
does not survive saving is judged by what the file says. Values transformers itself rejects
(at construction, load or forward) are skipped; each key must keep at least one value."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from transformers.activations import ACT2FN

import cli
from tests.oracles import randomize_params
from tests.test_model_vs_hf import hf_exact64  # noqa: F401  (fixture)

from tests.test_families import CLASSES  # one list of the families' classes
BASE = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, attn_implementation="eager")
# Qwen2: a small window and a first sliding layer, inert until use_sliding_window is set
QWEN2_BASE = dict(sliding_window=5, max_window_layers=1)
# per family: small windows (inert until switched on, or Gemma's every other layer), a
# head_dim that is not transformers' large default
FAMILY_BASE = {"qwen2": QWEN2_BASE, "qwen3": dict(QWEN2_BASE, head_dim=8),
               "mistral": dict(sliding_window=5), "gemma2": dict(sliding_window=5, head_dim=8,
                                                                query_pre_attn_scalar=8),
               "phi3": dict(pad_token_id=None),       # its default 32000 is past the vocabulary
               "gemma3": dict(sliding_window=5, head_dim=8, query_pre_attn_scalar=8)}
SEQ = 26          # more than 5 windows
TOL = 1e-10



class With(dict):
    """A candidate that sets other keys too (a value that only means something with them)."""


# keys whose every non-default value transformers itself fails on (at construction, load or
# forward); asserted to still fail, so that a transformers that accepts them adds the case
TRANSFORMERS_REJECTS = {
    "return_dict": "its own decoder unpacks the tuple the model then returns",
}

# values worth trying for keys whose type alone says little
SPECIAL: dict[str, list] = {
    "hidden_act": sorted(ACT2FN),
    "hidden_activation": sorted(ACT2FN),
    "pad_token_id": [3, 60],
    "attn_logit_softcapping": [3.0, 50.0],
    "final_logit_softcapping": [3.0, 30.0],          # inside the test vocabulary (transformers requires it)
    "rope_parameters": [{"rope_type": "default", "rope_theta": 123456.0},
                        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}],
    "layer_types": [["full_attention", "sliding_attention", "sliding_attention"],
                    With(layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                         use_sliding_window=True),
                    With(layer_types=["full_attention"] * 3, use_sliding_window=True)],
    "dtype": ["float64", "bfloat16"],
    "problem_type": ["regression", "single_label_classification"],
    "id2label": [{"0": "A", "1": "B", "2": "C"}],
    "label2id": [{"A": 0}],
    "num_attention_heads": [8, 2],
    "num_key_value_heads": [4, 1],
    "head_dim": [16, 4],
    "hidden_size": [48, 36],
    "architectures": [["LlamaForCausalLM"], ["Qwen2ForCausalLM"], ["SomethingElse"]],
    "model_type": ["mistral"],
    "_name_or_path": ["somewhere/else"],
    "transformers_version": ["0.0.1"],
    "rms_norm_eps": [1e-3, 0.1],
    "tie_word_embeddings": [True],
    "use_sliding_window": [True],
    "max_window_layers": [0, 2],
    "sliding_window": [3, 9],
}


def candidates(key: str, default):
    if key in SPECIAL:
        return SPECIAL[key]
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int):
        return [default * 2 + 1, default + 1]
    if isinstance(default, float):
        return [default * 3 + 0.25]
    if isinstance(default, str):
        return [default + "_other"]
    if default is None:
        return [3, "other", True]
    if isinstance(default, dict):
        return [{}, {"other": 1}]
    if isinstance(default, list):
        return [[], ["other"]]
    return []


def _logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    logits = out[0] if isinstance(out, tuple) else out.logits
    return logits[0].double().numpy()


def hf_case(tmp: Path, family: str, overrides: dict, seed: int = 0):
    """Save a float64 random model with ``overrides``; the logits transformers computes for
    the saved directory, or None if transformers itself rejects the configuration."""
    cfg_cls, model_cls = CLASSES[family]
    kw = {**BASE, **FAMILY_BASE.get(family, {}), **overrides}
    try:
        torch.manual_seed(seed)
        model = model_cls(cfg_cls(**kw)).double()
        randomize_params(model, seed)
        model.save_pretrained(tmp)
        back = model_cls.from_pretrained(tmp, dtype=torch.float64, attn_implementation="eager").eval()
        ids = [int(i) for i in np.random.default_rng(seed).integers(0, back.config.vocab_size, SEQ)]
        return ids, _logits(back, ids)
    except Exception as e:  # transformers refuses this value: not a case
        return f"{type(e).__name__}: {e}"[:200]


def run_ours(path: Path, ids: list[int], out: Path):
    r = CliRunner().invoke(cli.main, ["logits", str(path), "--tokens", ",".join(map(str, ids)),
                                      "--dtype", "f64", "-o", str(out), "--json"])
    return r.exit_code, r.stderr if hasattr(r, "stderr") else r.output, r


def judge(tmp: Path, family: str, key: str, value) -> str:
    """'match', 'refused' or 'skip' (transformers rejects it); asserts there is no third way."""
    case = hf_case(tmp / "model", family, dict(value) if isinstance(value, With) else {key: value})
    if isinstance(case, str):
        return "skip: " + case
    ids, expected = case
    written = json.loads((tmp / "model" / "config.json").read_text())
    code, err, r = run_ours(tmp / "model", ids, tmp / "out.npy")
    if code == 0:
        got = np.load(tmp / "out.npy")
        assert got.shape == expected.shape, (key, value, got.shape, expected.shape)
        rel = float(np.abs(got - expected).max() / np.abs(expected).max())
        assert rel < TOL, f"{family} {key}={value!r}: logits differ from transformers (rel {rel:.3g})"
        round_trip(tmp, family, ids, expected, f"{family} {key}={value!r}")
        return "match"
    assert code == 2, f"{family} {key}={value!r}: exit {code}\n{r.output}\n{r.exception!r}"
    line = err.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: "), err
    named = [k for k in written if k in line[0]] + ([key] if key in line[0] else [])
    assert named, f"{family} {key}={value!r}: refused without naming a key: {line[0]}"
    return "refused"


def round_trip(tmp: Path, family: str, ids: list[int], expected: np.ndarray, what: str) -> None:
    """HF -> APR -> HF: the config.json we write loads in transformers to the same logits."""
    runner = CliRunner()
    for src, dst in ((tmp / "model", tmp / "m.apr"), (tmp / "m.apr", tmp / "back")):
        r = runner.invoke(cli.main, ["convert", str(src), "-o", str(dst), "--allow-no-tokenizer", "--quiet"])
        assert r.exit_code == 0, f"{what}: convert {src.name} -> {dst.name}: {r.output}"
    back = CLASSES[family][1].from_pretrained(tmp / "back", dtype=torch.float64,
                                              attn_implementation="eager").eval()
    got = _logits(back, ids)
    rel = float(np.abs(got - expected).max() / np.abs(expected).max())
    assert rel < TOL, f"{what}: HF -> APR -> HF changed transformers' logits (rel {rel:.3g})"


def all_keys(family: str) -> list[str]:
    return sorted(CLASSES[family][0]().to_dict())


CASES = [(f, k) for f in CLASSES for k in all_keys(f)]


@pytest.mark.parametrize("family,key", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_every_config_key(family, key, tmp_path, hf_exact64):  # noqa: F811
    default = CLASSES[family][0](**BASE).to_dict().get(key)
    outcomes = {}
    for i, value in enumerate(candidates(key, default)):
        outcomes[repr(value)] = judge(tmp_path / str(i), family, key, value)
    tried = [v for v, o in outcomes.items() if not o.startswith("skip")]
    if key in TRANSFORMERS_REJECTS:
        assert not tried, f"transformers now accepts {key}: remove it from TRANSFORMERS_REJECTS"
        return
    if not tried:
        pytest.fail(f"{family} {key}: transformers rejected every candidate value "
                    f"{outcomes}; give the test a value it accepts")
