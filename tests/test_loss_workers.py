"""`Model.loss_and_grads(workers=N)`: the batch's rows in N threads (single-threaded BLAS) must
give the loss and gradients of the plain single-call path, which stays the reference."""
from __future__ import annotations

import numpy as np
import pytest

from apr.config import ModelConfig
from apr.errors import AprError
from ref import backend
from ref.model import Model
from ref.ops import IGNORE_INDEX

VOCAB, T = 61, 12



def blas_threads() -> list[int]:
    """The thread count of every BLAS loaded in the process, as threadpoolctl reads it."""
    from threadpoolctl import threadpool_info
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_numpys_blas_threads_can_be_set():
    """The tests below run the threaded path only where the BLAS's thread count can be set,
    which NumPy's wheels (OpenBLAS) allow; a BLAS that does not would run one worker."""
    assert backend.blas_threads_settable() and blas_threads()


def small_model(dtype=np.float64, tied=True) -> Model:
    cfg = ModelConfig("qwen2", 32, 2, 4, 2, 48, VOCAB, max_position_embeddings=64,
                      tie_word_embeddings=tied, attention_bias=True)
    model = Model.init_random(cfg, seed=0, dtype=dtype)
    rng = np.random.default_rng(1)
    for name, p in model.params.items():     # every parameter non-negligible
        scale = 0.2 if p.ndim == 1 else 1.0 / np.sqrt(p.shape[-1])
        p[...] = (p if name.endswith("norm.weight") else 0) + rng.normal(0, scale, p.shape)
    return model


def batch(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (rows, T))
    targets = rng.integers(0, VOCAB, (rows, T))
    targets[0, 3:] = IGNORE_INDEX            # the rows hold different numbers of targets,
    targets[-1, ::2] = IGNORE_INDEX          # so the shards' losses weigh differently
    return ids, targets


def assert_same(a: tuple, b: tuple, rtol: float) -> None:
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, rel=rtol, abs=0)
    assert ga.keys() == gb.keys()
    for name in ga:
        err = float(np.abs(ga[name] - gb[name]).max() / np.abs(gb[name]).max())
        assert err < rtol, (name, err)


@pytest.mark.parametrize("rows,workers", [(5, 2), (5, 3), (4, 4), (3, 8)])
def test_workers_give_the_single_call_values(rows, workers, monkeypatch):
    model = small_model()
    ids, targets = batch(rows)
    plain = model.loss_and_grads(ids, targets)
    shards = []
    inner = Model._loss_and_grads

    def spy(self, ids_, *args):
        shards.append(len(ids_))
        return inner(self, ids_, *args)

    monkeypatch.setattr(Model, "_loss_and_grads", spy)
    threaded = model.loss_and_grads(ids, targets, workers=workers)
    assert sorted(shards) == sorted(np.diff(np.linspace(0, rows, min(rows, workers) + 1).round()))
    assert_same(threaded, plain, 1e-12)


def test_workers_float32_untied():
    model = small_model(np.float32, tied=False)
    ids, targets = batch(6, seed=3)
    assert_same(model.loss_and_grads(ids, targets, workers=2), model.loss_and_grads(ids, targets), 1e-5)


def test_a_shard_with_no_targets_adds_nothing():
    model = small_model()
    ids, targets = batch(6)
    targets[:3] = IGNORE_INDEX               # the first of two shards predicts nothing
    assert_same(model.loss_and_grads(ids, targets, workers=2), model.loss_and_grads(ids, targets), 1e-12)


def test_the_weighting_is_what_is_checked():
    """The plain mean of the shards' losses (each shard's rows weighing alike) differs from
    the batch mean here, so a wrong combination would fail the tests above."""
    model = small_model()
    ids, targets = batch(5)
    plain, _ = model.loss_and_grads(ids, targets)
    halves = [model.loss_and_grads(ids[a:b], targets[a:b])[0] for a, b in ((0, 2), (2, 5))]
    assert abs(np.mean(halves) - plain) > 1e-6 * abs(plain)


def test_errors_and_blas_threads_are_as_without_workers():
    model = small_model()
    ids, targets = batch(4)
    before = blas_threads()
    with pytest.raises(ValueError, match="every target is ignore_index"):
        model.loss_and_grads(ids, np.full_like(targets, IGNORE_INDEX), workers=2)
    bad = ids.copy()
    bad[3, 0] = VOCAB                        # in the second shard
    with pytest.raises(AprError, match="out of range"):
        model.loss_and_grads(bad, targets, workers=2)
    bad_t = targets.copy()
    bad_t[2, 1] = VOCAB
    with pytest.raises(ValueError, match="target ids must lie"):
        model.loss_and_grads(ids, bad_t, workers=2)
    model.loss_and_grads(ids, targets, workers=2)
    assert blas_threads() == before


def test_single_threaded_blas_nests_and_restores():
    import threadpoolctl
    before = blas_threads()
    with threadpoolctl.threadpool_limits(2, user_api="blas"):   # more than one, to see the change
        with backend.single_threaded_blas():
            assert set(blas_threads()) == {1}
            with backend.single_threaded_blas():
                assert set(blas_threads()) == {1}
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {2}
    assert blas_threads() == before
