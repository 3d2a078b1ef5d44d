"""CausalLMTask: summed next-token losses, per-token/per-example views, masks, and kronfluence per-token scores."""

from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from kronfluence_bif import Analyzer, CausalLMTask, FactorArguments, ScoreArguments, prepare_model  # noqa: E402
from kronfluence_bif.loss_views import LossViews  # noqa: E402

VOCAB, T = 40, 12


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def make_batch(seed: int = 0) -> Dict[str, torch.Tensor]:
    """Four right-padded sequences; the last two are prompt/completion queries (labels -100 on the prompt)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (4, T), generator=gen)
    lengths = torch.tensor([T, 9, T, 7])
    attention_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[2, :5] = -100
    labels[3, :4] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def reference_per_token(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Explicit loop over positions: -log p(token t | tokens < t) where labelled and attended, else 0."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    out = torch.zeros(batch["input_ids"].shape)
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            label = int(batch["labels"][b, t])
            if label != -100 and int(batch["attention_mask"][b, t]) == 1:
                out[b, t] = -F.log_softmax(logits[b, t - 1], dim=-1)[label]
    return out


def test_per_token_matches_hand_written_reference(gpt2):
    batch = make_batch()
    task = CausalLMTask(token_position="target")
    with torch.no_grad():
        per_token = task.compute_per_token_train_loss(batch, gpt2)
        measurement = task.compute_per_token_measurement(batch, gpt2)
        expected = reference_per_token(gpt2, batch)
    assert per_token.shape == (4, T)
    torch.testing.assert_close(per_token, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(measurement, per_token, rtol=0, atol=0)


def test_masked_padded_and_first_tokens_are_exactly_zero(gpt2):
    batch = make_batch()
    with torch.no_grad():
        per_token = CausalLMTask(token_position="target").compute_per_token_train_loss(batch, gpt2)
    ignored = (batch["labels"] == -100) | (batch["attention_mask"] == 0)
    ignored[:, 0] = True
    assert torch.all(per_token[ignored] == 0)
    assert torch.all(per_token[~ignored] > 0)


def test_default_token_position_is_kronfluences_input_position(gpt2):
    """Default: the loss of the prediction made at position t sits at t (kronfluence's activations at t)."""
    batch = make_batch()
    with torch.no_grad():
        target = CausalLMTask(token_position="target").compute_per_token_train_loss(batch, gpt2)
        default = CausalLMTask().compute_per_token_train_loss(batch, gpt2)
    assert torch.equal(default[:, :-1], target[:, 1:]) and torch.all(default[:, -1] == 0)
    with pytest.raises(ValueError, match="token_position"):
        CausalLMTask(token_position="middle")


def test_attention_mask_masks_tokens_even_when_labels_do_not():
    """Labels that forget the padding still take no loss where attention_mask == 0; no labels = all tokens."""
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=32)
    ).eval()
    batch = make_batch()
    unlabelled = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    task = CausalLMTask(token_position="target")
    with torch.no_grad():
        per_token = task.compute_per_token_train_loss(unlabelled, model)
    assert torch.all(per_token[batch["attention_mask"] == 0] == 0)
    assert torch.all(per_token[:, 1:][batch["attention_mask"][:, 1:] == 1] > 0)


def test_rows_sum_to_per_example_and_per_example_to_scalar(gpt2):
    batch = make_batch()
    task = CausalLMTask()
    with torch.no_grad():
        per_token = task.compute_per_token_train_loss(batch, gpt2)
        per_example = task.compute_per_example_train_loss(batch, gpt2)
        scalar = task.compute_train_loss(batch, gpt2)
        measurement = task.compute_measurement(batch, gpt2)
        per_example_measurement = task.compute_per_example_measurement(batch, gpt2)
    assert per_example.shape == (4,)
    assert torch.equal(per_token.sum(dim=1), per_example)
    assert torch.equal(per_example.sum(), scalar)
    assert torch.equal(per_example_measurement, per_example)
    assert torch.equal(measurement, scalar)
    assert scalar.dim() == 0


def test_equals_hugging_face_loss_times_label_count(gpt2):
    batch = make_batch()
    with torch.no_grad():
        hf = gpt2(**batch).loss
        ours = CausalLMTask().compute_train_loss(batch, gpt2)
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(ours, hf * n_labels, rtol=1e-5, atol=1e-5)


def test_plain_logits_and_tuple_outputs(gpt2):
    """A model returning a tensor (or a tuple) of logits gives the same losses as `.logits`."""

    class TensorLM(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, as_tuple: bool) -> None:
            super().__init__()
            self.inner, self.as_tuple = inner, as_tuple

        def forward(self, input_ids, attention_mask=None):
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
            return (logits,) if self.as_tuple else logits

    batch = make_batch()
    task = CausalLMTask()
    with torch.no_grad():
        expected = task.compute_per_token_train_loss(batch, gpt2)
        for as_tuple in (False, True):
            torch.testing.assert_close(task.compute_per_token_train_loss(batch, TensorLM(gpt2, as_tuple)), expected)
    with pytest.raises(TypeError, match="logits"):
        task.compute_train_loss(batch, lambda **_: {"nothing": 1})


def test_sampled_loss_is_finite_scalar_with_grad(gpt2):
    batch = make_batch()
    torch.manual_seed(0)
    for p in gpt2.parameters():
        p.requires_grad_(True)
    loss = CausalLMTask().compute_train_loss(batch, gpt2, sample=True)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in gpt2.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    gpt2.zero_grad(set_to_none=True)


def test_sampled_labels_respect_the_mask(gpt2):
    """With `sample=True` only labelled positions take a loss: a batch with no labels gives exactly 0."""
    batch = make_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with torch.no_grad():
        assert CausalLMTask().compute_train_loss(batch, gpt2, sample=True).item() == 0.0


def test_attention_mask_and_tracked_modules():
    batch = make_batch()
    assert CausalLMTask().get_attention_mask(batch) is batch["attention_mask"]
    assert CausalLMTask().get_influence_tracked_modules() is None
    assert CausalLMTask(tracked_modules=["lm_head"]).get_influence_tracked_modules() == ["lm_head"]


def test_bif_loss_views_accept_the_task(gpt2):
    """The BIF contract check (per-example values sum to the scalar methods) passes on the explicit methods."""
    views = LossViews(CausalLMTask())
    batch = make_batch()
    with torch.no_grad():
        views.train.check(batch, gpt2)
        views.measurement.check(batch, gpt2)
    assert views.train.mode == "method" and views.measurement.mode == "method"


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, batch: Dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.batch.items()}


def test_kronfluence_ekfac_per_token_scores(tmp_path):
    """Plain kronfluence workflow on the lm_head (the only nn.Linear of GPT-2): per-token [n_query, n_train, T]."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=32)
    ).eval()
    task = CausalLMTask(tracked_modules=["lm_head"])
    model = prepare_model(model, task)
    train, query = _DictDataset(make_batch(0)), _DictDataset(make_batch(1))
    analyzer = Analyzer("lm", model, task, output_dir=str(tmp_path), disable_tqdm=True, cpu=True)
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=4, factor_args=FactorArguments(strategy="ekfac"))
    score_args = ScoreArguments(compute_per_token_scores=True)
    analyzer.compute_pairwise_scores("tok", "ekfac", query, train, per_device_query_batch_size=4, score_args=score_args)
    analyzer.compute_pairwise_scores("seq", "ekfac", query, train, per_device_query_batch_size=4)
    per_token = analyzer.load_pairwise_scores("tok")["all_modules"]
    sequence = analyzer.load_pairwise_scores("seq")["all_modules"]
    assert per_token.shape == (4, 4, T)
    torch.testing.assert_close(per_token.sum(-1), sequence, rtol=1e-4, atol=1e-4 * float(sequence.abs().max()))


def test_fisher_probe_takes_only_labelled_positions(gpt2):
    """The sketch's Gaussian Fisher probe: finite and differentiable, and exactly 0 (no gradient) without labels."""
    batch = make_batch()
    torch.manual_seed(0)
    for p in gpt2.parameters():
        p.requires_grad_(True)
    probe = CausalLMTask().compute_fisher_probe(batch, gpt2)
    assert probe.dim() == 0 and torch.isfinite(probe) and probe.requires_grad
    batch["labels"] = torch.full_like(batch["labels"], -100)
    empty = CausalLMTask().compute_fisher_probe(batch, gpt2)
    grads = torch.autograd.grad(empty, [p for p in gpt2.parameters()], allow_unused=True)
    assert empty.item() == 0.0 and all(g is None or not g.any() for g in grads)
