"""diff: compare two model files of any formats and name the defect class and the tensor.

    from diff import compare
    report = compare("model.apr", "model.gguf")      # DiffReport (dataclasses)
    print(report.diagnosis.line)                      # "DIAGNOSIS: equivalent — ..."

Tensors are aligned by canonical (HF) name and compared in HF layout (a format's known
layout, such as GGUF llama's rotary row order, is undone first), one tensor at a time, with
a tolerance derived from the two storage dtypes (diff/values.py). Every relation below is
recognized from the values (diff/detectors.py); names only label the findings. A tensor
that its own name's counterpart does not explain is then looked for among the other side's
tensors of its shape (diff/relations.py: SWAPPED, LAYERS REORDERED, MOVED).

Diagnosis classes — the first word(s) of the final `DIAGNOSIS:` line and `diagnosis.class`
in `--json`:

    equivalent          every tensor identical or equal within its dtype's rounding
                        (F16, BF16, Q8_0, APR_Q8, Q4_K, Q6_K, ...), same config and tokenizer,
                        logits agree. Known layouts (GGUF llama rotary order), an APR's tied
                        lm_head copy and a GGUF's unused pad tokens are equivalent.
    MISSING             a tensor in A is not in B, or one a side's config needs is missing
                        there ("B cannot be run", whatever the tensors present say)
    EXTRA               a tensor in B is not in A
    SHAPE               shapes differ in a way no layout explains
    NON-FINITE          a tensor holds inf or nan values where the other file's does not
    LAYOUT transposed   B holds A's transpose (square or not; with the reversed shape, or
                        the transpose's bytes under A's shape)
    LAYOUT rotary-permuted
                        Q/K rows in the other rotary order (halves <-> adjacent pairs),
                        permuted with a wrong head count, or permuted twice
    PADDING             rows padded or truncated (embedding / lm_head); common rows equal
    TIED                one side ties lm_head to the embedding and the other's lm_head is
                        not equal to it (or a side declares tied embeddings but stores an
                        lm_head that is not a copy of its embedding)
    LAYERS REORDERED    every tensor of B's layer i is A's layer p(i): the permutation p is
                        printed once ("in the order [0, 2, 1, 3]")
    SWAPPED             B's X is A's Y and B's Y is A's X (gate <-> up, q <-> k, two layers'
                        norms, ...), both named
    MOVED               B's X is A's Y, which is still in place (a copy under the wrong name)
    SHUFFLED            B's rows are A's rows in another order
    SCALED              B = s × A for a scalar s != 1
    VALUES CHANGED      B's values follow A's but differ beyond rounding: between two lossless
                        files any such difference (rel L2 <= 0.3), or beyond a lossy side's
                        noise bound; for a vector the pattern is named (all ones, zeroed,
                        A + 1 / A - 1: a norm's (1 + w) folded twice or not at all, a constant)
    UNRELATED           values unrelated (no relation above holds, to this or another tensor)
    QUANTIZATION noise  values differ beyond the rounding of the dtype a side was stored in (or
                        held before an up-cast), by at most 2x that dtype's tolerance: claimed
                        from the storage, never from the size of the difference alone
    CONFIG              a model config key differs (rope_theta, rms_norm_eps, heads, ...);
                        with identical tensors it shows only in the logits, which confirm it
                        by re-running B with A's value
    TOKENIZER           vocabulary, merges, bos/eos ids and add-BOS flag, the pre-tokenizer (a
                        GGUF without tokenizer.ggml.pre), a GGUF token count != embedding
                        rows; behaviour: a fixed probe set (code, Unicode, emoji, whitespace
                        runs, digits, special tokens) encoded by both, the first differing
                        string named; the chat template (its first changed lines, and a short
                        conversation rendered by both in Jinja2's sandbox in a child process)
    GENERATION          the ids generation stops at differ: eos_token_id (an int or a list) of
                        config.json and generation_config.json, a GGUF's eos/eot/eom ids, an
                        APR's tokenizer eos id (diff/generation.py); bos, pad and sampling
                        defaults that differ are notes (they change no logit)
    LOGITS              logits diverge and nothing above explains it

Per-tensor relations that are not defects: `identical`, `rounding` (within dtype rounding),
`tied-copy` (one side ties lm_head, the other stores an equal copy).

Exit codes of `apr-ref diff`: 0 equivalent, 1 a defect was found, 2 an input cannot be read.
"""
from __future__ import annotations

from .core import compare, diagnose
from .report import (CLASS_PRIORITY, ConfigFinding, Diagnosis, DiffReport, LogitsReport,
                     PairStats, StageDelta, TensorFinding, TokenizerFinding)

__all__ = ["compare", "diagnose", "DiffReport", "TensorFinding", "ConfigFinding",
           "TokenizerFinding", "LogitsReport", "StageDelta", "PairStats", "Diagnosis",
           "CLASS_PRIORITY"]
