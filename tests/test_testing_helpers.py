"""kronfluence_bif.testing: threshold assertions, golden files, and fake kronfluence score folders."""

import json

import numpy as np
import pytest
import torch
from kronfluence import ScoreArguments
from kronfluence.score.pairwise import load_pairwise_scores
from kronfluence.score.self import load_self_scores
from safetensors import safe_open

from kronfluence_bif import storage
from kronfluence_bif.compare import Comparison
from kronfluence_bif.testing import (
    UPDATE_GOLDEN_ENV,
    assert_matches_golden,
    assert_scores_agree,
    write_score_folder,
)


@pytest.fixture()
def pair():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 50))
    return a, a + 0.2 * rng.normal(size=a.shape), rng.normal(size=a.shape)


# ---------------------------------------------------------------------------------------------- agreement
def test_assert_scores_agree_passes_and_returns_the_comparison(pair, tmp_path):
    a, close, _ = pair
    result = assert_scores_agree(a, close, min_spearman=0.9, min_topk_overlap=0.5, k=5)
    assert isinstance(result, Comparison) and result.mean_spearman > 0.9
    fa = write_score_folder(tmp_path / "scores_a", torch.tensor(a))
    fb = write_score_folder(tmp_path / "scores_b", torch.tensor(close))
    assert_scores_agree(fa, str(fb), min_spearman=0.9)
    assert_scores_agree(a, np.zeros_like(a), min_spearman=None)  # nothing checked


def test_assert_scores_agree_fails_with_measured_values_and_thresholds(pair):
    a, _, unrelated = pair
    with pytest.raises(AssertionError) as info:
        assert_scores_agree(a, unrelated, min_spearman=0.5, min_topk_overlap=0.6, k=5)
    message = str(info.value)
    assert "min_spearman=0.5" in message and "min_topk_overlap=0.6" in message
    assert "mean Spearman" in message and "below the threshold 0.5" in message
    assert "mean top-5 overlap" in message and "below the threshold 0.6" in message
    assert "metric (per query)" in message  # the table follows


def test_assert_scores_agree_only_topk(pair):
    a, close, _ = pair
    with pytest.raises(AssertionError, match="top-3 overlap .* below the threshold 1.0"):
        assert_scores_agree(a, close + np.random.default_rng(1).normal(size=a.shape), None, 1.0, k=3)


def test_assert_scores_agree_input_errors_are_value_errors(pair):
    a, close, _ = pair
    with pytest.raises(ValueError, match="shapes differ"):
        assert_scores_agree(a, close[:, 1:])
    with pytest.raises(ValueError, match="min_spearman"):
        assert_scores_agree(a, close, min_spearman=1.5)


# ---------------------------------------------------------------------------------------------- golden
def test_golden_is_written_when_missing_then_compared(pair, tmp_path, monkeypatch):
    monkeypatch.delenv(UPDATE_GOLDEN_ENV, raising=False)
    a, _, _ = pair
    golden = tmp_path / "golden" / "scores.safetensors"
    assert assert_matches_golden(torch.tensor(a, dtype=torch.float32), golden) is True
    with safe_open(str(golden), framework="np") as f:
        assert list(f.keys()) == [storage.ALL_MODULES] and f.get_tensor(storage.ALL_MODULES).dtype == np.float64
    assert assert_matches_golden(torch.tensor(a, dtype=torch.float32), golden) is False
    folder = write_score_folder(tmp_path / "scores_a", torch.tensor(a, dtype=torch.float32))
    assert assert_matches_golden(folder, golden) is False


def test_golden_mismatch_message_says_how_much_and_where(pair, tmp_path, monkeypatch):
    monkeypatch.delenv(UPDATE_GOLDEN_ENV, raising=False)
    a, _, _ = pair
    golden = tmp_path / "g.safetensors"
    assert_matches_golden(a, golden)
    changed = a.copy()
    changed[2, 7] += 0.5
    changed[4, 1] *= 1.001
    with pytest.raises(AssertionError) as info:
        assert_matches_golden(changed, golden, rtol=1e-5, atol=1e-8)
    message = str(info.value)
    assert "2 of 300 values differ beyond rtol=1e-05, atol=1e-08" in message
    assert "max abs diff 0.5 at index (2, 7)" in message
    assert "max rel diff" in message and UPDATE_GOLDEN_ENV in message
    assert_matches_golden(changed, golden, rtol=0.0, atol=0.6)  # within a looser tolerance
    with pytest.raises(AssertionError, match=r"shape \[6, 49\] do not match the golden shape \[6, 50\]"):
        assert_matches_golden(a[:, 1:], golden)


def test_golden_update_flag_and_environment_variable(pair, tmp_path, monkeypatch):
    monkeypatch.delenv(UPDATE_GOLDEN_ENV, raising=False)
    a, close, _ = pair
    golden = tmp_path / "g.safetensors"
    assert_matches_golden(a, golden)
    assert assert_matches_golden(close, golden, update=True) is True
    assert assert_matches_golden(close, golden) is False
    monkeypatch.setenv(UPDATE_GOLDEN_ENV, "1")
    assert assert_matches_golden(a, golden) is True
    monkeypatch.setenv(UPDATE_GOLDEN_ENV, "0")
    assert assert_matches_golden(a, golden) is False
    with pytest.raises(AssertionError):
        assert_matches_golden(close, golden)


def test_golden_nan_equal_self_scores_and_path_check(tmp_path, monkeypatch):
    monkeypatch.delenv(UPDATE_GOLDEN_ENV, raising=False)
    values = np.array([1.0, np.nan, 3.0])
    assert_matches_golden(values, tmp_path / "self.safetensors")
    assert assert_matches_golden(values.copy(), tmp_path / "self.safetensors") is False
    with pytest.raises(AssertionError, match="max abs diff inf at index \\(1,\\)"):
        assert_matches_golden(np.array([1.0, 2.0, 3.0]), tmp_path / "self.safetensors")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        assert_matches_golden(values, tmp_path / "golden.pt")


# ---------------------------------------------------------------------------------------------- fake folders
def test_write_score_folder_is_readable_by_kronfluence(tmp_path):
    scores = torch.randn(4, 9)
    folder = write_score_folder(tmp_path / "scores_x", scores)
    loaded = load_pairwise_scores(folder)[storage.ALL_MODULES]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, scores)
    ScoreArguments(**json.loads((folder / "score_arguments.json").read_text()))  # kronfluence's load_score_args
    with safe_open(str(storage.score_file(folder, "pairwise")), framework="pt") as f:
        assert f.metadata() == ScoreArguments().to_str_dict()
    assert json.loads((folder / "train_dataset_metadata.json").read_text()) == {
        "type": "TensorDataset",
        "dataset_size": 9,
        "indices": None,
    }
    assert json.loads((folder / "query_dataset_metadata.json").read_text())["dataset_size"] == 4
    assert (folder / "factor_arguments.json").exists()


def test_write_score_folder_self_and_dtype(tmp_path):
    folder = write_score_folder(
        tmp_path / "scores_self", np.arange(5.0), score_args=ScoreArguments(score_dtype=torch.float64)
    )
    loaded = load_self_scores(folder)[storage.ALL_MODULES]
    assert loaded.dtype == torch.float64 and loaded.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert not (folder / "query_dataset_metadata.json").exists()
    with pytest.raises(ValueError, match="`scores` must be"):
        write_score_folder(tmp_path / "bad", torch.zeros(1, 1, 1, 1))
