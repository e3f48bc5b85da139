"""qa: the gates a model file must pass before anyone downstream gets it.

Each gate is a small function that returns (passed, message, value, threshold) or raises
Skip; `run_qa` times them and collects a report. The forward gate wants a loss on the sample
text at least 1 nat below ln(vocab) (the rule of pretrain's init gate, `ref.gates`), and the
golden-output gate a greedy decode of ids the tokenizer has, not one id over and over: a
file that imports into gibberish while every structural check passes fails here, unless
--allow-untrained says it is meant to be untrained. A gate that cannot run because an earlier
one failed is skipped with the reason, never passed.
"""
from __future__ import annotations

import math
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from apr import names
from apr.config import ModelConfig
from apr.errors import AprError
from apr.model import ModelView, open_model
from apr.tokenizer import TokenizerData, UNUSED, is_row_pad
from ref.gates import INIT_LOSS_MARGIN_NATS, better_than_chance

SAMPLE_FILE = "textwrap.py"        # a text sample every Python installation ships
SAMPLE_TOKENS = 256
GOLDEN_TOKENS = 16                 # ids of the golden-output greedy decode


@dataclass
class Gate:
    name: str
    passed: bool
    skipped: bool = False
    message: str = ""
    value: Any = None
    threshold: Any = None
    duration_ms: float = 0.0


@dataclass
class QaReport:
    model: str
    passed: bool
    gates: list[Gate] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "passed": self.passed, "gates": [asdict(g) for g in self.gates]}


class Skip(Exception):
    """The gate does not apply or cannot run; the message says why."""


@dataclass
class QaContext:
    path: Path
    max_ppl: float | None
    min_tps: float | None
    gguf: bool
    max_memory: str | None = None        # --max-memory (None: the default budget)
    allow_untrained: bool = False        # --allow-untrained: a deliberately untrained file
    view: ModelView | None = None
    model: Any = None
    tokenizer: Any = None
    sample_ids: list[int] | None = None
    golden: Any = None                   # the golden-output gate's second decode (its timing)


# --------------------------------------------------------------------------- gates

def gate_format(ctx: QaContext):
    ctx.view = open_model(ctx.path)
    if ctx.view.format == "apr":
        from apr.container import AprFile
        with AprFile.open(ctx.path) as f:
            ok = f.verify_footer()
        return ok, ("header and footer CRC32 valid" if ok else "footer CRC mismatch: file corrupted"), \
            ctx.view.info.get("version"), None
    return True, f"{ctx.view.format} file readable", ctx.view.format, None


# plausible ranges per family; a value outside is a config defect, not a style choice


def gate_metadata(ctx: QaContext):
    view = _need_view(ctx)
    cfg = view.config
    if cfg is None:
        return False, f"no architecture: {view.info.get('config_note')}", None, None
    problems = []
    if view.format == "apr":
        required = ("architecture", "hf_architecture", "hidden_size", "num_layers", "num_heads",
                    "num_kv_heads", "vocab_size", "intermediate_size", "max_position_embeddings",
                    "rope_theta", "rope_type", "rms_norm_eps", "head_dim")
        missing = [k for k in required if k not in view.metadata]
        if missing:
            problems.append(f"missing keys {', '.join(missing)}")
        aliases = [a for als in names.APR_KEY_ALIASES.values() for a in als if a in view.metadata]
        if aliases:
            problems.append(f"alias keys {', '.join(aliases)} beside canonical ones make aprender drop all metadata")
    lo, hi = names.FAMILIES[cfg.family].rope_theta_range
    if not lo <= cfg.rope_theta <= hi:
        problems.append(f"rope_theta {cfg.rope_theta:g} is implausible for {cfg.family} "
                        f"(expected {lo:g}..{hi:g}; Qwen2 uses 1e6)")
    if not 1e-8 <= cfg.rms_norm_eps <= 1e-3:
        problems.append(f"rms_norm_eps {cfg.rms_norm_eps:g} outside 1e-8..1e-3")
    if cfg.max_position_embeddings < 16:
        problems.append(f"max_position_embeddings {cfg.max_position_embeddings} too small")
    msg = "; ".join(problems) or (f"{cfg.family}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
                                  f"{cfg.num_heads}/{cfg.num_kv_heads} heads, rope {cfg.rope_theta:g}")
    return not problems, msg, cfg.to_dict(), None


def gate_tokenizer(ctx: QaContext):
    view = _need_config(ctx)
    td = view.tokenizer
    if td is None:
        return False, "no embedded tokenizer: the file is not self-contained", None, None
    if td.vocab_size > view.config.vocab_size:
        return False, (f"tokenizer has {td.vocab_size} tokens, embedding {view.config.vocab_size} rows"), \
            td.vocab_size, view.config.vocab_size
    from apr.tokenizer import build_tokenizer
    ctx.tokenizer = build_tokenizer(td)
    text = sample_text()
    ids = ctx.tokenizer.encode(text, add_special_tokens=False).ids
    back = ctx.tokenizer.decode(ids, skip_special_tokens=False)
    if back != text:
        i = next((k for k, (a, b) in enumerate(zip(back, text)) if a != b), min(len(back), len(text)))
        return False, f"encode/decode round trip differs at character {i}", td.vocab_size, None
    ctx.sample_ids = ids[:min(SAMPLE_TOKENS, view.config.max_position_embeddings)]
    return True, f"{td.vocab_size} tokens, {len(td.merges)} merges, round trip exact", td.vocab_size, None


def gate_tensors(ctx: QaContext):
    view = _need_config(ctx)
    cfg: ModelConfig = view.config
    wrong = [m for m in view.mismatches() if m.kind in ("missing", "shape")]
    problems = [f"{m.name} missing" if m.kind == "missing" else f"{m.name} shape {list(m.found)} != "
                f"{list(m.expected)}" for m in wrong]
    skip = {m.name for m in wrong}
    from ref.backend import cpu_backend
    from ref.weights import RowReader
    for name in cfg.tensor_shapes():
        if name in skip:
            continue
        ref = view.tensors[name]
        # a matrix a block of rows at a time (a 7B's embedding is 2.2 GB as float32)
        blocks = RowReader(ref, cpu_backend(), np.float32).blocks() if len(ref.shape) == 2 \
            else [ref.numpy(np.float32)]
        nonfinite = zero_rows = 0
        for values in blocks:
            nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
            if name == "model.embed_tokens.weight":
                zero_rows += int(np.count_nonzero(np.abs(values).max(axis=1) == 0))
        if nonfinite:
            problems.append(f"{name} has {nonfinite} non-finite values")
        if name == "model.embed_tokens.weight" and zero_rows > 0.5 * ref.shape[0]:
            problems.append(f"{name}: {zero_rows / ref.shape[0]:.0%} of rows are all zeros")
    if problems:
        return False, "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""), len(problems), 0
    return True, f"{len(cfg.tensor_shapes())} tensors present, shapes right, all finite", \
        len(cfg.tensor_shapes()), None


def gate_tied_embeddings(ctx: QaContext):
    view = _need_config(ctx)
    cfg = view.config
    head = view.tensors.get("lm_head.weight")
    emb = view.tensors.get("model.embed_tokens.weight")
    if emb is None:
        raise Skip("no embedding")
    broken = [m for m in view.mismatches() if m.kind == "tied"]
    if broken:
        return False, str(broken[0]), True, None
    if cfg.tie_word_embeddings:
        if head is None:
            return True, "tied: output projection is the embedding", True, None
        same = bool(view.info.get("tied_copy_equal"))      # compared when the file was opened
        return same, ("tied: lm_head.weight is a copy of the embedding (APR convention)" if same else
                      "config says tied but lm_head.weight differs from the embedding"), True, None
    if head is None:
        return False, "untied but lm_head.weight is missing (would leave a random output layer)", False, None
    return True, "untied: separate lm_head.weight", False, None


def gate_forward(ctx: QaContext):
    view = _need_config(ctx)
    from ref.load import model_from_view, plan_memory
    ctx.model = model_from_view(view, memory=plan_memory(view, max_memory=ctx.max_memory))
    ids = ctx.sample_ids or list(range(min(32, view.config.vocab_size)))
    arr = np.array([ids])
    logits = ctx.model.forward(arr)
    if not np.isfinite(ctx.model.backend.to_numpy(logits)).all():
        return False, "non-finite logits", None, None
    loss = ctx.model.loss(arr[:, :-1], arr[:, 1:])
    vocab = view.config.vocab_size
    bar = math.log(vocab) - INIT_LOSS_MARGIN_NATS
    msg = f"loss {loss:.4f} on {len(ids)} tokens of {SAMPLE_FILE} (ln vocab = {math.log(vocab):.2f})"
    if not math.isfinite(loss):
        return False, msg, loss, bar
    if not ctx.sample_ids:
        return True, msg.replace(f" of {SAMPLE_FILE}", "") + " (no tokenizer: no text to judge it on)", loss, None
    if better_than_chance(loss, vocab):
        return True, msg, loss, bar
    if ctx.allow_untrained:
        return True, msg + f": not {INIT_LOSS_MARGIN_NATS:g} nat below chance, allowed by --allow-untrained", \
            loss, bar
    return False, (msg + f": not {INIT_LOSS_MARGIN_NATS:g} nat below ln(vocab), the model predicts this "
                   "text no better than chance (untrained weights, a layout defect or a wrong "
                   "tokenizer); --allow-untrained passes a deliberately untrained file"), loss, bar


def gate_golden_output(ctx: QaContext):
    if ctx.model is None:
        raise Skip("forward gate did not run")
    from ref.generate import generate
    prompt = (ctx.sample_ids or [0])[:16]
    # a streamed model reads its whole file once per token: half as many tokens
    n = GOLDEN_TOKENS // 2 if ctx.model.streamed else GOLDEN_TOKENS
    a = generate(ctx.model, prompt, n).new_ids
    ctx.golden = generate(ctx.model, prompt, n)
    b = ctx.golden.new_ids
    if a != b:
        return False, "greedy decoding is not deterministic", a, b
    wrong = _degenerate(ctx, a) if ctx.sample_ids else None     # no tokenizer: no text prompt
    if wrong and not ctx.allow_untrained:
        return False, f"greedy decode {a[:8]}...: {wrong} (--allow-untrained passes a deliberately " \
            "untrained file)", a, None
    if wrong:
        return True, f"greedy decode {a[:8]}...: {wrong}, allowed by --allow-untrained", a, None
    if ctx.max_ppl is None:
        return True, f"greedy decode deterministic: {a[:8]}...", a, None
    if not ctx.sample_ids:
        raise Skip("no tokenizer for a perplexity sample")
    ids = np.array([ctx.sample_ids])
    ppl = math.exp(ctx.model.loss(ids[:, :-1], ids[:, 1:]))
    return ppl <= ctx.max_ppl, f"perplexity {ppl:.2f} on {ids.shape[1]} tokens of {SAMPLE_FILE}", \
        ppl, ctx.max_ppl


def _degenerate(ctx: QaContext, ids: list[int]) -> str | None:
    """What makes a greedy decode worthless, if anything: ids no token of the tokenizer
    stands for (beyond it, or unused padding rows), or one id over and over."""
    td = ctx.view.tokenizer if ctx.view is not None else None
    if td is not None:
        outside = [i for i in ids if not 0 <= i < td.vocab_size or is_placeholder(td, i)]
        if outside:
            return (f"{len(outside)} of {len(ids)} ids are outside the tokenizer's "
                    f"{td.vocab_size} tokens or unused padding rows ({outside[:4]})")
    if len(ids) >= GOLDEN_TOKENS and len(set(ids)) == 1:
        return f"one id ({ids[0]}) over and over"
    return None


def gate_throughput(ctx: QaContext):
    if ctx.model is None:
        raise Skip("forward gate did not run")
    from ref.generate import generate
    prompt = (ctx.sample_ids or [0])[:16]
    if ctx.model.streamed and ctx.golden is not None and ctx.golden.decode_seconds:
        # a streamed model reads its whole file once per token: the golden gate's second
        # (warm) decode is the measurement
        tps = ctx.golden.decode_tokens_per_second
    else:
        generate(ctx.model, prompt, 4)                         # warm-up
        tps = generate(ctx.model, prompt, 32).decode_tokens_per_second
    if ctx.min_tps is None:
        return True, f"decode {tps:.1f} tokens/s (no --min-tps bound)", tps, None
    return tps >= ctx.min_tps, f"decode {tps:.1f} tokens/s", tps, ctx.min_tps


def gate_gguf_export(ctx: QaContext):
    if not ctx.gguf:
        raise Skip("--no-gguf")
    if ctx.model is None:
        raise Skip("forward gate did not run")
    from apr import llamacpp
    from apr.convert import convert
    if not llamacpp.available():
        raise Skip("llama-cpp-python is not installed (pip install 'apr-ref[test]')")
    if ctx.model.streamed:
        from ref.memory import format_size
        size = format_size(4 * ctx.view.config.param_count())
        raise Skip(f"the model is larger than the memory budget: its F32 export ({size}) is "
                   "not written for llama.cpp here (export it and run llama.cpp on it)")
    ids = (ctx.sample_ids or list(range(16)))[:64]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export.gguf"
        convert(ctx.path, out, dtype="f32", allow_no_tokenizer=True)
        got = llamacpp.llama_cpp_logits(out, ids)
    want = ctx.model.backend.to_numpy(ctx.model.forward(np.array([ids])))[0]
    rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    return rel <= 1e-3, f"llama.cpp loads the F32 export; max |Δ logits| / max |logit| = {rel:.2e}", rel, 1e-3


GATES: list[tuple[str, Callable[[QaContext], Any]]] = [
    ("format", gate_format), ("metadata", gate_metadata), ("tokenizer", gate_tokenizer),
    ("tensors", gate_tensors), ("tied_embeddings", gate_tied_embeddings), ("forward", gate_forward),
    ("golden_output", gate_golden_output), ("throughput", gate_throughput),
    ("gguf_export", gate_gguf_export),
]


# --------------------------------------------------------------------------- driver

def _need_view(ctx: QaContext) -> ModelView:
    if ctx.view is None:
        raise Skip("the file could not be opened")
    return ctx.view


def _need_config(ctx: QaContext) -> ModelView:
    view = _need_view(ctx)
    if view.config is None:
        raise Skip("no architecture metadata")
    return view


def sample_text() -> str:
    text = (Path(sysconfig.get_paths()["stdlib"]) / SAMPLE_FILE).read_text(encoding="utf-8")
    return text[:4000]


def is_placeholder(td: TokenizerData, i: int) -> bool:
    """An unused token or an embedding padding row (no string stands for it)."""
    return td.token_type[i] == UNUSED or is_row_pad(td.vocab[i], i)


def run_qa(path: str | Path, max_ppl: float | None = None, min_tps: float | None = None,
           gguf: bool = True, progress: Callable[[Gate], None] | None = None,
           max_memory: str | None = None, allow_untrained: bool = False) -> QaReport:
    """Every gate of `GATES` on the file; ``allow_untrained`` passes a file whose loss on the
    sample text is not below chance and whose greedy decode is degenerate (a deliberately
    untrained file), saying so."""
    ctx = QaContext(Path(path), max_ppl, min_tps, gguf, max_memory, allow_untrained)
    report = QaReport(str(path), True)
    for name, fn in GATES:
        t = time.perf_counter()
        try:
            passed, message, value, threshold = fn(ctx)
            gate = Gate(name, bool(passed), False, message, value, threshold)
        except Skip as s:
            gate = Gate(name, True, True, str(s))
        except AprError as e:
            gate = Gate(name, False, False, str(e))
        gate.duration_ms = round(1000 * (time.perf_counter() - t), 1)
        report.gates.append(gate)
        report.passed &= gate.passed
        if progress:
            progress(gate)
    if ctx.view is not None:
        ctx.view.close()
    return report
