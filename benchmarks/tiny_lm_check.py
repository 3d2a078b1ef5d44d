"""Sampler health on the demo's tiny GPT-2: R-hat and ESS fraction of a BIF setting, optionally span-restricted.

    python benchmarks/tiny_lm_check.py --output-dir benchmark_results/tiny_lm --subspace \
        --bif-args '{"sampler": "sketch_sgld", "nbeta": 1e4, "localization": 100, "step_size": 1.0}'

Runs `python -m kronfluence_bif.demo.tiny_lm` (its cached model in --output-dir/model is reused); with --subspace,
`subspace_sampler.SubspaceSketchSGLD` and its Hessian Rayleigh-Ritz eigenvalues are patched in. That patch targets the
engine before the sampler refactor and no longer applies; the library's `sampler="subspace_sgld"` replaces it
(`python -m kronfluence_bif.demo.tiny_lm --bif-args '{"sampler": "subspace_sgld", ...}'`). Prints the chains'
R-hat, ESS fraction, loss at w* and over the draws, and the largest distance from w*, from bif_diagnostics.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from subspace_sampler import SubspaceSketchSGLD, hessian_ritz
from torch.nn.attention import SDPBackend, sdpa_kernel

import kronfluence_bif.engine as engine
from kronfluence_bif.demo import tiny_lm


def main() -> None:
    argv = [a for a in sys.argv[1:] if a != "--subspace"]
    if "--subspace" in sys.argv:
        engine.SketchSGLD = SubspaceSketchSGLD
        engine.sketch_fisher = hessian_ritz(engine.sketch_fisher)
    args = tiny_lm.parse_args(argv)
    bif = {**tiny_lm.DEFAULT_BIF_ARGS, **json.loads(args.bif_args)}
    result = {"subspace": "--subspace" in sys.argv, **bif}
    try:
        # the math kernel of scaled_dot_product_attention has a double backward (the Rayleigh-Ritz HVPs need it)
        with sdpa_kernel([SDPBackend.MATH]):
            tiny_lm.main(argv)
    except Exception as exc:  # noqa: BLE001 - a diverging chain is the result
        result["error"] = str(exc).splitlines()[0][:200]
    path = Path(args.output_dir) / "scores" / "scores_bif_per_token" / "bif_diagnostics.json"
    if "error" not in result and path.exists():
        diag = json.loads(path.read_text())
        ess = [c["ess_mean_train_loss"] for c in diag["chains"]]
        result.update(
            rhat=round(diag["rhat_mean_train_loss"], 3),
            ess_fraction=round(sum(ess) / len(ess) / bif["num_draws"], 3),
            loss_at_w_star=round(diag["chains"][0]["initial_mean_loss"], 4),
            mean_loss=[round(c["mean_loss"], 4) for c in diag["chains"]],
            max_distance=[round(c["max_distance_from_w_star"], 3) for c in diag["chains"]],
            warnings=sorted({w["code"] for w in diag["warnings"]}),
        )
    print("TINY_LM_CHECK " + json.dumps(result))


if __name__ == "__main__":
    main()
