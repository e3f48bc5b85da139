"""The GPU tests: run by bench/gpu_check.sh on a machine with an NVIDIA GPU and CuPy, never
by the default test run (tests/conftest.py leaves this directory out unless
APR_REF_GPU_TESTS=1). Without a usable GPU they fail; they never skip.

Every measured difference is also written to $APR_REF_GPU_REPORT (a JSON file) when set."""
from __future__ import annotations

import json
import os

import pytest

_REPORT: dict = {}


@pytest.fixture(scope="session")
def report():
    """A dict the tests put their measured numbers in (written at the end of the session)."""
    return _REPORT


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("APR_REF_GPU_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_REPORT, f, indent=1, default=float)


@pytest.fixture(scope="session")
def gpu():
    from ref.backend import get_backend
    return get_backend("cuda")        # an AprError naming the reason when there is no GPU
