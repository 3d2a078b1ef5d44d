"""The one owner of process state, rank-0-only logging, and the warning for BIF arguments a kronfluence fit ignores."""

from __future__ import annotations

import logging

import pytest
from conftest import PlainRegressionTask

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.distributed import ProcessState, process_state
from kronfluence_bif.logs import logger, set_main_process_only


def test_every_caller_gets_the_same_process_state(trained_mlp):
    assert process_state() is process_state(trained_mlp) is ProcessState.local()
    assert not process_state().distributed and process_state().is_main_process


def test_the_logger_speaks_on_rank_zero_only(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="kronfluence_bif")
    monkeypatch.setenv("RANK", "1")
    logger.warning("a warning every rank would repeat")
    logger.error("a failure")
    assert [r.getMessage() for r in caplog.records] == ["[rank 1] a failure"]
    caplog.clear()
    set_main_process_only(False)  # kronfluence's Analyzer(log_main_process_only=False)
    try:
        logger.warning("now every rank speaks")
    finally:
        set_main_process_only(True)
    assert [r.getMessage() for r in caplog.records] == ["now every rank speaks"]
    caplog.clear()
    monkeypatch.setenv("RANK", "0")
    logger.warning("rank 0 speaks")
    assert [r.getMessage() for r in caplog.records] == ["rank 0 speaks"]


def test_bif_args_given_to_a_kronfluence_fit_are_warned_about(tmp_path, trained_mlp, small_data, caplog):
    train, _ = small_data
    task = PlainRegressionTask()
    analyzer = Analyzer(
        "w", prepare_model(trained_mlp, task), task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True
    )
    with caplog.at_level(logging.WARNING, logger="kronfluence_bif"):
        analyzer.fit_all_factors("f", dataset=train, bif_args=BIFArguments(num_draws=10))
    assert any("`bif_args` were passed to a fit with strategy 'ekfac'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("flag", [True, False])
def test_analyzer_sets_the_main_process_only_flag(tmp_path, trained_mlp, flag):
    from kronfluence_bif.logs import _MAIN_ONLY

    task = PlainRegressionTask()
    Analyzer(
        "f", prepare_model(trained_mlp, task), task, cpu=True, output_dir=str(tmp_path), log_main_process_only=flag
    )
    try:
        assert _MAIN_ONLY.enabled is flag
    finally:
        set_main_process_only(True)
