"""ZeRO-1 (`pretrain --zero 1`, `ref.zero`) under Open MPI on the CPU, in float64: the same
trajectory as the run without it (losses, final parameters, optimizer state), parameters
bit-identical on every rank, and checkpoints that resume with or without --zero; and the
one-line errors of a failing multi-rank run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from test_parallel import (MPIRUN, ONE_THREAD, ROOT, assert_same, common, corpus,  # noqa: F401
                           losses, pretrain, tensors)

WORKER = str(Path(__file__).resolve().parent / "mpi_worker.py")


def worker(mode: str, ranks: int, out: Path) -> None:
    import os
    r = subprocess.run([MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(ranks),
                        sys.executable, WORKER, mode, str(out)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **ONE_THREAD})
    assert r.returncode == 0, r.stderr[-3000:]


def test_sharded_steps_equal_the_plain_steps_on_three_ranks(tmp_path):
    """Three ranks, shards that begin and end inside parameters: ZeRO's parameters are
    bit-identical on every rank and equal the plain data-parallel ones (to float64 rounding); the state gathered to rank 0 is the
    whole state of a serial run; a ZeRO optimizer loaded halfway from a plain one's state
    ends where both do."""
    worker("zero", 3, tmp_path)
    ranks = [dict(np.load(tmp_path / f"zero-rank{r}.npz")) for r in range(3)]
    layouts = [json.loads((tmp_path / f"zero-rank{r}.json").read_text()) for r in range(3)]
    names = [k.split("/", 1)[1] for k in ranks[0] if k.startswith("zero/")]
    assert len(names) == 5
    cut = [p for lay in layouts for p in lay["pieces"]
           if p[1] != 0 or p[2] != int(np.prod(ranks[0]["zero/" + p[0]].shape))]
    assert cut, "no shard boundary falls inside a parameter: the test checks too little"
    # each rank holds a third of the state (padded block of 161 elements = 54, x2 arrays x8 B)
    assert sum(lay["state_bytes"] for lay in layouts) == 2 * 8 * 161
    for n in names:
        for r in range(3):
            assert ranks[r]["zero/" + n].tobytes() == ranks[0]["zero/" + n].tobytes(), (n, r)
        # (the reductions add in another order than the all-reduce's: equal to rounding)
        np.testing.assert_allclose(ranks[0]["zero/" + n], ranks[0]["plain/" + n], rtol=1e-12,
                                   err_msg=n)
        np.testing.assert_allclose(ranks[0]["zero/" + n], ranks[0]["serial/" + n], rtol=1e-12,
                                   err_msg=n)
        np.testing.assert_allclose(ranks[0]["resumed/" + n], ranks[0]["plain/" + n],
                                   rtol=1e-12, err_msg=n)
        for kind in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(ranks[0][f"state/{kind}.{n}"],
                                       ranks[0][f"serial_state/{kind}.{n}"], rtol=1e-12,
                                       atol=1e-300, err_msg=n)
    assert not any(k.startswith("state/") for k in ranks[1])
    # the parameters moved: a test of nothing would pass the equalities above too
    first = np.random.default_rng(0).standard_normal((13, 7))
    assert not np.allclose(ranks[0]["zero/model.embed_tokens.weight"], first)


def test_zero_follows_the_run_without_it(corpus, tmp_path):
    plain = pretrain(tmp_path, "plain", 2, *common(corpus, tmp_path / "plain", 2))
    assert plain.returncode == 0, plain.stderr
    zero = pretrain(tmp_path, "zero", 2, *common(corpus, tmp_path / "zero", 2), "--zero", "1")
    assert zero.returncode == 0, zero.stderr
    np.testing.assert_allclose(losses(tmp_path / "zero"), losses(tmp_path / "plain"), rtol=1e-12)
    a, b = tensors(tmp_path / "zero" / "ckpt" / "final.apr"), tensors(tmp_path / "plain" / "ckpt" / "final.apr")
    assert any(n.startswith("__training__.exp_avg_sq.") for n in a)   # the whole state, one file
    assert_same(a, b, rtol=1e-10)
    s_zero, s_plain = json.loads(zero.stdout), json.loads(plain.stdout)
    assert s_zero["optimizer_state_bytes"] * 2 >= s_plain["optimizer_state_bytes"]
    assert s_zero["optimizer_state_bytes"] < s_plain["optimizer_state_bytes"] * 0.51
    assert json.loads((tmp_path / "zero" / "run.json").read_text())["zero"] == 1


def test_resume_across_zero_and_rank_counts(corpus, tmp_path):
    full = pretrain(tmp_path, "full", 2, *common(corpus, tmp_path / "full", 2, steps=6))
    assert full.returncode == 0, full.stderr
    want = tensors(tmp_path / "full" / "ckpt" / "final.apr")
    # a checkpoint without ZeRO resumed with it, and one with ZeRO resumed without it
    for run, first, then in (("to-zero", "0", "1"), ("from-zero", "1", "0")):
        part = pretrain(tmp_path, run, 2, *common(corpus, tmp_path / run, 2, steps=6),
                        "--zero", first, "--stop-after", "2")
        assert part.returncode == 0, part.stderr
        resumed = pretrain(tmp_path, run, 2, "--resume", str(tmp_path / run), "--zero", then,
                           "-q", "--json")
        assert resumed.returncode == 0, resumed.stderr
        assert_same(tensors(tmp_path / run / "ckpt" / "final.apr"), want, rtol=1e-10)
    # a 2-rank ZeRO checkpoint resumed by 3 ranks under ZeRO (the shards are cut anew)
    three = pretrain(tmp_path, "to-zero", 3, "--resume",
                     str(tmp_path / "from-zero" / "ckpt" / "step-000002.apr"), "--zero", "1",
                     "--json")
    assert three.returncode == 0, three.stderr
    assert "global batch changes from 4 to 6" in three.stderr
    assert json.loads(three.stdout)["step"] == 6


def test_a_failing_run_prints_one_error_line_and_exits_2(corpus, tmp_path):
    args = common(corpus, tmp_path / "run", 2)
    args[args.index("--seq-length") + 1] = "100000"          # a gate every rank checks
    r = pretrain(tmp_path, "run", 2, *args, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "max_position_embeddings" in lines[0], r.stderr


def test_two_ranks_on_cuda_without_nccl_is_one_error_line(corpus, tmp_path):
    """No CuPy here: the NCCL path is refused with one line, before any training."""
    args = common(corpus, tmp_path / "run", 2)
    args[args.index("--device") + 1] = "cuda"
    r = pretrain(tmp_path, "run", 2, *args, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "need NCCL" in lines[0] and "--device cpu" in lines[0], r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank(corpus, tmp_path):
    """Rank 0 alone writes checkpoints; when that fails (best.apr is a directory here) the
    other ranks stop with it instead of waiting in the next step's collective."""
    part = pretrain(tmp_path, "run", 2, *common(corpus, tmp_path / "run", 2, steps=6),
                    "--zero", "1", "--stop-after", "2")
    assert part.returncode == 0, part.stderr
    (tmp_path / "run" / "ckpt" / "best.apr").unlink()
    (tmp_path / "run" / "ckpt" / "best.apr" / "x").mkdir(parents=True)
    # (the validation loss at step 4 improves on step 2's, so best.apr is written there)
    r = pretrain(tmp_path, "run", 2, "--resume", str(tmp_path / "run"), "-q", timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "best.apr" in lines[0], r.stderr
