"""Draws-to-LDS curves: LDS and agreement with EK-FAC against the number of draws, per sampler setting and task.

    python benchmarks/quality.py --task uci --retrains 60
    python benchmarks/quality.py --task digits --retrains 40 --draws 50 100 200 400 800

For each setting (plain SGLD at the sgld-notes settings, the RMSprop-SGLD defaults, sketch-SGLD at nbeta 1e4
and m 256) and each draw count N per chain, one BIF run with num_draws=N (same seed, so the chains of a shorter run
are the prefixes of a longer one). Reports LDS against retraining on random halves (cached in --cache), mean
per-query Spearman and top-10 overlap against kronfluence EK-FAC, wall time, and the draws each setting needs to
reach 90% of its own final LDS. Writes quality_<task>.json and quality_<task>.md. Not a test: minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any, Dict, List, Optional

import torch
from defaults_grid import LDSSetup, agreement

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.threads import set_threads

SETTINGS: Dict[str, Dict[str, Any]] = {
    "plain SGLD (sgld-notes)": {"sampler": "sgld", "step_size": 1e-4, "nbeta": 100.0, "localization": 1000.0},
    "RMSprop-SGLD (defaults)": {},
    "sketch-SGLD (nbeta 1e4, m 256)": {"sampler": "sketch_sgld", "nbeta": 1e4, "sampler_batch_size": 256},
}


def draws_to_reach(curve: List[Dict[str, Any]], level: float) -> Optional[int]:
    """Total draws (chains x draws) of the first point whose LDS reaches `level`; None if none does."""
    for point in curve:
        if point["lds"] >= level:
            return point["total_draws"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["uci", "digits"], default="uci")
    parser.add_argument("--retrains", type=int, default=60)
    parser.add_argument("--draws", type=int, nargs="+", default=[25, 50, 100, 200, 400, 800])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="./benchmark_results")
    args = parser.parse_args()
    set_threads(args.threads)
    setup = LDSSetup.load(args.task, args.retrains, args.cache)
    train, query, masks, out = setup.train, setup.query, setup.masks, setup.out
    model = prepare_model(setup.fit(train, 0), setup.task)
    analyzer = Analyzer(f"q_{args.task}", model, setup.task, cpu=True, output_dir=str(out), disable_tqdm=True)
    ekfac, seconds = setup.score(analyzer, "ekfac")
    ekfac_row = {"seconds": seconds, "lds": setup.lds(ekfac)}
    curves: Dict[str, List[Dict[str, Any]]] = {}
    for label in args.settings:
        curves[label] = []
        for n_draws in args.draws:
            bif = BIFArguments(**{**SETTINGS[label], "num_draws": n_draws, "checkpoint_interval": 0})
            scores, seconds = setup.score(analyzer, f"bif_{len(curves)}_{n_draws}", "bif", bif)
            rho, top = agreement(ekfac, scores)
            point = {
                "draws_per_chain": n_draws,
                "total_draws": n_draws * bif.num_chains,
                "seconds": seconds,
                "lds": setup.lds(scores),
                "spearman_vs_ekfac": rho,
                "top10_overlap": top,
            }
            curves[label].append(point)
            print(json.dumps({"setting": label, **{k: round(v, 4) for k, v in point.items()}}), flush=True)
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    lines = [
        f"### {args.task}: {len(train)} train x {len(query)} query, LDS against {len(masks)} retrains ({machine})",
        "",
        f"EK-FAC: LDS {ekfac_row['lds']:.3f} in {ekfac_row['seconds']:.1f} s.",
        "",
        "| setting | draws (chains x per chain) | time (s) | LDS | Spearman vs EK-FAC | top-10 overlap |",
        "|---|---|---:|---:|---:|---:|",
    ]
    summary = {}
    reference = curves[next(iter(curves))][-1]["lds"]  # the first setting's final LDS (plain SGLD by default)
    for label, curve in curves.items():
        for p in curve:
            chains = p["total_draws"] // p["draws_per_chain"]
            lines.append(
                f"| {label} | {chains} x {p['draws_per_chain']} | {p['seconds']:.1f} | {p['lds']:.3f} | "
                f"{p['spearman_vs_ekfac']:.3f} | {p['top10_overlap']:.2f} |"
            )
        summary[label] = {
            "final_lds": curve[-1]["lds"],
            "draws_to_90pct_of_own_final": draws_to_reach(curve, 0.9 * curve[-1]["lds"]),
            "draws_to_90pct_of_first_setting_final": draws_to_reach(curve, 0.9 * reference),
        }
    first = next(iter(curves))
    lines += [
        "",
        f"| setting | final LDS | total draws to 90% of its own final | total draws to 90% of {first}'s final |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {v['final_lds']:.3f} | {v['draws_to_90pct_of_own_final']} | "
        f"{v['draws_to_90pct_of_first_setting_final']} |"
        for k, v in summary.items()
    ]
    text = "\n".join(lines)
    print("\n" + text)
    (out / f"quality_{args.task}.md").write_text(text + "\n")
    (out / f"quality_{args.task}.json").write_text(
        json.dumps({"ekfac": ekfac_row, "curves": curves, "summary": summary}, indent=2)
    )


if __name__ == "__main__":
    main()
