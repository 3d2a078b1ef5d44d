"""compare: every metric against scipy or hand-computed values, ties, constant rows, folders and refusals."""

import json
import logging

import numpy as np
import pytest
import torch
from kronfluence import ScoreArguments
from scipy.stats import pearsonr, rankdata, spearmanr

from kronfluence_bif import compare as compare_module
from kronfluence_bif import storage
from kronfluence_bif.compare import compare, load_scores, pearson_rows, rank_rows, spearman_rows
from kronfluence_bif.testing import write_score_folder


def _scipy_spearman(a, b):
    return np.array([spearmanr(x, y).statistic for x, y in zip(a, b)])


def _noisy_pair(n_query=6, n_train=40, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_query, n_train))
    return a, a + noise * rng.normal(size=(n_query, n_train))


# ---------------------------------------------------------------------------------------------- row metrics
def test_rank_rows_averages_ties_like_scipy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(9, 25)).astype(float)  # many ties
    x[3] = 2.0  # a constant row: every rank is (n + 1) / 2
    np.testing.assert_array_equal(rank_rows(x), rankdata(x, axis=1))
    np.testing.assert_array_equal(rank_rows(torch.tensor([3.0, 1.0, 3.0, 2.0])), [[3.5, 1.0, 3.5, 2.0]])


def test_spearman_and_pearson_rows_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, size=(8, 30)).astype(float)
    b = a + rng.integers(-2, 3, size=(8, 30))
    np.testing.assert_allclose(spearman_rows(a, b), _scipy_spearman(a, b), atol=1e-12)
    expected = np.array([pearsonr(x, y).statistic for x, y in zip(a, b)])
    np.testing.assert_allclose(pearson_rows(a, b), expected, atol=1e-12)


def test_constant_and_nonfinite_rows_give_nan():
    a, b = _noisy_pair()
    a[1] = 0.1  # constant in A, the float mean of which is not exactly 0.1
    b[2] = -3.0
    a[4, 7] = np.nan
    rho = spearman_rows(a, b)
    assert np.isnan(rho[[1, 2, 4]]).all()
    assert not np.isnan(rho[[0, 3, 5]]).any()
    assert np.isnan(pearson_rows(a, b)[[1, 2, 4]]).all()


# ---------------------------------------------------------------------------------------------- compare
def test_hand_computed_metrics():
    # Train examples 0..5. A ranks 0 > 1 > 2 > 3 > 4 > 5; B swaps 1 and 3 and flips the sign of 4.
    a = np.array([[5.0, 4.0, 3.0, 2.0, -1.0, -6.0]])
    b = np.array([[5.0, 2.0, 3.0, 4.0, 1.0, -6.0]])
    result = compare(a, b, k=2)
    # Top-2 most helpful: A {0, 1}, B {0, 3} -> 1/2. Most harmful (k most negative): A {5, 4}, B {5, 4} -> 1.
    assert result.topk_overlap[0] == 0.5
    assert result.bottomk_overlap[0] == 1.0
    # Signs: only example 4 differs -> 5/6. Top-2 of A by |score|: {5, 0}, both agree -> 1.
    assert result.sign_agreement[0] == pytest.approx(5 / 6)
    assert result.topk_sign_agreement[0] == 1.0
    # Spearman: rank differences d = (0, 2, 0, -2, 0, 0) -> 1 - 6 * 8 / (6 * 35).
    assert result.spearman[0] == pytest.approx(1 - 6 * 8 / (6 * 35))
    assert result.pearson[0] == pytest.approx(pearsonr(a[0], b[0]).statistic)
    assert result.kind == "pairwise" and result.n_query == 1 and result.n_train == 6 and result.k == 2


def test_topk_overlap_matches_set_reference_and_summaries():
    a, b = _noisy_pair(n_query=12, n_train=80, noise=1.0, seed=2)
    k = 7
    result = compare(a, b, k=k)
    top = [len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / k for x, y in zip(a, b)]
    low = [len(set(np.argsort(x)[:k]) & set(np.argsort(y)[:k])) / k for x, y in zip(a, b)]
    np.testing.assert_allclose(result.topk_overlap, top)
    np.testing.assert_allclose(result.bottomk_overlap, low)
    np.testing.assert_allclose(result.spearman, _scipy_spearman(a, b), atol=1e-12)
    strongest = np.argsort(-np.abs(a), axis=1)[:, :k]
    same = np.take_along_axis(np.sign(a) == np.sign(b), strongest, axis=1).mean(1)
    np.testing.assert_allclose(result.topk_sign_agreement, same)
    summary = result.summary["spearman"]
    assert summary["mean"] == pytest.approx(result.spearman.mean())
    assert summary["median"] == pytest.approx(np.median(result.spearman))
    assert summary["min"] == pytest.approx(result.spearman.min())
    assert summary["n_excluded"] == 0
    assert result.mean_spearman == summary["mean"]
    assert result.mean_topk_overlap == pytest.approx(np.mean(top))


def test_blocks_give_the_same_result(monkeypatch):
    a, b = _noisy_pair(n_query=10, n_train=50, seed=3)
    whole = compare(a, b, k=5)
    monkeypatch.setattr(compare_module, "_BLOCK_ELEMENTS", 120)  # 2 rows per block
    blocked = compare(a, b, k=5)
    for name, _ in compare_module.METRICS:
        np.testing.assert_array_equal(getattr(whole, name), getattr(blocked, name))


def test_constant_rows_are_reported_and_excluded_with_a_count():
    a, b = _noisy_pair(n_query=5, n_train=30, seed=4)
    a[1] = 0.0
    b[3] = 2.5
    a[4, 0] = np.inf
    result = compare(a, b, k=5)
    assert result.constant_in_a == [1] and result.constant_in_b == [3] and result.non_finite == [4]
    valid = [0, 2]
    for name in ("spearman", "pearson", "topk_overlap", "bottomk_overlap"):
        stats = result.summary[name]
        assert stats["n_excluded"] == 3
        assert stats["mean"] == pytest.approx(getattr(result, name)[valid].mean())
    # Sign agreement stays defined for constant rows (all zeros in A vs mixed signs in B).
    assert result.summary["sign_agreement"]["n_excluded"] == 1
    table = result.to_table()
    assert "constant scores in A" in table and "constant scores in B" in table and "NaN/inf" in table
    payload = json.dumps(result.to_dict(), allow_nan=False)  # NaN written as null: valid JSON
    assert json.loads(payload)["per_query"]["spearman"][1] is None


def test_all_rows_excluded_gives_nan_mean_and_failure():
    result = compare(np.ones((2, 5)), np.random.default_rng(0).normal(size=(2, 5)), k=2)
    assert np.isnan(result.mean_spearman)
    assert result.summary["spearman"]["n_excluded"] == 2
    assert "undefined" in result.failures(min_spearman=0.5)[0]


def test_failures_thresholds_and_validation():
    a, b = _noisy_pair(noise=0.3)
    result = compare(a, b, k=5)
    assert 0.9 < result.mean_spearman < 1.0 and 0.5 < result.mean_topk_overlap < 1.0
    assert result.failures() == []
    assert result.failures(min_spearman=0.9, min_topk_overlap=0.5) == []
    reasons = result.failures(min_spearman=1.0, min_topk_overlap=1.0)
    assert len(reasons) == 2 and "below the threshold 1.0" in reasons[0]
    with pytest.raises(ValueError, match="min_spearman"):
        result.failures(min_spearman=2.0)
    with pytest.raises(ValueError, match="min_topk_overlap"):
        result.failures(min_topk_overlap=-0.1)


def test_k_is_validated_and_clamped(caplog):
    a, b = _noisy_pair(n_train=8)
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        compare(a, b, k=0)
    with caplog.at_level(logging.WARNING, logger="kronfluence_bif"):
        result = compare(a, b, k=50)
    assert result.k == 8 and "exceeds" in caplog.text
    np.testing.assert_array_equal(result.topk_overlap, 1.0)


def test_self_vectors():
    rng = np.random.default_rng(5)
    a = rng.gamma(2.0, size=30)
    b = a + rng.normal(scale=0.5, size=30)
    result = compare(torch.tensor(a), torch.tensor(b), k=5)
    assert result.kind == "self" and result.n_query is None
    assert result.self_spearman == pytest.approx(spearmanr(a, b).statistic)
    assert result.self_pearson == pytest.approx(pearsonr(a, b).statistic)
    assert "self-influence scores" in str(result)
    assert json.loads(json.dumps(result.to_dict()))["self_influence"]["spearman"] == pytest.approx(result.self_spearman)


# ---------------------------------------------------------------------------------------------- folders
def test_folders_files_dicts_and_tensors_agree(tmp_path):
    a, b = _noisy_pair(seed=6)
    fa = write_score_folder(tmp_path / "scores_a", torch.tensor(a, dtype=torch.float32))
    fb = write_score_folder(tmp_path / "scores_b", torch.tensor(b, dtype=torch.float32))
    from_tensors = compare(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    from_folders = compare(str(fa), fb)
    from_files = compare(storage.score_file(fa, "pairwise"), storage.score_file(fb, "pairwise"))
    from_dicts = compare(storage.load_tensors(storage.score_file(fa, "pairwise")), {"all_modules": b})
    np.testing.assert_allclose(from_folders.spearman, from_tensors.spearman)
    np.testing.assert_allclose(from_files.spearman, from_tensors.spearman)
    np.testing.assert_allclose(from_dicts.topk_overlap, from_tensors.topk_overlap)
    assert from_folders.label_a == str(fa) and str(fb) in from_folders.to_table()


def test_pairwise_folders_with_self_scores_report_self_agreement(tmp_path):
    a, b = _noisy_pair(seed=7)
    rng = np.random.default_rng(7)
    sa = rng.gamma(2.0, size=a.shape[1])
    sb = sa + rng.normal(scale=0.3, size=sa.shape)
    for folder, pairwise, self_scores in ((tmp_path / "scores_a", a, sa), (tmp_path / "scores_b", b, sb)):
        write_score_folder(folder, torch.tensor(pairwise))
        write_score_folder(folder, torch.tensor(self_scores))
    result = compare(tmp_path / "scores_a", tmp_path / "scores_b")
    assert result.kind == "pairwise"
    expected = spearmanr(sa.astype(np.float32), sb.astype(np.float32)).statistic
    assert result.self_spearman == pytest.approx(expected)
    assert "self-influence: Spearman" in result.to_table()


def test_per_module_per_token_and_bf16_scores_load(tmp_path):
    rng = np.random.default_rng(8)
    per_token = torch.tensor(rng.normal(size=(3, 10, 4)))
    folder = write_score_folder(tmp_path / "scores_tok", per_token)
    np.testing.assert_allclose(load_scores(folder).pairwise, per_token.float().double().sum(2).numpy(), rtol=1e-6)
    per_module = {"0": torch.ones(3, 10), "2": 2 * torch.ones(3, 10)}
    np.testing.assert_array_equal(load_scores(per_module).pairwise, 3.0)
    bf16 = write_score_folder(
        tmp_path / "scores_bf16", torch.randn(3, 10), score_args=ScoreArguments(score_dtype=torch.bfloat16)
    )
    assert load_scores(bf16).pairwise.dtype == np.float64


def test_refuses_different_dataset_metadata_naming_both(tmp_path):
    a, b = _noisy_pair()
    write_score_folder(tmp_path / "scores_a", torch.tensor(a))
    other = {"type": "TensorDataset", "dataset_size": a.shape[1] + 5, "indices": list(range(a.shape[1]))}
    write_score_folder(tmp_path / "scores_b", torch.tensor(b), train_dataset_metadata=other)
    with pytest.raises(ValueError, match="train datasets differ") as info:
        compare(tmp_path / "scores_a", tmp_path / "scores_b")
    message = str(info.value)
    assert (
        "'dataset_size': 40" in message and "'dataset_size': 45" in message and "train_dataset_metadata.json" in message
    )
    query = {"type": "Subset", "dataset_size": a.shape[0], "indices": None}
    write_score_folder(tmp_path / "scores_c", torch.tensor(b), query_dataset_metadata=query)
    with pytest.raises(ValueError, match="query datasets differ.*TensorDataset.*Subset"):
        compare(tmp_path / "scores_a", tmp_path / "scores_c")


def test_refuses_different_shapes_and_kinds(tmp_path):
    a, _ = _noisy_pair(n_query=4, n_train=20)
    with pytest.raises(ValueError, match=r"shapes differ: A `A` is \[4, 20\], B `B` is \[4, 19\]"):
        compare(a, a[:, :19])
    with pytest.raises(ValueError, match="A `A` holds pairwise scores, B `B` holds self scores"):
        compare(a, a[0])
    with pytest.raises(ValueError, match=r"not kronfluence scores"):
        compare(a[None, None], a[None, None])


def test_clear_errors_for_wrong_paths(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        load_scores(tmp_path / "missing")
    analysis = tmp_path / "analysis"
    write_score_folder(analysis / "scores_x", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="analysis folder; pass one of its score folders: scores_x"):
        load_scores(analysis)
    partitions = tmp_path / "scores_partial"
    storage.save_tensors(storage.score_file(partitions, "pairwise", (0, 0)), {"all_modules": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="only partition files"):
        load_scores(partitions)
    (tmp_path / "scores.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        load_scores(tmp_path / "scores.npy")


def test_vectorized_speed_on_a_realistic_size():
    a, b = _noisy_pair(n_query=100, n_train=2000, seed=9)
    result = compare(a, b, k=10)
    rows = [0, 57, 99]
    np.testing.assert_allclose(result.spearman[rows], _scipy_spearman(a[rows], b[rows]), atol=1e-12)
