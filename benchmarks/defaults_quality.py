"""The defaults against EK-FAC and the previous defaults on a demo task: LDS, Spearman vs EK-FAC, time, R-hat, ESS.

    python benchmarks/defaults_quality.py --task uci --retrains 60 --seeds 0 1
    python benchmarks/defaults_quality.py --task digits --retrains 40
    python benchmarks/defaults_quality.py --task uci --retrains 60 --fraction 0.1

`BIFArguments()` (sampler="auto": subspace_sgld on these MLPs, 4 chains x 100 draws with the linear control
variate) and `BIFArguments(sampler="rmsprop_sgld")` (the defaults before 0.6, 4 chains x 400 draws), through the
Analyzer on one thread; the same retrains on random
halves as `error_budget.py` (cached in --cache). `--overrides` adds a JSON dict of BIFArguments fields to both BIF
rows. Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import json

from common import print_row
from defaults_grid import LDSSetup, agreement
from error_budget import chain_health

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.threads import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["uci", "digits"], default="uci")
    parser.add_argument("--retrains", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--fraction", type=float, default=0.5, help="retrain fraction of the LDS subsets")
    parser.add_argument("--overrides", default="{}", help="JSON dict of BIFArguments fields for the new defaults")
    parser.add_argument("--skip-previous", action="store_true", help="only EK-FAC and the defaults")
    parser.add_argument("--cache", default="./benchmark_results")
    args = parser.parse_args()
    set_threads(1)
    setup = LDSSetup.load(args.task, args.retrains, args.cache, args.fraction)
    model = prepare_model(setup.fit(setup.train, 0), setup.task)
    name = f"defaults_{args.task}"
    analyzer = Analyzer(name, model, setup.task, cpu=True, output_dir=str(setup.out), disable_tqdm=True)
    ekfac, seconds = setup.score(analyzer, "ekfac")
    print_row({"what": "EK-FAC", "lds": setup.lds(ekfac), "seconds": seconds})
    rows = [("defaults", {**json.loads(args.overrides)})]
    if not args.skip_previous:
        rows.append(("previous defaults (rmsprop_sgld)", {"sampler": "rmsprop_sgld"}))
    for seed in args.seeds:
        for what, fields in rows:
            bif = BIFArguments(**{"checkpoint_interval": 0, "seed": seed, **fields})
            scores, seconds = setup.score(analyzer, "bif", "bif", bif)
            health = chain_health(setup.out / name / "scores_bif")
            row = {"what": f"{what} seed {seed}", "lds": setup.lds(scores), "spearman": agreement(ekfac, scores)[0]}
            print_row({**row, "seconds": seconds, **health})


if __name__ == "__main__":
    main()
