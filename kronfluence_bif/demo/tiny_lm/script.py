"""Per-token influence on a tiny character-level GPT-2 trained on Python's own help texts (no downloads).

The script behind `python -m kronfluence_bif.demo.tiny_lm`: flags, training (or the cached model), the
EK-FAC and BIF runs, the renders and what is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from kronfluence_bif import Analyzer, BIFArguments, CausalLMTask, prepare_model
from kronfluence_bif.demo.tiny_lm.analysis import (
    format_pairs,
    per_token_agreement,
    relation_matrices,
    relation_rates,
    shift_to_targets,
    top_token_pairs,
)
from kronfluence_bif.demo.tiny_lm.corpus import (
    CharTokenizer,
    CorpusSplit,
    TokenDataset,
    choose_scored,
    load_corpus,
    make_queries,
    make_train_dataset,
    split_corpus,
)
from kronfluence_bif.demo.tiny_lm.influence import (
    DEFAULT_BIF_ARGS,
    run_bif_per_token,
    run_ekfac_per_token,
    score_inputs,
)
from kronfluence_bif.demo.tiny_lm.model import conv1d_to_linear, linear_module_names
from kronfluence_bif.demo.tiny_lm.render import mixing_warning, render_all
from kronfluence_bif.demo.tiny_lm.train import DEFAULT_TRAIN_STEPS, TrainingStats, load_or_train
from kronfluence_bif.threads import set_threads
from kronfluence_bif.usage import Usage


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The demo's flags (`--help` lists them)."""
    parser = argparse.ArgumentParser(prog="python -m kronfluence_bif.demo.tiny_lm", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="./influence_results/tiny_lm", help="model cache, scores and renders")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default {DEFAULT_TRAIN_STEPS}, the same on any machine)",
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="train for this wall-time budget instead of a number of steps (results then depend on the machine)",
    )
    parser.add_argument("--retrain", action="store_true", help="train even when a cached model exists")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--context", type=int, default=64, help="model context = fixed sequence length T")
    parser.add_argument("--n-train", type=int, default=128, help="training sequences scored")
    parser.add_argument("--n-posterior", type=int, default=None, help="training sequences in the posterior (all)")
    parser.add_argument("--n-query", type=int, default=6, help="prompt/completion queries")
    parser.add_argument("--top", type=int, default=3, help="training sequences shown per query")
    parser.add_argument("--bif-args", default="{}", help="JSON overrides of the demo's BIFArguments")
    parser.add_argument("--skip-bif", action="store_true", help="EK-FAC only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    return parser.parse_args(argv)


def _print_usage(name: str, usage: Usage) -> None:
    """One line of the cost table: wall time and peak RSS of a method's fit and scores."""
    peak = "peak RSS" if usage.exact_peak else "process peak RSS so far"
    print(f"  {name:24s} {usage.seconds:7.1f} s   {peak} {usage.peak_mib:7.0f} MiB (+{usage.peak_delta_mib:.0f} MiB)")


def report_token_pairs(
    token_scores: np.ndarray, arrays: Dict[str, np.ndarray], tokenizer: CharTokenizer, k: int = 100, show: int = 12
) -> Dict[str, Tuple[float, float]]:
    """Print the top token pairs and how often the paired characters are related, against the base rate."""
    pairs = top_token_pairs(token_scores, arrays["query_valid"], arrays["train_valid"], k)
    print(f"\nTop {min(show, len(pairs))} of the {len(pairs)} largest token pairs (query token <- training token):")
    for line in format_pairs(pairs[:show], tokenizer, arrays["query_ids"], arrays["train_ids"]):
        print("  " + line)
    rates = relation_rates(
        pairs,
        arrays["query_ids"],
        arrays["train_ids"],
        arrays["query_valid"],
        arrays["train_valid"],
        relation_matrices(tokenizer),
    )
    print(f"Among the top {len(pairs)} pairs vs all valid pairs (base rate):")
    for name, (top, base) in rates.items():
        print(f"  {name:40s} {top:6.2f}  vs {base:6.3f}")
    return rates


def _print_model(args: argparse.Namespace, model: nn.Module, stats: TrainingStats) -> None:
    """What was trained (or loaded): size, steps, time and losses."""
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Model: GPT-2 {args.n_layer} layers x {args.n_embd}, {n_params / 1e3:.0f}k parameters; "
        f"{'loaded from the cache (--retrain to train again), ' if stats.cached else ''}trained {stats.steps} "
        f"steps in {stats.seconds:.0f} s ({stats.threads} thread(s)): loss {stats.train_loss:.3f} nats/char, "
        f"held-out {stats.heldout_loss:.3f}"
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train (or load) the tiny LM, score per token with EK-FAC and BIF, render and print; returns the results."""
    args = parse_args(argv)
    if args.steps is not None and args.train_seconds is not None:
        raise SystemExit("error: give --steps or --train-seconds, not both")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    set_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    text = load_corpus()
    tokenizer, split = CharTokenizer.from_text(text), split_corpus(text, seed=args.seed)
    model_kwargs = {"n_layer": args.n_layer, "n_embd": args.n_embd, "context": args.context, "seed": args.seed}
    train_kwargs = {"seconds": args.train_seconds, "steps": args.steps, "seed": args.seed, "disable_tqdm": args.quiet}
    print(
        f"Corpus: {len(text)} characters, {len(tokenizer)} tokens; {len(split.heldout_paragraphs)} held-out paragraphs"
    )
    model, stats = load_or_train(out / "model", tokenizer, split, model_kwargs, train_kwargs, args.retrain)
    _print_model(args, model, stats)
    return score_and_render(model, tokenizer, split, out, args)


def _datasets(
    tokenizer: CharTokenizer, split: CorpusSplit, args: argparse.Namespace
) -> Tuple[TokenDataset, List[int], TokenDataset, List[Tuple[str, str]]]:
    """(posterior training set, scored indices into it, queries, their (prompt, completion) texts); prints them."""
    train, _ = make_train_dataset(tokenizer, split.train_paragraphs, args.context, args.n_posterior)
    scored = choose_scored(len(train), args.n_train, args.seed)
    queries, pairs = make_queries(
        tokenizer, split.heldout_paragraphs, split.train_text, args.n_query, args.context, args.seed
    )
    for q, (prompt, completion) in enumerate(pairs):
        print(f"  query {q}: {prompt!r} -> {completion!r}")
    return train, scored, queries, pairs


def _analyzer(model: nn.Module, out: Path, args: argparse.Namespace) -> Analyzer:
    """One Analyzer over the model with its Conv1D layers as `nn.Linear`, every linear layer tracked."""
    model = conv1d_to_linear(model)
    # the demo shows each loss on the token it predicts ("target"); EK-FAC is shifted the same way for display
    task = CausalLMTask(tracked_modules=linear_module_names(model), token_position="target")
    model = prepare_model(model, task)
    return Analyzer("scores", model, task, cpu=True, output_dir=str(out), disable_tqdm=args.quiet)


def score_and_render(
    model: nn.Module, tokenizer: CharTokenizer, split: CorpusSplit, out: Path, args: argparse.Namespace
) -> Dict[str, Any]:
    """Per-token EK-FAC and BIF on the trained model, then the renders and printed statistics."""
    train, scored, queries, pairs = _datasets(tokenizer, split, args)
    analyzer = _analyzer(model, out, args)
    arrays = score_inputs(train.subset(scored), queries)
    results: Dict[str, Any] = {"pairs": pairs, "arrays": arrays, "scored": scored}
    print(f"Training sequences: {len(train)} (posterior / EK-FAC factors), {len(scored)} scored; T = {args.context}")

    ekfac, results["ekfac_usage"] = run_ekfac_per_token(analyzer, train, queries, scored)
    results["ekfac"] = ekfac
    print(f"\nEK-FAC per-token scores {list(ekfac.shape)} -> {out}/scores/scores_ekfac_per_token/")
    # kronfluence's score at input position t is (almost all) the prediction of token t + 1: show it there
    note = "EK-FAC's score at input position t is shown on the token it predicts (t + 1), see `shift_to_targets`."
    results["renders"] = render_all(out, "ekfac", tokenizer, arrays, shift_to_targets(ekfac), None, args.top, note)
    if not args.skip_bif:
        _score_bif(analyzer, train, queries, scored, tokenizer, out, args, results)
    print("\nCost (fit + per-token scores):")
    _print_usage("EK-FAC", results["ekfac_usage"])
    if "bif_usage" in results:
        _print_usage("BIF", results["bif_usage"])
    print("Renders: " + ", ".join(str(p) for p in results["renders"]))
    return results


def _score_bif(
    analyzer: Analyzer,
    train: TokenDataset,
    queries: TokenDataset,
    scored: List[int],
    tokenizer: CharTokenizer,
    out: Path,
    args: argparse.Namespace,
    results: Dict[str, Any],
) -> None:
    """BIF per-token and token-by-token scores, their renders, agreement and token pairs, added to `results`."""
    arrays = results["arrays"]
    bif_args = BIFArguments(**{**DEFAULT_BIF_ARGS, **json.loads(args.bif_args)})
    bif, token_scores, results["bif_usage"] = run_bif_per_token(analyzer, train, queries, bif_args, scored)
    results.update(bif=bif, bif_token_scores=token_scores)
    shape = None if token_scores is None else list(token_scores.shape)
    print(f"BIF per-token scores {list(bif.shape)}; token-by-token {shape}")
    warning = mixing_warning(out / "scores" / "scores_bif_per_token")
    if warning:
        print(warning)
    results["renders"] += render_all(out, "bif", tokenizer, arrays, bif, token_scores, args.top, "", warning)
    results["agreement"] = per_token_agreement(results["ekfac"], bif, arrays["train_valid"])
    print("Agreement EK-FAC vs BIF (mean per-query Spearman): " + json.dumps(results["agreement"]))
    if token_scores is not None:
        results["relations"] = report_token_pairs(token_scores, arrays, tokenizer)
