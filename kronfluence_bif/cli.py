"""`kronfluence-bif` command line: compare two score folders, inspect one query, print BIF sampling diagnostics.

    kronfluence-bif compare runs/uci/scores_ekfac runs/uci/scores_bif --min-spearman 0.05 --k 10
    kronfluence-bif inspect runs/uci/scores_bif --query 3 --top 5
    kronfluence-bif diagnose runs/uci/scores_bif

Exit status: 0 success; 1 a check failed (a `compare` threshold, `diagnose --strict` warnings, `calibrate` found
no usable setting); 2 bad usage or unreadable input (message on stderr).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from safetensors import SafetensorError

import kronfluence_bif
from kronfluence_bif import storage
from kronfluence_bif.compare import compare, jsonable, load_scores
from kronfluence_bif.storage import BIF_DIAGNOSTICS_FILE, BIF_TRACES_FILE

PROG = "kronfluence-bif"
# Traces printed first, in this order; any other [num_chains, num_draws] trace follows.
MAIN_TRACES = ("mean_train_loss", "mean_measurement")


def _version() -> str:
    version = getattr(kronfluence_bif, "__version__", None)
    return version if version else importlib.metadata.version("kronfluence-bif")


def int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, with argparse's usage error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _fmt(value: Any) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    cells = [list(header)] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]


# ---------------------------------------------------------------------------------------------- inspect
def _entries(values: np.ndarray, columns: np.ndarray, train_indices: Optional[List[int]]) -> List[Dict[str, Any]]:
    return [
        {
            "rank": rank + 1,
            "train_index": int(train_indices[c]) if train_indices is not None else int(c),
            "column": int(c),
            "score": float(values[c]),
        }
        for rank, c in enumerate(columns)
    ]


def inspect_scores(folder: Union[str, Path], query: Optional[int] = None, top: int = 10) -> Dict[str, Any]:
    """Most helpful (largest positive) and most harmful (most negative) training examples of one query.

    kronfluence's sign: a positive score means the training example lowers the query's loss-like measurement.
    `train_index` is the training dataset index (through `train_indices` when the scores used them); `column`
    is the column of the score matrix. For a self-score folder, the highest and lowest self-influences.
    """
    scores = load_scores(folder)
    train_meta = scores.dataset_metadata.get("train") or {}
    train_indices = train_meta.get("indices")
    n_columns = scores.pairwise.shape[1] if scores.pairwise is not None else scores.self_scores.size
    if train_indices is not None and len(train_indices) != n_columns:
        train_indices = None  # e.g. aggregated train gradients: columns are not dataset rows
    if scores.pairwise is None:
        if query is not None:
            raise ValueError(f"`{folder}` holds self scores, which have no query axis; drop --query.")
        values = scores.self_scores
        order = np.argsort(-values, kind="stable")
        return {
            "folder": str(folder),
            "kind": "self",
            "n_train": int(values.size),
            "top": top,
            "highest": _entries(values, order[:top], train_indices),
            "lowest": _entries(values, np.argsort(values, kind="stable")[:top], train_indices),
        }
    n_query, n_train = scores.pairwise.shape
    query = 0 if query is None else query
    if not 0 <= query < n_query:
        raise ValueError(f"--query {query} is out of range: `{folder}` holds {n_query} queries (0..{n_query - 1}).")
    query_indices = (scores.dataset_metadata.get("query") or {}).get("indices")
    row = scores.pairwise[query]
    helpful = np.flatnonzero(row > 0)
    harmful = np.flatnonzero(row < 0)
    helpful = helpful[np.argsort(-row[helpful], kind="stable")][:top]
    harmful = harmful[np.argsort(row[harmful], kind="stable")][:top]
    return {
        "folder": str(folder),
        "kind": "pairwise",
        "n_query": int(n_query),
        "n_train": int(n_train),
        "query": int(query),
        "query_dataset_index": int(query_indices[query]) if query_indices and len(query_indices) == n_query else query,
        "top": top,
        "helpful": _entries(row, helpful, train_indices),
        "harmful": _entries(row, harmful, train_indices),
    }


def format_inspection(result: Dict[str, Any]) -> str:
    """Text form of `inspect_scores`."""
    lines = []

    def section(title: str, entries: List[Dict[str, Any]]) -> None:
        lines.append("")
        lines.append(title)
        if not entries:
            lines.append("  (none)")
            return
        rows = [(e["rank"], e["train_index"], e["score"]) for e in entries]
        lines.extend("  " + line for line in _table(("rank", "train_index", "score"), rows))

    if result["kind"] == "self":
        lines.append(f"{result['folder']}: self-influence scores of {result['n_train']} training examples")
        section(f"Highest {result['top']} self-influence scores:", result["highest"])
        section(f"Lowest {result['top']} self-influence scores:", result["lowest"])
        return "\n".join(lines)
    lines.append(
        f"{result['folder']}: query {result['query']} (query dataset index {result['query_dataset_index']}) of "
        f"{result['n_query']} queries x {result['n_train']} training examples"
    )
    lines.append("kronfluence sign: a positive score means the training example helps the query (lowers its loss).")
    section(f"Most helpful (largest positive scores, up to {result['top']}):", result["helpful"])
    section(f"Most harmful (most negative scores, up to {result['top']}):", result["harmful"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- diagnose
def format_diagnostics(folder: Union[str, Path]) -> str:
    """Per-chain summaries (`bif_diagnostics.json`) and per-chain means of the traces (`bif_traces.safetensors`)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"no such folder `{folder}`; pass a `scores_<name>` folder written with strategy 'bif'.")
    diagnostics_path, traces_path = folder / BIF_DIAGNOSTICS_FILE, folder / BIF_TRACES_FILE
    if not diagnostics_path.exists() and not traces_path.exists():
        raise ValueError(
            f"`{folder}` holds neither {BIF_DIAGNOSTICS_FILE} nor {BIF_TRACES_FILE}: only scores computed with "
            "strategy 'bif' have sampling diagnostics (EK-FAC folders do not)."
        )
    lines = [f"BIF sampling diagnostics of {folder}"]
    if diagnostics_path.exists():
        report = storage.load_json(diagnostics_path)
        chains = report.get("chains", [])
        rhat, sharp = report.get("rhat_mean_train_loss"), report.get("sharpness")
        if rhat is not None:
            lines.append(f"Split R-hat of the mean train loss: {_fmt(float(rhat))} (fine below 1.1)")
        if sharp:
            lines.append(
                f"step_size x largest preconditioned curvature: {_fmt(sharp['step_size_times_lambda_max'])} "
                "(fine below 2)"
            )
        warnings = report.get("warnings", [])
        lines.append(f"Warnings: {len(warnings)}" + ("" if warnings else " (none)"))
        lines.extend(f"  [{w['code']}] {w['message']}" for w in warnings)
        keys: List[str] = []
        for summary in chains:
            keys.extend(key for key in summary if key not in keys)
        lines.append("")
        lines.append(f"Per-chain summaries ({BIF_DIAGNOSTICS_FILE}, {len(chains)} chains):")
        rows = [[summary.get(key, "-") for key in keys] for summary in chains]
        lines.extend("  " + line for line in _table(keys, rows) if keys)
    else:
        lines.append(f"({BIF_DIAGNOSTICS_FILE} is missing)")
    if traces_path.exists():
        traces = storage.load_tensors(traces_path)
        names = [n for n in MAIN_TRACES if n in traces] + sorted(n for n in traces if n not in MAIN_TRACES)
        names = [n for n in names if traces[n].ndim == 2]
        if names:
            num_chains, num_draws = traces[names[0]].shape
            means = {n: traces[n].double().mean(dim=1).tolist() for n in names}
            rows = [[c] + [means[n][c] if c < len(means[n]) else "-" for n in names] for c in range(num_chains)]
            lines.append("")
            lines.append(f"Per-chain means over draws ({BIF_TRACES_FILE}, {num_chains} chains x {num_draws} draws):")
            lines.extend("  " + line for line in _table(["chain"] + names, rows))
    else:
        lines.append(f"({BIF_TRACES_FILE} is missing)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- commands
def _run_compare(args: argparse.Namespace) -> int:
    comparison = compare(args.a, args.b, k=args.k)
    failures = comparison.failures(min_spearman=args.min_spearman, min_topk_overlap=args.min_topk_overlap)
    if args.json:
        out = comparison.to_dict()
        out["thresholds"] = {"min_spearman": args.min_spearman, "min_topk_overlap": args.min_topk_overlap}
        out["failures"] = failures
        out["passed"] = not failures
        print(json.dumps(out, indent=2))
    else:
        print(comparison.to_table())
        if not failures and (args.min_spearman is not None or args.min_topk_overlap is not None):
            print("\nAll thresholds passed.")
    for reason in failures:
        print(f"{PROG} compare: FAILED: {reason}", file=sys.stderr)
    return 1 if failures else 0


def _run_inspect(args: argparse.Namespace) -> int:
    result = inspect_scores(args.folder, query=args.query, top=args.top)
    print(json.dumps(jsonable(result), indent=2) if args.json else format_inspection(result))
    return 0


def _run_diagnose(args: argparse.Namespace) -> int:
    print(format_diagnostics(args.folder))
    if args.plot:
        from kronfluence_bif.diagnostics import plot_traces

        traces = storage.load_tensors(Path(args.folder).expanduser() / BIF_TRACES_FILE)
        print(f"Wrote {plot_traces(traces, args.plot, title=str(args.folder))}")
    if args.strict:
        report = storage.load_json(Path(args.folder).expanduser() / BIF_DIAGNOSTICS_FILE)
        return 1 if report.get("warnings") else 0
    return 0


FACTORY_CONTRACT = (
    "a function with no arguments returning a dict with `model` (the trained nn.Module), `task` (its kronfluence "
    "Task) and `train_dataset` (a map-style Dataset), optionally `base_args` (BIFArguments or a dict of its fields); "
    "or a tuple (model, task, train_dataset)"
)


class FactoryError(ValueError):
    """The calibrate factory could not be imported, called, or returned the wrong thing (exit 2)."""


def _import_target(target: str) -> Any:
    """The module of a FACTORY spec: a file path, or a module resolved from the current directory first."""
    import importlib
    import importlib.util
    import os

    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise FactoryError(f"no such file `{path}` (from the working directory `{os.getcwd()}`)")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.resolve().parent))  # the file's siblings import as they would under `python`
        module_spec.loader.exec_module(module)
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the current directory come first
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (target == exc.name or target.startswith(exc.name + ".")):
            raise  # a module the factory's module imports: the user's environment, reported with its traceback
        raise FactoryError(
            f"cannot import `{target}`: no module named `{exc.name}` in the working directory `{os.getcwd()}` or on "
            f"sys.path. Run from the directory that holds `{target.split('.')[0]}`, or pass a file instead, e.g. "
            f"`{PROG} calibrate path/to/{target.split('.')[-1]}.py:FUNCTION`."
        ) from None


def load_factory(spec: str) -> Dict[str, Any]:
    """`package.module:function` or `path/to/file.py:function`, called with no arguments.

    The function returns a dict with `model`, `task`, `train_dataset` (and optionally `base_args`, a
    BIFArguments or a dict of its fields), or a tuple (model, task, train_dataset). Modules resolve from the
    current directory first, as with `python -m`. Raises FactoryError (exit 2) with what to change.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise FactoryError(
            f"expected MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}; FUNCTION is {FACTORY_CONTRACT}"
        )
    try:
        module = _import_target(target)
    except FactoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module failed: show where, then exit 2
        _print_user_traceback(exc)
        raise FactoryError(f"importing `{target}` raised {type(exc).__name__}: {exc} (traceback above)") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:8]
        raise FactoryError(f"`{target}` has no function `{name}`" + (f"; it defines {found}" if found else ""))
    try:
        made = factory()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed: show where, then exit 2
        _print_user_traceback(exc)
        raise FactoryError(f"`{spec}()` raised {type(exc).__name__}: {exc} (traceback above)") from None
    if isinstance(made, (tuple, list)) and len(made) == 3:
        made = dict(zip(("model", "task", "train_dataset"), made))
    if not isinstance(made, dict) or not {"model", "task", "train_dataset"} <= set(made):
        got = sorted(made) if isinstance(made, dict) else type(made).__name__
        raise FactoryError(f"`{spec}` returned {got}; it must be {FACTORY_CONTRACT}")
    return made


def _print_user_traceback(exc: BaseException) -> None:
    import traceback

    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def _run_calibrate(args: argparse.Namespace) -> int:
    from kronfluence_bif.arguments import BIFArguments
    from kronfluence_bif.calibrate import calibrate

    made = load_factory(args.factory)
    base = made.get("base_args")
    if isinstance(base, dict):
        base = BIFArguments.from_dict(base)
    result = calibrate(
        made["model"],
        made["task"],
        made["train_dataset"],
        base_args=base,
        step_sizes=args.steps,
        nbetas=args.nbetas,
        localizations=args.localizations,
        num_chains=args.chains,
        num_draws=args.draws,
        max_examples=args.max_examples,
        disable_tqdm=args.json,
    )
    print(json.dumps(jsonable(result.to_dict()), indent=2) if args.json else result.to_table())
    return 0 if result.recommended is not None else 1


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: `compare`, `inspect`, `diagnose`, `calibrate`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compare, inspect and diagnose kronfluence / kronfluence-bif score folders.",
        epilog="Exit status: 0 success; 1 a check failed (a compare threshold, diagnose --strict warnings, "
        "calibrate found no usable setting); 2 bad usage or input.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser(
        "compare",
        help="agreement of two score folders (Spearman, Pearson, top-k overlap, sign agreement)",
        description="Per-query agreement of two score sets of the same shape and datasets. Exits 1 when a "
        "threshold fails. kronfluence sign: positive = helpful.",
    )
    p.add_argument("a", help="scores A: a scores_<name> folder or a .safetensors score file")
    p.add_argument("b", help="scores B: a scores_<name> folder or a .safetensors score file")
    p.add_argument("--min-spearman", type=float, default=None, help="fail when the mean per-query Spearman is lower")
    p.add_argument(
        "--min-topk-overlap", type=float, default=None, help="fail when the mean top-k overlap (most helpful) is lower"
    )
    p.add_argument("--k", type=int_at_least(1), default=10, help="size of the top-k sets (default: 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_run_compare)

    p = commands.add_parser(
        "inspect",
        help="most helpful and most harmful training examples of one query",
        description="List the training examples with the largest positive (helpful) and most negative (harmful) "
        "scores for one query (kronfluence sign). For a self-score folder: highest and lowest self-influence.",
    )
    p.add_argument("folder", help="a scores_<name> folder or a .safetensors score file")
    p.add_argument("--query", type=int_at_least(0), default=None, help="row of the score matrix (default: 0)")
    p.add_argument("--top", type=int_at_least(1), default=10, help="number of examples per list (default: 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_run_inspect)

    p = commands.add_parser(
        "diagnose",
        help="BIF sampling diagnostics of a score folder",
        description=f"Print R-hat, the step-size/curvature check, sampler warnings, the per-chain summaries "
        f"({BIF_DIAGNOSTICS_FILE}) and per-chain trace means ({BIF_TRACES_FILE}) of a folder scored with strategy "
        "'bif'.",
    )
    p.add_argument("folder", help="a scores_<name> folder written with strategy 'bif'")
    p.add_argument("--plot", metavar="PNG", default="", help="also draw the traces (one panel each) into this PNG")
    p.add_argument("--strict", action="store_true", help="exit 1 when the run recorded sampler warnings (for CI)")
    p.set_defaults(handler=_run_diagnose)

    p = commands.add_parser(
        "calibrate",
        help="choose the SGLD step size from short chains",
        description="Run short BIF chains for a grid of step sizes (and optionally nbeta/localization) on a subset "
        "of the training data and recommend the largest step without blocking warnings. FACTORY is "
        f"MODULE:FUNCTION (resolved from the current directory first, as with python -m) or FILE.py:FUNCTION: "
        f"{FACTORY_CONTRACT}. Exit 1 when no setting is usable, 2 when FACTORY cannot be loaded.",
    )
    p.add_argument("factory", help="MODULE:FUNCTION or FILE.py:FUNCTION that builds the model, task and data")
    p.add_argument("--steps", type=float, nargs="+", default=None, help="step sizes (default: base x 0.1..10)")
    p.add_argument("--nbetas", type=float, nargs="+", default=None, help="nbeta values (default: base)")
    p.add_argument("--localizations", type=float, nargs="+", default=None, help="localization values")
    p.add_argument("--chains", type=int_at_least(1), default=2, help="chains per setting (default: 2)")
    p.add_argument("--draws", type=int_at_least(2), default=100, help="draws per chain (default: 100)")
    p.add_argument("--max-examples", type=int_at_least(2), default=256, help="training examples evaluated")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_run_calibrate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status instead of exiting (0 ok, 1 threshold failed, 2 error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: choose a command: compare, inspect, diagnose or calibrate", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except (ValueError, OSError, SafetensorError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
