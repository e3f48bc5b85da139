"""Both reference models on the same token ids: logits, and where they start to differ.

Each file runs in its own stored layout (`ref.load.model_from_view`). A and B run in
lockstep, a stage at a time (`Model.stages`: the embeddings, each decoder layer, the final
norm, the logits), so that two models larger than memory, streamed from their files, each
hold one layer's weights at a time; the hidden states of both are kept (a few rows each).
When the logits disagree, the hidden states locate the first stage that diverges, and that
stage is tied to the tensor findings of that layer. When no tensor finding explains it,
each differing config key (every one `diff.meta` compares) whose A value leaves B's tensor
shapes alone is tried on B with A's value: if B then agrees, that key is the confirmed
culprit (a wrong rope_theta, rope_scaling, soft-cap or rms_norm_eps with identical tensors
shows up only here).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from apr import names
from apr.config import ModelConfig
from apr.console import progress_bar
from apr.errors import AprError
from apr.dtypes import DTYPES
from apr.model import ModelView, TensorRef
from ref.backend import cpu_backend
from ref.load import model_from_view
from ref.memory import resolve_budget
from ref.model import Model
from ref.weights import MemoryPlan

from .report import IDENTICAL, ROUNDING, ConfigFinding, LogitsReport, StageDelta, TensorFinding
from .values import dtype_tolerance, lossiest, lossy, rel_l2, rounded_as

DEFAULT_TOKENS: tuple[int, ...] = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597)
SHORT_TOKENS = 8                     # for a float32 run of a large model
FLOAT64_MAX_PARAMS = 50_000_000      # float64 up to this size, float32 above
LOGIT_FACTOR = 10.0                  # hidden states may differ this many times the worst tensor tolerance
LOGIT_FLOOR = {np.float64: 1e-9, np.float32: 1e-5}
# What storage rounding alone does to the logits, per storage type: (mean KL divergence at
# most, top-1 agreement at least) between a float model and its quantization by llama.cpp's
# quantizer (our writers for APR_Q8, APR_Q4), measured by bench/logit_tolerance.py on the
# test models and a small trained one (docs/benchmarks.md), with a margin. A side is keyed
# by its lossiest storage (a Q4_K_M file: Q4_K); two lossy sides add their KL and their
# misses. A pair beyond them is a finding; lossless pairs keep the relative-L2 bound.
LOGIT_MEASURED: dict[str, tuple[float, float]] = {       # worst KL, worst top-1 (2026-12-07)
    "F16": (3.82e-8, 1.00), "BF16": (2.19e-6, 0.92), "Q8_0": (1.47e-5, 0.92),
    "APR_Q8": (8.33e-5, 0.85), "Q6_K": (1.35e-4, 1.00), "Q5_K": (3.48e-4, 0.77),
    "Q5_1": (4.28e-4, 0.69), "Q5_0": (5.91e-4, 0.46), "Q4_K": (1.26e-3, 0.77),
    "Q4_1": (1.41e-3, 0.54), "Q4_0": (2.06e-3, 0.69), "IQ4_NL": (1.49e-3, 0.85),
    "IQ4_XS": (1.55e-3, 0.77), "Q3_K": (5.95e-3, 0.54), "Q2_K": (1.28e-2, 0.38),
}
KL_MARGIN = 4.0          # x the worst KL measured
TOP1_MARGIN = 0.15       # below the worst top-1 measured (two of the 13 positions compared)
CONTROL_KL_MARGIN = 2.0  # x the control's KL (llama.cpp's Q8_0, Q4_0, Q4_K_M and Q6_K of a
#                          test model: 0.75-1.0 x the KL of our encoding of the same weights)
CONTROL_EXTRA_MISSES = 2  # top-1 misses allowed beyond CONTROL_KL_MARGIN x the control's
KL_FLOOR = 1e-12         # a control KL below this (tiny logits) is taken as this
# Those rows bound the logits only loosely: KL scales with the logits' size, so a model with
# larger logits than the test models' goes past them from rounding alone (this suite's own F16
# and Q8_0 conversions of other models: KL 1.2e-6 against 1.5e-7, 2.6e-3 against 5.9e-5). So
# where the lossier side's storage has an encoder here (F16, BF16, Q8_0, Q4_0/1, Q5_0/1, Q4_K,
# Q6_K, APR_Q8, APR_Q4) and both models fit the budget, the bound is measured on the pair
# itself: the other side's weights rounded as the lossy side stores each tensor (the control)
# are run, and the lossy side must stay within CONTROL_KL_MARGIN x the control's KL and
# top-1 misses (+ CONTROL_EXTRA_MISSES). A pair beyond that is a finding, whatever its
# relative L2. Otherwise (a type without an encoder, a streamed model) the table's rows
# widen the relative-L2 rule.
LOGIT_TOLERANCE: dict[str, tuple[float, float]] = {
    d: (KL_MARGIN * kl, max(0.0, top1 - TOP1_MARGIN)) for d, (kl, top1) in LOGIT_MEASURED.items()}
EMBED, FINAL_NORM, LM_HEAD = names.EMBED, names.FINAL_NORM, names.LM_HEAD


@dataclass
class Run:
    logits: np.ndarray       # (T, V) float64
    hidden: list[np.ndarray]  # L + 2 arrays (T, hidden), float64


def default_tokens(vocab: int, n: int = len(DEFAULT_TOKENS)) -> list[int]:
    """A fixed id sequence valid for a vocabulary of `vocab` ids."""
    ids = [t for t in DEFAULT_TOKENS if t < vocab][:n]
    return ids if len(ids) >= 4 else list(range(min(vocab, n)))


def param_count(va: ModelView, vb: ModelView) -> int:
    return max(v.config.param_count() for v in (va, vb))


def run_dtype(params: int) -> Any:
    return np.float64 if params <= FLOAT64_MAX_PARAMS else np.float32


def _host(model: Model, x: Any) -> np.ndarray:
    return np.asarray(model.backend.to_numpy(x)[0], np.float64)


def _run(outputs: list[np.ndarray]) -> Run:
    return Run(outputs[-1], outputs[:-1])


def _forward(model: Model, ids: Sequence[int]) -> Run:
    return _run([_host(model, x) for x in model.stages(np.asarray([ids], dtype=np.int64))])


def _shared_stages(va: ModelView, vb: ModelView, findings: list[TensorFinding]) -> set[int]:
    """The stages (`Model.stages` indices) whose parameters B holds exactly as A does: the
    same config, each tensor of the stage identical in value (the tensor comparison) and
    stored in the same row order and offset. Given the same input such a stage computes the
    same output bits, so B takes A's instead of reading and running its own."""
    if va.config is None or va.config != vb.config:
        return set()
    cfg = va.config
    same = {f.name for f in findings if f.relation == IDENTICAL and not f.defect}
    by_stage: dict[int, list[str]] = {}
    for name in cfg.tensor_shapes():
        layer = names.layer_of(name)
        stage = 0 if name == EMBED else cfg.num_layers + 1 if name == FINAL_NORM else \
            cfg.num_layers + 2 if name == LM_HEAD else layer + 1
        by_stage.setdefault(stage, []).append(name)
    if cfg.tie_word_embeddings:         # the output projection is the embedding
        by_stage.setdefault(cfg.num_layers + 2, []).append(EMBED)

    def kept(name: str) -> bool:
        ra, rb = va.tensors.get(name), vb.tensors.get(name)
        return name in same and ra is not None and rb is not None and \
            (ra.rotary_heads, ra.offset) == (rb.rotary_heads, rb.offset)

    return {stage for stage, ns in by_stage.items() if all(map(kept, ns))}


def _lockstep(model_a: Model, model_b: Model, ids: Sequence[int], progress: bool,
              shared: set[int] = frozenset()) -> tuple[Run, Run, int]:
    """Both models' stages (`Model.stages`), A's and B's of the same index one after the
    other (a model with fewer layers finishes first), with a bar over the stages. A stage in
    ``shared`` (`_shared_stages`) whose input in B is bit-identical to its input in A gives
    B A's output: B's weights for it are never read. Also returns how many stages did."""
    arr = np.asarray([ids], dtype=np.int64)
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    inputs_a: list[Any] = [arr]           # A's input to each stage so far, then its output
    xp = model_a.backend.xp
    taken = [0]

    def known(k: int, x: Any) -> Any:
        if k not in shared or k + 1 >= len(inputs_a):
            return None
        given = inputs_a[k]
        if given is None:
            return None
        same = given is x or (given.shape == x.shape and given.dtype == x.dtype
                              and bool(xp.array_equal(given, x)))
        taken[0] += same
        return inputs_a[k + 1] if same else None

    stages = max(m.config.num_layers for m in (model_a, model_b)) + 3
    with progress_bar(progress, total=stages, unit="stage", desc="logits") as bar:
        run_a, run_b = model_a.stages(arr), model_b.stages(arr, known)
        while True:
            xa = next(run_a, None)          # A's stage k before B's: B may take its output
            if xa is not None:
                out_a.append(_host(model_a, xa))
                inputs_a.append(xa)
                if len(inputs_a) > 2:     # only the latest input and output are looked at
                    inputs_a[-3] = None
            xb = next(run_b, None)
            if xb is not None:
                out_b.append(_host(model_b, xb))
            if xa is None and xb is None:
                break
            bar.update(1)
    return _run(out_a), _run(out_b), taken[0]


def _stage_names(num_layers: int) -> list[tuple[str, int | None]]:
    return [("embeddings", None)] + [(f"layer {i}", i) for i in range(num_layers)] + [("final norm", None)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _logit_metrics(rep: LogitsReport, ra: Run, rb: Run) -> None:
    v = min(ra.logits.shape[-1], rb.logits.shape[-1])
    la, lb = ra.logits[:, :v], rb.logits[:, :v]
    rep.max_abs = float(np.max(np.abs(la - lb)))
    rep.rel_l2 = rel_l2(la, lb)
    pa, pb = _log_softmax(la), _log_softmax(lb)
    kl = np.sum(np.exp(pa) * (pa - pb), axis=-1)
    rep.kl_mean, rep.kl_max = float(kl.mean()), float(kl.max())
    rep.top1_agreement = float(np.mean(la.argmax(-1) == lb.argmax(-1)))


def _stages(ra: Run, rb: Run) -> list[StageDelta]:
    if len(ra.hidden) != len(rb.hidden):
        return []
    out = []
    for (stage, layer), ha, hb in zip(_stage_names(len(ra.hidden) - 2), ra.hidden, rb.hidden):
        if ha.shape != hb.shape:
            break
        out.append(StageDelta(stage, layer, rel_l2(ha, hb), float(np.max(np.abs(ha - hb)))))
    return out


def logit_tolerance(findings: list[TensorFinding], dtype: Any) -> float:
    """Allowed relative L2 of logits and hidden states: LOGIT_FACTOR times the largest
    rounding among the compared tensors (their dtype tolerance, or the error a tensor
    within rounding really has), at least the float precision's floor."""
    worst = 2 * dtype_tolerance("F32")
    for f in findings:
        if f.tolerance is not None:
            worst = max(worst, f.tolerance)
        if f.relation == ROUNDING and f.stats is not None:
            worst = max(worst, f.stats.rel_l2)
    return max(LOGIT_FACTOR * worst, LOGIT_FLOOR[dtype])


def side_storage(view: ModelView, findings: list[TensorFinding] = (), side: str = "a") -> str:
    """The lossiest rounding a side's values carry: its tensors' storage (or the dtype they
    were dequantized from), and any rounding the values show (`detect_rounded_to`)."""
    dtypes = {r.precision for r in view.tensors.values()} or {"F32"}
    for f in findings:
        if f.detail.get("rounded_to") and f.detail.get("rounded_side", "").lower() == side:
            dtypes.add(f.detail["rounded_to"])
    return lossiest(*sorted(dtypes))


def quantized_tolerance(storage_a: str, storage_b: str) -> tuple[float, float] | None:
    """(KL at most, top-1 agreement at least) for a pair with a lossy side (see
    `LOGIT_TOLERANCE`; a type not measured gets the loosest measured row), or None for two
    lossless sides."""
    def row(d: str) -> tuple[float, float]:
        if not lossy(d):
            return 0.0, 1.0
        return LOGIT_TOLERANCE.get(d) or max(LOGIT_TOLERANCE.values())
    if not (lossy(storage_a) or lossy(storage_b)):
        return None
    (ka, ta), (kb, tb) = row(storage_a), row(storage_b)
    return ka + kb, max(0.0, ta + tb - 1.0)


def _culprit_tensors(stage: StageDelta | None, findings: list[TensorFinding]) -> list[str]:
    """Defective tensors of the first divergent stage (None: the output projection); where
    that stage holds none, those of the stages before it (under a quantized file's noise, a
    defect's divergence can cross the bound some layers after it)."""
    defects = [f for f in findings if f.defect]
    if stage is None:
        want = lambda n: n in (LM_HEAD, EMBED)
        before = lambda n: n != LM_HEAD
    elif stage.layer is not None:
        want = lambda n: names.layer_of(n) == stage.layer
        before = lambda n: n == EMBED or (names.layer_of(n) is not None and names.layer_of(n) < stage.layer)
    elif stage.stage == "embeddings":
        want = lambda n: n == EMBED
        before = lambda n: False
    else:
        want = lambda n: n == FINAL_NORM
        before = lambda n: n != LM_HEAD and n != FINAL_NORM
    found = list(dict.fromkeys(f.name for f in defects if want(f.name)))
    return found or list(dict.fromkeys(f.name for f in defects if before(f.name)))


def _agrees(run: Run, ref: Run, rep: LogitsReport) -> bool:
    """B's logits agree with A's by the report's rule (relative L2 within the tensors'
    rounding, or, for a lossy side, the measured KL and top-1)."""
    if ref.logits.shape != run.logits.shape:
        return False
    within = rel_l2(ref.logits, run.logits) <= rep.tolerance
    if (within and not rep.control) or rep.kl_tolerance is None:
        return within
    trial = LogitsReport(ran=True)
    _logit_metrics(trial, ref, run)
    return trial.kl_mean <= rep.kl_tolerance and trial.top1_agreement >= rep.top1_tolerance


def swappable(key: str, ca: ModelConfig, cb: ModelConfig) -> bool:
    """Whether B's config with A's value of ``key`` (a config finding's key: a field of
    `ModelConfig`, as `diff.meta.CONFIG_KEYS` lists them) describes a model of B's tensor
    shapes, so that B's tensors can be re-run under it."""
    try:
        cfg = cb.replace(**{key: getattr(ca, key)})
    except (AprError, ValueError, TypeError, AttributeError):
        return False          # not a field (computes_as), or a value B's other keys refuse
    return cfg.tensor_shapes(include_lm_head=True) == cb.tensor_shapes(include_lm_head=True)


def _confirm_config(model_b: Model, va: ModelView, keys: list[str], ids: Sequence[int],
                    ra: Run, rep: LogitsReport) -> list[str]:
    """The config keys whose A value, put into B, makes B's logits agree with A's
    (one at a time, then all of them together)."""
    ca = va.config
    trials = [[k] for k in keys] + ([keys] if len(keys) > 1 else [])
    for trial in trials:
        try:
            cfg = model_b.config.replace(**{k: getattr(ca, k) for k in trial})
            model = Model(cfg, model_b.params, model_b.backend, model_b.dtype)
        except (AprError, ValueError, TypeError):
            continue
        if _agrees(_forward(model, ids), ra, rep):
            return trial
    return []


class _CannotRun(Exception):
    """A side's tensors do not make a model its config describes."""


def control_view(source: ModelView, lossy_side: ModelView) -> ModelView | None:
    """``source``'s weights, each rounded as ``lossy_side`` stores that tensor (encoded and
    decoded by our writer of its dtype): what the lossy side's storage alone would do to the
    source. None where a tensor's dtype has no encoder here, or a tensor is missing."""
    f32 = DTYPES["F32"]
    tensors: dict[str, TensorRef] = {}
    for name, ref in source.tensors.items():
        other = lossy_side.tensors.get(name)
        if other is None:
            return None
        target = other.precision
        if not lossy(target) or target == ref.precision:
            tensors[name] = ref
            continue
        values = rounded_as(ref.numpy(np.float32, order="hf"), target)
        if values is None:
            return None
        tensors[name] = TensorRef(name, f32, tuple(ref.shape), names.LAYOUT_ROW_MAJOR,
                                  ref.source_name, values.nbytes, lambda v=values: v)
    return replace(source, tensors=tensors, _closers=[], _pending_checks=[])


def _control(rep: LogitsReport, va: ModelView, vb: ModelView, runs: tuple[Run, Run],
             ids: Sequence[int], dtype: Any, budget: tuple[int, str]) -> None:
    """Measure the KL and top-1 bound on the pair itself (the notes above LOGIT_TOLERANCE):
    the less lossy side's weights rounded as the lossier side stores them, run on ``ids``.
    Leaves the table's bound where both sides round alike, the source would be streamed, or
    a type has no encoder here."""
    sa, sb = rep.storage
    if dtype_tolerance(sa) == dtype_tolerance(sb):
        return
    lossy_b = dtype_tolerance(sb) > dtype_tolerance(sa)
    source, lossy_view = (va, vb) if lossy_b else (vb, va)
    source_run = runs[0] if lossy_b else runs[1]
    if MemoryPlan.of(source.check_runnable(), dtype, *budget).streamed:
        return
    view = control_view(source, lossy_view)
    if view is None:
        return
    try:
        run = _forward(_build("control", view, dtype, budget), ids)
    except _CannotRun:
        return
    trial = LogitsReport(ran=True)
    _logit_metrics(trial, source_run, run)
    rep.control = f"{'A' if lossy_b else 'B'} rounded as {'B' if lossy_b else 'A'} stores it"
    rep.control_kl, rep.control_top1 = trial.kl_mean, trial.top1_agreement
    rep.kl_tolerance = CONTROL_KL_MARGIN * max(trial.kl_mean, KL_FLOOR)
    # top-1 misses on a dozen tokens are few and noisy (llama.cpp's Q5_1 of a test model: 4
    # of 13 where the control had 2): at most twice the control's, and two more
    n = len(source_run.logits)
    misses = round((1.0 - trial.top1_agreement) * n)
    rep.top1_tolerance = max(0.0, 1.0 - (CONTROL_KL_MARGIN * misses + CONTROL_EXTRA_MISSES) / n)


def _build(side: str, view: ModelView, dtype: Any, budget: tuple[int, str]) -> Model:
    """``side``'s model, streamed from its file when it does not fit ``budget`` (bytes, and
    where the figure came from); one layer at a time (no read-ahead): the other side's layer
    is the other one held."""
    try:
        config = view.check_runnable()
        plan = MemoryPlan.of(config, dtype, *budget, read_ahead=False)
        return model_from_view(view, cpu_backend(), dtype, memory=plan)
    except AprError as e:
        raise _CannotRun(f"{side} cannot be run: {e}") from None


def _explain(rep: LogitsReport, findings: list[TensorFinding], config: list[ConfigFinding],
             model_b: Model, va: ModelView, ids: Sequence[int], ra: Run) -> None:
    """First divergent stage, its culprit tensors, or a confirmed config culprit."""
    stage = next((s for s in rep.stages if s.rel_l2 > rep.tolerance), None)
    rep.first_divergent = stage.stage if stage else "logits (output projection)"
    rep.first_divergent_layer = stage.layer if stage else None
    rep.culprit_tensors = _culprit_tensors(stage, findings)
    keys = [c.key for c in config if c.defect and swappable(c.key, va.config, model_b.config)]
    if not rep.culprit_tensors and keys:
        rep.culprit_config = _confirm_config(model_b, va, keys, ids, ra, rep)
        rep.confirmed = bool(rep.culprit_config)
        if not rep.confirmed:
            rep.culprit_config = keys
    where = f"from {rep.first_divergent}"
    if rep.culprit_tensors:
        rep.message = f"logits diverge {where}: {', '.join(rep.culprit_tensors)}"
    elif rep.culprit_config:
        keys = ", ".join(rep.culprit_config)
        how = (f"confirmed: B re-run with A's {keys} matches A" if rep.confirmed
               else "not confirmed by re-running B with A's values")
        rep.message = f"logits diverge {where}; config {keys}, {how}"
    else:
        rep.message = f"logits diverge {where}; no tensor or config difference explains it"


def compare_logits(va: ModelView, vb: ModelView, ids: Sequence[int], dtype: Any,
                   findings: list[TensorFinding], config: list[ConfigFinding],
                   max_memory: str | None = None, progress: bool = False) -> LogitsReport:
    """Run both models on `ids` and compare (see the module notes). ``max_memory``: the
    budget of both models together (--max-memory; None: the default), half each."""
    tol = logit_tolerance(findings, dtype)
    rep = LogitsReport(ran=True, tokens=list(ids), dtype=np.dtype(dtype).name, tolerance=tol)
    rep.storage = [side_storage(va, findings, "a"), side_storage(vb, findings, "b")]
    bound = quantized_tolerance(*rep.storage)
    if bound is not None:
        rep.kl_tolerance, rep.top1_tolerance = bound
    budget, source = resolve_budget(max_memory)
    with np.errstate(all="ignore"):      # inf/nan weights: reported below, not as warnings
        return _compare_logits(rep, va, vb, ids, dtype, findings, config, tol,
                               (budget // 2, f"half of {source}"), progress)


def _compare_logits(rep: LogitsReport, va: ModelView, vb: ModelView, ids: Sequence[int], dtype: Any,
                    findings: list[TensorFinding], config: list[ConfigFinding], tol: float,
                    budget: tuple[int, str], progress: bool) -> LogitsReport:
    try:
        model_a = _build("A", va, dtype, budget)
        model_b = _build("B", vb, dtype, budget)
    except _CannotRun as e:
        return LogitsReport(ran=False, note=str(e), tokens=list(ids))
    rep.streamed = [side for side, m in (("A", model_a), ("B", model_b)) if m.streamed]
    ra, rb, rep.shared_stages = _lockstep(model_a, model_b, ids, progress,
                                          _shared_stages(va, vb, findings))
    _logit_metrics(rep, ra, rb)
    rep.stages = _stages(ra, rb)
    quantized = rep.kl_tolerance is not None
    if quantized and not rep.streamed and ra.logits.shape == rb.logits.shape:
        del model_a                     # the control takes its place in memory
        _control(rep, va, vb, (ra, rb), ids, dtype, budget)
    within_l2 = rep.rel_l2 <= tol and all(s.rel_l2 <= tol for s in rep.stages)
    within_kl = quantized and rep.kl_mean <= rep.kl_tolerance and rep.top1_agreement >= rep.top1_tolerance
    # a control measured on this pair decides alone; the table's rows (model-specific, see
    # LOGIT_MEASURED) only widen the rounding the tensors carry
    rep.agree = ra.logits.shape == rb.logits.shape and (
        within_kl if rep.control else (within_l2 or within_kl))
    kl = f"KL {rep.kl_mean:.3g}, top-1 {rep.top1_agreement:.0%}"
    if rep.control:
        kl = (f"KL {rep.kl_mean:.3g} (<= {rep.kl_tolerance:.3g}: {CONTROL_KL_MARGIN:g} x the "
              f"{rep.control_kl:.3g} of {rep.control}), top-1 {rep.top1_agreement:.0%} "
              f"(>= {rep.top1_tolerance:.0%})")
    elif quantized:
        kl = (f"KL {rep.kl_mean:.3g} (<= {rep.kl_tolerance:.3g} measured for "
              f"{' / '.join(dict.fromkeys(rep.storage))}), top-1 {rep.top1_agreement:.0%} "
              f"(>= {rep.top1_tolerance:.0%})")
    if rep.agree:
        rep.message = (f"logits agree: {kl}, max |Δ| {rep.max_abs:.3g}, rel L2 {rep.rel_l2:.3g}"
                       + (f" <= {tol:.3g}" if rep.rel_l2 <= tol else ""))
    else:
        _explain(rep, findings, config, model_b, va, ids, ra)
        rep.message += f" ({kl})"
        bad = [f"{side} {n} of {run.logits.size}" for side, run in (("A", ra), ("B", rb))
               if (n := int(run.logits.size - np.count_nonzero(np.isfinite(run.logits))))]
        if bad:
            rep.message += f" (inf/nan logits: {', '.join(bad)})"
    if ra.logits.shape != rb.logits.shape:
        rep.note = (f"vocabularies differ ({ra.logits.shape[-1]} vs {rb.logits.shape[-1]} logits): "
                    "compared on the common ids")
    return rep

