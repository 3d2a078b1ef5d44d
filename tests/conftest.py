"""Shared fixtures: tiny models and data that make every test run in seconds on 2 CPU cores."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from kronfluence.task import Task
from torch import nn
from torch.utils.data import TensorDataset

torch.set_num_threads(2)
logging.getLogger("kronfluence_bif").setLevel(logging.WARNING)


class PlainRegressionTask(Task):
    """A plain kronfluence Task (no per-example methods): BIF must derive per-example values itself."""

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model)


def make_regression(n: int, d: int = 6, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, 1, generator=gen)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=gen)
    return TensorDataset(x, y)


def make_mlp(d: int = 6, width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def fit(model: nn.Module, data: TensorDataset, steps: int = 300, lr: float = 1e-2) -> nn.Module:
    x, y = data.tensors
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def small_data():
    return make_regression(48, seed=0), make_regression(10, seed=1)


@pytest.fixture()
def trained_mlp(small_data):
    train, _ = small_data
    return fit(make_mlp(), train)


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(model: nn.Module, saved: dict) -> None:
    current = model.state_dict()
    assert current.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(current[key], value), f"parameter {key} changed"
