"""Why the tiny GPT-2 demo's chains do not mix: its run with the chains' start displaced (issue 14 experiment).

    python benchmarks/tiny_lm_start.py --output-dir /tmp/tlm --quiet                       # the demo as shipped
    python benchmarks/tiny_lm_start.py --output-dir /tmp/tlm --quiet --dispersed \
        --bif-args '{"center_gradient": true}'

Runs `python -m kronfluence_bif.demo.tiny_lm` (RMSprop-SGLD, nbeta 1e3, localization 1e3, 2 chains x 300 draws;
its cached model in --output-dir/model is reused). With `--dispersed`, each chain starts at w* + N(0, I /
localization), the stationary spread of the directions the loss does not constrain, instead of at w*: if the
chains' poor mixing is the slow outward transient of those directions, it goes. Then prints the chains' R-hat
and ESS and, every 50 draws, their distance from w* and mean train loss (from the run's diagnostics and traces).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from kronfluence_bif.demo import tiny_lm
from kronfluence_bif.engine import chain as chain_module


def disperse_starts() -> None:
    """Patch `Chain._burn_in`: the weights move to w* + N(0, I / localization) first (seeded per chain)."""
    burn_in = chain_module.Chain._burn_in

    def dispersed(self, sampler):
        generator = torch.Generator().manual_seed(1000 + self.chain)
        scale = float(self.args.localization) ** -0.5
        with torch.no_grad():
            for master in self.engine.weights.masters:
                master.add_(torch.randn(master.shape, generator=generator).to(master) * scale)
        self.engine.weights.sync()
        return burn_in(self, sampler)

    chain_module.Chain._burn_in = dispersed


def main() -> None:
    argv = [a for a in sys.argv[1:] if a != "--dispersed"]
    if "--dispersed" in sys.argv:
        disperse_starts()
    tiny_lm.main(argv)
    folder = Path(tiny_lm.parse_args(argv).output_dir) / "scores" / "scores_bif_per_token"
    diag = json.loads((folder / "bif_diagnostics.json").read_text())
    traces = load_file(str(folder / "bif_traces.safetensors"))
    print(json.dumps({"rhat": diag["rhat_mean_train_loss"], "ess": [c["ess_mean_train_loss"] for c in diag["chains"]]}))
    for chain in range(traces["mean_train_loss"].shape[0]):
        distance = traces["distance_from_w_star"][chain]
        loss = traces["mean_train_loss"][chain]
        print(f"chain {chain} distance:", [round(float(d), 1) for d in distance[~distance.isnan()][::6]])
        print(f"chain {chain} loss:", [round(float(loss[i : i + 50].mean()), 1) for i in range(0, loss.numel(), 50)])


if __name__ == "__main__":
    main()
