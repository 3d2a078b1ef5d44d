"""Bad input: a clear error that names the argument and the fix."""

from typing import Any

import pytest
import torch
from conftest import PlainRegressionTask, make_regression
from kronfluence import FactorArguments, ScoreArguments
from torch.utils.data import TensorDataset

from kronfluence_bif import Analyzer, BIFArguments, BIFTask, TaskContractError, prepare_model
from kronfluence_bif.loss_views import LossViews

FAST = BIFArguments(num_chains=1, num_draws=4, num_burnin_steps=2, sampler_batch_size=8)

INVALID_FIELDS = [
    ("sampler", "langevin"),
    ("num_chains", 0),
    ("num_draws", -1),
    ("num_draws", 2.5),
    ("num_burnin_steps", -1),
    ("draw_interval", 0),
    ("step_size", 0.0),
    ("step_size", float("nan")),
    ("nbeta", -3.0),
    ("localization", -1.0),
    ("localization", float("inf")),
    ("sampler_batch_size", 0),
    ("normalize", "yes"),
    ("seed", -1),
    ("rmsprop_alpha", 1.0),
    ("rmsprop_eps", 0.0),
    ("freeze_preconditioner", 1),
    ("divergence_loss_ratio", 0.5),
    ("draws_per_block", 0),
    ("cache_batches", None),
    ("num_threads", 0),
]


@pytest.mark.parametrize("field,value", INVALID_FIELDS)
def test_each_invalid_field_is_named(field, value):
    with pytest.raises(ValueError, match=rf"BIFArguments\.{field} must"):
        BIFArguments(**{"sampler": "rmsprop_sgld", field: value})


def test_localization_stability_limit():
    with pytest.raises(ValueError, match=r"step_size \* localization / rmsprop_eps must be < 4"):
        # the RMSprop preconditioner starts at 1/rmsprop_eps
        BIFArguments(sampler="rmsprop_sgld", step_size=1e-4, localization=1e4)
    with pytest.raises(ValueError, match=r"step_size \* localization must be < 4"):
        BIFArguments(sampler="sgld", step_size=1e-2, localization=400)
    BIFArguments(sampler="sgld", step_size=1e-4, localization=1e4)


def test_single_draw_total_is_rejected():
    with pytest.raises(ValueError, match="at least 2 draws"):
        BIFArguments(num_chains=1, num_draws=1)


def test_unknown_bif_field_from_json():
    with pytest.raises(ValueError, match="Unknown BIFArguments fields \\['stepsize'\\]"):
        BIFArguments.from_dict({"stepsize": 1e-4})


def _prepared(task):
    from conftest import fit, make_mlp

    return prepare_model(fit(make_mlp(), make_regression(32), steps=50), task)


def test_typo_strategy_lists_valid_ones(tmp_path):
    task = PlainRegressionTask()
    model = _prepared(task)
    with pytest.raises(ValueError, match=r"Unknown strategy 'bfi'.*'ekfac'.*'bif'"):
        Analyzer("a", model, task, cpu=True, output_dir=str(tmp_path), strategy="bfi")
    analyzer = Analyzer("a", model, task, cpu=True, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"Unknown strategy 'ekfca' in FactorArguments.strategy.*'identity'"):
        analyzer.fit_all_factors("f", dataset=make_regression(8), factor_args=FactorArguments(strategy="ekfca"))


@pytest.fixture()
def bif_analyzer(tmp_path):
    task = PlainRegressionTask()
    analyzer = Analyzer(
        "e", _prepared(task), task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif", bif_args=FAST
    )
    analyzer.fit_all_factors("f", dataset=make_regression(32))
    return analyzer


def test_empty_datasets(bif_analyzer, tmp_path):
    empty = TensorDataset(torch.zeros(0, 6), torch.zeros(0, 1))
    train = make_regression(32)
    with pytest.raises(ValueError, match="`train_dataset` is empty"):
        bif_analyzer.compute_pairwise_scores(
            "s1", "f", query_dataset=train, train_dataset=empty, per_device_query_batch_size=4
        )
    with pytest.raises(ValueError, match="`query_dataset` is empty"):
        bif_analyzer.compute_pairwise_scores(
            "s2", "f", query_dataset=empty, train_dataset=train, per_device_query_batch_size=4
        )
    with pytest.raises(ValueError, match="`train_dataset` is empty"):
        bif_analyzer.compute_self_scores("s3", "f", train_dataset=empty)
    # validation happens before anything is recorded
    assert not (tmp_path / "e" / "scores_s1" / "score_arguments.json").exists()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(per_device_query_batch_size=0), "per_device_query_batch_size"),
        (dict(per_device_query_batch_size=4, per_device_train_batch_size=-2), "per_device_train_batch_size"),
        (dict(per_device_query_batch_size=4, query_indices=[0, 99]), "query_indices.*outside"),
        (dict(per_device_query_batch_size=4, train_indices=[]), "train_indices` is empty"),
        (
            dict(per_device_query_batch_size=4, score_args=ScoreArguments(module_partitions=4)),  # 3 Linear modules
            "Module partition size \\(4\\) exceeds total tracked modules \\(3\\)",
        ),
        (
            dict(
                per_device_query_batch_size=4,
                score_args=ScoreArguments(module_partitions=3),
                target_module_partitions=[3],
            ),
            "Invalid module partition 3",
        ),
        (dict(per_device_query_batch_size=4, target_data_partitions=[0]), "target_data_partitions"),
        (
            dict(
                per_device_query_batch_size=4, score_args=ScoreArguments(data_partitions=3), target_data_partitions=[3]
            ),
            "Invalid data partition 3",
        ),
    ],
)
def test_bad_score_call_arguments(bif_analyzer, kwargs, match):
    data = make_regression(32)
    with pytest.raises(ValueError, match=match):
        bif_analyzer.compute_pairwise_scores("s", "f", query_dataset=make_regression(6), train_dataset=data, **kwargs)


class WrongShapeTask(BIFTask):
    def compute_train_loss(self, batch: Any, model, sample: bool = False) -> torch.Tensor:
        x, y = batch
        return (model(x) - y).pow(2).sum()

    def compute_measurement(self, batch: Any, model) -> torch.Tensor:
        return self.compute_train_loss(batch, model)

    def compute_per_example_train_loss(self, batch: Any, model) -> torch.Tensor:
        x, y = batch
        return (model(x) - y).pow(2)  # [B, 1]: forgot to reduce the output dimension


class DisagreeingTask(WrongShapeTask):
    def compute_per_example_train_loss(self, batch: Any, model) -> torch.Tensor:
        x, y = batch
        return (model(x) - y).abs().sum(1)  # a different loss than compute_train_loss


class MeanTask(PlainRegressionTask):
    def compute_train_loss(self, batch: Any, model, sample: bool = False) -> torch.Tensor:
        x, y = batch
        return (model(x) - y).pow(2).mean()  # kronfluence expects a sum


@pytest.mark.parametrize(
    "task_cls,match",
    [
        (
            WrongShapeTask,
            r"`WrongShapeTask.compute_per_example_train_loss` must return a tensor of shape \[batch_size\]",
        ),
        (
            DisagreeingTask,
            r"`DisagreeingTask.compute_per_example_train_loss` sum to .* but `DisagreeingTask.compute_tr",
        ),
        (MeanTask, r'`MeanTask.compute_train_loss` averages over the batch.* Use reduction="sum" in it'),
    ],
)
def test_per_example_contract_is_checked(tmp_path, task_cls, match):
    task = task_cls()
    model = _prepared(task)
    analyzer = Analyzer(
        "c", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif", bif_args=FAST
    )
    analyzer.fit_all_factors("f", dataset=make_regression(32))
    with pytest.raises(TaskContractError, match=match):
        analyzer.compute_pairwise_scores(
            "s", "f", query_dataset=make_regression(6), train_dataset=make_regression(32), per_device_query_batch_size=4
        )
    assert not (tmp_path / "c" / "scores_s" / "pairwise_scores.safetensors").exists()


def test_a_plain_task_that_averages_is_told_to_sum_not_to_define_per_example_methods():
    task = MeanTask()
    view = LossViews(task).train
    model = _prepared(task)  # trains: outside inference mode
    with pytest.raises(TaskContractError) as info, torch.inference_mode():
        view.check(make_regression(8).tensors, model)
    message = str(info.value)
    assert "first batch of 8 examples" in message and 'reduction="sum"' in message
    assert "compute_per_example_train_loss" not in message  # a plain kronfluence Task never defined it


def _classifier_data(n, labels):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 6, generator=g), labels)


@pytest.mark.parametrize(
    "task_name, query, method, holds",
    [
        (
            "plain",
            TensorDataset(torch.randn(6, 5), torch.randn(6, 1)),
            "PlainRegressionTask.compute_measurement",
            "tensor[6, 5] float32, tensor[6, 1] float32",
        ),
        (
            "classification",
            _classifier_data(6, torch.rand(6)),
            "ClassificationTask.compute_measurement",
            "tensor[6, 6] float32, tensor[6] float32",
        ),
    ],
)
def test_a_query_dataset_that_does_not_fit_is_named_before_any_fallback(
    tmp_path, caplog, task_name, query, method, holds
):
    import logging

    from kronfluence_bif import ClassificationTask

    if task_name == "plain":
        task, model, train = PlainRegressionTask(), _prepared(PlainRegressionTask()), make_regression(16)
    else:
        task = ClassificationTask()
        model = prepare_model(torch.nn.Sequential(torch.nn.Linear(6, 3)), task)
        train = _classifier_data(16, torch.randint(0, 3, (16,)))
    analyzer = Analyzer("q", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=FAST)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"), pytest.raises(TaskContractError) as info:
        analyzer.compute_pairwise_scores(
            "s", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=6
        )
    message = str(info.value)
    assert f"`{method}` failed on the first batch of `query_dataset`" in message and holds in message
    logged = [r.getMessage() for r in caplog.records]
    assert not [m for m in logged if "falling back" in m or "compute_measurement" in m]  # no vmap attempt, no loop


class ControlFlowTask(PlainRegressionTask):
    """Python control flow on tensor values: vmap cannot trace it, the loop fallback must take over."""

    def compute_train_loss(self, batch: Any, model, sample: bool = False) -> torch.Tensor:
        x, y = batch
        scale = 2.0 if float(y.sum()) > 1e9 else 1.0
        return scale * (model(x) - y).pow(2).sum()


def test_vmap_and_loop_paths_equal_the_explicit_method():
    from kronfluence_bif import RegressionTask

    data = make_regression(12)
    batch = data.tensors
    model = _prepared(PlainRegressionTask())
    explicit = LossViews(RegressionTask()).train(batch, model)
    plain = LossViews(PlainRegressionTask())
    vmapped = plain.train(batch, model)
    assert plain.train.mode == "vmap"
    looped_view = LossViews(ControlFlowTask())
    looped = looped_view.train(batch, model)
    assert looped_view.train.mode == "loop"
    torch.testing.assert_close(vmapped, explicit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(looped, explicit, rtol=1e-5, atol=1e-6)
    looped_view.train.check(batch, model)  # the loop output satisfies the contract


def test_ignored_score_arguments_warn_once(bif_analyzer, caplog):
    import logging

    from kronfluence_bif import logs

    logs._warned.discard("ignored-damping_factor")
    kw = dict(query_dataset=make_regression(6), train_dataset=make_regression(32), per_device_query_batch_size=3)
    with caplog.at_level(logging.WARNING, logger="kronfluence_bif"):
        bif_analyzer.compute_pairwise_scores("w1", "f", score_args=ScoreArguments(damping_factor=0.1), **kw)
        bif_analyzer.compute_pairwise_scores("w2", "f", score_args=ScoreArguments(damping_factor=0.1), **kw)
    messages = [r.getMessage() for r in caplog.records if "damping_factor" in r.getMessage()]
    assert len(messages) == 1 and "`localization` (gamma) in BIFArguments plays the role of damping" in messages[0]


def test_individual_fit_methods_record_bif(tmp_path):
    task = PlainRegressionTask()
    analyzer = Analyzer("i", _prepared(task), task, cpu=True, output_dir=str(tmp_path), strategy="bif", bif_args=FAST)
    data = make_regression(16)
    analyzer.fit_covariance_matrices("f", dataset=data)
    analyzer.perform_eigendecomposition("f")
    analyzer.fit_lambda_matrices("f", dataset=data)
    assert analyzer.load_factor_args("f").strategy == "bif" and analyzer.load_bif_args("f") == FAST
    assert analyzer.load_all_factors("f") == {}
