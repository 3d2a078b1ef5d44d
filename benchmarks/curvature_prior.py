"""Issue 14's hypothesis "localize with EK-FAC's curvature": the exact estimand and its i.i.d. Monte Carlo estimate.

    python benchmarks/curvature_prior.py --task digits --kappas 1e-3 0.1 --dampings 1e3 10 1 --iid-gammas 1e9 1e10
    python benchmarks/curvature_prior.py --task uci --kappas 0.01 0.1 --dampings 1e3 10 1 --iid-gammas 1e5 1e6

The local BIF of the paper localizes with an isotropic Gaussian prior, precision gamma I. This replaces it by a
prior shaped by kronfluence's own EK-FAC curvature K (the Kronecker eigenbases and corrected eigenvalues that
`fit_all_factors` writes), damped by kappa times K's mean eigenvalue:

    posterior precision  nbeta G + gamma (K + kappa mean(K) I),   d = gamma / nbeta,

G the mean Gauss-Newton. Rows (LDS at retrain fractions 0.5 / 0.1, mean per-query Spearman against EK-FAC):

- `limit g K^-1 g`: d -> infinity, the first-order term alone: EK-FAC's influence function at damping kappa mean(K);
- `first` / `exact`: the damped influence function and the exact covariance of the linearized Laplace posterior
  (first + second order), as `error_budget.Linearization.exact`, by Woodbury in kernel form (nothing [p, p]);
- `iid`: 400 and 1600 i.i.d. draws from the prior N(w*, (gamma K_kappa)^-1) itself (the d -> infinity posterior),
  through the linearized model and through the true network: the Monte Carlo and nonlinearity terms.

BENCHMARKS.md, "A prior shaped by EK-FAC's curvature", has the figures and what they mean. One thread; minutes
(digits: 2860 Gauss-Newton root rows), with the retrains cached in --cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from defaults_grid import LDSSetup, agreement
from error_budget import Linearization, covariance
from safetensors.torch import load_file

from kronfluence_bif import Analyzer, prepare_model
from kronfluence_bif.threads import set_threads


class EKFACCurvature:
    """K = blockdiag_l (Q_S,l (x) Q_A,l) diag(lambda_l) (Q_S,l (x) Q_A,l)^T from kronfluence's factor files, applied
    to rows of flat parameter vectors laid out as `Linearization` lays them (weight [out, in], then bias [out])."""

    def __init__(self, factors: Path, lin: Linearization) -> None:
        def load(name: str) -> Dict[str, torch.Tensor]:
            return {k: v.double() for k, v in load_file(str(factors / f"{name}.safetensors")).items()}

        self.qa, self.qs = load("activation_eigenvectors"), load("gradient_eigenvectors")
        counts = load("num_lambda_processed")
        self.lam = {k: v / counts[k] for k, v in load("lambda_matrix").items()}
        self.mean = float(torch.cat([v.flatten() for v in self.lam.values()]).mean())
        self.slices: Dict[str, Tuple[int, int, torch.Size]] = {}
        offset = 0
        for name, shape in zip(lin.names, lin.shapes):
            size = int(np.prod(shape))
            self.slices[name] = (offset, offset + size, shape)
            offset += size

    def power(self, rows: torch.Tensor, kappa: float, exponent: float) -> torch.Tensor:
        """rows [R, p] times (K + kappa mean(K) I)^exponent (K_kappa is symmetric, so from either side)."""
        out = torch.empty_like(rows)
        for module, lam in self.lam.items():
            w0, w1, shape = self.slices[f"{module}.weight"]
            b0, b1, _ = self.slices[f"{module}.bias"]
            r = len(rows)
            mat = torch.cat([rows[:, w0:w1].reshape(r, *shape), rows[:, b0:b1].reshape(r, shape[0], 1)], 2)
            qs, qa = self.qs[module], self.qa[module]
            rotated = (qs.T @ mat @ qa) * (lam + kappa * self.mean) ** exponent
            mat = qs @ rotated @ qa.T
            out[:, w0:w1] = mat[:, :, :-1].reshape(r, -1)
            out[:, b0:b1] = mat[:, :, -1]
        return out


class CurvaturePrior:
    """The exact linearized estimand under the prior gamma K_kappa, for one kappa and any (nbeta, d)."""

    def __init__(self, lin: Linearization, curvature: EKFACCurvature, kappa: float) -> None:
        self.lin = lin
        train_rows = lin.owners < lin.n
        self.b = lin.roots[train_rows]  # G = B^T B / n
        roots_q = lin.roots[lin.query_rows]
        mb, mg = curvature.power(self.b, kappa, -1.0), curvature.power(lin.grads, kappa, -1.0)
        self.bmb = self.b @ mb.T  # B K^-1 B^T
        self.gmb = mg @ self.b.T  # g K^-1 B^T
        self.gmg = lin.grads[lin.n :] @ mg[: lin.n].T  # [nq, n]: g_q K^-1 g_i, the d -> infinity first order
        self.rmb = curvature.power(roots_q, kappa, -1.0) @ self.b.T  # query roots K^-1 B^T

    def exact(self, nbeta: float, d: float) -> Tuple[np.ndarray, np.ndarray]:
        """(first order, first + second order) [nq, n], with Sigma = (c B^T B + gamma K)^-1 by Woodbury:
        Sigma = M - M B^T (I / c + B M B^T)^-1 B M, M = (gamma K)^-1, c = nbeta / n."""
        lin, gamma = self.lin, d * nbeta
        inner = torch.eye(len(self.b), dtype=self.b.dtype) * lin.n / nbeta + self.bmb / gamma
        solve = torch.linalg.solve(inner, torch.cat([self.gmb[: lin.n].T, self.bmb], 1) / gamma)
        first = self.gmg / gamma - (self.gmb[lin.n :] / gamma) @ solve[:, : lin.n]
        products = self.rmb / gamma - (self.rmb / gamma) @ solve[:, lin.n :]  # query roots Sigma B^T
        return first.numpy(), (first + lin.second_order(products)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["uci", "digits"], default="digits")
    parser.add_argument("--retrains", type=int, default=60)
    parser.add_argument("--cache", default="./benchmark_results")
    parser.add_argument("--kappas", type=float, nargs="+", default=[1e-3, 0.1])
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e3, 10.0, 1.0])
    parser.add_argument("--nbetas", type=float, nargs="+", default=[1e3, 1e5])
    parser.add_argument("--iid-gammas", type=float, nargs="*", default=[], help="prior precisions of the i.i.d. rows")
    args = parser.parse_args()
    set_threads(1)
    setups = [LDSSetup.load(args.task, args.retrains, args.cache, f) for f in (0.5, 0.1)]
    setup = setups[0]
    analyzer = Analyzer(
        f"cp_{args.task}",
        prepare_model(setup.fit(setup.train, 0), setup.task),
        setup.task,
        cpu=True,
        output_dir=str(setup.out),
        disable_tqdm=True,
    )
    ekfac, _ = setup.score(analyzer, "ekfac")
    lin = Linearization(setup.fit(setup.train, 0).double().eval(), setup, dtype=torch.float64)
    curvature = EKFACCurvature(setup.out / f"cp_{args.task}" / "factors_ekfac", lin)

    def row(label: str, scores: np.ndarray) -> str:
        lds = " / ".join(f"{s.lds(scores):.3f}" for s in setups)
        return f"| {label} | {lds} | {agreement(ekfac, scores)[0]:.2f} |"

    lines: List[str] = ["| estimand | LDS 0.5 / 0.1 | Spearman vs EK-FAC |", "|---|---|---:|", row("EK-FAC", ekfac)]
    print("\n".join(lines), flush=True)
    gen = torch.Generator().manual_seed(0)
    for kappa in args.kappas:
        prior = CurvaturePrior(lin, curvature, kappa)
        lines.append(row(f"kappa {kappa:g}: limit g K^-1 g", prior.gmg.numpy()))
        print(lines[-1], flush=True)
        for nbeta in args.nbetas:
            for d in args.dampings:
                first, exact = prior.exact(nbeta, d)
                lines += [row(f"kappa {kappa:g}, d {d:g}: first", first)]
                lines += [row(f"kappa {kappa:g}, d {d:g}, nbeta {nbeta:g}: exact", exact)]
                print("\n".join(lines[-2:]), flush=True)
        for gamma in args.iid_gammas:
            xi = torch.randn(1600, lin.p, generator=gen, dtype=torch.float64)
            deltas = curvature.power(xi, kappa, -0.5) / gamma**0.5
            spread = float(deltas.norm(dim=1).mean())
            for linear in (True, False):
                values = lin.losses(deltas, linear)
                for count in (400, 1600):
                    what = "linearized" if linear else "true net"
                    label = f"kappa {kappa:g}, gamma {gamma:g} (spread {spread:.3g}): iid {what}, {count}"
                    lines.append(row(label, covariance(values[:count], lin.n)))
                    print(lines[-1], flush=True)
    (setup.out / f"curvature_prior_{args.task}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
