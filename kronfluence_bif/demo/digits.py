"""scikit-learn's digits (1797 8x8 images, 10 classes) and a 64-128-128-10 MLP classifier."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kronfluence_bif.demo.training import fit_minibatches


def load_digits_split(n_train: int = 1000, n_query: int = 200, seed: int = 0) -> Tuple[TensorDataset, TensorDataset]:
    """(train, query) TensorDatasets: x [n, 64] float32 scaled to [0, 1], y [n] int64."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(seed).permutation(len(x))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(
        x[n_train : n_train + n_query], y[n_train : n_train + n_query]
    )


def make_classifier(width: int = 128, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def train_classifier(
    train: TensorDataset,
    epochs: int = 60,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    model: Optional[nn.Module] = None,
) -> nn.Module:
    """AdamW on the cross-entropy; deterministic for a given seed."""
    model = make_classifier(seed=seed) if model is None else model
    x, y = train.tensors
    return fit_minibatches(model, x, y, nn.functional.cross_entropy, epochs, lr, batch_size, 1e-4, seed)
