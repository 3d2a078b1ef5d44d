"""What a curvature sketch's span is worth: the closed-form BIF on spans from Gaussian Gauss-Newton probes.

    python benchmarks/sketch_spans.py --task digits --retrains 40 --nbeta 3e5 --localization 1e3

On the float64 linearization of `error_budget.py` (per-example output Jacobians and loss-Hessian roots at w*), for
each span V [k, p]: the Gauss-Newton's Ritz pairs on V, then the linearized posterior's covariance on the span,
first order g_q^T V^T S V g_i and first + second order (+ 1/2 |B_q S B_i^T|_F^2, B the examples' Gauss-Newton roots
on the span), S = diag(1 / (nbeta s + localization)); LDS at retrain fractions 0.5 and 0.1. Spans: the exact top-k
eigenvectors; k Gaussian probes B^T xi (what `ClassificationTask.compute_fisher_probe` gives the sketch), per probe
seed; the same after one power iteration (GN times the probes); and the top k Ritz vectors of [probes, GN probes].
Prints one JSON line per span (BENCHMARKS.md, "The Fisher probe").
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from defaults_grid import LDSSetup
from error_budget import Linearization

from kronfluence_bif.threads import set_threads


class SpanTerms:
    """The linearized estimand's first- and second-order terms restricted to a span."""

    def __init__(self, lin: Linearization, nbeta: float, localization: float) -> None:
        self.lin, self.nbeta, self.localization = lin, nbeta, localization
        self.train_roots = lin.roots[~lin.query_rows]  # [R, p]: GN_sum = B^T B

    def on(self, span: torch.Tensor):
        """(first order, first + second order) [nq, n] on the span of the rows of `span`."""
        lin, n = self.lin, self.lin.n
        projected = self.train_roots @ span.T
        values, vectors = torch.linalg.eigh(projected.T @ projected / n)
        rotated = vectors.T @ span
        weight = 1.0 / (self.nbeta * values.clamp_min(0) + self.localization)
        grads = lin.grads @ rotated.T
        first = (grads[n:] * weight) @ grads[:n].T
        roots = lin.roots @ rotated.T
        return first, first + lin.second_order((roots[lin.query_rows] * weight) @ roots[~lin.query_rows].T)


def orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    _, singular, right = torch.linalg.svd(rows, full_matrices=False)
    return right[singular > singular[0] * 1e-8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["uci", "digits"], default="digits")
    parser.add_argument("--retrains", type=int, default=40)
    parser.add_argument("--nbeta", type=float, default=3e5)
    parser.add_argument("--localization", type=float, default=1e3)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--probe-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--cache", default="./benchmark_results")
    args = parser.parse_args()
    set_threads(1)
    setups = [LDSSetup.load(args.task, args.retrains, args.cache, f) for f in (0.5, 0.1)]
    lin = Linearization(setups[0].fit(setups[0].train, 0).to(torch.float64).eval(), setups[0], dtype=torch.float64)
    terms = SpanTerms(lin, args.nbeta, args.localization)

    def report(name: str, span: torch.Tensor) -> None:
        lds = [[round(s.lds(np.asarray(t, dtype=np.float64)), 3) for s in setups] for t in terms.on(span)]
        print(json.dumps({"span": name, "dim": span.shape[0], "first_order": lds[0], "first_and_second": lds[1]}))

    k, roots = args.rank, terms.train_roots
    report(f"exact top-{k}", lin.basis[:, :k].T)
    for seed in args.probe_seeds:
        probes = torch.randn(k, roots.shape[0], generator=torch.Generator().manual_seed(seed), dtype=roots.dtype)
        probes = probes @ roots
        powered = (probes @ roots.T) @ roots
        report(f"{k} Gaussian probes, seed {seed}", orthonormal_rows(probes))
        report(f"  + one power iteration, seed {seed}", orthonormal_rows(powered))
        krylov = orthonormal_rows(torch.cat([probes, powered]))
        projected = roots @ krylov.T
        _, vectors = torch.linalg.eigh(projected.T @ projected)
        report(f"  top {k} Ritz vectors of [probes, GN probes], seed {seed}", vectors[:, -k:].T @ krylov)


if __name__ == "__main__":
    main()
