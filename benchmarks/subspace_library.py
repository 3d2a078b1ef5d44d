"""The library's `subspace_sgld` through the Analyzer: LDS, Spearman vs EK-FAC, time, R-hat / ESS on a demo task.

    python benchmarks/subspace_library.py --task digits --retrains 40 --setting 1e5 1e3 --rank 256
    python benchmarks/subspace_library.py --task uci --retrains 60 --setting 1e4 1e2 --rank 128 --seeds 0 1

Full-batch gradients (sampler_batch_size = n), step 1.0 (the sampler's default), 4 chains x `--draws` each; the
same retrains as `error_budget.py` / `subspace_sampler.py` (cached in --cache). Prints one JSON line per run.
"""

from __future__ import annotations

import argparse

from common import print_row
from defaults_grid import LDSSetup, agreement
from error_budget import chain_health

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.threads import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["uci", "digits"], default="uci")
    parser.add_argument("--retrains", type=int, default=60)
    parser.add_argument("--setting", type=float, nargs=2, default=[1e4, 1e2], metavar=("NBETA", "LOCALIZATION"))
    parser.add_argument("--rank", type=int, default=128, help="sketch_rank")
    parser.add_argument("--draws", type=int, nargs="+", default=[400], help="num_draws per chain (4 chains)")
    parser.add_argument("--steps", type=float, nargs="+", default=[1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cache", default="./benchmark_results")
    args = parser.parse_args()
    set_threads(1)
    setup = LDSSetup.load(args.task, args.retrains, args.cache)
    model = prepare_model(setup.fit(setup.train, 0), setup.task)
    name = f"sublib_{args.task}"
    analyzer = Analyzer(name, model, setup.task, cpu=True, output_dir=str(setup.out), disable_tqdm=True)
    ekfac, seconds = setup.score(analyzer, "ekfac")
    print_row({"what": "EK-FAC", "lds": setup.lds(ekfac), "seconds": seconds})
    default, seconds = setup.score(analyzer, "default", "bif", BIFArguments(checkpoint_interval=0))
    rho = agreement(ekfac, default)[0]
    print_row({"what": "BIF defaults", "lds": setup.lds(default), "spearman": rho, "seconds": seconds})
    nbeta, localization = args.setting
    for draws in args.draws:
        for step in args.steps:
            for seed in args.seeds:
                bif = BIFArguments(
                    sampler="subspace_sgld",
                    nbeta=nbeta,
                    localization=localization,
                    step_size=step,
                    sketch_rank=args.rank,
                    num_draws=draws,
                    sampler_batch_size=len(setup.train),
                    checkpoint_interval=0,
                    seed=seed,
                )
                scores, seconds = setup.score(analyzer, "sub", "bif", bif)
                health = chain_health(setup.out / name / "scores_sub", draws)
                what = f"subspace_sgld 4x{draws} step {step:g} seed {seed}"
                row = {"what": what, "lds": setup.lds(scores), "spearman": agreement(ekfac, scores)[0]}
                print_row({**row, "seconds": seconds, **health})


if __name__ == "__main__":
    main()
