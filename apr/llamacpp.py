"""llama.cpp as a consumer: load a GGUF and compute its logits in a child process
(llama-cpp-python). A GGML assert kills its process, and a load failure only says "Failed to
load model" while the reason is on llama.cpp's stderr, so the child's stderr is kept."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from .errors import AprError

_CHILD = textwrap.dedent("""
    import sys, json, numpy as np
    from llama_cpp import Llama
    path, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    llm = Llama(path, logits_all=True, type_k=0, type_v=0, n_ctx=max(64, len(ids)),
                n_batch=max(64, len(ids)), n_threads=int(sys.argv[4]), verbose=True, seed=0)
    llm.eval(ids)
    np.save(out, np.asarray(llm.scores[:len(ids)], dtype=np.float32))
""")


class LlamaCppError(AprError):
    """llama.cpp could not load or run a file; the message carries its own words."""


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _reason(stderr: str) -> str:
    """The line of llama.cpp's log that says why, else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "error loading model" in ln or "GGML_ASSERT" in ln or "error:" in ln.lower():
            return ln
    return lines[-1] if lines else "no output"


def llama_cpp_logits(gguf_path: str | os.PathLike, ids: list[int], threads: int = 2,
                     timeout: float = 600) -> np.ndarray:
    """F32 logits (len(ids), n_vocab) from llama.cpp with an F32 KV cache."""
    if not available():
        raise LlamaCppError("llama-cpp-python is not installed (pip install 'apr-ref[test]')")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.npy"
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(gguf_path), json.dumps(list(map(int, ids))),
                               str(out), str(threads)], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if proc.returncode != 0 or not out.exists():
            raise LlamaCppError(f"{gguf_path}: llama.cpp failed (exit {proc.returncode}): {_reason(proc.stderr)}")
        return np.load(out)


_QUANTIZE = textwrap.dedent("""
    import sys, llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
    params.nthread = int(sys.argv[4])
    sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
""")


def quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: str, threads: int = 2,
             timeout: float = 600) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize) on an F32/F16 GGUF, in a child
    process: ``ftype`` is llama.cpp's file type name without the prefix (Q8_0, Q4_K_M, ...)."""
    if not available():
        raise LlamaCppError("llama-cpp-python is not installed (pip install 'apr-ref[test]')")
    proc = subprocess.run([sys.executable, "-c", _QUANTIZE, str(src), str(dst), ftype, str(threads)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not Path(dst).exists():
        raise LlamaCppError(f"{src}: llama.cpp could not quantize to {ftype} "
                            f"(exit {proc.returncode}): {_reason(proc.stderr)}")
    return Path(dst)


_CHILD_MANY = textwrap.dedent("""
    import sys, json, numpy as np
    from llama_cpp import Llama
    jobs, ids, threads = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    for path, out in jobs:
        llm = Llama(path, logits_all=True, type_k=0, type_v=0, n_ctx=max(64, len(ids)),
                    n_batch=max(64, len(ids)), n_threads=threads, verbose=True, seed=0)
        llm.eval(ids)
        np.save(out, np.asarray(llm.scores[:len(ids)], dtype=np.float32))
        print("done", path, file=sys.stderr, flush=True)
        del llm
""")


def llama_cpp_logits_many(gguf_paths: list[str | os.PathLike], ids: list[int], threads: int = 2,
                          timeout: float = 600) -> list[np.ndarray]:
    """`llama_cpp_logits` of several files in one child process (llama.cpp's start-up paid
    once); a file llama.cpp cannot load fails the whole call, naming it."""
    if not available():
        raise LlamaCppError("llama-cpp-python is not installed (pip install 'apr-ref[test]')")
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(str(p), str(Path(tmp) / f"{i}.npy")) for i, p in enumerate(gguf_paths)]
        proc = subprocess.run([sys.executable, "-c", _CHILD_MANY, json.dumps(jobs),
                               json.dumps(list(map(int, ids))), str(threads)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        missing = [p for p, out in jobs if not Path(out).exists()]
        if proc.returncode != 0 or missing:
            where = missing[0] if missing else jobs[-1][0]
            raise LlamaCppError(f"{where}: llama.cpp failed (exit {proc.returncode}): {_reason(proc.stderr)}")
        return [np.load(out) for _, out in jobs]
