"""The bounded fuzz campaign of CI (a fixed seed; `python -m tests.fuzz.campaign --budget S`
runs a longer one) and the replay of every failure a campaign ever found."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fuzz.campaign import (COMMANDS, LAST_EXIT, REGRESSIONS, SEED_MODELS, SLOW_COMMANDS, campaign,
                                 run_case, seed_key)

CI_CASES = 320           # mutants per format
SLOW_EVERY = 4           # qa and pretrain --init on every 4th, diff --report on every 16th:
                         # about 6,000 command runs in all


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    from tests.fuzz.campaign import make_seeds
    return make_seeds(tmp_path_factory.mktemp("fuzz") / "seeds")


def test_bounded_campaign_finds_nothing():
    o = campaign(CI_CASES, seed=0, slow_every=SLOW_EVERY)
    assert o.failures == [], "\n".join(sorted(set(o.failures))[:20])
    for fmt in ("apr", "gguf", "hf"):     # every seed model is drawn, about equally
        for model in SEED_MODELS:
            assert o.mutants.get(f"{fmt} {model}", 0) >= CI_CASES / len(SEED_MODELS) * 0.7, \
                (fmt, model, o.mutants)
    for fmt in ("apr", "gguf", "hf"):
        for command in COMMANDS:
            share = 1 / (SLOW_EVERY * SLOW_COMMANDS[command]) if command in SLOW_COMMANDS else 1
            assert o.cases[f"{fmt} {command}"] >= CI_CASES * share * 0.9, (fmt, command)
            exits = {k: o.exits.get(f"{fmt} {command} exit {k}", 0) for k in (0, 1, 2)}
            # the mutants reach both outcomes: accepted files and refused ones (qa refuses
            # a damaged file with failed gates, exit 1, or as unreadable, exit 2)
            # (the report is drawn for few mutants: an accepted file diff finds a defect in counts)
            assert exits[0] + (exits[1] if command == "diff-report" else 0) > 0, \
                (fmt, command, o.exits)
            assert exits[2] + (exits[1] if command == "qa" else 0) > 0, (fmt, command, o.exits)


CASES = sorted(p for p in REGRESSIONS.iterdir() if p.is_dir()) if REGRESSIONS.is_dir() else []


def test_regressions_exist():
    assert len(CASES) >= 35


@pytest.mark.parametrize("case", CASES, ids=[p.name for p in CASES])
def test_regression_replays_cleanly(case: Path, tmp_path):
    info = json.loads((case / "case.json").read_text())
    fmt = info["format"]
    mutant = case / ("mutant" if fmt == "hf" else f"mutant.{fmt}")
    seed = case / ("seed" if fmt == "hf" else f"seed.{fmt}")
    if fmt == "hf":            # the seed directory keeps config and tokenizer; weights are shared
        local = tmp_path / "seed"
        shutil.copytree(seed, local)
        weights = mutant / "model.safetensors"
        if weights.exists():
            shutil.copyfile(weights, local / "model.safetensors")
        seed = local
    if info.get("fifo"):           # git keeps no FIFO: made again
        import os
        mutant = tmp_path / mutant.name
        os.mkfifo(mutant)
    work = tmp_path / "work"
    work.mkdir()
    # the HTML report (0.7 s) only for the cases a diff found
    for command in [c for c in COMMANDS if c != "diff-report" or info["command"].startswith("diff")]:
        problem = run_case(command, seed, mutant, work, variant=info.get("variant", 0))
        assert problem is None, f"{case.name} {command} (first found: {info['found'][:120]}): {problem}"
        assert LAST_EXIT[0] in (0, 1, 2)


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 10 ** 8), ("num_hidden_layers", 2 ** 32 - 1),
                                       ("vocab_size", 2 ** 40), ("max_position_embeddings", 2 ** 63),
                                       ("hidden_size", [64]), ("rms_norm_eps", "1e-6")])
def test_huge_or_mistyped_counts_are_refused_at_once(key, value, tmp_path):
    """Counts are checked before any loop or allocation uses them (no hang, one error line)."""
    from click.testing import CliRunner

    import cli
    from tests.oracles import make_hf_model
    hf = make_hf_model(tmp_path / "hf", "llama", hidden=32, layers=1, heads=2, kv_heads=1, ffn=48)
    cfg = json.loads((hf / "config.json").read_text())
    cfg[key] = value
    (hf / "config.json").write_text(json.dumps(cfg))
    for args in (["inspect", str(hf)], ["convert", str(hf), "-o", str(tmp_path / "o.apr")]):
        r = CliRunner().invoke(cli.main, args)
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
        assert key in r.stderr or key.replace("num_hidden_layers", "num_layers") in r.stderr, r.stderr
    assert not (tmp_path / "o.apr").exists()


def _gguf_bytes(kv_parts: bytes, n_kv: int) -> bytes:
    import struct
    return b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kv_parts


def _key(name: str) -> bytes:
    import struct
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize("what", ["nested", "alignment0", "huge_counts"])
def test_hostile_gguf_structure_is_one_error(what, tmp_path):
    import struct
    from click.testing import CliRunner

    import cli
    if what == "nested":          # an array of arrays 100,000 deep
        body = _key("general.x") + struct.pack("<I", 9) + (struct.pack("<IQ", 9, 1) * 100_000)
        data = _gguf_bytes(body, 1)
    elif what == "alignment0":
        data = _gguf_bytes(_key("general.alignment") + struct.pack("<II", 4, 0), 1)
    else:
        data = b"GGUF" + struct.pack("<IQQ", 3, 2 ** 62, 2 ** 62)
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    for args in (["inspect", str(path)], ["diff", str(path), str(path)]):
        r = CliRunner().invoke(cli.main, args)
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, \
            (what, r.exit_code, r.stderr, r.exception)


@pytest.mark.parametrize("fmt", ["apr", "gguf", "hf"])
def test_rope_mutants_reach_the_rope_readers(fmt, seeds, tmp_path):
    """The RoPE mutators' mutants of both seed models are read: some accepted, some refused
    by the RoPE readers with one error line naming what is wrong, none crashing."""
    import random

    from click.testing import CliRunner

    import cli
    from tests.fuzz import mutators as m
    mutate = {"apr": m.apr_rope, "gguf": m.gguf_rope_freqs, "hf": m.hf_rope}[fmt]
    rng = random.Random(3)
    accepted, rope_errors = 0, 0
    for model in SEED_MODELS:
        for i in range(12):
            mutant = tmp_path / f"{model}-{i}{'' if fmt == 'hf' else '.' + fmt}"
            mutate(seeds[seed_key(fmt, model)], mutant, rng)
            r = CliRunner().invoke(cli.main, ["logits", str(mutant), "--tokens", "1,2,3"])
            assert r.exit_code in (0, 2) and not isinstance(r.exception, Exception), (r.exit_code, r.output)
            if r.exit_code == 0:
                accepted += 1
                continue
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
            rope_errors += "rope" in lines[0].lower() or "freq" in lines[0].lower()
    assert accepted > 0 and rope_errors > 0, (accepted, rope_errors)


def test_the_harness_can_fail(seeds, tmp_path, monkeypatch):
    """Each failure class the campaign claims to catch is caught: an escaped exception (exit
    3), an allocation beyond the memory bound, a hang, a file left behind."""
    import time

    import numpy as np

    import apr.model
    from apr.errors import FormatError
    from tests.fuzz import campaign as c
    work = tmp_path / "work"
    work.mkdir()

    def check(fake, expect: str) -> None:
        monkeypatch.setattr(apr.model, "detect_format", fake)
        problem = run_case("inspect", seeds["apr"], seeds["apr"], work)
        assert problem is not None and expect in problem, problem
        for p in work.iterdir():
            p.unlink()

    check(lambda p: {}["x"], "exit 3")
    check(lambda p: np.ones(1 << 31), "MemoryError")                # 16 GiB under a 2 GiB bound
    monkeypatch.setattr(c, "CASE_SECONDS", 1)
    check(lambda p: time.sleep(30), "hang")
    def stray(p):                      # refuses the file properly, but leaves a file behind
        (work / "stray.tmp").write_text("x")
        raise FormatError("refused")
    check(stray, "leftover")
    monkeypatch.undo()
    assert run_case("inspect", seeds["apr"], seeds["apr"], work) is None
