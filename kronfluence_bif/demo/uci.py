"""UCI Concrete Compressive Strength (Yeh 1998, CC BY 4.0) and kronfluence's UCI regression MLP.

Same preprocessing as kronfluence's UCI example: 90/10 split with seed 0, inputs and targets standardized
with the training split's statistics; an 8 -> 128 -> 128 -> 128 -> 1 MLP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kronfluence_bif.demo.training import fit_minibatches

DATA_FILE = Path(__file__).with_name("concrete.data")


def load_concrete(split_seed: int = 0, test_fraction: float = 0.1) -> Tuple[TensorDataset, TensorDataset]:
    """(train, test) TensorDatasets of float32 (x [n, 8], y [n, 1]), standardized."""
    raw = np.loadtxt(DATA_FILE, dtype=np.float64)
    x, y = raw[:, :-1], raw[:, -1:]
    order = np.random.RandomState(split_seed).permutation(len(raw))
    n_test = int(round(test_fraction * len(raw)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    x_mean, x_std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-8
    y_mean, y_std = y[train_idx].mean(0), y[train_idx].std(0) + 1e-8
    xs, ys = (x - x_mean) / x_std, (y - y_mean) / y_std

    def make(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(xs[idx], dtype=torch.float32), torch.tensor(ys[idx], dtype=torch.float32))

    return make(train_idx), make(test_idx)


def make_mlp(width: int = 128, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, 1),
    )


def train_mlp(
    train: TensorDataset,
    epochs: int = 100,
    lr: float = 3e-3,
    batch_size: int = 32,
    weight_decay: float = 1e-5,
    seed: int = 0,
    model: Optional[nn.Module] = None,
) -> nn.Module:
    """AdamW with a cosine schedule on the mean squared error; deterministic for a given seed."""
    model = make_mlp(seed=seed) if model is None else model
    x, y = train.tensors
    return fit_minibatches(
        model, x, y, nn.functional.mse_loss, epochs, lr, batch_size, weight_decay, seed, cosine_schedule=True
    )
