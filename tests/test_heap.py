"""`heap.frozen_heap`: sampling leaves the heap alive at its start out of the collector's scans, then restores it."""

from __future__ import annotations

import gc
from typing import List

import pytest
from conftest import PIN_ARGS

from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, prepare_model
from kronfluence_bif.heap import frozen_heap


def _scanned(obj: object) -> bool:
    """Whether `obj` sits in a generation the collector scans (not the permanent, frozen one)."""
    return any(o is obj for g in range(3) for o in gc.get_objects(generation=g))


@pytest.fixture()
def unfrozen():
    """The heap as in a user's process: nothing frozen (conftest freezes it per module; restored after)."""
    gc.unfreeze()
    yield
    gc.freeze()


def test_frozen_within_and_restored_after(unfrozen):
    assert gc.get_freeze_count() == 0
    alive: List[int] = []
    assert _scanned(alive)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        assert not _scanned(alive)
    assert gc.get_freeze_count() == 0
    assert _scanned(alive)


def test_restored_when_the_block_raises(unfrozen):
    with pytest.raises(KeyError):
        with frozen_heap():
            raise KeyError("x")
    assert gc.get_freeze_count() == 0


def test_a_caller_freeze_or_disabled_collector_is_left_alone():
    alive: List[int] = []
    gc.freeze()  # as a forking server (or conftest) does
    assert not _scanned(alive)
    with frozen_heap():
        pass
    # Not unfrozen by the package. (The freeze count itself is no witness: frozen objects that die while the
    # block runs leave the permanent generation, so the count can drop by a few without any unfreeze.)
    assert gc.get_freeze_count() > 0 and not _scanned(alive)
    gc.unfreeze()
    gc.disable()
    try:
        with frozen_heap():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()
        gc.freeze()


def test_sampling_runs_on_the_frozen_heap(unfrozen, tmp_path, trained_mlp, small_data):
    seen: List[int] = []

    class Recording(RegressionTask):
        def compute_per_example_measurement(self, batch, model):
            seen.append(gc.get_freeze_count())
            return super().compute_per_example_measurement(batch, model)

    task = Recording()
    model = prepare_model(trained_mlp, task)
    train, query = small_data
    analyzer = Analyzer("h", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=BIFArguments(**PIN_ARGS))
    analyzer.compute_pairwise_scores("s", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=4)
    draws = PIN_ARGS["num_chains"] * PIN_ARGS["num_draws"]
    assert sum(count > 0 for count in seen) >= draws + 1  # every draw and the values at w*
    assert all(count > 0 for count in seen[-draws:])
    assert gc.get_freeze_count() == 0
