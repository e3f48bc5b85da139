"""The findings of a diff, as dataclasses. The library fills them; the CLI only formats them
(text table or `DiffReport.to_json()`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------- vocabulary
# Diagnosis classes (see diff/__init__.py for what each means).
EQUIVALENT = "equivalent"
MISSING = "MISSING"
EXTRA = "EXTRA"
SHAPE = "SHAPE"
NONFINITE = "NON-FINITE"
TRANSPOSED = "LAYOUT transposed"
ROTARY = "LAYOUT rotary-permuted"
PADDING = "PADDING"
TIED = "TIED"
SHUFFLED = "SHUFFLED"
LAYERS_REORDERED = "LAYERS REORDERED"
SWAPPED = "SWAPPED"
MOVED = "MOVED"
SCALED = "SCALED"
VALUES_CHANGED = "VALUES CHANGED"
UNRELATED = "UNRELATED"
NOISE = "QUANTIZATION noise"
CONFIG = "CONFIG"
GENERATION = "GENERATION"
TOKENIZER = "TOKENIZER"
LOGITS = "LOGITS"

# When several defects are found, the diagnosis names the first class in this order (the
# most structural first); a culprit the logits localized goes in front of all of them.
CLASS_PRIORITY: tuple[str, ...] = (MISSING, EXTRA, NONFINITE, LAYERS_REORDERED, SWAPPED, MOVED,
                                   SHAPE, TRANSPOSED, ROTARY, PADDING, TIED, SHUFFLED, SCALED,
                                   VALUES_CHANGED, UNRELATED, NOISE, CONFIG, TOKENIZER, GENERATION,
                                   LOGITS)

# Per-tensor relations that are not defects.
IDENTICAL = "identical"
ROUNDING = "rounding"          # equal within the lower-precision dtype's rounding
TIED_COPY = "tied-copy"        # one side ties lm_head, the other stores an equal copy
BENIGN_RELATIONS = (IDENTICAL, ROUNDING, TIED_COPY)


@dataclass
class PairStats:
    """Value statistics of B against A over the aligned elements (after layouts are undone)."""
    max_abs: float = 0.0           # max |b - a|
    mean_abs: float = 0.0          # mean |b - a|
    rmse: float = 0.0              # sqrt(mean (b - a)^2)
    cosine: float = 1.0            # <a, b> / (|a| |b|)
    rel_l2: float = 0.0            # |b - a| / max(|a|, |b|)
    scale: float = 1.0             # s minimizing |b - s a|
    max_value: float = 0.0         # largest |value| on either side
    identical: bool = True         # every value equal
    nonfinite_a: int = 0           # inf / nan values in A (the other fields cover the
    nonfinite_b: int = 0           # elements finite on both sides)


@dataclass
class TensorFinding:
    """How tensor `name` in B relates to the same tensor in A."""
    name: str
    relation: str                  # identical, rounding, transposed, rotary-permuted, padded, ...
    defect: str | None             # diagnosis class, None when the pair is equivalent
    message: str
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None
    tolerance: float | None = None  # relative L2 allowed by the dtypes
    stats: PairStats | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    # the dtypes whose rounding bounds each side (the stored one, or the lossy dtype an earlier
    # conversion dequantized it from)
    precision_a: str | None = None
    precision_b: str | None = None


@dataclass
class ConfigFinding:
    """A model config key on which the two files disagree (or a generation setting: defect
    GENERATION)."""
    key: str
    a: Any
    b: Any
    defect: str | None = CONFIG     # None when another finding explains it (e.g. PADDING)
    message: str = ""


@dataclass
class TokenizerFinding:
    """One way the embedded tokenizers (or a tokenizer and its embedding) disagree."""
    what: str                       # vocab, merges, bos_token_id, token_count, missing, ...
    message: str
    defect: str | None = TOKENIZER


@dataclass
class StageDelta:
    """Hidden states of one stage (embeddings, layer i, final norm) of B against A."""
    stage: str                      # "embeddings", "layer 3", "final norm"
    layer: int | None               # decoder layer index, None for embeddings / final norm
    rel_l2: float
    max_abs: float


@dataclass
class LogitsReport:
    """Both reference models run on the same token ids."""
    ran: bool
    note: str = ""                  # why it did not run, or how it ran
    tokens: list[int] = field(default_factory=list)
    dtype: str = ""
    tolerance: float = 0.0          # relative L2 of logits / hidden states allowed
    max_abs: float = 0.0
    rel_l2: float = 0.0
    kl_mean: float = 0.0            # mean over positions of KL(softmax A || softmax B)
    kl_max: float = 0.0
    top1_agreement: float = 1.0
    agree: bool = True
    stages: list[StageDelta] = field(default_factory=list)
    first_divergent: str | None = None      # stage name
    first_divergent_layer: int | None = None
    culprit_tensors: list[str] = field(default_factory=list)
    culprit_config: list[str] = field(default_factory=list)
    confirmed: bool = False         # re-running B with A's config values makes them agree
    message: str = ""
    streamed: list[str] = field(default_factory=list)   # sides whose weights were read a layer at a time
    storage: list[str] = field(default_factory=list)    # each side's lossiest storage rounding
    kl_tolerance: float | None = None       # KL allowed (a lossy side: measured), else None
    top1_tolerance: float | None = None     # top-1 agreement required, with it
    control: str | None = None              # what the bounds were measured on ("A rounded as B stores it")
    control_kl: float | None = None         # KL and top-1 of that control against its source
    control_top1: float | None = None
    shared_stages: int = 0          # B's stages with A's weights and input: A's output taken


@dataclass
class Diagnosis:
    cls: str                         # one of the classes above
    tensors: list[str]
    message: str
    keys: list[str] = field(default_factory=list)   # config keys / tokenizer fields named

    @property
    def line(self) -> str:
        return f"DIAGNOSIS: {self.message}"


@dataclass
class FileSummary:
    path: str
    format: str
    tensors: int
    dtypes: dict[str, int]
    config: dict[str, Any] | None
    tokenizer: str                  # "400 tokens, 292 merges" or "none"


@dataclass
class DiffReport:
    a: FileSummary
    b: FileSummary
    tensors: list[TensorFinding]
    config: list[ConfigFinding]
    tokenizer: list[TokenizerFinding]
    logits: LogitsReport
    diagnosis: Diagnosis
    notes: list[str] = field(default_factory=list)
    metadata_only: list[str] = field(default_factory=list)  # other differing keys (not defects)
    timings: dict[str, float] = field(default_factory=dict)  # seconds; answers_ahead: a count

    @property
    def equivalent(self) -> bool:
        return self.diagnosis.cls == EQUIVALENT

    @property
    def defects(self) -> list[TensorFinding]:
        return [t for t in self.tensors if t.defect]

    def to_json(self) -> dict[str, Any]:
        d = _clean(dataclasses.asdict(self))
        d["diagnosis"] = {"class": self.diagnosis.cls, "tensors": self.diagnosis.tensors,
                          "keys": self.diagnosis.keys, "message": self.diagnosis.message,
                          "line": self.diagnosis.line}
        d["equivalent"] = self.equivalent
        return d


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become strings, tuples lists, numpy scalars Python."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
