"""LDS: kronfluence's sign on an additive model with known scores, scipy agreement, resumable retraining."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.stats import spearmanr

from kronfluence_bif import storage
from kronfluence_bif.lds import (
    draw_subset_masks,
    linear_datamodeling_score,
    predict_subset_measurements,
    retrain_subsets,
)
from kronfluence_bif.testing import write_score_folder

N_TRAIN, N_QUERY, N_SUBSETS = 60, 5, 40


def additive_world(seed=0, noise=0.05):
    """True scores s [n_query, n_train] and a 'retraining' whose query loss is -sum of s over kept examples + noise.

    Under kronfluence's sign a positive score helps (keeping the example lowers the loss), so the true scores
    must give LDS near +1 and their negatives near -1.
    """
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(N_QUERY, N_TRAIN))

    def train_fn(indices):
        return -scores[:, indices].sum(axis=1) + noise * rng.normal(size=N_QUERY)

    return scores, train_fn


def test_true_scores_give_lds_near_one_and_negated_near_minus_one():
    scores, train_fn = additive_world()
    masks, measurements = retrain_subsets(train_fn, N_TRAIN, N_SUBSETS, seed=1, disable_tqdm=True)
    good = linear_datamodeling_score(scores, masks, measurements)
    bad = linear_datamodeling_score(-scores, masks, measurements)
    assert good.mean > 0.95 and (good.per_query > 0.9).all()
    assert bad.mean < -0.95
    random = linear_datamodeling_score(np.random.default_rng(2).normal(size=scores.shape), masks, measurements)
    assert abs(random.mean) < 0.4
    assert good.n_subsets == N_SUBSETS and good.n_excluded == 0
    assert "LDS" in str(good) and good.to_dict()["mean"] == pytest.approx(good.mean)


def test_prediction_sign_and_per_query_spearman_match_scipy():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(3, 12))
    masks = rng.random((10, 12)) < 0.5
    measured = rng.normal(size=(10, 3))
    prediction = predict_subset_measurements(scores, masks)
    np.testing.assert_allclose(prediction, -(masks.astype(float) @ scores.T))
    result = linear_datamodeling_score(torch.tensor(scores), torch.tensor(masks.astype(np.int64)), measured)
    expected = [spearmanr(prediction[:, q], measured[:, q]).statistic for q in range(3)]
    np.testing.assert_allclose(result.per_query, expected, atol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected))


def test_scores_from_a_folder(tmp_path):
    scores, train_fn = additive_world(seed=4)
    folder = write_score_folder(tmp_path / "scores_true", torch.tensor(scores, dtype=torch.float32))
    masks, measurements = retrain_subsets(train_fn, N_TRAIN, 20, seed=0, disable_tqdm=True)
    assert linear_datamodeling_score(folder, masks, measurements).mean > 0.9


def test_constant_measurement_is_excluded_with_a_count():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(3, 10))
    masks = rng.random((8, 10)) < 0.5
    measured = rng.normal(size=(8, 3))
    measured[:, 1] = 4.0
    result = linear_datamodeling_score(scores, masks, measured)
    assert np.isnan(result.per_query[1]) and result.n_excluded == 1
    assert result.mean == pytest.approx(np.nanmean(result.per_query))


def test_input_errors_name_the_argument():
    scores = np.zeros((2, 6))
    masks = np.ones((5, 6), dtype=bool)
    with pytest.raises(ValueError, match="`masks` has 5 columns but `scores` has 6"):
        linear_datamodeling_score(scores, masks[:, :5], np.zeros((5, 2)))
    with pytest.raises(ValueError, match="boolean or 0/1"):
        linear_datamodeling_score(scores, masks * 2, np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"`measurements` must be \[n_subsets, n_query\] = \[5, 2\]"):
        linear_datamodeling_score(scores, masks, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="at least 3 subsets"):
        linear_datamodeling_score(scores, masks[:2], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="self scores cannot predict"):
        linear_datamodeling_score(np.zeros(6), masks, np.zeros((5, 2)))


# ---------------------------------------------------------------------------------------------- retraining
def test_masks_have_the_requested_size_and_indices_match():
    seen = []
    masks, measured = retrain_subsets(
        lambda idx: seen.append(idx) or np.arange(3.0), 11, 6, fraction=0.3, seed=7, disable_tqdm=True
    )
    assert masks.dtype == bool and masks.shape == (6, 11) and (masks.sum(1) == round(0.3 * 11)).all()
    for mask, indices in zip(masks, seen):
        assert indices.dtype == np.int64
        np.testing.assert_array_equal(indices, np.flatnonzero(mask))
    np.testing.assert_array_equal(measured, np.tile(np.arange(3.0), (6, 1)))
    np.testing.assert_array_equal(masks, draw_subset_masks(11, 6, 0.3, 7))
    assert not np.array_equal(masks, draw_subset_masks(11, 6, 0.3, 8))


class Interrupted(RuntimeError):
    pass


def test_resumes_after_an_interruption(tmp_path):
    cache = tmp_path / "retrains.safetensors"
    scores, _ = additive_world(seed=6)
    calls = []

    def train_fn(indices, fail_after=None):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted("killed")
        calls.append(indices)
        return -scores[:, indices].sum(axis=1)

    with pytest.raises(Interrupted):
        retrain_subsets(
            lambda idx: train_fn(idx, fail_after=4), N_TRAIN, 10, seed=3, cache_path=cache, disable_tqdm=True
        )
    assert len(calls) == 4
    with safe_open(str(cache), framework="np") as f:  # safetensors, no pickle; saved after every retrain
        assert f.get_tensor("measurements").shape == (4, N_QUERY)
    masks, measured = retrain_subsets(train_fn, N_TRAIN, 10, seed=3, cache_path=cache, disable_tqdm=True)
    assert len(calls) == 10
    np.testing.assert_array_equal(np.stack([np.flatnonzero(m) for m in masks]), np.stack(calls))
    fresh_masks, fresh = retrain_subsets(
        lambda idx: -scores[:, idx].sum(axis=1), N_TRAIN, 10, seed=3, disable_tqdm=True
    )
    np.testing.assert_array_equal(masks, fresh_masks)
    np.testing.assert_allclose(measured, fresh)
    again = retrain_subsets(
        lambda idx: pytest.fail("a finished cache must not retrain"), N_TRAIN, 10, seed=3, cache_path=cache
    )
    np.testing.assert_array_equal(again.measurements, measured)


@pytest.mark.parametrize(
    "change",
    [{"n_train": N_TRAIN + 1}, {"n_subsets": 11}, {"fraction": 0.4}, {"seed": 4}],
)
def test_other_settings_refuse_the_cache(tmp_path, change):
    cache = tmp_path / "retrains.safetensors"
    settings = {"n_train": N_TRAIN, "n_subsets": 10, "fraction": 0.5, "seed": 3}
    retrain_subsets(lambda idx: np.zeros(2), cache_path=cache, disable_tqdm=True, **{**settings, "n_subsets": 2})
    settings["n_subsets"] = 2
    with pytest.raises(ValueError, match=f"other settings.*{next(iter(change))}.*same n_train"):
        retrain_subsets(lambda idx: np.zeros(2), cache_path=cache, disable_tqdm=True, **{**settings, **change})


def test_train_fn_output_is_checked_and_earlier_results_kept(tmp_path):
    cache = tmp_path / "c.safetensors"
    outputs = iter([np.zeros(3), np.zeros(2)])
    with pytest.raises(ValueError, match="returned 2 measurements for subset 1, but earlier subsets had 3"):
        retrain_subsets(lambda idx: next(outputs), 8, 4, cache_path=cache, disable_tqdm=True)
    with pytest.raises(ValueError, match="NaN/inf measurements for subset 1"):
        retrain_subsets(lambda idx: np.full(3, np.nan), 8, 4, cache_path=cache, disable_tqdm=True)
    with safe_open(str(cache), framework="np") as f:
        assert f.get_tensor("measurements").shape == (1, 3)
    with pytest.raises(ValueError, match="1-D array"):
        retrain_subsets(lambda idx: np.zeros((2, 2)), 8, 4, disable_tqdm=True)


def test_argument_validation(tmp_path):
    fn = lambda idx: np.zeros(1)  # noqa: E731
    with pytest.raises(ValueError, match="`n_train` must be an integer >= 2"):
        retrain_subsets(fn, 1, 3)
    with pytest.raises(ValueError, match="`n_subsets` must be an integer >= 1"):
        retrain_subsets(fn, 10, 0)
    with pytest.raises(ValueError, match=r"`fraction` must be in \(0, 1\)"):
        retrain_subsets(fn, 10, 3, fraction=1.0)
    with pytest.raises(ValueError, match="keeps 0 of n_train=10"):
        retrain_subsets(fn, 10, 3, fraction=0.01)
    with pytest.raises(ValueError, match="`train_fn` must be a callable"):
        retrain_subsets(None, 10, 3)
    other = tmp_path / "scores.safetensors"
    storage.save_tensors(other, {"all_modules": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a retrain_subsets cache"):
        retrain_subsets(fn, 10, 3, cache_path=other)
