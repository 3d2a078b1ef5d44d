"""Where the defaults' estimate loses to the exact estimand: span, Jacobians, remainder; and other remainder estimators.

    python benchmarks/estimator_gap.py --task uci --seeds 0 1 2 --pairs       # antithetic pairs on and off
    python benchmarks/estimator_gap.py --task digits --retrains 40 --seeds 0 --linearization

Each run is the package's defaults (`--overrides` adds BIFArguments fields) through the Analyzer, one thread, with
the engine's draws, span coordinates, span and secants recorded (the only hooks: `CrossMoments.update`,
`LinearControlVariate.by_secants`, `linear_term._evaluate_secants`). From them, LDS at retrain fractions 0.5 and 0.1
(the error budget's retrains) of: the package's scores; its closed-form term J_y S J_x^T alone; the regression form
Cov(x - J_x c, y - J_y c) + J_y S J_x^T; a James-Stein shrinkage of the remainder towards the closed-form term, its
noise from the chains' separate remainders (meaningful for unpaired runs only: a pair's chains are not
independent); a diagonal quadratic control variate (c_j^2 - s_j as more coordinates,
the secants' second differences as their coefficients). `--linearization` adds, from the exact linearization of
`error_budget.py` (float64): the closed-form term with the gradients at w* instead of the secants, with the
Gauss-Newton's Ritz values on the run's span, the first order on the exact top-k Gauss-Newton eigenvectors, how much
of those the run's span holds, and the control variate with the gradient Jacobian. Prints one JSON line per run
(BENCHMARKS.md, "What stops digits at fraction 0.1, and Spearman", "Antithetic chains").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from defaults_grid import LDSSetup, agreement, lds_runs_parser
from error_budget import Linearization, chain_health

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif import moments as moments_module
from kronfluence_bif.engine import linear_term
from kronfluence_bif.threads import set_threads


class Recorder:
    """The draws (x, y, c) of every chain in order, and the last run's span, Jacobians and secant curvatures."""

    def __init__(self) -> None:
        self.blocks, self.span, self.term, self.curvature = [], None, None, []
        recorder, update = self, moments_module.CrossMoments.update
        by_secants = linear_term.LinearControlVariate.by_secants.__func__
        evaluate = linear_term._evaluate_secants

        def record_update(moments, x, y, coordinates=None):
            if coordinates is not None:
                recorder.blocks.append((x.double().clone(), y.double().clone(), coordinates.double().clone()))
            return update(moments, x, y, coordinates)

        def record_secants(cls, engine, run, span):
            recorder.span = (span.basis.double().clone(), span.variance.double().clone())
            recorder.curvature = []
            recorder.term = by_secants(cls, engine, run, span)
            return recorder.term

        def record_evaluations(engine, run, span, directions, steps):
            """The package's secant evaluations, and their second differences (x(+a) + x(-a)) / a^2 (values at w*
            are 0 after the shift), per block of directions."""
            block = evaluate(engine, run, span, directions, steps)
            full = dataclasses.replace(run.layout, own=None)
            x, y = engine.evaluator.centered(block, run.shift, full, engine.diagonal)
            step = steps[directions].to(x)[:, None]
            recorder.curvature.append([((v[0::2] + v[1::2]) / step**2).T.double() for v in (x, y)])
            return block

        moments_module.CrossMoments.update = record_update
        linear_term.LinearControlVariate.by_secants = classmethod(record_secants)
        linear_term._evaluate_secants = record_evaluations

    def curvatures(self):
        """[dim_x, k] and [dim_y, k] second differences of the last run's secants."""
        return [torch.cat([part[side] for part in self.curvature], 1) for side in (0, 1)]

    def draws(self):
        x, y, c = (torch.cat([b[i] for b in self.blocks]) for i in range(3))
        self.blocks = []
        return x, y, c


def covariance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[dim_b, dim_a] sample covariance over the rows."""
    a, b = a - a.mean(0), b - b.mean(0)
    return b.T @ a / (len(a) - 1)


def estimators(rec: Recorder, chains: int) -> dict:
    """The package's estimate rebuilt from the draws, and the alternatives, as [dim_y, dim_x] float64."""
    x, y, c = rec.draws()
    jx, jy, var = rec.term.jacobian_x, rec.term.jacobian_y, rec.term.variance
    closed = (jy * var) @ jx.T
    remainder = covariance(x, y) - jy @ covariance(c, c) @ jx.T
    parts = []
    for k in range(chains):  # the chains ran one after the other
        rows = slice(k * len(x) // chains, (k + 1) * len(x) // chains)
        parts.append(covariance(x[rows], y[rows]) - jy @ covariance(c[rows], c[rows]) @ jx.T)
    noise = sum(((p - remainder) ** 2).sum() for p in parts) / (chains * (chains - 1))
    shrink = float((1 - noise / (remainder**2).sum()).clamp_min(0))
    features = torch.cat([c, c**2 - var], 1)
    bx, by = (torch.cat([j, d / 2], 1) for j, d in zip((jx, jy), rec.curvatures()))
    known = torch.diag(torch.cat([var, 2 * var**2]))
    return {
        "rebuilt": closed + remainder,
        "closed_form_term": closed,
        "regression_form": covariance(x - c @ jx.T, y - c @ jy.T) + closed,
        f"shrunk_remainder_{shrink:.2f}": closed + shrink * remainder,
        "diagonal_quadratic_cv": covariance(x, y) - by @ covariance(features, features) @ bx.T + by @ known @ bx.T,
        "_draws": (x, y, c),
    }


def against_linearization(lin: Linearization, rec: Recorder, x, y, c, nbeta: float, gamma: float) -> dict:
    """The closed-form term with exact ingredients on the run's span, and on the exact top-k eigenvectors."""
    basis, var = rec.span
    n = lin.n
    grads = lin.grads @ basis.T  # [N, k]: per-example gradients at w* on the run's span
    roots = lin.roots[~lin.query_rows] @ basis.T
    values, vectors = torch.linalg.eigh(roots.T @ roots / n)  # the mean Gauss-Newton on the span
    rotated = grads @ vectors
    gn_var = 1.0 / (nbeta * values.clamp_min(0) + gamma)
    out = {
        "gradient_J_closed_form": (grads[n:] * var) @ grads[:n].T,
        "gradient_J_gn_ritz_closed_form": (rotated[n:] * gn_var) @ rotated[:n].T,
        "gradient_J_control_variate": covariance(x, y)
        - grads[n:] @ covariance(c, c) @ grads[:n].T
        + (grads[n:] * var) @ grads[:n].T,
        "gradient_J_closed_form_with_the_secants_remainder": covariance(x, y)
        - rec.term.jacobian_y @ covariance(c, c) @ rec.term.jacobian_x.T
        + (grads[n:] * var) @ grads[:n].T,
    }
    for k in sorted({basis.shape[0], 256}):
        weight = 1.0 / (nbeta * lin.s2[:k] / n + gamma)
        out[f"exact_top{k}_first_order"] = (lin.grads_v[n:, :k] * weight) @ lin.grads_v[:n, :k].T
    cover = (basis @ lin.basis[:, : basis.shape[0]]).pow(2).sum(0)
    out["_coverage"] = {"first_32": float(cover[:32].mean()), "last_32": float(cover[-32:].mean())}
    return out


def main() -> None:
    parser = lds_runs_parser(__doc__)
    parser.add_argument("--pairs", action="store_true", help="each seed with antithetic_chains True and False")
    parser.add_argument("--linearization", action="store_true", help="compare with the exact linearization")
    args = parser.parse_args()
    set_threads(1)
    setups = LDSSetup.both_fractions(args)
    setup = setups[0]
    model = prepare_model(setup.fit(setup.train, 0), setup.task)
    name = f"gap_{args.task}"
    analyzer = Analyzer(name, model, setup.task, cpu=True, output_dir=str(setup.out), disable_tqdm=True)
    ekfac, _ = setup.score(analyzer, "ekfac")
    print(json.dumps({"what": "EK-FAC", "lds": [round(s.lds(ekfac), 3) for s in setups]}), flush=True)
    lin = None
    if args.linearization:
        lin = Linearization(setup.fit(setup.train, 0).to(torch.float64).eval(), setup, dtype=torch.float64)
    recorder = Recorder()

    def lds(scores) -> list:
        scores = np.asarray(scores, dtype=np.float64)
        return [round(s.lds(scores), 3) for s in setups] + [round(agreement(ekfac, scores)[0], 3)]

    for seed in args.seeds:
        for paired in (True, False) if args.pairs else (None,):
            fields = {"seed": seed, "checkpoint_interval": 0, **json.loads(args.overrides)}
            if paired is not None:
                fields["antithetic_chains"] = paired
            bif = BIFArguments(**fields)
            scores, seconds = setup.score(analyzer, "bif", "bif", bif)
            folder = setup.out / name / "scores_bif"
            ran = json.loads((folder / "bif_diagnostics.json").read_text())["sampler_arguments"]
            row = {"fields": fields, "seconds": round(seconds, 1), "rung": [ran["nbeta"], ran["localization"]]}
            row.update({k: round(v, 3) for k, v in chain_health(Path(folder)).items()})
            row["package (LDS 0.5, 0.1, Spearman)"] = lds(scores)
            rebuilt = estimators(recorder, ran["num_chains"])
            x, y, c = rebuilt.pop("_draws")
            if lin is not None:
                extra = against_linearization(lin, recorder, x, y, c, ran["nbeta"], ran["localization"])
                row["coverage_of_top_eigenvectors"] = extra.pop("_coverage")
                rebuilt.update(extra)
            row.update({key: lds(value) for key, value in rebuilt.items()})
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
