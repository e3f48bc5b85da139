"""The fuzz campaign: mutants of small APR, GGUF and HF files through every command that
reads files, in-process, each case under a time and a memory bound. The seeds are three tiny
models (a Qwen2, a Qwen3 with linear RoPE scaling, a Gemma 2) in each format. A case fails on a
traceback (an exception that escaped, or the last-resort handler's exit 3; a MemoryError
under the bound ends there too), a hang, an exit code outside {0, 1, 2} (1 only for diff's
findings and qa's failed gates), a partial output, or a leftover temporary file.

    python -m tests.fuzz.campaign --budget 600        # a longer campaign on request
    python -m tests.fuzz.campaign --cases 300 --seed 7

Each failure is kept as a regression file under tests/fuzz/regressions/ (the mutant and the
command), which `tests/test_fuzz.py` replays in every run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
REGRESSIONS = Path(__file__).resolve().parent / "regressions"
CASE_SECONDS = 20
# Address space a case may add to the process's: the seeds are ~100 KB, so a reader that
# allocates gigabytes has believed a size it read.
CASE_BYTES = 2 << 30


class Hang(BaseException):       # not an Exception: no handler of the CLI may catch it
    pass


@dataclass
class Outcome:
    cases: dict[str, int] = field(default_factory=dict)        # "format command" -> count
    exits: dict[str, int] = field(default_factory=dict)
    mutants: dict[str, int] = field(default_factory=dict)      # "format seed-model" -> count
    failures: list[str] = field(default_factory=list)


def make_seeds(directory: Path) -> dict[str, Path]:
    """Tiny model files of three configs, each as an HF directory and its APR and GGUF
    conversions: "hf", "apr", "gguf" a Qwen2 saved by transformers; "hf qwen3", "apr qwen3",
    "gguf qwen3" a Qwen3 (per-head q/k norms, head_dim != hidden / heads) with linear RoPE
    scaling (rope_parameters in config.json, rope_scaling in APR, rope.scaling.* in GGUF),
    and "... gemma2" a Gemma 2 with a SentencePiece-style tokenizer, both written by our own
    writers. A campaign draws one of the three per mutant."""
    sys.path.insert(0, str(ROOT))
    import cli
    from tests.oracles import make_hf_model
    hf = make_hf_model(directory / "hf", "qwen2", hidden=32, layers=1, heads=2, kv_heads=1, ffn=48,
                        rope_theta=1e6)           # a plausible Qwen2 value: the seed passes qa
    seeds = {"hf": hf, "hf qwen3": write_qwen3_seed(directory / "hf-qwen3"),
             "hf gemma2": write_gemma2_seed(directory / "hf-gemma2")}
    runner = CliRunner()
    for model in SEED_MODELS:
        for fmt in ("apr", "gguf"):
            out = directory / f"seed-{model}.{fmt}"
            r = runner.invoke(cli.main, ["convert", str(seeds[seed_key("hf", model)]), "-o", str(out), "-q"])
            assert r.exit_code == 0, r.output
            seeds[seed_key(fmt, model)] = out
    seeds["corpus"] = write_corpus(directory / "corpus")
    return seeds


SEED_MODELS = ("qwen2", "qwen3", "gemma2")


def seed_key(fmt: str, model: str) -> str:
    return fmt if model == "qwen2" else f"{fmt} {model}"


def write_qwen3_seed(directory: Path) -> Path:
    """An HF directory from apr.config.ModelConfig: config.to_hf_config(), random weights
    through write_safetensors, the test tokenizer."""
    from apr import rope
    from apr.config import ModelConfig
    from tests.oracles import write_tokenizer
    from tests.fuzz.mutators import LINEAR_ROPE
    config = ModelConfig("qwen3", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=48, vocab_size=448, head_dim=24,
                         max_position_embeddings=256, rope_theta=1e6,
                         rope_scaling=rope.from_dict(LINEAR_ROPE, "seed", 256))
    _write_hf_weights(directory, config)
    write_tokenizer(directory)
    return directory


def write_gemma2_seed(directory: Path) -> Path:
    """A two-layer Gemma 2 (sliding and global layers, soft-caps, post norms, (1 + w) norms
    folded in GGUF) with a SentencePiece-style tokenizer (scores in GGUF, merges in HF)."""
    from apr.config import ModelConfig
    from apr.tokenizer import TokenizerData, to_hf_files
    config = ModelConfig("gemma2", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                         intermediate_size=48, vocab_size=320, head_dim=16,
                         max_position_embeddings=256, rope_theta=1e4, tie_word_embeddings=True,
                         hidden_act="gelu_pytorch_tanh", sliding_window=8,
                         layer_types=("sliding_attention", "full_attention"),
                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                         query_pre_attn_scalar=16)
    _write_hf_weights(directory, config)
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz.,", "▁t", "he", "▁the", "at", "▁c", "▁cat",
              "▁s", "▁sat", "▁o", "on", "▁on", "▁m", "▁mat", "▁a"]
    vocab = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{i:02X}>" for i in range(256)), *pieces]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))]
    td = TokenizerData(vocab=vocab, merges=[], scores=scores, token_type=types, model_type="SPM",
                       space_prefix="never", bos_token_id=2, eos_token_id=1, padding_token_id=0,
                       unknown_token_id=3, add_bos_token=True)
    for name, text in to_hf_files(td).items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def _write_hf_weights(directory: Path, config) -> None:
    import numpy as np

    from apr.dtypes import DTYPES
    from apr.safetensors_io import StTensor, write_safetensors
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tensors = []
    for name, shape in config.tensor_shapes().items():
        a = rng.standard_normal(shape).astype(np.float32) * np.float32(0.1)
        if name.endswith("norm.weight"):
            a += np.float32(1.0)
        tensors.append(StTensor(name, DTYPES["F32"], shape, lambda a=a: a))
    write_safetensors(directory / "model.safetensors", tensors)
    cfg = config.to_hf_config()
    cfg.update(bos_token_id=0, eos_token_id=0)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def write_corpus(directory: Path) -> Path:
    """What pretrain --init reads: a few small documents."""
    directory.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(6):
        (directory / f"{i}.txt").write_text(" ".join(rng.choice(("the", "cat", "sat", "on", "a", "mat"))
                                                     for _ in range(120)) + "\n")
    return directory


def _mutators(fmt: str, seed: Path):
    from tests.fuzz import mutators as m
    return {"apr": m.apr_mutators, "gguf": m.gguf_mutators, "hf": m.hf_mutators}[fmt](seed)


COMMANDS = ("inspect", "convert", "logits", "diff", "diff-report", "run", "qa", "pretrain")
# a campaign may run these on every k-th mutant only (the HTML report, at 0.7 s the slowest
# command on a seed, on every 4k-th)
SLOW_COMMANDS = {"qa": 1, "pretrain": 1, "diff-report": 4}
# exit codes a command may end with on a mutant: 1 is diff's "a defect was found" and qa's
# "a gate failed"; 2 is bad input
ALLOWED_EXITS = {"diff": {0, 1, 2}, "diff-report": {0, 1, 2}, "qa": {0, 1, 2}}
CORPUS: list[Path] = []           # set by make_seeds' caller: the corpus pretrain reads
MADE = "made"                     # the outputs' directory: created by the write, so a failed
                                  # write must remove it again

# run's options, one set per case (``variant``): a prompt of bytes that are not UTF-8 (as the
# shell passes them: surrogate escapes), a seed of -1 or 2^64, more tokens than any seed
# model's context (256), none at all
RUN_OPTIONS = (
    ["the cat", "--max-tokens", "3"],
    ["the cat", "--max-tokens", "3", "--temperature", "0.8", "--top-k", "5", "--seed", "7"],
    ["\udcff\udcfe cat", "--max-tokens", "2"],
    ["the cat", "--max-tokens", "100000"],
    ["the cat", "--max-tokens", "2", "--temperature", "1", "--seed", "-1"],
    ["the cat", "--max-tokens", "2", "--temperature", "1", "--seed", str(2 ** 64)],
    ["", "--max-tokens", "2"],
    ["the cat\u2028sat", "--max-tokens", "0", "--top-p", "0.5", "--temperature", "1"],
)


def _args(command: str, seed: Path, mutant: Path, out: Path, variant: int = 0) -> list[str]:
    if command == "pretrain":
        return ["pretrain", "--init", str(mutant), "--dataset", str(CORPUS[0]),
                "--run-dir", str(out.parent.parent / "run"), "--steps", "1", "--batch-size", "1",
                "--seq-length", "8", "--val-batches", "1", "--allow-data-starvation",
                "--allow-untrained-init", "-q"]
    if command == "run":
        return ["run", str(mutant), *RUN_OPTIONS[variant % len(RUN_OPTIONS)], "--json"]
    # convert writes APR or GGUF by turns (a GGUF mutant always to APR)
    target = out.with_suffix(".gguf") if variant % 2 and mutant.suffix != ".gguf" else out
    return {"inspect": ["inspect", str(mutant), "--json"],
            "convert": ["convert", str(mutant), "-o", str(target), "-q"],
            "logits": ["logits", str(mutant), "--tokens", "1,2,3"],
            "diff": ["diff", str(seed), str(mutant), "--json"],
            "diff-report": ["diff", str(seed), str(mutant), "--report", str(out.with_suffix(".html"))],
            "qa": ["qa", str(mutant), "--no-gguf", "--allow-untrained", "--json"]}[command]


ALARMS: list[int] = [0]           # how many alarms fired (a guard may catch the Hang itself)


def _alarm(signum, frame):
    ALARMS[0] += 1
    raise Hang(f"no result in {CASE_SECONDS} s")


LAST_EXIT: list[int] = [0]


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


class memory_bound:
    """While active, the process may map at most CASE_BYTES more than it had: an allocation
    beyond that raises MemoryError instead of swapping the machine."""

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_AS)
        limit = _address_space() + CASE_BYTES
        if self.old[1] != resource.RLIM_INFINITY:
            limit = min(limit, self.old[1])
        resource.setrlimit(resource.RLIMIT_AS, (limit, self.old[1]))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_AS, self.old)


def _leftovers(work: Path, before: set[str], exit_code: int) -> list[str]:
    """New files in the case's directory, but the expected outputs (after a success, the
    outputs' directory; the run directory, in which only temporaries count)."""
    expected = ("run", MADE) if exit_code in (0, 1) else ("run",)
    left = [p.name for p in work.iterdir() if p.name not in before and p.name not in expected]
    made = work / MADE
    if made.is_dir():
        left += [str(p.relative_to(work)) for p in made.iterdir() if p.name.endswith(".tmp")]
    run = work / "run"
    if run.is_dir():
        left += [str(p.relative_to(work)) for p in run.rglob("*") if p.name.endswith(".tmp")]
    return left


def run_case(command: str, seed: Path, mutant: Path, work: Path, variant: int = 0) -> str | None:
    """None if the command behaved; else what went wrong (the exit code goes to LAST_EXIT).
    ``variant`` picks run's options (`RUN_OPTIONS`) and convert's target format."""
    import cli
    out = work / MADE / "out.apr"
    if command == "pretrain" and not CORPUS:       # a replay outside a campaign
        CORPUS.append(write_corpus(Path(tempfile.mkdtemp(prefix="apr-ref-fuzz-")) / "corpus"))
    before = set(p.name for p in work.iterdir())
    old = signal.signal(signal.SIGALRM, _alarm)
    alarms = ALARMS[0]
    signal.alarm(CASE_SECONDS)
    try:
        with memory_bound():
            r = CliRunner().invoke(cli.main, _args(command, seed, mutant, out, variant))
    except Hang as e:
        LAST_EXIT[0] = -1
        return f"hang: {e}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    LAST_EXIT[0] = r.exit_code
    if ALARMS[0] != alarms:
        return f"hang: no result in {CASE_SECONDS} s (the alarm was caught inside the command)"
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        exc = r.exception
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else "?"
        return f"traceback: {type(exc).__name__} at {where}: {str(exc)[:200]}"
    if r.exit_code not in ALLOWED_EXITS.get(command, {0, 2}):
        return f"exit {r.exit_code}: {r.stderr.strip()[-300:]}"
    lines = r.stderr.strip().splitlines()
    if any(line.startswith("error: out of memory") for line in lines):
        return f"MemoryError under the {CASE_BYTES >> 30} GiB bound: {lines[-1][:200]}"
    # click's own usage errors (an option's value out of its range) keep click's form
    usage = r.exit_code == 2 and bool(lines) and lines[0].startswith("Usage: ") and \
        lines[-1].startswith("Error: ")
    if r.exit_code == 2 and not usage and not (lines and lines[-1].startswith("error: ")):
        return f"exit 2 without a final error line: {r.stderr.strip()[-200:]!r}"
    broken = [x for x in lines if not x.startswith(("error: ", "warning: ", "device: ", "memory: "))]
    if r.exit_code == 2 and not usage and (broken or sum(x.startswith("error: ") for x in lines) != 1):
        return f"exit 2 with a message broken across lines: {r.stderr.strip()[-200:]!r}"
    left = _leftovers(work, before, r.exit_code)
    if left:
        return f"leftover files: {left}"
    shutil.rmtree(work / MADE, ignore_errors=True)
    shutil.rmtree(work / "run", ignore_errors=True)
    return None



def save_regression(fmt: str, command: str, mutant: Path, problem: str, seed: Path,
                    variant: int = 0) -> Path:
    """Keep one mutant per format and failure site (the site is the same whatever command
    reached it; the replay runs every command)."""
    site = re.sub(r"internal error in [a-z-]+", "internal error", problem)
    site = re.sub(r"(position|byte) \d+", r"\1 N", site)
    digest = hashlib.sha256((fmt + site).encode()).hexdigest()[:12]
    REGRESSIONS.mkdir(exist_ok=True)
    target = REGRESSIONS / f"{fmt}-{digest}"
    if target.exists():
        return target
    target.mkdir()
    dest = target / ("mutant" if mutant.is_dir() else "mutant." + fmt)
    fifo = not mutant.is_symlink() and stat.S_ISFIFO(os.lstat(mutant).st_mode)
    if mutant.is_symlink():
        os.symlink(os.readlink(mutant), dest)
    elif not fifo:
        (shutil.copytree if mutant.is_dir() else shutil.copyfile)(mutant, dest, **(
            {"symlinks": True} if mutant.is_dir() else {}))
    # diff compares the mutant with its seed; an HF seed is kept as its config and tokenizer
    # only (its weights are the mutant's, which the replay links in)
    if seed.is_dir():
        (target / "seed").mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(seed / name, target / "seed" / name)
    else:
        shutil.copyfile(seed, target / ("seed." + fmt))
    # a link is kept as a link (git stores it); a FIFO as a note, made again by the replay
    note = {"fifo": True} if fifo else {}
    (target / "case.json").write_text(json.dumps({"format": fmt, "command": command,
                                                  "variant": variant, **note, "found": problem},
                                                 indent=1) + "\n")
    return target


def campaign(cases: int, seed: int = 0, budget: float | None = None, save: bool = False,
             formats=("apr", "gguf", "hf"), slow_every: int = 1) -> Outcome:
    """``cases`` mutants per format (or as many as ``budget`` seconds allow), every command
    (`SLOW_COMMANDS` on every ``slow_every``-th mutant)."""
    rng = random.Random(seed)
    outcome = Outcome()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="apr-ref-fuzz-") as d:
        base = Path(d)
        seeds = make_seeds(base / "seeds")
        CORPUS[:] = [seeds.pop("corpus")]
        for i in range(cases):
            for fmt in formats:
                if budget is not None and time.monotonic() - start > budget:
                    return outcome
                work = base / f"case-{i}-{fmt}"
                work.mkdir()
                model = rng.choice(SEED_MODELS)
                seed_file = seeds[seed_key(fmt, model)]
                mutate = rng.choice(_mutators(fmt, seed_file))
                mutant = work / ("mutant" if fmt == "hf" else f"mutant.{fmt}")
                try:
                    mutate(seed_file, mutant, rng)
                except Exception:       # the mutator could not build this mutant: not a case
                    shutil.rmtree(work, ignore_errors=True)
                    continue
                mk = f"{fmt} {model}"
                outcome.mutants[mk] = outcome.mutants.get(mk, 0) + 1
                for command in COMMANDS:
                    if command in SLOW_COMMANDS and i % (slow_every * SLOW_COMMANDS[command]):
                        continue
                    key = f"{fmt} {command}"
                    outcome.cases[key] = outcome.cases.get(key, 0) + 1
                    problem = run_case(command, seed_file, mutant, work, variant=i)
                    ek = f"{key} exit {LAST_EXIT[0]}"
                    outcome.exits[ek] = outcome.exits.get(ek, 0) + 1
                    if problem:
                        outcome.failures.append(f"{key} [{model} {getattr(mutate, '__name__', 'mutate')}]: "
                                                f"{problem}")
                        if save:
                            save_regression(fmt, command, mutant, problem, seed_file, variant=i)
                shutil.rmtree(work, ignore_errors=True)
    return outcome


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="apr-ref's fuzz campaign over its file readers")
    ap.add_argument("--cases", type=int, default=1_000_000, help="mutants per format")
    ap.add_argument("--budget", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow-every", type=int, default=1, metavar="K",
                    help="run qa and pretrain on every K-th mutant only")
    ap.add_argument("--no-save", action="store_true", help="do not keep failures as regression files")
    a = ap.parse_args(argv)
    if a.budget is None and a.cases == 1_000_000:
        a.budget = 300
    o = campaign(a.cases, a.seed, a.budget, save=not a.no_save, slow_every=a.slow_every)
    print(json.dumps({"mutants": o.mutants, "cases": o.cases, "exits": o.exits,
                      "failures": len(o.failures)}, indent=1))
    for f in sorted(set(o.failures)):
        print(f)
    return 1 if o.failures else 0


if __name__ == "__main__":
    sys.exit(main())
