"""A/B of EK-FAC, identity (gradient similarity) and BIF on a shipped problem, judged by LDS against retraining.

    python -m kronfluence_bif.demo.ab --task uci_concrete            # or: python examples/uci_concrete/run.py
    python -m kronfluence_bif.demo.ab --task digits --bif-args '{"sampler": "rmsprop_sgld", "step_size": 1e-4}'

One `kronfluence_bif.Analyzer` fits and scores the three methods side by side (the factors name binds the
strategy). The same training recipe is then rerun, with other seeds, on random halves of the training set
(`kronfluence_bif.lds.retrain_subsets`, cached and resumable); each retrained model measures every query with the
Task's own per-example measurement, so LDS scores exactly the quantity the influence scores predict. Results land
in `--output-dir`: `summary.json`, `results.md` (the printed Markdown tables), `ab_scatter.png`, the score folders
(`ab/scores_<method>/`) and the retrain cache.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kronfluence_bif import (
    Analyzer,
    BIFArguments,
    BIFTask,
    ClassificationTask,
    RegressionTask,
    prepare_model,
    storage,
)
from kronfluence_bif.argtypes import int_at_least
from kronfluence_bif.compare import Comparison, compare
from kronfluence_bif.demo.digits import load_digits_split, train_classifier
from kronfluence_bif.demo.uci import load_concrete, train_mlp
from kronfluence_bif.lds import (
    LDSResult,
    SubsetRetrains,
    draw_subset_masks,
    linear_datamodeling_score,
    retrain_subsets,
    score_pairwise,
)
from kronfluence_bif.logs import logger
from kronfluence_bif.storage import jsonable
from kronfluence_bif.threads import set_threads

# Methods scored through the one Analyzer: (factors/scores name, table label, kronfluence strategy).
METHODS: Tuple[Tuple[str, str, str], ...] = (("ekfac", "EK-FAC", "ekfac"), ("identity", "identity", "identity"))
BIF_METHOD = "bif"
REFERENCE = "ekfac"
ANALYSIS_NAME = "ab"
# Retrain i uses seed RETRAIN_SEED_BASE + i; the analysed model uses seed 0, so no retrain repeats its seed.
RETRAIN_SEED_BASE = 1000
SUMMARY_FILE, MARKDOWN_FILE, PLOT_FILE = "summary.json", "results.md", "ab_scatter.png"
SUMMARY_KEYS = ("problem", "settings", "methods", "agreement", "timings", "files", "environment")


# ---------------------------------------------------------------------------------------------- problems
@dataclass
class ABProblem:
    """Data, kronfluence Task and training recipe of one A/B; `fit(data, seed=...)` trains the model and retrains."""

    name: str
    title: str
    train: TensorDataset
    query: TensorDataset
    task: BIFTask
    fit: Callable[..., nn.Module]
    recipe: str
    measurement: str


def uci_concrete_problem(epochs: int = 100) -> ABProblem:
    """kronfluence's UCI regression MLP on the shipped concrete data; measurement: the query's squared error."""
    train, query = load_concrete()
    return ABProblem(
        name="uci_concrete",
        title="UCI concrete MLP 8-128-128-128-1",
        train=train,
        query=query,
        task=RegressionTask(),
        fit=functools.partial(train_mlp, epochs=epochs),
        recipe=f"epochs{epochs}",
        measurement="squared error (RegressionTask)",
    )


def digits_problem(epochs: int = 60) -> ABProblem:
    """scikit-learn digits MLP classifier; measurement: the query's cross-entropy (ClassificationTask's default)."""
    train, query = load_digits_split()
    return ABProblem(
        name="digits",
        title="digits MLP 64-128-128-10",
        train=train,
        query=query,
        task=ClassificationTask(measurement="loss"),
        fit=functools.partial(train_classifier, epochs=epochs),
        # "preciseloss": the precise cross-entropy of 2026-12-03, so caches measured with float32's are not reused
        recipe=f"epochs{epochs}_preciseloss",
        measurement="cross-entropy (ClassificationTask, measurement='loss')",
    )


PROBLEMS: Dict[str, Callable[..., ABProblem]] = {"uci_concrete": uci_concrete_problem, "digits": digits_problem}


# ---------------------------------------------------------------------------------------------- scoring
def score_method(
    analyzer: Analyzer, problem: ABProblem, name: str, strategy: str, bif_args: Optional[BIFArguments] = None
) -> Tuple[np.ndarray, float]:
    """Fit factors `name` with `strategy` and score every query against every training example; (scores, seconds).

    `kronfluence_bif.lds.score_pairwise` on the problem's training and query sets.
    """
    return score_pairwise(analyzer, name, strategy, problem.train, problem.query, bif_args)


# ---------------------------------------------------------------------------------------------- retraining
def measure_queries(task: BIFTask, model: nn.Module, query: TensorDataset) -> np.ndarray:
    """The Task's per-example measurement of every query, the quantity the influence scores predict."""
    with torch.no_grad():
        return task.compute_per_example_measurement(query.tensors, model).double().numpy()


def retrain_measurements(
    problem: ABProblem,
    n_retrains: int,
    cache_path: Path,
    fraction: float = 0.5,
    seed: int = 0,
    disable_tqdm: bool = True,
) -> Tuple[SubsetRetrains, int, float]:
    """Retrain on `n_retrains` random subsets (cached in `cache_path`); (retrains, retrains run now, their seconds).

    Subset i is `draw_subset_masks(...)[i]` and is trained with seed `RETRAIN_SEED_BASE + i`, so a resumed run
    trains exactly the models an uninterrupted one would.
    """
    masks = draw_subset_masks(len(problem.train), n_retrains, fraction, seed)
    subset_index = {np.flatnonzero(m).astype(np.int64).tobytes(): i for i, m in enumerate(masks)}
    computed: List[float] = []

    def train_fn(indices: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        rows = torch.from_numpy(indices)
        subset = TensorDataset(*(t[rows] for t in problem.train.tensors))
        model = problem.fit(subset, seed=RETRAIN_SEED_BASE + subset_index[indices.tobytes()])
        measured = measure_queries(problem.task, model, problem.query)
        computed.append(time.perf_counter() - start)
        return measured

    retrains = retrain_subsets(
        train_fn, len(problem.train), n_retrains, fraction, seed, cache_path=cache_path, disable_tqdm=disable_tqdm
    )
    return retrains, len(computed), float(sum(computed))


# ---------------------------------------------------------------------------------------------- summary
def lds_summary(result: LDSResult) -> Dict[str, Any]:
    """Mean LDS over queries, its standard error, and the per-query values."""
    valid = result.per_query[~np.isnan(result.per_query)]
    stderr = float(valid.std(ddof=1) / math.sqrt(valid.size)) if valid.size > 1 else math.nan
    return {**result.to_dict(), "stderr": stderr}


def agreement_summary(comparison: Comparison) -> Dict[str, Any]:
    """Means over queries of every metric of `kronfluence_bif.compare`, plus the full summary."""
    summary = comparison.summary
    return {
        "a": comparison.label_a,
        "b": comparison.label_b,
        "k": comparison.k,
        "spearman": summary["spearman"]["mean"],
        "pearson": summary["pearson"]["mean"],
        "topk_overlap": summary["topk_overlap"]["mean"],
        "bottomk_overlap": summary["bottomk_overlap"]["mean"],
        "sign_agreement": summary["sign_agreement"]["mean"],
        "topk_sign_agreement": summary["topk_sign_agreement"]["mean"],
        "summary": summary,
    }


def bif_label(overrides: Dict[str, Any]) -> str:
    """`BIF (defaults)` or `BIF (step_size=0.0001, nbeta=100)`."""
    if not overrides:
        return "BIF (defaults)"
    return "BIF (" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")"


# ---------------------------------------------------------------------------------------------- Markdown
def _num(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _retrain_text(timings: Dict[str, Any], n_retrains: int) -> str:
    """How long the retraining took, and how much of it came from the cache."""
    done = timings["retrains_computed"]
    if done == 0:
        return f"all {n_retrains} retrains read from the cache"
    seconds = timings["retrain_seconds"]
    text = f"retraining {done} models in {seconds:.1f} s ({seconds / done:.2f} s each)"
    return text + (f", {n_retrains - done} more read from the cache" if done < n_retrains else "")


def format_markdown(summary: Dict[str, Any]) -> str:
    """The results as Markdown: LDS and timing per method, agreement with EK-FAC, retraining cost."""
    s, t = summary["settings"], summary["timings"]
    k = s["k"]
    lines = [
        f"**{summary['problem']['title']}**: {s['n_train']} train, {s['n_query']} queries, "
        f"{s['n_retrains']} retrains on random halves; measurement: {summary['problem']['measurement']}.",
        "",
        f"| method | LDS (mean ± s.e.) | Spearman vs EK-FAC | top-{k} overlap vs EK-FAC | fit + score (s) |",
        "|---|---|---|---|---|",
    ]
    for name, method in summary["methods"].items():
        lds = method["lds"]
        agree = summary["agreement"].get(f"{name}_vs_{REFERENCE}")
        rho, top = ("1", "1") if name == REFERENCE else (_num(agree["spearman"]), _num(agree["topk_overlap"], 2))
        lines.append(
            f"| {method['label']} | {_num(lds['mean'])} ± {_num(lds['stderr'])} | {rho} | {top} | "
            f"{method['seconds']:.1f} |"
        )
    lines += [
        "",
        "| agreement with EK-FAC (mean over queries) | Spearman | Pearson | "
        f"top-{k} helpful | top-{k} harmful | sign agreement | sign agreement on EK-FAC's top-{k} by magnitude |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, agree in summary["agreement"].items():
        label = summary["methods"][name.split("_vs_")[0]]["label"]
        lines.append(
            f"| {label} | {_num(agree['spearman'])} | {_num(agree['pearson'])} | {_num(agree['topk_overlap'], 2)} | "
            f"{_num(agree['bottomk_overlap'], 2)} | {_num(agree['sign_agreement'], 2)} | "
            f"{_num(agree['topk_sign_agreement'], 2)} |"
        )
    lines += [
        "",
        f"Model training {t['train_seconds']:.1f} s; {_retrain_text(t, s['n_retrains'])}; "
        f"total {t['total_seconds']:.1f} s on {summary['environment']['torch_threads']} torch thread(s).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plot
def _symlog_threshold(values: np.ndarray) -> float:
    """Linear range of a symlog axis: the decade of the median |score|, so the bulk and the heavy tail both show."""
    nonzero = np.abs(values[values != 0])
    return float(10.0 ** np.floor(np.log10(np.median(nonzero)))) if nonzero.size else 1.0


def plot_ab(
    path: Path,
    ekfac: np.ndarray,
    bif: np.ndarray,
    lds: Dict[str, Tuple[float, float]],
    queries: Sequence[int],
    k: int,
) -> bool:
    """Save BIF-vs-EK-FAC scatter plots (one per query) and LDS bars (mean, s.e.); False when matplotlib is missing.

    matplotlib is imported here, lazily, and only through its object-oriented API (no pyplot backend switch).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib); skipping the plot %s.", path)
        return False
    fig = Figure(figsize=(4.0 * (len(queries) + 1), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(queries) + 1, squeeze=False)[0]
    for ax, q in zip(axes, queries):
        top = np.zeros(ekfac.shape[1], dtype=bool)
        top[np.argsort(-ekfac[q], kind="stable")[:k]] = True
        ax.scatter(ekfac[q, ~top], bif[q, ~top], s=6, alpha=0.5, color="tab:blue", label="training example")
        ax.scatter(ekfac[q, top], bif[q, top], s=18, color="tab:red", label=f"EK-FAC top-{k}")
        ax.set_xscale("symlog", linthresh=_symlog_threshold(ekfac[q]))
        ax.set_yscale("symlog", linthresh=_symlog_threshold(bif[q]))
        for axis in (ax.xaxis, ax.yaxis):
            axis.get_major_locator().set_params(numticks=7)  # symlog's default labels every decade and overlaps
        ax.tick_params(labelsize=7)
        ax.tick_params(axis="x", labelrotation=40)
        rho = compare(ekfac[q : q + 1], bif[q : q + 1], k=k).mean_spearman
        ax.set_title(f"query {q}: Spearman {rho:.2f}", fontsize=10)
        ax.set_xlabel("EK-FAC score (symlog)")
        ax.set_ylabel("BIF score (symlog)")
    axes[0].legend(fontsize=8, loc="best")
    bars = axes[-1]
    names = list(lds)
    means, errors = [lds[n][0] for n in names], [lds[n][1] for n in names]
    bars.bar(names, means, yerr=errors, capsize=4, color=["tab:gray", "tab:olive", "tab:green"][: len(names)])
    bars.axhline(0.0, color="black", linewidth=0.8)
    bars.set_title("LDS, mean ± s.e. over queries (higher is better)", fontsize=10)
    bars.tick_params(axis="x", labelrotation=15)
    temporary = path.with_name(path.name + ".tmp.png")
    fig.savefig(temporary, dpi=110)
    os.replace(temporary, path)
    return True


# ---------------------------------------------------------------------------------------------- run
def _score_all(
    problem: ABProblem, model: nn.Module, output_dir: Path, bif_args: BIFArguments, disable_tqdm: bool
) -> Dict[str, Tuple[np.ndarray, float]]:
    """EK-FAC, identity and BIF scores [n_query, n_train] and wall times, all from one Analyzer."""
    model = prepare_model(model, problem.task)
    analyzer = Analyzer(
        ANALYSIS_NAME, model, problem.task, cpu=True, output_dir=str(output_dir), disable_tqdm=disable_tqdm
    )
    results = {}
    for name, _, strategy in METHODS:
        logger.info("Scoring with %s ...", strategy)
        results[name] = score_method(analyzer, problem, name, strategy)
    draws = "the sampler's default" if bif_args.num_draws is None else bif_args.num_draws
    logger.info("Scoring with BIF (%d chains x %s draws) ...", bif_args.num_chains, draws)
    results[BIF_METHOD] = score_method(analyzer, problem, BIF_METHOD, "bif", bif_args)
    return results


def _evaluate(
    scored: Dict[str, Tuple[np.ndarray, float]], retrains: SubsetRetrains, labels: Dict[str, str], k: int
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(per method: label, seconds and LDS; agreement of BIF and identity with the reference EK-FAC)."""
    methods = {
        name: {
            "label": labels[name],
            "seconds": seconds,
            "lds": lds_summary(linear_datamodeling_score(scores, retrains.masks, retrains.measurements)),
        }
        for name, (scores, seconds) in scored.items()
    }
    reference = scored[REFERENCE][0]
    agreement = {
        f"{name}_vs_{REFERENCE}": agreement_summary(
            compare(reference, scored[name][0], k=k, label_a=labels[REFERENCE], label_b=labels[name])
        )
        for name in (BIF_METHOD, "identity")
    }
    return methods, agreement


def _settings(
    problem: ABProblem, n_retrains: int, retrain_seed: int, k: int, overrides: Dict[str, Any], bif_args: BIFArguments
) -> Dict[str, Any]:
    """The `settings` entry of the summary: sizes, retraining, recipe, k and the BIF arguments."""
    return {
        "n_train": len(problem.train),
        "n_query": len(problem.query),
        "n_retrains": n_retrains,
        "retrain_fraction": 0.5,
        "retrain_seed": retrain_seed,
        "retrain_model_seeds": f"{RETRAIN_SEED_BASE} + subset index",
        "recipe": problem.recipe,
        "k": k,
        "bif_overrides": overrides,
        "bif_args": bif_args.to_dict(),
    }


def _files(out: Path, plot: Optional[Path], cache: Path, scored: Dict[str, Any]) -> Dict[str, Any]:
    """The `files` entry of the summary: where the summary, tables, plot, retrain cache and score folders are."""
    return {
        "summary": str(out / SUMMARY_FILE),
        "markdown": str(out / MARKDOWN_FILE),
        "plot": str(plot) if plot is not None else None,
        "retrain_cache": str(cache),
        "scores": {name: str(storage.scores_dir(out / ANALYSIS_NAME, name)) for name in scored},
    }


def run_ab(
    problem: ABProblem,
    output_dir: str,
    n_retrains: int = 100,
    bif_overrides: Optional[Dict[str, Any]] = None,
    k: int = 10,
    plot_queries: int = 3,
    retrain_seed: int = 0,
    disable_tqdm: bool = True,
) -> Dict[str, Any]:
    """Train, score (EK-FAC, identity, BIF), retrain on random halves, compute LDS and agreement; write the results.

    Returns the summary written to `summary.json` (keys `SUMMARY_KEYS`). `bif_overrides` are BIFArguments fields
    (unknown names raise ValueError); retrains are cached in `output_dir`, keyed by problem, recipe, count and seed.
    """
    start = time.perf_counter()
    overrides = dict(bif_overrides or {})
    bif_args = BIFArguments.from_dict(overrides)
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    logger.info("Training the %s on %d examples ...", problem.title, len(problem.train))
    train_start = time.perf_counter()
    model = problem.fit(problem.train, seed=0)
    train_seconds = time.perf_counter() - train_start
    scored = _score_all(problem, model, out, bif_args, disable_tqdm)
    cache = out / f"retrains_{problem.name}_{problem.recipe}_{n_retrains}x_seed{retrain_seed}.safetensors"
    logger.info("Retraining on %d random halves (cache: %s) ...", n_retrains, cache)
    retrains, n_computed, retrain_seconds = retrain_measurements(
        problem, n_retrains, cache, seed=retrain_seed, disable_tqdm=disable_tqdm
    )
    labels = {name: label for name, label, _ in METHODS}
    labels[BIF_METHOD] = bif_label(overrides)
    methods, agreement = _evaluate(scored, retrains, labels, k)
    plot_path = out / PLOT_FILE
    lds_bars = {labels[n].split(" (")[0]: (m["lds"]["mean"], m["lds"]["stderr"]) for n, m in methods.items()}
    reference = scored[REFERENCE][0]
    queries = list(range(min(plot_queries, reference.shape[0])))
    plotted = plot_ab(plot_path, reference, scored[BIF_METHOD][0], lds_bars, queries, k)
    summary = {
        "problem": {"name": problem.name, "title": problem.title, "measurement": problem.measurement},
        "settings": _settings(problem, n_retrains, retrain_seed, k, overrides, bif_args),
        "methods": methods,
        "agreement": agreement,
        "timings": {
            "train_seconds": train_seconds,
            "retrain_seconds": retrain_seconds,
            "retrains_computed": n_computed,
            "total_seconds": time.perf_counter() - start,
        },
        "files": _files(out, plot_path if plotted else None, cache, scored),
        "environment": {"torch": torch.__version__, "torch_threads": torch.get_num_threads()},
    }
    summary = jsonable(summary)
    storage.save_json(summary, out / SUMMARY_FILE)
    storage.atomic_write_text(out / MARKDOWN_FILE, format_markdown(summary))
    return summary


# ---------------------------------------------------------------------------------------------- command line
def _json_object(text: str) -> Dict[str, Any]:
    """An argparse type: a JSON object (BIFArguments overrides)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"step_size\": 1e-4}}', got {text!r}")
    return value


def build_parser(task: Optional[str] = None) -> argparse.ArgumentParser:
    """Flags of the A/B; `task` fixes the problem (examples/<task>/run.py) instead of offering `--task`."""
    prog = "python -m kronfluence_bif.demo.ab" if task is None else f"python examples/{task}/run.py"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    if task is None:
        parser.add_argument("--task", choices=sorted(PROBLEMS), default="uci_concrete", help="which shipped problem")
    parser.add_argument(
        "--retrains", type=int_at_least(3), default=100, help="models retrained on random halves for LDS (>= 3)"
    )
    parser.add_argument("--output-dir", default=None, help="default: ./influence_results/<task>")
    parser.add_argument("--bif-args", type=_json_object, default={}, help="JSON object of BIFArguments overrides")
    parser.add_argument(
        "--epochs", type=int_at_least(1), default=None, help="training epochs (default: the demo's recipe)"
    )
    parser.add_argument(
        "--threads", type=int_at_least(1), default=1, help="torch CPU threads (1 is fastest for these MLPs)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    return parser


def main(argv: Optional[Sequence[str]] = None, task: Optional[str] = None) -> Dict[str, Any]:
    """Parse the flags, run the A/B, print the Markdown tables; returns the summary."""
    parser = build_parser(task)
    args = parser.parse_args(argv)
    try:
        BIFArguments.from_dict(args.bif_args)  # fail before training, not after
    except (TypeError, ValueError) as exc:
        parser.error(f"--bif-args: {exc}")
    name = task or args.task
    warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's torch.cuda.amp deprecation notices
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    set_threads(args.threads)
    problem = PROBLEMS[name]() if args.epochs is None else PROBLEMS[name](epochs=args.epochs)
    output_dir = args.output_dir or os.path.join("influence_results", name)
    summary = run_ab(problem, output_dir, args.retrains, args.bif_args, disable_tqdm=args.quiet)
    print(format_markdown(summary))
    print(f"Results in {output_dir}: {SUMMARY_FILE}, {MARKDOWN_FILE}, {PLOT_FILE}")
    return summary


if __name__ == "__main__":
    main()
