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
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from safetensors import SafetensorError

import kronfluence_bif
from kronfluence_bif import storage
from kronfluence_bif.argtypes import int_at_least
from kronfluence_bif.compare import compare
from kronfluence_bif.diagnostics import format_diagnostics, plot_traces
from kronfluence_bif.inspection import format_inspection, inspect_scores
from kronfluence_bif.storage import BIF_DIAGNOSTICS_FILE, BIF_TRACES_FILE, jsonable

# The domain logic lives beside what it reports on; these names stay importable from here.
__all__ = ["build_parser", "format_diagnostics", "format_inspection", "inspect_scores", "int_at_least", "main"]

PROG = "kronfluence-bif"


def _version() -> str:
    version = getattr(kronfluence_bif, "__version__", None)
    return version if version else importlib.metadata.version("kronfluence-bif")


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


def _add_compare(commands: argparse._SubParsersAction) -> None:
    """`compare A B`: agreement of two score sets, with optional thresholds."""
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


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    """`inspect FOLDER`: one query's most helpful and most harmful training examples."""
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


def _add_diagnose(commands: argparse._SubParsersAction) -> None:
    """`diagnose FOLDER`: BIF sampling diagnostics, optionally plotted or strict."""
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


def _add_calibrate(commands: argparse._SubParsersAction) -> None:
    """`calibrate FACTORY`: short chains over a grid of step sizes."""
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
    _add_compare(commands)
    _add_inspect(commands)
    _add_diagnose(commands)
    _add_calibrate(commands)
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
