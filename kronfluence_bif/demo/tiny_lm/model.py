"""The tiny GPT-2 (`GPT2LMHeadModel` from a config) and the Conv1D -> `nn.Linear` swap kronfluence needs."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from kronfluence_bif.demo.tiny_lm.corpus import CharTokenizer


def make_model(
    vocab_size: int, n_layer: int = 2, n_embd: int = 128, n_head: int = 4, context: int = 64, seed: int = 0
) -> nn.Module:
    """A small GPT-2 (`GPT2LMHeadModel`): dropout off, seeded initialization, untied output layer.

    The output layer (`lm_head`) has its own weight, so EK-FAC's tracked `lm_head` and BIF's sampled `lm_head`
    are the same weights and do not also move the input embedding.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=context,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=CharTokenizer.pad_id,
        eos_token_id=CharTokenizer.pad_id,
        tie_word_embeddings=False,
    )
    return GPT2LMHeadModel(config)


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every `transformers.pytorch_utils.Conv1D` by the equivalent `nn.Linear`, in place.

    GPT-2's Conv1D computes ``x @ W + b`` with ``W`` of shape ``[in, out]``; kronfluence tracks only `nn.Linear`
    and `nn.Conv2d`, so the swap (weight transposed, same bias, same device and dtype) makes GPT-2's attention
    and MLP weights visible to EK-FAC without changing the function.
    """
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                in_features, out_features = child.weight.shape
                linear = nn.Linear(in_features, out_features, device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                linear.weight.requires_grad_(child.weight.requires_grad)
                linear.bias.requires_grad_(child.bias.requires_grad)
                setattr(module, child_name, linear)
    return model


def linear_module_names(model: nn.Module) -> List[str]:
    """Names of every `nn.Linear` of the model (what EK-FAC tracks, and what BIF samples in the demo)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
