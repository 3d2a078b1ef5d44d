"""The ready-made tasks' numerics: `precise_cross_entropy` (ClassificationTask, CausalLMTask)."""

from __future__ import annotations

import pytest
import torch

from kronfluence_bif.tasks import precise_cross_entropy


def test_precise_cross_entropy_keeps_a_confident_examples_loss_and_gradient():
    """float32 cross-entropy takes log(1 + tiny) of a number next to 1: a confident example's loss is known to ~6e-8,
    the size of its changes over the draws, and its gradient's p_y - 1 likewise. `precise_cross_entropy` keeps both
    to float32's relative precision (against the same formula in float64), with ignore_index and reductions."""
    logits = torch.tensor([[12.0, 0.0, -1.0], [20.0, 3.0, 0.0], [0.3, 0.1, -0.2], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 0, 2, -100])
    exact = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")
    mine = logits.clone().requires_grad_(True)
    precise = precise_cross_entropy(mine, labels, reduction="none")
    assert precise.dtype == torch.float32 and precise[3] == 0.0
    # |z| <= 20: z_k - m is off by at most ulp(20) / 2 = 1e-6, so exp(z_k - m) and the loss by about that, relatively
    assert torch.allclose(precise.double(), exact, rtol=2e-6, atol=0)
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    relative = ((plain.double() - exact) / exact)[:3].abs()
    # float32's log(1 + t) is off by up to 6e-8 / t of t: 0.7% at loss 8.4e-6, all of it at 4.3e-8 (it reads 0)
    assert relative[0] > 1e-3 and relative[1] > 0.5 and relative[2] < 1e-6

    precise.sum().backward()
    reference = logits.double().softmax(1) - torch.nn.functional.one_hot(labels.clamp_min(0), 3).double()
    reference[3] = 0.0  # the ignored label
    label_entries = reference[torch.arange(3), labels[:3]]  # p_y - 1: -8.4e-6, -4.3e-8, -0.75
    assert torch.allclose(mine.grad[torch.arange(3), labels[:3]].double(), label_entries, rtol=2e-6, atol=0)
    assert torch.allclose(mine.grad.double(), reference, rtol=2e-6, atol=1e-12)
    plain_logits = logits.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(plain_logits, labels, reduction="none").sum().backward()
    assert plain_logits.grad[1, 0] == 0.0  # float32's p_y - 1 for the loss of 4.3e-8: lost entirely

    for reduction in ("sum", "mean"):
        expected = torch.nn.functional.cross_entropy(logits.double(), labels, reduction=reduction)
        assert torch.allclose(precise_cross_entropy(logits, labels, reduction=reduction).double(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        precise_cross_entropy(logits, labels, reduction="max")
