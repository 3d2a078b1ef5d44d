"""Chains as a batch dimension (`kronfluence_bif.batched`): batched values and steps equal the per-chain loop."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_mlp, make_regression
from torch import nn

from kronfluence_bif.batched import (
    BatchedSGLD,
    ChainBatch,
    batched_sgld_step,
    replicate,
    stack_batches,
    stack_weights,
    unstack_weights,
)
from kronfluence_bif.sampler import SGLD

K = 3
# float32 tolerance: a batched product sums the same terms as the per-chain one, possibly in another order (a
# few ulps of values of order 1, ~1e-6), far below the 1e-2 spread between chains that the test relies on
ATOL = 1e-5


def per_example(batch: Any, model: nn.Module) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).sum(1)


def summed(batch: Any, model: nn.Module) -> torch.Tensor:
    return per_example(batch, model).sum()


class ItemGate(nn.Module):
    """A model vmap cannot batch: its forward reads a weight-dependent value with `.item()`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out * 0.5 if out.abs().max().item() > 1e6 else out


def perturbed(model: nn.Module, names, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    stacked = replicate(model, names, K)
    for t in stacked.values():
        t.add_(0.1 * torch.randn(t.shape, generator=gen))
    return stacked


def loop_values(model: nn.Module, stacked, fn, batch) -> torch.Tensor:
    """The reference: each chain's weights copied into the model, then the plain call."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in stacked}
    out = []
    with torch.no_grad():
        for weights in unstack_weights(stacked):
            for n, t in weights.items():
                params[n].copy_(t)
            out.append(fn(batch, model))
        for n, t in saved.items():
            params[n].copy_(t)
    return torch.stack(out)


@pytest.mark.parametrize("model_cls, expected_mode", [(make_mlp, "auto"), (ItemGate, "loop")])
def test_evaluate_equals_the_per_chain_loop(model_cls, expected_mode):
    model = model_cls().eval()
    names = [n for n, _ in model.named_parameters()][:4]  # a subset: the rest is shared by every chain
    stacked = perturbed(model, names)
    batch = make_regression(20, seed=3).tensors
    chains = ChainBatch(model, names, stacked)
    with torch.inference_mode():
        values = chains.evaluate(per_example, batch)
    assert values.shape == (K, 20)
    assert chains.mode == expected_mode
    if expected_mode == "loop":
        assert chains.fallback_reason is not None
    reference = loop_values(model, stacked, per_example, batch)
    assert torch.allclose(values, reference, rtol=0, atol=ATOL)
    assert float((reference[0] - reference[1]).abs().max()) > 1e-3  # the chains do differ


def test_per_token_values_of_a_gpt2():
    transformers = pytest.importorskip("transformers")
    from kronfluence_bif import CausalLMTask

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config).eval()
    names = [n for n, _ in model.named_parameters() if ".attn." in n or ".mlp." in n]
    stacked = perturbed(model, names)
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    view = CausalLMTask().compute_per_token_train_loss
    chains = ChainBatch(model, names, stacked, mode="vmap")
    with torch.inference_mode():
        values = chains.evaluate(view, batch)
    assert values.shape == (K, 4, 8)
    assert torch.allclose(values, loop_values(model, stacked, view, batch), rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_batched_sgld_step_equals_k_chains_of_the_package_sampler(mode):
    model = make_mlp().eval()
    names = [n for n, _ in model.named_parameters()]
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = make_regression(40, seed=2)
    args = dict(step_size=1e-3, nbeta=20.0, localization=50.0)
    stacked = replicate(model, names, K)
    chains = ChainBatch(model, names, stacked, mode=mode)
    sampler = BatchedSGLD(stacked, anchors, generators=[torch.Generator().manual_seed(c) for c in range(K)], **args)
    # the reference: K independent copies of the weights, each stepped by the package's SGLD on its own minibatch
    ref = [[anchors[n].clone() for n in names] for _ in range(K)]
    ref_samplers = [
        SGLD(ref[c], list(anchors.values()), generator=torch.Generator().manual_seed(c), **args) for c in range(K)
    ]
    for step in range(5):
        idx = [torch.arange(8) + 8 * ((step + c) % 5) for c in range(K)]
        batches = [(data.tensors[0][i], data.tensors[1][i]) for i in idx]
        losses = batched_sgld_step(chains, sampler, summed, stack_batches(batches), 8)
        for c in range(K):
            weights = [w.requires_grad_(True) for w in ref[c]]
            loss = torch.func.functional_call(model, dict(zip(names, weights)), (batches[c][0],))
            loss = (loss - batches[c][1]).pow(2).sum()
            grads = torch.autograd.grad(loss, weights)
            [w.requires_grad_(False) for w in weights]
            ref_samplers[c].step(grads, 8)
            loss = float(loss.detach())
            assert abs(float(losses[c]) - loss) <= ATOL * max(1.0, loss)
    for c in range(K):
        for n, w in zip(names, ref[c]):
            assert torch.allclose(stacked[n][c], w, rtol=0, atol=ATOL), (c, n)


def test_stack_and_unstack_round_trip():
    a = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    b = {"w": 2 * torch.ones(2, 3), "b": torch.ones(3)}
    stacked = stack_weights([a, b])
    assert stacked["w"].shape == (2, 2, 3)
    back = unstack_weights(stacked)
    assert torch.equal(back[1]["w"], b["w"]) and torch.equal(back[0]["b"], a["b"])
    with pytest.raises(ValueError, match="names"):
        stack_weights([a, {"w": a["w"]}])
    with pytest.raises(ValueError, match="mode"):
        ChainBatch(make_mlp(), ["0.weight"], {"0.weight": torch.zeros(1, 16, 6)}, mode="fast")
