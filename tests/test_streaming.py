"""A model streamed from its file (weights converted a layer at a time, `ref.weights`) against
the same file fully loaded: bit-identical logits, hidden states, KV-cache decoding and
generated tokens, for every family, from files that transformers wrote (F32), that our
converter wrote as BF16 APR and as Q8_0 GGUF (blocks dequantized a layer at a time), with a
budget smaller than two layers; a streamed `logits` command in bounded memory; and a model
with the width of Qwen2-7B against transformers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from apr import names
from apr.model import open_model
from ref.generate import generate
from ref.load import model_from_view, plan_memory
from ref.weights import MemoryPlan
from tests.test_families import CLASSES, hf_model

ROOT = Path(__file__).resolve().parent.parent


def _plans(view) -> list[MemoryPlan]:
    """A budget of one and a half layers (every layer streamed, never two held), and one of
    two layers and a block of the output projection (the next layer read ahead in a thread)."""
    config = view.check_runnable()
    one = MemoryPlan.of(config, np.float32, 1 << 40, "test").largest_layer
    tight = MemoryPlan.of(config, np.float32, int(1.5 * one), "test")
    ahead = MemoryPlan.of(config, np.float32, 2 * one + tight.head_block, "test")
    assert tight.streamed and not tight.prefetch and ahead.streamed and ahead.prefetch
    return [tight, ahead]


def _files(family: str, tmp: Path) -> list[Path]:
    tied = family in ("qwen2", "gemma2", "gemma3")
    head_dim = 16 if family in ("qwen3", "gemma2", "gemma3") else None
    extra = {"intermediate_size": 64, "num_hidden_layers": 3}
    if family.startswith("gemma"):      # the query scale llama.cpp's gemma hard-wires
        extra["query_pre_attn_scalar"] = head_dim
    if family == "gemma3":              # llama.cpp's pattern: five sliding layers, then a full one
        extra["layer_types"] = ["sliding_attention"] * 3
    hf = hf_model(family, 2, 2, tied, "default", head_dim, None, 1e4, seed=7, extra=extra)
    hf.float().save_pretrained(tmp / "hf")
    out = [tmp / "hf"]
    runner = CliRunner()
    for name, dtype in (("m.apr", "bf16"), ("m.gguf", "q8_0")):
        res = runner.invoke(cli.main, ["convert", str(tmp / "hf"), "-o", str(tmp / name), "--dtype",
                                       dtype, "--allow-no-tokenizer", "--allow-changes", "-q"])
        assert res.exit_code == 0, res.output
        out.append(tmp / name)
    return out


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_streamed_is_bit_identical_to_loaded(family, tmp_path):
    ids = np.random.default_rng(1).integers(0, 83, (1, 9))
    for path in _files(family, tmp_path):
        with open_model(path) as view:
            plans = _plans(view)
        for plan in plans:
            _check_streamed(path, plan, ids)


def _check_streamed(path: Path, plan: MemoryPlan, ids: np.ndarray) -> None:
    with open_model(path) as view:
        loaded = model_from_view(view)
        streamed = model_from_view(view, memory=plan)
        assert streamed.streamed and not loaded.streamed
        want, want_hidden = loaded.forward(ids, capture_hidden=True)
        got, got_hidden = streamed.forward(ids, capture_hidden=True)
        assert np.array_equal(want, got), path
        assert len(want_hidden) == len(got_hidden)
        assert all(np.array_equal(a, b) for a, b in zip(want_hidden, got_hidden)), path
        # every layer's weights were read again for the pass: nothing kept past the budget
        assert streamed.params.loads >= view.config.num_layers
        # the stages read in lockstep (diff) are the same arrays
        assert all(np.array_equal(a, b) for a, b in
                   zip(streamed.stages(ids), [*want_hidden, want]))
        # KV-cache decoding: prefill then one token at a time
        ca, cb = loaded.new_kv_cache(1, 12), streamed.new_kv_cache(1, 12)
        for step in (ids[:, :6], ids[:, 6:7], ids[:, 7:8]):
            assert np.array_equal(loaded.forward_step(step, ca), streamed.forward_step(step, cb))
        # generation (the loaded model may use its decode layout; tokens must agree)
        a = generate(loaded, ids[0, :4].tolist(), 6).new_ids
        b = generate(streamed, ids[0, :4].tolist(), 6).new_ids
        assert a == b
        # a layer's host arrays are used again for the next layer of those shapes (F32, F16,
        # BF16 read from a file) ...
        name = "model.layers.0.mlp.down_proj.weight"
        ref = view.tensors[name]
        if ref.dtype.name in ("F32", "F16", "BF16") and ref.file_span is not None:
            assert streamed.params.buffers.reused > 0, path
        # ... but never one that someone still holds
        held = streamed.params[name]
        before = held.copy()
        streamed.forward(ids)
        assert np.array_equal(held, before) and np.array_equal(held, loaded.params[name]), path


def test_embedding_and_head_rows_of_quantized_blocks(tmp_path):
    """`TensorRef.numpy_rows` of Q8_0 and BF16 rows equals the rows of the whole tensor."""
    path = _files("llama", tmp_path)[2]
    with open_model(path) as view:
        for name in (names.EMBED, names.LM_HEAD):
            ref = view.tensors[name]
            assert ref.dtype.name == "Q8_0"
            whole = ref.numpy(np.float32)
            for a, b in ((0, 1), (5, 17), (82, 83), (0, 83)):
                assert np.array_equal(ref.numpy_rows(a, b), whole[a:b])


def test_memory_plan_words_and_budget(tmp_path):
    path = _files("qwen2", tmp_path)[0]
    with open_model(path) as view:
        assert not plan_memory(view, max_memory="1G").streamed
        plan = plan_memory(view, max_memory="1K")
        assert plan.streamed and plan.source == "--max-memory"
        assert "streamed from the file a layer at a time" in plan.describe()
        assert "is more than the budget" in plan.describe()
        default = plan_memory(view)
        assert default.source.startswith("default: 50% of the")
    res = CliRunner().invoke(cli.main, ["logits", str(path), "--tokens", "1,2,3", "--max-memory",
                                        "12K"])
    assert res.exit_code == 0, res.output
    assert "memory: parameters" in res.output and "streamed" in res.output
    res = CliRunner().invoke(cli.main, ["logits", str(path), "--tokens", "1,2,3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["memory"].endswith("held in memory")
    res = CliRunner().invoke(cli.main, ["logits", str(path), "--tokens", "1,2,3", "--max-memory",
                                        "lots"])
    assert res.exit_code == 2 and "error: memory size 'lots'" in res.output


PEAK = """
import sys
import numpy as np
from click.testing import CliRunner
import cli
res = CliRunner().invoke(cli.main, sys.argv[1:])
assert res.exit_code == 0, res.output
# the high-water mark of this process alone (getrusage's counts the parent's before the exec)
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def _peak_rss(*args: str) -> int:
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


def test_streamed_logits_command_runs_in_bounded_memory(tmp_path):
    """A 64M-parameter BF16 file (257 MB as float32): `logits` with a 64M budget holds about
    a layer and a block of the output projection at a time, and gives the numbers of the
    loaded run."""
    import ml_dtypes
    from apr.safetensors_io import StTensor, write_safetensors
    from apr.config import ModelConfig
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
           "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8,
           "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 512,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    config = ModelConfig.from_hf_config(cfg, "test")
    rng = np.random.default_rng(0)
    from apr.dtypes import dtype_by_name

    def tensor(name, shape):
        def data():
            if name.endswith("norm.weight"):
                return np.ones(shape, ml_dtypes.bfloat16)
            return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        return StTensor(name, dtype_by_name("BF16"), shape, data)

    write_safetensors(d / "model.safetensors",
                      [tensor(n, s) for n, s in config.tensor_shapes().items()])
    weights = 4 * config.param_count()
    plan = MemoryPlan.of(config, np.float32, 64 << 20, "test")
    assert plan.streamed and plan.peak_weights < weights / 2
    out_l, out_s = tmp_path / "l.npy", tmp_path / "s.npy"
    base = ["logits", str(d), "--tokens", "1,2,3,4,5,6,7,8"]
    idle = _peak_rss("inspect", str(d))              # the interpreter, imports and the header
    loaded = _peak_rss(*base, "--max-memory", "4G", "-o", str(out_l))
    streamed = _peak_rss(*base, "--max-memory", "64M", "-o", str(out_s))
    assert np.array_equal(np.load(out_l), np.load(out_s))
    assert loaded - idle > weights, (idle, loaded, weights)
    # what streaming holds: a layer and a block of the output projection, each also read
    # from the file in its stored dtype (half the size in BF16), and the activations
    assert streamed - idle < 2 * plan.peak_weights, (idle, streamed, plan.peak_weights)


def test_qwen2_7b_width_streamed_against_transformers(tmp_path):
    """The width of Qwen2-7B (hidden 3584, intermediate 18944, 28 heads, 4 KV heads) with 2
    layers and a small vocabulary, saved by transformers in BF16: the streamed reference's
    float32 logits equal transformers' float32 logits on the same BF16 weights."""
    import torch
    import transformers
    cfg = transformers.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=2,
                                   num_attention_heads=28, num_key_value_heads=4, vocab_size=2048,
                                   max_position_embeddings=32768, rope_theta=1e6,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        hf = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    ids = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597]
    del hf          # read back as transformers reads a checkpoint (its rotary tables anew)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    del hf
    with open_model(tmp_path / "hf") as view:
        model = model_from_view(view, memory=plan_memory(view, max_memory="600M"))
        assert model.streamed
        got = model.forward(np.array([ids]))[0]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel <= 1e-4, rel


def test_diff_streamed_in_lockstep_matches_loaded():
    """`diff` with a budget below two layers per model runs both sides streamed, in
    lockstep, and says what the loaded run says: the same logit and stage numbers, the same
    first divergent layer and tensor, for a transposed square weight in the last layer."""
    from diff import compare
    from diff import report as R
    from test_diff_helpers import MODELS, clean, hf_tensors, layer_name, write_variant
    family = "llama"
    last = MODELS[family]["layers"] - 1
    name = layer_name(last, "self_attn.o_proj.weight")
    t = hf_tensors(family)
    t[name] = np.ascontiguousarray(t[name].T)
    b = write_variant("apr", family, t, {})
    loaded = compare(clean(family, "hf"), b)
    streamed = compare(clean(family, "hf"), b, max_memory="8K")
    assert streamed.logits.streamed == ["A", "B"] and loaded.logits.streamed == []
    for rep in (loaded, streamed):
        assert rep.diagnosis.cls == R.TRANSPOSED and rep.diagnosis.tensors[0] == name
        assert rep.logits.first_divergent_layer == last and name in rep.logits.culprit_tensors
    # B computes only the stages from the transposed layer on; the earlier ones hold A's
    # weights and input exactly and take A's output
    assert loaded.logits.shared_stages == streamed.logits.shared_stages == last + 1
    assert [(s.stage, s.rel_l2, s.max_abs) for s in loaded.logits.stages] == \
        [(s.stage, s.rel_l2, s.max_abs) for s in streamed.logits.stages]
    assert (loaded.logits.rel_l2, loaded.logits.kl_mean, loaded.logits.top1_agreement) == \
        (streamed.logits.rel_l2, streamed.logits.kl_mean, streamed.logits.top1_agreement)


def test_qa_of_a_streamed_model(tmp_path):
    """qa with a budget below the model's size runs its model gates streamed, measures decode
    on a few tokens, and says why it writes no F32 export for llama.cpp."""
    from ref.qa import run_qa
    path = _files("qwen2", tmp_path)[1]
    gates = {g.name: g for g in run_qa(path, max_memory="16K").gates}
    assert not gates["forward"].skipped and "loss" in gates["forward"].message
    assert not gates["throughput"].skipped and "tokens/s" in gates["throughput"].message
    assert gates["gguf_export"].skipped
    assert "larger than the memory budget" in gates["gguf_export"].message
    whole = {g.name: g for g in run_qa(path, max_memory="1G").gates}
    assert not whole["gguf_export"].skipped


def test_shared_stages_are_what_b_computes(tmp_path):
    """B taking A's output for the stages whose weights and input are A's changes no bit:
    the lockstep run with sharing equals the one without, for an HF directory against its
    BF16 APR (nothing shared: the values differ), against an F32 APR (every stage shared),
    and against a copy with one layer changed (the stages after it computed)."""
    from apr.model import open_model as om
    from diff import compare
    from diff.logits import _lockstep, _shared_stages
    hf, apr_bf16, _ = _files("llama", tmp_path)
    res = CliRunner().invoke(cli.main, ["convert", str(hf), "-o", str(tmp_path / "f32.apr"),
                                        "--allow-no-tokenizer", "-q"])
    assert res.exit_code == 0, res.output
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    expect = {apr_bf16: 0, tmp_path / "f32.apr": 3 + 3}
    for other, count in expect.items():
        findings = compare(hf, other, logits=False).tensors
        with om(hf) as va, om(other) as vb:
            ma, mb = model_from_view(va), model_from_view(vb)
            shared = _shared_stages(va, vb, findings)
            ra, rb, taken = _lockstep(ma, mb, ids, False, shared)
            ra0, rb0, none = _lockstep(ma, mb, ids, False, set())
        assert taken == count and none == 0
        assert np.array_equal(rb.logits, rb0.logits)
        assert all(np.array_equal(x, y) for x, y in zip(rb.hidden, rb0.hidden))
