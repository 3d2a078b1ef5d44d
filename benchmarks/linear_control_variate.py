"""The linear control variate's share of the error budget: the same chains with and without it, and its exact term.

    python benchmarks/linear_control_variate.py --task uci --seeds 0 1 --draws 400 200 100
    python benchmarks/linear_control_variate.py --task digits --retrains 40 --seeds 0 1 --draws 400 100

For each seed and draws per chain (4 chains, the defaults otherwise: subspace-SGLD at the temperature pilot's rung),
LDS at retrain fractions 0.5 and 0.1 of: the run with `linear_control_variate=False`; the same chains with it
(the package's default); and its closed-form term alone, J_y diag(variance) J_x^T (the BIF's leading term on the
span, taken from the run's `LinearControlVariate`). Prints one JSON line per row (BENCHMARKS.md, "The linear
control variate").
"""

from __future__ import annotations

import json

import numpy as np
from defaults_grid import LDSSetup, agreement, lds_runs_parser

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.engine import linear_term
from kronfluence_bif.threads import set_threads


class _Recorder:
    """Keeps the closed-form term of every `LinearControlVariate` the package applies (the benchmark's only hook)."""

    def __init__(self) -> None:
        self.terms: list = []
        self._apply = linear_term.LinearControlVariate.apply_
        recorder = self

        def apply_(term, moments):
            recorder.terms.append((term.jacobian_y * term.variance) @ term.jacobian_x.T)
            return recorder._apply(term, moments)

        linear_term.LinearControlVariate.apply_ = apply_


def main() -> None:
    parser = lds_runs_parser(__doc__)
    parser.add_argument("--draws", type=int, nargs="+", default=[100], help="draws per chain, one row each")
    args = parser.parse_args()
    set_threads(1)
    setups = LDSSetup.both_fractions(args)
    setup = setups[0]
    model = prepare_model(setup.fit(setup.train, 0), setup.task)
    analyzer = Analyzer(f"lcv_{args.task}", model, setup.task, cpu=True, output_dir=str(setup.out), disable_tqdm=True)
    ekfac, _ = setup.score(analyzer, "ekfac")
    print(json.dumps({"what": "EK-FAC", "lds": [round(s.lds(ekfac), 3) for s in setups]}), flush=True)
    recorder = _Recorder()
    for seed in args.seeds:
        for draws in args.draws:
            row = {"seed": seed, "draws": draws}
            for flag in (False, True):
                fields = {"seed": seed, "num_draws": draws, "checkpoint_interval": 0, **json.loads(args.overrides)}
                bif = BIFArguments(**fields, linear_control_variate=flag)
                scores, seconds = setup.score(analyzer, "bif", "bif", bif)
                name = "with" if flag else "without"
                row[name] = [round(s.lds(scores), 3) for s in setups]
                row[f"spearman_{name}"] = round(agreement(ekfac, scores)[0], 3)
                row[f"seconds_{name}"] = round(seconds, 1)
            exact = recorder.terms[-1].cpu().numpy().astype(np.float64)
            row["closed_form_term"] = [round(s.lds(exact), 3) for s in setups]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
