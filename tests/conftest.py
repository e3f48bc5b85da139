"""Shared fixtures. Oracles (transformers, llama.cpp and its source tree) are required:
a missing one fails the run, it never skips."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# tests/gpu needs an NVIDIA GPU and CuPy: bench/gpu_check.sh runs it with APR_REF_GPU_TESTS=1
collect_ignore = [] if os.environ.get("APR_REF_GPU_TESTS") == "1" else ["gpu"]
CACHE = Path(os.environ.get("APR_REF_CACHE", Path.home() / ".cache" / "apr-ref"))


def llama_cpp_source_dir() -> Path:
    """The llama.cpp tree shipped in the llama-cpp-python source distribution
    (models/ggml-vocab-*.gguf with .inp/.out vectors, convert_hf_to_gguf.py, gguf-py).
    Downloaded once into the cache with pip; the test run fails if that is impossible."""
    env = os.environ.get("APR_REF_LLAMA_CPP_SRC")
    if env:
        return Path(env)
    root = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    tree = root / "vendor" / "llama.cpp"
    if (tree / "conversion" / "base.py").exists() and (tree / "models").is_dir():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(CACHE)],
            check=True, stdout=subprocess.DEVNULL)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    wanted = (prefix + "models/", prefix + "gguf-py/", prefix + "conversion/",
              prefix + "convert_hf_to_gguf.py")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        tar.extractall(CACHE, members=members, filter="data")
    return tree


@pytest.fixture(scope="session")
def llama_cpp_src() -> Path:
    return llama_cpp_source_dir()
