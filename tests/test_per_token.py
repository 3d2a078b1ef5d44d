"""Per-token BIF: kronfluence's per-token layout, the token-by-token file, sums, masks, and weight patterns."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import check_pinned
from torch import nn
from torch.utils.data import Dataset

from kronfluence_bif import Analyzer, BIFArguments, BIFTask, ScoreArguments, prepare_model, storage
from kronfluence_bif.parameters import select_parameters

V, T = 12, 8


class TokenData(Dataset):
    """Sequences of token ids; labels -100 on the first `prompt` positions and on padding (the tail)."""

    def __init__(self, n: int, seed: int, prompt: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, V, (n, T), generator=g)
        self.labels = self.ids.clone()
        self.labels[:, :prompt] = -100
        lengths = torch.randint(T - 3, T + 1, (n,), generator=g)
        for i, length in enumerate(lengths):
            self.ids[i, length:] = 0
            self.labels[i, length:] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Bigram(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(input_ids)))


class TokenTask(BIFTask):
    """Next-token loss; position t holds the loss of predicting token t from token t-1 (0 where masked)."""

    def compute_per_token_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        logits = model(batch["input_ids"])[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none", ignore_index=-100)
        return F.pad(loss.view(labels.shape), (1, 0))

    compute_per_token_measurement = compute_per_token_train_loss

    def compute_per_example_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_per_token_train_loss(batch, model).sum(1)

    compute_per_example_measurement = compute_per_example_train_loss

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        return self.compute_per_example_train_loss(batch, model).sum()

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model)

    def get_attention_mask(self, batch: Any) -> torch.Tensor:
        return (batch["input_ids"] != 0).long()


ARGS = dict(
    sampler="sgld",
    num_chains=2,
    num_draws=60,
    num_burnin_steps=20,
    sampler_batch_size=8,
    step_size=1e-3,
    nbeta=50.0,
    localization=50.0,
)


def trained_bigram(train: TokenData, steps: int) -> Bigram:
    """A `Bigram` trained on `train` for `steps` full-batch Adam steps (seeded: the same weights every call)."""
    torch.manual_seed(0)
    model, task = Bigram(), TokenTask()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    batch = {"input_ids": train.ids, "labels": train.labels}
    for _ in range(steps):
        opt.zero_grad()
        (task.compute_train_loss(batch, model) / len(train)).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    train, query = TokenData(24, 0), TokenData(3, 1, prompt=3)
    task = TokenTask()
    model = prepare_model(trained_bigram(train, 200), task)
    out = tmp_path_factory.mktemp("tok")
    analyzer = Analyzer("t", model, task, cpu=True, output_dir=str(out), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("bif", train, bif_args=BIFArguments(**ARGS))
    kw = dict(query_dataset=query, train_dataset=train, per_device_query_batch_size=2, per_device_train_batch_size=5)
    analyzer.compute_pairwise_scores("tok", "bif", score_args=ScoreArguments(compute_per_token_scores=True), **kw)
    analyzer.compute_pairwise_scores("seq", "bif", **kw)
    analyzer.fit_all_factors("bif_blocks", train, bif_args=BIFArguments(**ARGS, moment_memory_gb=3e-5))
    tok_args = ScoreArguments(compute_per_token_scores=True)
    analyzer.compute_pairwise_scores("blocks", "bif_blocks", score_args=tok_args, **kw)
    return analyzer, out / "t", train, query


def test_per_token_layout_and_token_by_token_file(runs):
    analyzer, folder, train, query = runs
    tok = analyzer.load_pairwise_scores("tok")["all_modules"]
    assert tok.shape == (3, 24, T) and tok.dtype == torch.float32
    full = storage.load_tensors(folder / "scores_tok" / storage.BIF_TOKEN_SCORES_FILE)["all_modules"]
    assert full.shape == (3, T, 24, T)
    meta = storage.load_metadata(folder / "scores_tok" / "pairwise_scores.safetensors")
    assert meta["compute_per_token_scores"] == "True"
    check_pinned("per_token/pairwise", tok)
    check_pinned("per_token/token_by_token", full)
    check_pinned("per_token/sequence", analyzer.load_pairwise_scores("seq")["all_modules"])


def test_sum_over_tokens_equals_sequence_scores(runs):
    analyzer, _, _, _ = runs
    tok = analyzer.load_pairwise_scores("tok")["all_modules"].double()
    seq = analyzer.load_pairwise_scores("seq")["all_modules"].double()
    # the same chains (same seeds, same SGLD steps): Cov(sum_t x_t, y) = sum_t Cov(x_t, y). The only difference is
    # float32 summation of T = 8 tokens inside the task vs float64 in the moments: <= 8 * 2^-24 ~ 5e-7 of a loss,
    # and the loss changes the covariance is made of are a few % of the loss, so <= 1e-5 of the scores (measured 1e-7)
    assert torch.allclose(tok.sum(2), seq, rtol=0, atol=1e-5 * float(seq.abs().max()))


def test_masked_tokens_score_exactly_zero(runs):
    analyzer, folder, train, query = runs
    tok = analyzer.load_pairwise_scores("tok")["all_modules"]
    masked = train.labels == -100
    masked[:, 0] = True  # position 0 predicts nothing
    assert bool((tok[:, masked] == 0).all())
    assert bool((tok[:, ~masked] != 0).all())
    full = storage.load_tensors(folder / "scores_tok" / storage.BIF_TOKEN_SCORES_FILE)["all_modules"]
    query_masked = query.labels == -100
    query_masked[:, 0] = True
    assert bool((full[query_masked] == 0).all())  # prompt and padding of the query


def test_token_by_token_sums_over_query_tokens_to_the_per_token_file(runs):
    analyzer, folder, _, _ = runs
    tok = analyzer.load_pairwise_scores("tok")["all_modules"].double()
    full = storage.load_tensors(folder / "scores_tok" / storage.BIF_TOKEN_SCORES_FILE)["all_modules"].double()
    # the measurement is the summed per-token loss, so summing the query tokens gives the sequence measurement
    # (same float32-summation bound as above; measured 2e-7)
    assert torch.allclose(full.sum(1), tok, rtol=0, atol=1e-5 * float(tok.abs().max()))


def test_memory_budget_splits_columns_into_blocks_with_the_same_result(runs):
    analyzer, folder, _, _ = runs
    # 3e-5 GB = 30 kB: the [3 * 9, 24 * 8] float64 sums (41 kB) need two blocks of training rows, each re-running
    # the identical chains; values differ from one pass only by the batch composition of the evaluation (float32)
    tok = analyzer.load_pairwise_scores("tok")["all_modules"].double()
    blocks = analyzer.load_pairwise_scores("blocks")["all_modules"].double()
    assert torch.allclose(blocks, tok, rtol=0, atol=1e-5 * float(tok.abs().max()))  # same bound; measured 0
    full = storage.load_tensors(folder / "scores_blocks" / storage.BIF_TOKEN_SCORES_FILE)["all_modules"]
    assert full.shape == (3, T, 24, T)
    assert not (folder / "scores_blocks" / "bif_checkpoints").exists()


def test_sampled_modules_patterns():
    model = Bigram()
    assert [n for n, _ in select_parameters(model, None, ["head.*"])] == ["head.weight", "head.bias"]
    assert [n for n, _ in select_parameters(model, None, ["embed"])] == ["embed.weight"]  # module name
    with pytest.raises(ValueError, match=r"matches no parameter.*embed.weight"):
        select_parameters(model, None, ["*.attn.*"])
    with pytest.raises(ValueError, match="sampled_modules"):
        BIFArguments(sampled_modules="head.*")
