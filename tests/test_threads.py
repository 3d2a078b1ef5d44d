"""The sampling phase's thread policy: one thread for small models unless the user chose, restored afterwards."""

import pytest
import torch
from conftest import PlainRegressionTask
from torch import nn

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif import threads as threads_module
from kronfluence_bif.threads import SMALL_MATMUL_FLOPS, choose_threads, mean_matmul_flops, using_threads

CPU = torch.device("cpu")
FAST = dict(num_chains=1, num_draws=8, num_burnin_steps=2, sampler_batch_size=8, checkpoint_interval=0)


@pytest.fixture()
def default_threads(monkeypatch):
    """torch at 2 threads, as if nobody had set it (no env variable, unchanged since import)."""
    before = torch.get_num_threads()
    for name in threads_module.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(2)
    monkeypatch.setattr(threads_module, "_THREADS_AT_IMPORT", 2)
    yield
    torch.set_num_threads(before)


def test_mean_matmul_flops_of_a_linear_layer():
    layer = nn.Linear(32, 16)
    x = torch.randn(10, 32)
    assert mean_matmul_flops(lambda: layer(x)) == pytest.approx(2 * 10 * 32 * 16)
    assert mean_matmul_flops(lambda: x.sum()) is None  # no matrix product: nothing to decide on


def test_small_model_samples_on_one_thread(default_threads):
    layer = nn.Linear(32, 16)
    choice = choose_threads(None, CPU, lambda: layer(torch.randn(10, 32)))
    assert choice.threads == 1 and "small matrix products" in choice.reason and "num_threads" in choice.reason


def test_large_matrix_products_use_the_idle_cores(default_threads, monkeypatch):
    monkeypatch.setattr(threads_module, "mean_matmul_flops", lambda forward: 10 * SMALL_MATMUL_FLOPS)
    monkeypatch.setattr(threads_module, "_available_cores", lambda: 2)
    monkeypatch.setattr(threads_module, "busy_cores", lambda: 0.1)  # a quiet machine: torch's count
    assert choose_threads(None, CPU, lambda: None).threads == 2
    monkeypatch.setattr(threads_module, "busy_cores", lambda: 1.7)  # another process on a core: one thread
    choice = choose_threads(None, CPU, lambda: None)
    assert choice.threads == 1 and "other work keeps 1.7 cores busy" in choice.reason
    monkeypatch.setattr(threads_module, "busy_cores", lambda: None)  # load unknown: torch's count
    assert choose_threads(None, CPU, lambda: None).threads == 2


def test_busy_cores_is_a_core_count():
    busy = threads_module.busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (threads_module.os.cpu_count() or 1) + 1e-9


def test_the_users_choice_wins(default_threads, monkeypatch):
    forward = lambda: nn.Linear(4, 4)(torch.randn(2, 4))  # noqa: E731 - small: auto would pick 1
    assert choose_threads(3, CPU, forward).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    choice = choose_threads(None, CPU, forward)
    assert choice.threads == 2 and "OMP_NUM_THREADS=2" in choice.reason
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(3)  # after import: an explicit choice
    choice = choose_threads(None, CPU, forward)
    assert choice.threads == 3 and "torch.set_num_threads(3)" in choice.reason


def test_set_threads_is_an_explicit_choice_even_at_torchs_default(default_threads, monkeypatch):
    monkeypatch.setattr(threads_module, "_CHOSEN", None)
    forward = lambda: nn.Linear(4, 4)(torch.randn(2, 4))  # noqa: E731
    threads_module.set_threads(2)  # the same count torch started with: set_num_threads could not be told apart
    choice = choose_threads(None, CPU, forward)
    assert choice.threads == 2 and "set_threads(2)" in choice.reason


def test_using_threads_restores_after_an_error(default_threads):
    with pytest.raises(RuntimeError, match="boom"):
        with using_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_num_threads_is_validated():
    with pytest.raises(ValueError, match=r"num_threads must be None .* integer >= 1, got 0"):
        BIFArguments(num_threads=0)


def test_a_run_samples_on_one_thread_and_gives_the_count_back(tmp_path, trained_mlp, small_data, default_threads):
    train, query = small_data
    seen = []

    class Spy(PlainRegressionTask):
        def compute_train_loss(self, batch, model, sample=False):
            seen.append(torch.get_num_threads())
            return super().compute_train_loss(batch, model, sample)

    task = Spy()
    model = prepare_model(trained_mlp, task)
    analyzer = Analyzer("t", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=BIFArguments(**FAST))
    seen.clear()
    analyzer.compute_pairwise_scores("s", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=4)
    assert seen and set(seen[-3:]) == {1}  # the SGLD steps ran on one thread
    assert torch.get_num_threads() == 2
