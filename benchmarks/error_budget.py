"""Error budget of the BIF on the demo tasks: estimand, Monte Carlo, nonlinearity and mixing, each as an LDS.

    python benchmarks/error_budget.py --task uci --retrains 60
    python benchmarks/error_budget.py --task digits --retrains 40 --settings '[[1e3, 1e3], [1e5, 1e3]]'
    python benchmarks/error_budget.py --task uci --exact-grid      # the exact estimand by nbeta x damping only
    python benchmarks/error_budget.py --task digits --retrains 40 --exact-grid --fraction 0.1  # on random tenths

For each setting (nbeta, localization), i.e. damping d = localization / nbeta, the rows are:

- `exact, first order`: g_q^T Sigma g_i with Sigma = (nbeta GN_mean + localization I)^-1, the damped Gauss-Newton IF
  (divided by nbeta) that damping_ceiling.py computes;
- `exact linearized`: the exact covariance of the losses when the network is linearized at w* and each loss is
  expanded to second order in the outputs, under w ~ N(w*, Sigma): g_i^T K_iq g_q + 1/2 tr(L_i K_iq L_q K_qi),
  K = J Sigma J^T, L = output Hessian of the loss (regression: 4 r_i r_q K + 2 K^2). This is what a perfect sampler
  of the Laplace posterior converges to on the linearized model;
- `iid linearized`: the sample covariance of N i.i.d. draws from N(w*, Sigma) through that linearized model (the
  Monte Carlo term at N draws);
- `iid true net`: the same draws through the real network and loss (adds the nonlinearity term);
- `iid true net, span only`: the draws' component inside the span of the training output Jacobians only (the flat
  directions, which the linearized cross-covariances never see, are not sampled);
- one row per sampler run through `Analyzer(strategy="bif")` at the same nbeta and localization (adds mixing and
  gradient noise), with `--samplers` a JSON list of BIFArguments overrides.

Every row reports LDS (retrains on random halves, cached in --cache; scale-free, so rows at different nbeta
compare) and the mean per-query Spearman against kronfluence EK-FAC. The Gauss-Newton is handled in kernel form
(eigendecomposition of B B^T, B the [n*C, p] loss-Hessian-weighted output Jacobians), so nothing is [p, p].
Prints a Markdown table and writes error_budget_<task>.json / .md. One thread; minutes with cached retrains.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from defaults_grid import LDSSetup, agreement
from torch.func import functional_call, jacrev, jvp, vmap

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.threads import set_threads

# today's defaults (damping 1), and damping 1e-2 with a tight posterior (issue 14's candidates)
DEFAULT_SETTINGS = [[1e3, 1e3], [1e4, 1e2], [1e5, 1e3]]
DEFAULT_SAMPLERS = [{}]  # the span-restricted prototype runs in subspace_sampler.py --library


class Linearization:
    """Output Jacobians, loss gradients and loss-Hessian roots at w*, and the kernel eigenpairs of the Gauss-Newton."""

    def __init__(self, model: torch.nn.Module, setup: LDSSetup, dtype=torch.float64, cutoff: float = 1e-7) -> None:
        self.model, self.kind, self.dtype = model, setup.name, dtype
        self.params = {k: v.detach().to(dtype) for k, v in model.named_parameters()}
        self.names = list(self.params)
        self.shapes = [v.shape for v in self.params.values()]
        self.p = sum(v.numel() for v in self.params.values())
        x, y = setup.train.tensors
        xq, yq = setup.query.tensors
        self.n, self.nq = len(x), len(xq)
        self.inputs = torch.cat([x, xq]).to(dtype)
        self.targets = torch.cat([y, yq]).to(dtype if self.kind == "uci" else torch.long)
        with torch.no_grad():
            self.out = self.forward(self.params)
        grads, roots, owners = [], [], []
        for start in range(0, len(self.inputs), 100):  # Jacobians in chunks: [100, C, p] at a time
            jac = self._jacobians(self.inputs[start : start + 100])
            g, r, o = self._loss_terms(jac, self.out[start : start + 100], self.targets[start : start + 100], cutoff)
            grads.append(g)
            roots.append(r)
            owners.append(o + start)
        self.grads = torch.cat(grads)  # [N, p]: per-example loss gradients at w*
        self.roots = torch.cat(roots)  # [R, p]: rows sqrt(e) v^T J_i over the eigenpairs (e, v) of the loss Hessian
        self.owners = torch.cat(owners)  # [R]: which example each root row belongs to
        train_rows = self.owners < self.n
        b = self.roots[train_rows]
        kernel = b @ b.T
        evals, evecs = torch.linalg.eigh(kernel)
        keep = evals > evals.max() * 1e-10
        self.s2 = evals[keep].flip(0)  # eigenvalues of B B^T = s^2, descending
        self.basis = (b.T @ evecs[:, keep].flip(1)) / self.s2.sqrt()  # V [p, r], orthonormal columns
        self.lambda_max = float(self.s2[0]) / self.n
        # projections onto V, once: gradients and query roots
        self.grads_v = self.grads @ self.basis  # [N, r]
        self.roots_v = self.roots @ self.basis  # [R, r]
        self.grads_gram = self.grads[self.n :] @ self.grads[: self.n].T  # [nq, n]
        self.query_rows = ~train_rows
        self.roots_gram = self.roots[self.query_rows] @ self.roots[train_rows].T  # [Rq, Rt]

    def forward(self, params: Dict[str, torch.Tensor], inputs=None) -> torch.Tensor:
        inputs = self.inputs if inputs is None else inputs
        return functional_call(self.model, params, (inputs,))

    def _jacobians(self, inputs: torch.Tensor) -> torch.Tensor:
        def f(p, x):
            return functional_call(self.model, p, (x[None],))[0]

        jac = vmap(jacrev(f), in_dims=(None, 0))(self.params, inputs)
        return torch.cat([jac[k].reshape(len(inputs), jac[k].shape[1], -1) for k in self.names], 2)

    def _loss_terms(self, jac, out, target, cutoff) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.kind == "uci":  # (f - y)^2: gradient 2 r J, Hessian 2 J^T J
            resid = (out - target)[:, 0]
            return 2 * resid[:, None] * jac[:, 0], jac[:, 0] * 2**0.5, torch.arange(len(jac))
        probs = out.softmax(-1)
        onehot = torch.nn.functional.one_hot(target, probs.shape[1]).to(probs)
        grads = torch.einsum("nc,ncp->np", probs - onehot, jac)
        lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        evals, evecs = torch.linalg.eigh(lam)  # [m, C], [m, C, C]
        keep = evals > cutoff  # drop the zero direction (ones) and negligible ones
        weighted = evecs * evals.clamp_min(0).sqrt()[:, None, :]  # columns sqrt(e) v
        rows = torch.einsum("mck,mcp->mkp", weighted, jac)  # [m, C, p]
        owner = torch.arange(len(jac))[:, None].expand_as(keep)
        return grads, rows[keep], owner[keep]

    # ------------------------------------------------------------------ exact estimands
    def exact(self, nbeta: float, gamma: float) -> Tuple[np.ndarray, np.ndarray]:
        """(first-order, first + second order) covariance [nq, n] of the linearized Laplace posterior."""
        lam = gamma * self.n / nbeta  # Sigma = (1/gamma) (I - V diag(s2 / (lam + s2)) V^T)
        shrink = self.s2 / (lam + self.s2)
        gq, gt = self.grads_v[self.n :], self.grads_v[: self.n]
        first = (self.grads_gram - (gq * shrink) @ gt.T) / gamma
        rq, rt = self.roots_v[self.query_rows], self.roots_v[~self.query_rows]
        m = (self.roots_gram - (rq * shrink) @ rt.T) / gamma  # [Rq, Rt] = roots_q Sigma roots_t^T
        return first.numpy(), (first + self.second_order(m)).numpy()

    def second_order(self, products: torch.Tensor) -> torch.Tensor:
        """[nq, n] second-order term 1/2 tr(L_q K L_i K) = 1/2 |sqrtL_q K sqrtL_i|_F^2 from the root rows' products
        [Rq, Rt] = roots_q K roots_t^T (K the posterior covariance), summed over each example's rows."""
        squares = 0.5 * products**2
        owners_q, owners_t = self.owners[self.query_rows] - self.n, self.owners[~self.query_rows]
        by_train = torch.zeros(len(squares), self.n, dtype=squares.dtype).index_add_(1, owners_t, squares)
        return torch.zeros(self.nq, self.n, dtype=squares.dtype).index_add_(0, owners_q, by_train)

    # ------------------------------------------------------------------ i.i.d. Gaussian draws
    def draws(self, nbeta: float, gamma: float, count: int, gen: torch.Generator, span_only: bool) -> torch.Tensor:
        """[count, p] draws of w - w* from N(0, Sigma); span_only keeps only their component in span(V)."""
        lam = gamma * self.n / nbeta
        scale = (lam / (lam + self.s2)).sqrt() / gamma**0.5  # Sigma^1/2 on V
        eta = torch.randn(count, len(self.s2), generator=gen, dtype=self.dtype)
        inside = (eta * scale) @ self.basis.T
        if span_only:
            return inside
        xi = torch.randn(count, self.p, generator=gen, dtype=self.dtype)
        return inside + (xi - (xi @ self.basis) @ self.basis.T) / gamma**0.5

    def _unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape))
            out[name] = flat[offset : offset + size].view(shape)
            offset += size
        return out

    def losses(self, deltas: torch.Tensor, linear: bool) -> torch.Tensor:
        """[count, N] per-example losses at w* + delta, through the linearized model or the true one."""
        rows = []
        for chunk in deltas.split(50):

            def one(d):
                moved = {k: self.params[k] + v for k, v in self._unflatten(d).items()}
                if linear:
                    return jvp(lambda p: self.forward(p), (self.params,), (self._unflatten(d),))[1]
                return self.forward(moved) - self.out

            change = vmap(one)(chunk)  # [c, N, C] output changes
            rows.append(self._loss_of(change, linear))
        return torch.cat(rows)

    def _loss_of(self, change: torch.Tensor, linear: bool) -> torch.Tensor:
        out = self.out + change
        if self.kind == "uci":
            return ((out - self.targets) ** 2).sum(-1)
        if linear:  # second-order expansion of the cross-entropy in the outputs
            probs = self.out.softmax(-1)
            onehot = torch.nn.functional.one_hot(self.targets, probs.shape[1]).to(probs)
            first = (change * (probs - onehot)).sum(-1)
            quad = (change**2 * probs).sum(-1) - (change * probs).sum(-1) ** 2
            return first + 0.5 * quad
        return -(out.log_softmax(-1).gather(-1, self.targets.expand(len(out), -1)[..., None])[..., 0])


def chain_health(scores_dir: Path, num_draws: Optional[int] = None) -> Dict[str, float]:
    """R-hat of the mean train loss and the mean ESS fraction per chain, from a run's bif_diagnostics.json (the
    draws per chain the run sampled with unless given)."""
    diag = json.loads((scores_dir / "bif_diagnostics.json").read_text())
    ess = [c["ess_mean_train_loss"] for c in diag["chains"]]
    num_draws = num_draws or diag["sampler_arguments"]["num_draws"]
    return {"rhat": diag["rhat_mean_train_loss"], "ess_fraction": float(np.mean(ess)) / num_draws}


def covariance(values: torch.Tensor, n: int) -> np.ndarray:
    """[nq, n] sample covariance of query (columns n:) and train (columns :n) values over the draws."""
    centred = values - values.mean(0)
    return (centred[:, n:].T @ centred[:, :n] / (len(values) - 1)).numpy()


def exact_grid(lin: Linearization, setup: LDSSetup, ekfac: np.ndarray) -> None:
    """Markdown tables: LDS (and Spearman vs EK-FAC) of the exact linearized estimand by nbeta and damping."""
    nbetas, dampings = [1e2, 3e2, 1e3, 3e3, 1e4, 1e5, 1e6], [1.0, 0.3, 0.1, 0.03, 1e-2, 3e-3, 1e-3]
    head = "| nbeta \\ damping | " + " | ".join(f"{d:g}" for d in dampings) + " |"
    rule = "|---|" + "---:|" * len(dampings)
    lds_lines, rho_lines = [head, rule], [head, rule]
    first_row = ["first order (any nbeta)"]
    for d in dampings:
        first, _ = lin.exact(1e3, d * 1e3)
        first_row.append(f"{setup.lds(first):.3f} / {agreement(ekfac, first)[0]:.2f}")
    for nbeta in nbetas:
        lds_row, rho_row = [f"{nbeta:g}"], [f"{nbeta:g}"]
        for d in dampings:
            _, exact = lin.exact(nbeta, d * nbeta)
            lds_row.append(f"{setup.lds(exact):.3f}")
            rho_row.append(f"{agreement(ekfac, exact)[0]:.2f}")
        lds_lines.append("| " + " | ".join(lds_row) + " |")
        rho_lines.append("| " + " | ".join(rho_row) + " |")
        print(lds_lines[-1], flush=True)
    text = "\n".join(
        [f"### {setup.name}: exact linearized estimand, LDS (EK-FAC {setup.lds(ekfac):.3f})", ""]
        + lds_lines
        + ["| " + " | ".join(first_row) + " |", "", "Spearman vs EK-FAC:", ""]
        + rho_lines
    )
    print("\n" + text)
    (setup.out / f"exact_grid_{setup.name}.md").write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["uci", "digits"], default="uci")
    parser.add_argument("--retrains", type=int, default=60)
    parser.add_argument("--settings", default=json.dumps(DEFAULT_SETTINGS), help="JSON [[nbeta, localization], ...]")
    parser.add_argument("--samplers", default=json.dumps(DEFAULT_SAMPLERS), help="JSON list of BIFArguments overrides")
    parser.add_argument("--draws", type=int, default=1600, help="total draws (i.i.d. rows; samplers: 4 chains)")
    parser.add_argument("--fraction", type=float, default=0.5, help="retrain fraction of the LDS subsets")
    parser.add_argument("--cache", default="./benchmark_results")
    parser.add_argument("--exact-grid", action="store_true", help="only the exact estimand's LDS by nbeta and damping")
    parser.add_argument("--float32", action="store_true", help="Jacobians and kernel in float32 (digits: faster)")
    args = parser.parse_args()
    set_threads(1)
    setup = LDSSetup.load(args.task, args.retrains, args.cache, args.fraction)
    rows: List[Dict[str, Any]] = []

    model = prepare_model(setup.fit(setup.train, 0), setup.task)
    analyzer = Analyzer(f"eb_{args.task}", model, setup.task, cpu=True, output_dir=str(setup.out), disable_tqdm=True)
    ekfac, seconds = setup.score(analyzer, "ekfac")

    def add(setting: str, what: str, scores: np.ndarray, secs: float = float("nan"), **extra) -> None:
        row = {"setting": setting, "what": what, "lds": setup.lds(scores), "spearman": agreement(ekfac, scores)[0]}
        rows.append({**row, "seconds": secs, **extra})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)

    add("", "EK-FAC", ekfac, seconds)
    t0 = time.perf_counter()
    dtype = torch.float32 if args.float32 else torch.float64
    lin = Linearization(setup.fit(setup.train, 0).to(dtype).eval(), setup, dtype=dtype)
    print(
        f"{args.task}: {lin.n} train, {lin.nq} query, {lin.p} weights, GN rank {len(lin.s2)}, lambda_max "
        f"{lin.lambda_max:.3g}; linearization {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    if args.exact_grid:
        exact_grid(lin, setup, ekfac)
        return
    gen = torch.Generator().manual_seed(0)
    for nbeta, gamma in json.loads(args.settings):
        label = f"nbeta {nbeta:g}, loc {gamma:g} (d {gamma / nbeta:g})"
        first, exact = lin.exact(nbeta, gamma)
        add(label, "exact, first order (damped GN IF)", first)
        add(label, "exact linearized (1st + 2nd order)", exact)
        t0 = time.perf_counter()
        deltas = lin.draws(nbeta, gamma, args.draws, gen, span_only=False)
        spread = float(deltas.norm(dim=1).mean())
        add(label, f"iid linearized, {args.draws} draws", covariance(lin.losses(deltas, True), lin.n))
        add(label, f"iid true net, {args.draws} draws", covariance(lin.losses(deltas, False), lin.n), spread=spread)
        inside = lin.draws(nbeta, gamma, args.draws, gen, span_only=True)
        add(
            label,
            f"iid true net, span only, {args.draws} draws",
            covariance(lin.losses(inside, False), lin.n),
            spread=float(inside.norm(dim=1).mean()),
        )
        print(f"  i.i.d. rows {time.perf_counter() - t0:.1f} s", flush=True)
        for i, overrides in enumerate(json.loads(args.samplers)):
            settings = {"num_draws": args.draws // 4, "checkpoint_interval": 0, **overrides}
            settings.update(nbeta=nbeta, localization=gamma)
            settings["sampler_batch_size"] = min(settings.get("sampler_batch_size", 64), lin.n)
            name = " ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
            try:
                scores, secs = setup.score(analyzer, f"eb{i}", "bif", BIFArguments(**settings))
            except Exception as exc:  # noqa: BLE001 - a diverging sampler is a row of the budget
                rows.append({"setting": label, "what": f"sampler {name}", "error": str(exc).splitlines()[0][:120]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            health = chain_health(setup.out / f"eb_{args.task}" / f"scores_eb{i}", settings["num_draws"])
            add(label, f"sampler {name}", scores, secs, **health)
    lines = [
        f"### {args.task}: {lin.n} train x {lin.nq} query, {lin.p} weights, LDS vs {len(setup.masks)} retrains "
        f"on halves",
        "",
        "| setting | estimate | LDS | Spearman vs EK-FAC | time (s) | R-hat | ESS fraction |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['setting']} | {row['what']} | failed: {row['error'][:60]} | | | | |")
            continue
        secs = "" if row["seconds"] != row["seconds"] else f"{row['seconds']:.1f}"
        health = f"{row['rhat']:.2f} | {row['ess_fraction']:.2f}" if "rhat" in row else " | "
        lines.append(
            f"| {row['setting']} | {row['what']} | {row['lds']:.3f} | {row['spearman']:.3f} | {secs} | {health} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    (setup.out / f"error_budget_{args.task}.md").write_text(text + "\n")
    (setup.out / f"error_budget_{args.task}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
