"""One seeded minibatch AdamW loop for the demo models (UCI regression, digits classification)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kronfluence_bif.threads import choose_threads, using_threads


def fit_minibatches(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    cosine_schedule: bool = False,
) -> nn.Module:
    """Reshuffled minibatches every epoch, deterministic for a given seed; returns the model in eval mode.

    Thousands of small steps: trained on one thread when the model's matrix products are small (the rule of
    `kronfluence_bif.threads`, which keeps an explicit thread setting), so a busy machine does not slow it down.
    """
    choice = choose_threads(None, x.device, lambda: model(x[:batch_size]))
    with using_threads(choice.threads):
        return _fit(model, x, y, loss_fn, epochs, lr, batch_size, weight_decay, seed, cosine_schedule)


def _fit(model, x, y, loss_fn, epochs, lr, batch_size, weight_decay, seed, cosine_schedule) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cosine_schedule else None
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    model.eval()
    return model
