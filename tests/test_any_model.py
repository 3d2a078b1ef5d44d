"""Strategy "bif" on models kronfluence cannot track, through the unchanged kronfluence workflow.

Each model kind goes through `prepare_model`, `Analyzer(strategy="bif")`, `fit_all_factors`,
`compute_pairwise_scores` and `compute_self_scores`, and must give finite scores of kronfluence's shapes and leave
the model bitwise unchanged. kronfluence's strategies on the same models keep kronfluence's own error.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import PlainRegressionTask, assert_bitwise_equal, state_copy
from kronfluence.task import Task
from kronfluence.utils.exceptions import IllegalTaskConfigurationError, TrackedModuleNotFoundError
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

from kronfluence_bif import Analyzer, BIFArguments, BIFTask, CausalLMTask, FactorArguments, prepare_model

VOCAB, LENGTH, CLASSES = 40, 6, 3
SHORT = BIFArguments(sampler="sgld", num_chains=2, num_draws=12, num_burnin_steps=4, step_size=1e-4, nbeta=100.0)


class TokenData(Dataset):
    """Token sequences with a padding mask and a class label (dict batches, as Hugging Face collators give)."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=gen)
        self.mask = torch.ones(n, LENGTH, dtype=torch.long)
        self.mask[: n // 2, -2:] = 0
        self.labels = torch.randint(0, CLASSES, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TokenTask(Task):
    """A plain kronfluence Task on dict batches: summed cross-entropy, measurement = the loss."""

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        return F.cross_entropy(model(batch), batch["labels"], reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model)


class NothingTracked(TokenTask):
    def get_influence_tracked_modules(self):
        return []


class TokenBag(nn.Module):
    """Embedding + LayerNorm + a learned projection: no nn.Linear, no nn.Conv2d (the issue's example)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm, self.w = nn.Embedding(VOCAB, 8), nn.LayerNorm(8), nn.Parameter(torch.randn(8, CLASSES))

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.emb(batch["input_ids"]) * batch["attention_mask"][..., None]
        return self.norm(h.sum(1)) @ self.w


class Recurrent(nn.Module):
    """A GRU or LSTM over embeddings, read out by a bare parameter."""

    def __init__(self, cell: type) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.rnn = cell(8, 8, batch_first=True)
        self.readout = nn.Parameter(0.3 * torch.randn(8, CLASSES))

    def forward(self, batch: dict) -> torch.Tensor:
        out, _ = self.rnn(self.emb(batch["input_ids"]))
        return out[:, -1] @ self.readout


class BareParameter(nn.Module):
    """The model's only parameter is a bare nn.Parameter (a bag-of-tokens linear classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(0.1 * torch.randn(VOCAB, CLASSES))

    def forward(self, batch: dict) -> torch.Tensor:
        return (self.table[batch["input_ids"]] * batch["attention_mask"][..., None]).sum(1)


class SoftSign(torch.autograd.Function):
    """A custom autograd.Function: x / (1 + |x|) with its hand-written backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x / (1 + x.abs())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad / (1 + x.abs()) ** 2


class CustomFunction(TokenBag):
    def forward(self, batch: dict) -> torch.Tensor:
        h = (self.emb(batch["input_ids"]) * batch["attention_mask"][..., None]).sum(1)
        return SoftSign.apply(self.norm(h)) @ self.w


class Checkpointed(TokenBag):
    """The normalisation and projection run under torch.utils.checkpoint (recomputed in the backward)."""

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(h)) @ self.w

    def forward(self, batch: dict) -> torch.Tensor:
        h = (self.emb(batch["input_ids"]) * batch["attention_mask"][..., None]).sum(1)
        return checkpoint(self.head, h, use_reentrant=False)


class Shared(nn.Module):
    """Shared parameters: one block applied twice, and an output layer tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, CLASSES)
        self.block = nn.LayerNorm(CLASSES)
        self.out_bias = nn.Parameter(torch.zeros(VOCAB))

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.block(self.block(self.emb(batch["input_ids"]).sum(1)))
        logits = h @ self.emb.weight.T + self.out_bias  # tied to the embedding
        return logits[:, :CLASSES]


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)  # attention and MLP are HF Conv1D; lm_head is tied to the token embedding


class PerExampleTokenTask(BIFTask, TokenTask):
    """Explicit per-example losses (for models vmap cannot trace, e.g. nn.LSTM), tracking nothing."""

    def get_influence_tracked_modules(self):
        return []

    def compute_per_example_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(batch), batch["labels"], reduction="none")

    def compute_per_example_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_per_example_train_loss(batch, model)


class LMData(TokenData):
    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


MODELS = {
    "embedding_layernorm": (TokenBag, TokenTask),
    "gpt2_conv1d": (gpt2, lambda: CausalLMTask(tracked_modules=[])),  # next-token loss, nothing tracked
    "gru": (lambda: Recurrent(nn.GRU), TokenTask),
    "lstm": (lambda: Recurrent(nn.LSTM), PerExampleTokenTask),
    "bare_parameter": (BareParameter, TokenTask),
    "autograd_function": (CustomFunction, TokenTask),
    "checkpoint": (Checkpointed, TokenTask),
    "shared_parameters": (Shared, TokenTask),
}


def score_with_bif(tmp_path, model: nn.Module, task: Task):
    data = LMData if isinstance(task, CausalLMTask) else TokenData
    train, query = data(12, seed=0), data(5, seed=1)
    model = prepare_model(model, task)
    saved = state_copy(model)
    analyzer = Analyzer("any", model, task, strategy="bif", bif_args=SHORT, output_dir=str(tmp_path), cpu=True)
    analyzer.fit_all_factors("bif", dataset=train)
    analyzer.compute_pairwise_scores(
        "p", "bif", query_dataset=query, train_dataset=train, per_device_query_batch_size=4
    )
    analyzer.compute_self_scores("s", "bif", train_dataset=train)
    assert_bitwise_equal(model, saved)
    return analyzer.load_pairwise_scores("p"), analyzer.load_self_scores("s")


@pytest.mark.parametrize("kind", list(MODELS))
def test_bif_scores_models_kronfluence_cannot_track(tmp_path, kind):
    make_model, make_task = MODELS[kind]
    torch.manual_seed(0)
    pairwise, self_scores = score_with_bif(tmp_path, make_model(), make_task())
    assert list(pairwise) == ["all_modules"] and pairwise["all_modules"].shape == (5, 12)
    assert list(self_scores) == ["all_modules"] and self_scores["all_modules"].shape == (12,)
    assert torch.isfinite(pairwise["all_modules"]).all() and torch.isfinite(self_scores["all_modules"]).all()
    assert (self_scores["all_modules"] > 0).all()  # a variance
    assert pairwise["all_modules"].abs().max() > 0


def test_kronfluence_strategies_keep_kronfluences_error_plus_one_sentence(tmp_path):
    model = prepare_model(TokenBag(), TokenTask())
    with pytest.raises(
        TrackedModuleNotFoundError,
        match="(?s)No tracked modules found.*Strategy 'ekfac' needs them, but strategy 'bif' works",
    ):
        Analyzer("e", model, TokenTask(), strategy="ekfac", output_dir=str(tmp_path), cpu=True)
    analyzer = Analyzer("e", model, TokenTask(), output_dir=str(tmp_path), cpu=True)  # no strategy: may run bif
    with pytest.raises(TrackedModuleNotFoundError, match="Strategy 'ekfac' needs them, but strategy 'bif' works"):
        analyzer.fit_all_factors("f", dataset=TokenData(8, 0))
    with pytest.raises(TrackedModuleNotFoundError, match="Strategy 'kfac' needs"):
        analyzer.fit_covariance_matrices("f", TokenData(8, 0), factor_args=FactorArguments(strategy="kfac"))
    analyzer.fit_all_factors("b", dataset=TokenData(8, 0), factor_args=FactorArguments(strategy="bif"))


def test_prepare_model_on_a_bare_linear_root(tmp_path, caplog):
    Regression = _Regression
    with caplog.at_level(logging.WARNING, logger="kronfluence_bif"):
        model = prepare_model(nn.Linear(3, 1), Regression())
    assert "nn.Sequential(model)" in caplog.text and type(model) is nn.Linear and not list(model.children())
    with pytest.raises(TrackedModuleNotFoundError, match=r"itself a Linear: wrap it, nn.Sequential\(model\)"):
        Analyzer("r", model, Regression(), strategy="ekfac", output_dir=str(tmp_path), cpu=True)
    data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.randn(10, 1))
    analyzer = Analyzer("r", model, Regression(), strategy="bif", bif_args=SHORT, output_dir=str(tmp_path), cpu=True)
    analyzer.fit_all_factors("f", dataset=data)
    analyzer.compute_self_scores("s", "f", train_dataset=data)
    assert analyzer.load_self_scores("s")["all_modules"].shape == (10,)


def test_prepare_model_wraps_what_kronfluence_tracks_and_keeps_the_rest():
    class AttentionAndHead(TokenTask):
        def get_influence_tracked_modules(self):
            return ["transformer.h.0.attn.c_attn", "lm_head"]  # a Conv1D and an nn.Linear

    model = prepare_model(gpt2(), AttentionAndHead())
    modules = dict(model.named_modules())
    assert type(modules["lm_head"]).__name__ == "TrackedLinear"
    assert type(modules["transformer.h.0.attn.c_attn"]).__name__ == "Conv1D"
    assert not any(p.requires_grad for p in model.transformer.parameters())

    class Missing(TokenTask):
        def get_influence_tracked_modules(self):
            return ["transformer.h.7.attn"]

    with pytest.raises(IllegalTaskConfigurationError, match=r"\['transformer.h.7.attn'\].*not modules of the model"):
        prepare_model(gpt2(), Missing())


def test_analyzer_flag_wins_over_the_strategy_inside_factor_arguments(tmp_path, caplog):
    model = prepare_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), _Regression())
    data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.randn(10, 1))
    analyzer = Analyzer("o", model, _Regression(), strategy="bif", bif_args=SHORT, output_dir=str(tmp_path), cpu=True)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        analyzer.fit_all_factors("f", dataset=data, factor_args=FactorArguments(strategy="ekfac", amp_scale=8.0))
        analyzer.fit_all_factors("g", dataset=data, factor_args=FactorArguments(strategy="ekfac"))
    assert caplog.text.count("overrides FactorArguments(strategy='ekfac')") == 1  # logged once
    recorded = analyzer.load_factor_args("f")
    assert recorded.strategy == "bif" and recorded.amp_scale == 8.0  # the other fields are kept
    assert analyzer.load_bif_args("f") == SHORT and analyzer.load_all_factors("f") == {}


class _Regression(Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return F.mse_loss(model(x), y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def test_sampling_calls_the_original_modules_and_restores_the_wrappers(trained_mlp, small_data):
    """During sampling kronfluence's TrackedModule wrappers are skipped (same values) and put back afterwards."""
    from kronfluence.module import TrackedModule

    from kronfluence_bif.tracking import untracked_forwards

    model = prepare_model(trained_mlp, PlainRegressionTask())
    x = small_data[0].tensors[0]
    with torch.inference_mode():
        wrapped = model(x)
        with untracked_forwards(model) as count:
            direct = model(x)
            assert count == 3 and all("forward" in vars(m) for m in model.modules() if isinstance(m, TrackedModule))
    assert torch.equal(direct, wrapped)
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, TrackedModule))
