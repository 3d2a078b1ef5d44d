"""Choose SGLD's step size (and optionally nbeta / localization) from short chains and their diagnostics.

SGLD-based methods live or die by the step size: too small and the draws barely move (the covariances are
noise), too large and the chain trains, explodes or is biased along sharp directions. `calibrate` runs short
chains for each setting of a small grid on a subset of the training data (self-influence only, so each draw
costs one pass over the subset), applies the diagnostics of `kronfluence_bif.diagnostics`, and recommends the
largest step with none of the blocking warnings (`training`, `exploding`, `flat`, `sharpness`) and no divergence.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from torch import nn
from torch.utils import data
from tqdm.auto import tqdm

from kronfluence_bif.arguments import BIFArguments
from kronfluence_bif.diagnostics import BLOCKING_CODES, summarize
from kronfluence_bif.distributed import process_state, unwrap_model
from kronfluence_bif.errors import SamplerDivergenceError
from kronfluence_bif.logs import logger
from kronfluence_bif.parameters import SampledWeights
from kronfluence_bif.problem import Problem, calibration_problem, resolve_arguments

STEP_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass
class CalibrationResult:
    """One row per grid point, and the recommended arguments (None when no setting was usable)."""

    rows: List[Dict[str, Any]]
    recommended: Optional[BIFArguments]
    base: BIFArguments
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)

    def to_table(self) -> str:
        header = ["step_size", "nbeta", "localization", "status", "eps*lambda", "R-hat", "ESS/draw", "loss rise"]
        lines = [" | ".join(header), " | ".join("---" for _ in header)]
        for row in self.rows:
            lines.append(
                " | ".join(
                    [
                        f"{row['step_size']:.3g}",
                        f"{row['nbeta']:.3g}",
                        f"{row['localization']:.3g}",
                        row["status"],
                        _num(row.get("step_size_times_lambda_max")),
                        _num(row.get("rhat")),
                        _num(row.get("ess_per_draw")),
                        _num(row.get("relative_loss_rise")),
                    ]
                )
            )
        reasons = [row for row in self.rows if row.get("reason")]
        if reasons:
            lines.append("\nWhy:")
            lines.extend(
                f"  step_size={row['step_size']:.3g}, nbeta={row['nbeta']:.3g}, localization={row['localization']:.3g}"
                f" ({row['status']}): {row['reason']}"
                for row in reasons
            )
        if self.recommended is not None:
            r = self.recommended
            lines.append(
                f"\nRecommended: step_size={r.step_size:g}, nbeta={r.nbeta:g}, localization={r.localization:g}"
            )
            lines.extend(f"Note: {note}" for note in self.notes)
        else:
            lines.append("\n" + " ".join(self.notes))
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "rows": self.rows,
            "recommended": None if self.recommended is None else self.recommended.to_dict(),
            "seconds": self.seconds,
            "notes": self.notes,
        }

    def __str__(self) -> str:
        return self.to_table()


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.3g}"


def calibrate(
    model: nn.Module,
    task: Any,
    train_dataset: data.Dataset,
    base_args: Optional[BIFArguments] = None,
    step_sizes: Optional[Sequence[float]] = None,
    nbetas: Optional[Sequence[float]] = None,
    localizations: Optional[Sequence[float]] = None,
    num_chains: int = 2,
    num_draws: int = 100,
    max_examples: int = 256,
    per_device_batch_size: int = 256,
    dataloader_kwargs: Optional[Dict[str, Any]] = None,
    disable_tqdm: bool = False,
) -> CalibrationResult:
    """Short chains over a grid; recommends the largest step with no blocking warning (see module docstring).

    `step_sizes` defaults to `base_args.step_size` x (0.1, 0.3, 1, 3, 10); `nbetas` and `localizations`
    default to the base values. Settings that BIFArguments rejects (step x localization x max G >= 4) are
    listed as invalid. The model is restored bitwise afterwards. Under torchrun / accelerate launch the grid is
    split over the processes (each runs its settings' chains alone) and every process gets the whole result.
    """
    base_args = base_args if base_args is not None else BIFArguments()
    # as a score run over the whole training set would resolve it (the grid's chains evaluate fewer examples)
    base = resolve_arguments(model, task, base_args, len(train_dataset), len(train_dataset))
    base = dataclasses.replace(base, calibrate_temperature=False)  # the grid sets nbeta and localization itself
    step_sizes = list(step_sizes) if step_sizes else [base.step_size * f for f in STEP_FACTORS]
    nbetas = list(nbetas) if nbetas else [base.nbeta]
    localizations = list(localizations) if localizations else [base.localization]
    for name, values in (("step_sizes", step_sizes), ("nbetas", nbetas), ("localizations", localizations)):
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for v in values):
            raise ValueError(f"`{name}` must hold positive finite numbers, got {values}.")
    if len(train_dataset) < 2:
        raise ValueError("`train_dataset` needs at least 2 examples to calibrate on.")
    model = unwrap_model(model)
    state = process_state(model)
    loader_params = dict(dataloader_kwargs or {})
    problem = calibration_problem(model, task, train_dataset, base, max_examples, per_device_batch_size, loader_params)
    grid = list(itertools.product(sorted(nbetas), sorted(localizations), sorted(step_sizes)))
    start = time.time()
    mine = list(range(state.process_index, len(grid), state.num_processes))
    bar = tqdm(total=len(mine), desc="Calibrating BIF", disable=disable_tqdm or not state.is_main_process)
    with SampledWeights(model, problem.params) as weights:
        problem.engine(model, weights, base).check_views()
        done = {i: _grid_row(problem, model, weights, base, grid[i], num_chains, num_draws, bar) for i in mine}
    bar.close()
    rows = [row for part in state.all_gather_object(done) for row in part.items()]
    rows = [row for _, row in sorted(rows, key=lambda item: item[0])]
    recommended, notes = _recommend(rows, base)
    result = CalibrationResult(rows=rows, recommended=recommended, base=base, seconds=time.time() - start, notes=notes)
    logger.info("Calibration over %d settings took %.1f s.\n%s", len(grid), result.seconds, result.to_table())
    return result


def _grid_row(problem: Problem, model, weights, base: BIFArguments, point, num_chains, num_draws, bar) -> Dict:
    """One grid point's table row: invalid settings, diverged chains, or the diagnostics of short chains."""
    nbeta, localization, step = point
    row: Dict[str, Any] = {"step_size": step, "nbeta": nbeta, "localization": localization}
    bar.update(1)
    try:
        args = dataclasses.replace(
            base,
            step_size=step,
            nbeta=nbeta,
            localization=localization,
            num_chains=num_chains,
            num_draws=num_draws,
            checkpoint_interval=0,
            linear_control_variate=False,  # the grid reads the chains' health, not their scores: no secants
        )
    except ValueError as exc:
        return {**row, "status": "invalid", "reason": str(exc)}
    try:
        # each grid point's chains run in this process alone (state=None): the grid, not the chains, is split
        result = problem.engine(model, weights, args, disable_tqdm=True).run()
    except SamplerDivergenceError as exc:
        return {**row, "status": "diverged", "reason": str(exc)}
    return {**row, **_row_stats(result, args)}


def _row_stats(result, args: BIFArguments) -> Dict[str, Any]:
    report = summarize(result.traces, result.chain_summaries, args, result.sharpness)
    codes = sorted({w["code"] for w in report["warnings"]})
    blocking = [c for c in codes if c in BLOCKING_CODES]
    start = float(result.chain_summaries[0]["initial_mean_loss"]) if result.chain_summaries else float("nan")
    mean_loss = float(np.mean([c["mean_loss"] for c in result.chain_summaries]))
    ess = [c["ess_mean_train_loss"] for c in report["chains"] if math.isfinite(c["ess_mean_train_loss"])]
    sharp = report["sharpness"] or {}
    first = {}  # one message per blocking code (the chains repeat it)
    for warning in report["warnings"]:
        if warning["code"] in blocking:
            first.setdefault(warning["code"], warning["message"])
    return {
        "status": "blocked: " + ",".join(blocking) if blocking else "ok" + (f" ({','.join(codes)})" if codes else ""),
        "reason": " ".join(first.values()) if first else None,
        "usable": not blocking,
        "warnings": codes,
        "step_size_times_lambda_max": sharp.get("step_size_times_lambda_max"),
        "rhat": report["rhat_mean_train_loss"],
        "ess_per_draw": float(np.mean(ess)) / args.num_draws if ess else None,
        "relative_loss_rise": (mean_loss - start) / abs(start) if start else None,
    }


# what to change for each way a setting fails (the reasons in the table say the same for each row)
ADVICE = {
    "invalid": "invalid settings break the localization's stability limit: lower `step_size` or `localization`"
    " (or raise `rmsprop_eps`)",
    "diverged": "diverged chains need smaller step sizes, a smaller `nbeta` or a larger `localization`",
    "exploding": "exploding chains need smaller step sizes, a smaller `nbeta` or a larger `localization`",
    "sharpness": "too sharp for the step: try smaller step sizes",
    "flat": "flat chains barely move: try larger step sizes",
    "training": "training chains mean w* is not a minimum of the tempered loss: train further, lower `nbeta` or"
    " raise `localization`",
}


def _advice(rows: List[Dict[str, Any]]) -> List[str]:
    """What to change, from how the settings failed, in the order of ADVICE, each once."""
    seen = set()
    for row in rows:
        status = row["status"]
        seen.update(c for c in ADVICE if status == c or (status.startswith("blocked") and c in status))
    hints = [ADVICE[c] for c in ADVICE if c in seen]
    return ["No setting was usable: " + "; ".join(hints) + "." if hints else "No setting was usable."]


def _recommend(rows: List[Dict[str, Any]], base: BIFArguments):
    usable = [r for r in rows if r.get("usable")]
    if not usable:
        return None, _advice(rows)
    best = max(usable, key=lambda r: (r["step_size"], -(r["rhat"] if math.isfinite(r["rhat"]) else 1e9)))
    notes = []
    if best["step_size"] == max(r["step_size"] for r in rows):
        notes.append("the largest step of the grid was usable: larger steps may be too (extend the grid).")
    recommended = dataclasses.replace(
        base, step_size=best["step_size"], nbeta=best["nbeta"], localization=best["localization"]
    )
    return recommended, notes


__all__ = ["CalibrationResult", "calibrate"]
