"""The tiny character-level GPT-2 demo: tokenizer, Conv1D swap, datasets, renders, and per-token EK-FAC."""

from __future__ import annotations

import dataclasses
import html.parser
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kronfluence_bif import Analyzer, BIFArguments, CausalLMTask, prepare_model  # noqa: E402
from kronfluence_bif.demo import tiny_lm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T = 24


@pytest.fixture(scope="module")
def corpus():
    text = tiny_lm.load_corpus()
    return text, tiny_lm.CharTokenizer.from_text(text), tiny_lm.split_corpus(text, seed=0)


@pytest.fixture()
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_model(tokenizer) -> torch.nn.Module:
    return tiny_lm.make_model(len(tokenizer), n_layer=1, n_embd=16, n_head=2, context=T, seed=0).eval()


def test_tokenizer_round_trip(corpus):
    text, tokenizer, _ = corpus
    sample = text[1000:1300]
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    assert tokenizer.itos[tokenizer.pad_id] == tiny_lm.PAD_TOKEN and len(tokenizer) == len(set(text)) + 2
    assert tokenizer.encode("\x00") == [tokenizer.unk_id]
    assert tokenizer.decode([tokenizer.pad_id, *tokenizer.encode("ab"), tokenizer.pad_id]) == "ab"
    assert tiny_lm.CharTokenizer.from_text(text).itos == tokenizer.itos
    assert tiny_lm.display_token(" ") == "␣" and tiny_lm.display_token("\n") == "↵"


def test_corpus_split_holds_out_paragraphs(corpus):
    _, _, split = corpus
    assert split.heldout_paragraphs and split.train_paragraphs
    assert not set(split.heldout_paragraphs) & set(split.train_paragraphs)
    assert all("****" not in p.splitlines()[-1] for p in split.train_paragraphs[:200])


def test_conv1d_to_linear_keeps_the_logits():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 40, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        tiny_lm.conv1d_to_linear(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert set(tiny_lm.linear_module_names(model)) == {
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
        "lm_head",
    }
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_datasets_are_fixed_length_with_masked_prompts_and_padding(corpus):
    _, tokenizer, split = corpus
    train, texts = tiny_lm.make_train_dataset(tokenizer, split.train_paragraphs, length=T, limit=10)
    queries, pairs = tiny_lm.make_queries(tokenizer, split.heldout_paragraphs, split.train_text, n=3, length=T)
    assert len(train) == 10 and len(queries) == len(pairs) == 3
    for data in (train, queries):
        item = data[0]
        assert set(item) == {"input_ids", "attention_mask", "labels"}
        assert all(v.shape == (T,) and v.dtype == torch.long for v in item.values())
        pad = data.attention_mask == 0
        assert torch.all(data.input_ids[pad] == tokenizer.pad_id) and torch.all(data.labels[pad] == -100)
    assert [tokenizer.decode(row) for row in train.input_ids] == texts
    assert all(len(text) >= T // 4 for text in texts)
    scored = tiny_lm.choose_scored(10, 4, seed=0)
    assert len(scored) == 4 == len(set(scored)) and scored == sorted(scored)
    assert torch.equal(train.subset(scored).input_ids, train.input_ids[scored])
    for q, (prompt, completion) in enumerate(pairs):
        assert len(prompt + completion) < T and completion.startswith(" ")
        assert torch.all(queries.labels[q, : len(prompt)] == -100)
        n = len(prompt + completion)
        assert torch.equal(queries.labels[q, len(prompt) : n], queries.input_ids[q, len(prompt) : n])
        assert (prompt + completion) not in split.train_text
    ids, mask, labels = tiny_lm.encode_fixed(tokenizer, "abcdef", 4, prompt_chars=2)
    assert ids == tokenizer.encode("abcd") and mask == [1] * 4 and labels[:2] == [-100, -100]


def synthetic(seed: int = 0, n_query: int = 2, n_train: int = 5, length: int = 10):
    """Random token ids, masks and a token-by-token score array with one planted maximum."""
    tokenizer = tiny_lm.CharTokenizer(list("abc xyz.\n"))
    rng = np.random.RandomState(seed)
    query_ids = rng.randint(2, len(tokenizer), (n_query, length))
    train_ids = rng.randint(2, len(tokenizer), (n_train, length))
    query_labels = query_ids.copy()
    query_labels[:, :4] = -100
    query_ids[:, -2:] = 0
    query_labels[:, -2:] = -100
    train_mask = np.ones((n_train, length), dtype=bool)
    train_mask[1, 6:] = False
    train_ids[~train_mask] = 0
    token_scores = rng.randn(n_query, length, n_train, length)
    token_scores[1, 5, 3, 2] = 100.0
    token_scores[0, 0, 0, 0] = 1000.0  # invalid position: must never be reported
    query_valid = query_labels != -100
    train_valid = train_mask.copy()
    train_valid[:, 0] = False
    per_token = (token_scores * query_valid[:, :, None, None]).sum(1)
    arrays = dict(
        query_ids=query_ids,
        query_labels=query_labels,
        query_valid=query_valid,
        train_ids=train_ids,
        train_mask=train_mask,
        train_valid=train_valid,
    )
    return tokenizer, arrays, token_scores, per_token


def test_top_token_pairs_and_relation_rates():
    tokenizer, a, scores, _ = synthetic()
    pairs = tiny_lm.top_token_pairs(scores, a["query_valid"], a["train_valid"], k=20)
    assert len(pairs) == 20 and pairs[0][:4] == (1, 5, 3, 2) and pairs[0][4] == 100.0
    assert all(p[4] >= n[4] for p, n in zip(pairs, pairs[1:]))
    assert all(a["query_valid"][q, s] and a["train_valid"][i, t] for q, s, i, t, _ in pairs)
    relations = tiny_lm.relation_matrices(tokenizer)
    rates = tiny_lm.relation_rates(pairs, a["query_ids"], a["train_ids"], a["query_valid"], a["train_valid"], relations)
    qs = a["query_ids"][a["query_valid"]]
    ts = a["train_ids"][a["train_valid"]]
    brute = np.mean([[x == y for y in ts] for x in qs])
    top, base = rates["identical"]
    assert base == pytest.approx(brute)
    assert top == pytest.approx(np.mean([a["query_ids"][q, s] == a["train_ids"][i, t] for q, s, i, t, _ in pairs]))
    assert rates["same ignoring case"][1] >= base
    lines = tiny_lm.format_pairs(pairs[:3], tokenizer, a["query_ids"], a["train_ids"])
    assert len(lines) == 3 and "[" in lines[0] and "+100" in lines[0]


def test_shift_and_top_sequences():
    x = np.arange(12, dtype=float).reshape(1, 2, 6)
    shifted = tiny_lm.shift_to_targets(x)
    assert np.all(shifted[..., 0] == 0) and np.array_equal(shifted[..., 1:], x[..., :-1])
    assert list(tiny_lm.top_train_sequences(x, 0, 2)) == [1, 0]


class _Checker(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack, self.spans, self.styled = [], 0, 0

    def handle_starttag(self, tag, attrs):
        if tag not in ("br", "meta"):
            self.stack.append(tag)
        if tag == "span":
            self.spans += 1
            self.styled += any(k == "style" for k, _ in attrs)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def _render(tmp_path, tokenizer, a, per_token, token_scores, **kwargs):
    """tokens.html of the synthetic arrays, the top 2 training sequences per query."""
    return tiny_lm.render_influence_html(
        tmp_path / "tokens.html",
        tokenizer,
        a["query_ids"],
        a["query_labels"],
        a["train_ids"],
        a["train_mask"],
        per_token,
        token_scores,
        top_k=2,
        **kwargs,
    )


def test_renders_png_and_html_on_synthetic_arrays(tmp_path):
    tokenizer, a, scores, per_token = synthetic()
    png = tiny_lm.plot_token_heatmaps(
        tmp_path / "heat.png",
        scores[1],
        a["query_ids"][1],
        a["query_valid"][1],
        a["train_ids"],
        a["train_mask"],
        tokenizer,
        tiny_lm.top_train_sequences(per_token, 1, 2),
    )
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    for token_scores in (scores, None):
        page = _render(tmp_path, tokenizer, a, per_token, token_scores)
        text = page.read_text(encoding="utf-8")
        checker = _Checker()
        checker.feed(text)
        assert checker.stack == [] and text.startswith("<!doctype html>")
        assert text.count("<h2>Query") == 2 and "rgba(220,40,40" in text and "rgba(40,90,220" in text
        n_train_styled = 2 * 2 * (a["train_mask"].sum(1).max())  # upper bound: two panels of two queries
        assert (
            0
            < checker.styled
            <= n_train_styled + (2 * 2 * a["query_valid"].sum(1).max() if token_scores is not None else 0)
        )


def test_measure_reports_time_and_memory():
    with tiny_lm.measure() as usage:
        block = np.ones(4_000_000)  # 32 MB
        block += 1
    assert usage.seconds > 0 and usage.peak_mib > 0
    # the block may reuse pages freed by earlier tests, so the increase is only bounded, not guaranteed >= 32 MB
    assert 0 <= usage.peak_delta_mib <= usage.peak_mib


def test_load_or_train_caches_the_weights(corpus, tmp_path, restore_threads):
    _, tokenizer, split = corpus
    model_kwargs = {"n_layer": 1, "n_embd": 16, "n_head": 2, "context": T, "seed": 0}
    train_kwargs = {"steps": 3, "batch_size": 4, "disable_tqdm": True}
    model, stats = tiny_lm.load_or_train(tmp_path, tokenizer, split, model_kwargs, train_kwargs)
    assert stats.steps == 3 and np.isfinite(stats.heldout_loss)
    again, cached = tiny_lm.load_or_train(tmp_path, tokenizer, split, model_kwargs, dict(train_kwargs))
    assert cached.cached and not stats.cached
    assert dataclasses.replace(cached, cached=False) == stats
    for p, q in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)
    # another recipe (here: more steps) is another model: trained again, not loaded
    _, other = tiny_lm.load_or_train(tmp_path, tokenizer, split, model_kwargs, {**train_kwargs, "steps": 4})
    assert not other.cached and other.steps == 4


def test_training_defaults_to_a_fixed_number_of_steps(corpus, monkeypatch, restore_threads):
    """No time budget unless asked: the same steps, hence the same weights, on a fast or a loaded machine."""
    _, tokenizer, split = corpus
    monkeypatch.setattr(tiny_lm.train, "DEFAULT_TRAIN_STEPS", 3)  # read where train_lm runs
    args = tiny_lm.parse_args([])
    assert args.steps is None and args.train_seconds is None  # -> DEFAULT_TRAIN_STEPS
    ids = torch.tensor(tokenizer.encode(split.train_text[:5000]), dtype=torch.long)
    runs = []
    for _ in range(2):
        model = tiny_lm.make_model(len(tokenizer), n_layer=1, n_embd=16, n_head=2, context=T, seed=0)
        stats = tiny_lm.train_lm(model, ids, ids, context=T, batch_size=4, disable_tqdm=True)
        assert stats.steps == 3 and stats.recipe["steps"] == 3 and stats.recipe["seconds"] is None
        runs.append(model.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key
    with pytest.raises(ValueError, match="not both"):
        tiny_lm.train_lm(model, ids, ids, context=T, steps=2, seconds=1.0)


def test_ekfac_per_token_path_and_bif_call(corpus, tmp_path):
    """EK-FAC per-token scores are [n_query, n_train, T]; BIF per-token gives [n_query, n_train, T] and token pairs."""
    _, tokenizer, split = corpus
    train, _ = tiny_lm.make_train_dataset(tokenizer, split.train_paragraphs, length=T, limit=16)
    scored = tiny_lm.choose_scored(len(train), 8)
    queries, _ = tiny_lm.make_queries(tokenizer, split.heldout_paragraphs, split.train_text, n=3, length=T)
    model = tiny_lm.conv1d_to_linear(tiny_model(tokenizer))
    task = CausalLMTask(tracked_modules=tiny_lm.linear_module_names(model), token_position="target")
    model = prepare_model(model, task)
    analyzer = Analyzer("lm", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True)
    ekfac, usage = tiny_lm.run_ekfac_per_token(analyzer, train, queries, scored, batch_size=8)
    assert ekfac.shape == (3, 8, T) and np.isfinite(ekfac).all() and usage.seconds > 0
    mask = train.subset(scored).attention_mask.numpy()
    assert np.all(ekfac[:, mask == 0] == 0)
    lengths = mask.sum(1)
    assert np.all(ekfac[:, np.arange(8), lengths - 1] == 0)  # last real token predicts nothing
    bif_args = BIFArguments(num_chains=1, num_draws=8, num_burnin_steps=2, sampler_batch_size=4, draws_per_block=4)
    bif, token_scores, _ = tiny_lm.run_bif_per_token(analyzer, train, queries, bif_args, scored, batch_size=8)
    # per-token BIF: covariances, so summing the query tokens gives the sequence measurement
    assert bif.shape == (3, 8, T) and token_scores.shape == (3, T, 8, T)
    assert np.all(bif[:, mask == 0] == 0) and np.all(token_scores[:, :, mask == 0] == 0)
    np.testing.assert_allclose(token_scores.sum(1), bif, rtol=1e-3, atol=1e-3 * np.abs(bif).max())


def test_example_script_end_to_end(tmp_path, monkeypatch, capsys, restore_threads):
    script = REPO / "examples" / "tiny_lm" / "run.py"
    argv = [str(script), "--output-dir", str(tmp_path), "--steps", "2", "--n-layer", "1", "--n-embd", "16"]
    argv += ["--context", str(T), "--n-train", "6", "--n-posterior", "12", "--n-query", "2", "--top", "2", "--quiet"]
    argv += ["--skip-bif"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "EK-FAC per-token scores [2, 6, 24]" in out and "peak RSS" in out
    assert (tmp_path / "ekfac_tokens.html").exists() and (tmp_path / "model" / "model.safetensors").exists()


def test_html_labels_its_boxes_and_says_when_the_chains_had_not_mixed(tmp_path):
    import json

    tokenizer, a, scores, per_token = synthetic()
    folder = tmp_path / "scores_bif"
    folder.mkdir()
    assert tiny_lm.mixing_warning(folder) == ""  # no diagnostics: nothing to say
    report = {
        "chains": [{"chain": 0, "ess_mean_train_loss": 4.2}, {"chain": 1, "ess_mean_train_loss": 6.0}],
        "rhat_mean_train_loss": 1.61,
        "warnings": [{"code": "rhat", "chain": None, "message": "..."}],
    }
    (folder / "bif_diagnostics.json").write_text(json.dumps(report))
    warning = tiny_lm.mixing_warning(folder)
    assert "had not mixed (R-hat 1.61; about 4 effective draws per chain; warnings: rhat)" in warning
    assert "When the diagnostics warn" in warning
    page = _render(tmp_path, tokenizer, a, per_token, scores, warning=warning)
    text = page.read_text(encoding="utf-8")
    assert '<p class="warn">The BIF chains had not mixed' in text
    top = tiny_lm.top_train_sequences(per_token, 0, 2)
    assert f"<b>query 0</b>: each completion token coloured by the influence of train #{int(top[0])} on it" in text
    assert f"<b>#1 train #{int(top[0])}</b>" in text and "its influence on the whole completion of query 0" in text
    report["warnings"] = []
    (folder / "bif_diagnostics.json").write_text(json.dumps(report))
    assert tiny_lm.mixing_warning(folder) == ""
