"""Prototype estimators for issue 14: sampling only inside the span of the training Jacobians, and a linear control
variate, measured by LDS against the same retrains as `error_budget.py`.

    python benchmarks/subspace_sampler.py --task uci --setting 1e4 1e3
    python benchmarks/subspace_sampler.py --task digits --setting 1e4 1e3 --rank 512

Why the span: the cross-covariances Cov(loss_i, loss_q) of the linearized model only see Sigma on the span of the
training output Jacobians (g_i and the loss-Hessian roots of training examples lie in it), so dropping the
localized posterior's flat directions leaves that estimand unchanged, while the draws no longer wander
sqrt(num_weights / localization) from w*, where the network is far from linear.

Estimators (all with `--draws` total draws, LDS against retrains on halves, Spearman against EK-FAC):
- `iid span`: i.i.d. Gaussian draws w* + V_k diag((nbeta s/n + gamma)^-1/2) eta through the true network, V_k the top
  k eigenvectors of the Gauss-Newton (the exact kernel basis of `error_budget.Linearization`);
- `chain span`: full-batch Langevin in the coordinates alpha of w = w* + V_k alpha, preconditioned by
  diag(1 / (nbeta s/n + gamma)) (Gauss-Newton preconditioning), the gradient taken from the same forward that
  evaluates the draw's losses (one forward over train + query and one backward per step);
- `+ CV`: the control variate a_i = g_i . (w - w*) (per-example gradients at w*, projected on V_k once): the estimate
  is Cov(l_i, l_q) - Cov(a_i, a_q) + g_i^T Sigma_k g_q, whose last term is the damped Gauss-Newton IF, exact.
R-hat and ESS fraction of the chains are reported on the mean train loss.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List

import numpy as np
import torch
from defaults_grid import LDSSetup, agreement
from error_budget import Linearization, chain_health, covariance

import kronfluence_bif.engine as engine
from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.sampler import SketchSGLD
from kronfluence_bif.threads import set_threads


def rhat_ess(trace: np.ndarray) -> Dict[str, float]:
    """Split-free Gelman-Rubin R-hat and the ESS fraction (initial positive sequence) of [chains, draws] traces."""
    chains, draws = trace.shape
    means = trace.mean(1)
    within = trace.var(1, ddof=1).mean()
    between = draws * means.var(ddof=1)
    rhat = float(np.sqrt(((draws - 1) / draws * within + between / draws) / max(within, 1e-300)))
    centred = trace - means[:, None]
    acov = np.array([(centred[:, : draws - t] * centred[:, t:]).mean() for t in range(min(draws, 200))])
    rho = acov / acov[0]
    total = 1.0
    for t in range(1, len(rho) - 1, 2):
        pair = rho[t] + rho[t + 1]
        if pair < 0:
            break
        total += 2 * pair
    return {"rhat": rhat, "ess_fraction": float(1.0 / total)}


class Subspace:
    """w = w* + V_k alpha on the top-k Gauss-Newton eigenvectors; Laplace precision diag(nbeta s/n + gamma)."""

    def __init__(
        self, lin: Linearization, nbeta: float, gamma: float, rank: int, span: str = "top", seed: int = 0
    ) -> None:
        self.lin, self.nbeta, self.gamma = lin, nbeta, gamma
        k = min(rank, len(lin.s2))
        if span == "top":  # the exact top-k eigenvectors of the Gauss-Newton
            coords, s2 = torch.eye(len(lin.s2), k, dtype=lin.dtype), lin.s2[:k]
        else:  # a random Fisher sketch span(B^T Z) (the library's), optionally after power iterations, Rayleigh-Ritz
            powers = int(span[len("sketch") :] or 0)
            gen = torch.Generator().manual_seed(seed)
            s = lin.s2.sqrt()
            coords = s[:, None] * torch.randn(len(s), k, generator=gen, dtype=lin.dtype)  # V^T B^T Z
            for _ in range(powers):
                coords = lin.s2[:, None] * torch.linalg.qr(coords)[0]
            coords = torch.linalg.qr(coords)[0]
            evals, evecs = torch.linalg.eigh(coords.T @ (lin.s2[:, None] * coords))  # Rayleigh-Ritz on the span
            coords, s2 = coords @ evecs.flip(1), evals.flip(0)
        self.basis = lin.basis @ coords  # [p, k] orthonormal
        self.precision = nbeta * s2 / lin.n + gamma
        self.grads_k = lin.grads_v @ coords  # [N, k] per-example gradients at w* on the span

    def linear_exact(self) -> np.ndarray:
        """g_q^T Sigma_k g_i: the control variate's known covariance (the damped GN IF on the span)."""
        g = self.grads_k / self.precision.sqrt()
        return (g[self.lin.n :] @ g[: self.lin.n].T).numpy()

    def losses(self, alpha: torch.Tensor) -> torch.Tensor:
        return self.lin.losses(alpha @ self.basis.T, linear=False)

    def chain(self, draws: int, burnin: int, step: float, gen: torch.Generator) -> Dict[str, torch.Tensor]:
        """Full-batch GN-preconditioned Langevin on alpha; the draw's forward gives the next step's gradient."""
        lin = self.lin
        precond = 1.0 / self.precision
        alpha = torch.zeros(len(precond), dtype=lin.dtype)
        kept_losses, kept_alpha = [], []
        for t in range(burnin + draws):
            a = alpha.clone().requires_grad_(True)
            flat = self.basis @ a
            params = {k: lin.params[k] + v for k, v in lin._unflatten(flat).items()}
            out = lin.forward(params)
            values = lin._loss_of((out - lin.out)[None], linear=False)[0]  # [N] losses at this draw
            potential = self.nbeta * values[: lin.n].mean()
            (grad,) = torch.autograd.grad(potential, a)
            if t >= burnin:
                kept_losses.append(values.detach())
                kept_alpha.append(alpha.clone())
            with torch.no_grad():
                drift = grad + self.gamma * alpha
                noise = torch.randn(len(alpha), generator=gen, dtype=alpha.dtype)
                alpha = alpha - 0.5 * step * precond * drift + (step * precond).sqrt() * noise
                if not bool(torch.isfinite(alpha).all()):
                    raise FloatingPointError(f"chain diverged at step {t}")
        return {"losses": torch.stack(kept_losses), "alpha": torch.stack(kept_alpha)}


class SubspaceSketchSGLD(SketchSGLD):
    """Prototype of the library change: sketch-SGLD with G = V diag(1 / (nbeta s + gamma)) V^T, zero off the sketch.

    The chain never leaves w* + span(V) (the sketch of the Fisher), so the flat directions are not sampled.
    """

    def __init__(self, params, anchors, step_size, nbeta, localization, generator, sketch) -> None:
        super().__init__(params, anchors, step_size, nbeta, localization, generator, sketch)
        lam = self.nbeta * sketch.eigenvalues.double()
        self.prec = (1.0 / (lam + self.localization)).to(self.basis.dtype)
        self.recording = False
        RECORDED.append([])  # one list of draws' alpha = V^T (w - w*) per chain (for the control variate)
        self.alphas = RECORDED[-1]
        PRECONDITIONERS.append(self.prec)  # the Laplace covariance on the span the chain actually used

    def freeze(self) -> None:
        self.recording = True  # the engine calls freeze() after burn-in: every later step is a kept draw

    @torch.no_grad()
    def step(self, grads, batch_size: int) -> None:
        eps, gamma = self.step_size, self.localization
        cols = self._columns
        torch._foreach_copy_(self._drift_views, grads)
        cols[0].mul_(self.nbeta / batch_size)
        torch._foreach_copy_(self._diff_views, self.params)
        torch._foreach_sub_(self._diff_views, self.anchors)
        self._sample_noise()
        coef = (self.basis @ cols.T).T  # [3, k]
        drift = (0.5 * eps) * self.prec * (coef[0] + gamma * coef[1])
        noise = (eps * self.prec).sqrt() * coef[2]
        if self.track_norms:
            loss_move = (0.5 * eps * self.prec * coef[0]).norm()
            self.last_norms = torch.stack([loss_move, (0.5 * eps * gamma * self.prec * coef[1]).norm(), noise.norm()])
        update = self.basis.T @ (noise - drift)
        torch._foreach_add_(self.params, _split(update, self.params))
        if self.recording:
            self.alphas.append((coef[1] + noise - drift).double().cpu())
        self.num_steps += 1

    @property
    def apply_root(self):
        def root(v):
            flat = torch.cat([t.reshape(-1) for t in v])
            return _split(self.basis.T @ (self.prec.sqrt() * (self.basis @ flat)), v)

        return root


RECORDED: List[List[torch.Tensor]] = []
SKETCHES: List[Any] = []
PRECONDITIONERS: List[torch.Tensor] = []


def rayleigh_ritz(lin: Linearization, original):
    """sketch_fisher, then the exact Gauss-Newton on the sketch's span (Rayleigh-Ritz): rotated basis, eigenvalues.

    The library would get V^T F V from k forward-mode passes (the directional derivatives of the n per-example
    sampled-label losses along each basis vector); here the kernel-form roots B give it exactly.
    """

    def refined(sampled_loss, batches, params, batch_size):
        sketch = original(sampled_loss, batches, params, batch_size)
        shapes = [tuple(p.shape) for p in params]
        assert shapes == [tuple(s) for s in lin.shapes], "parameter order differs from the Linearization's"
        basis = sketch.basis.double()
        bv = lin.roots[~lin.query_rows].double() @ basis.T  # [R_train, k]
        evals, evecs = torch.linalg.eigh(bv.T @ bv / lin.n)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        out = type(sketch)(basis=(evecs.T @ basis).to(sketch.basis), eigenvalues=evals.to(sketch.eigenvalues))
        SKETCHES.append(out)
        return out

    return refined


def hessian_ritz(original):
    """sketch_fisher, then Rayleigh-Ritz with Hessian-vector products of the sampled-label loss on the first sketch
    batch (any Task: its expected Hessian over the sampled labels is the Fisher / Gauss-Newton). Use with a full-batch
    `sampler_batch_size`, so that batch is the whole training set."""

    def refined(sampled_loss, batches, params, batch_size):
        sketch = original(sampled_loss, batches, params, batch_size)
        basis = sketch.basis
        with torch.enable_grad():
            grads = torch.autograd.grad(sampled_loss(batches[0]), params, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads]) / batch_size
            rows = [
                torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ v, params, retain_graph=True)])
                for v in basis
            ]
        projected = basis.double() @ torch.stack(rows).double().T
        evals, evecs = torch.linalg.eigh((projected + projected.T) / 2)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        out = type(sketch)(basis=(evecs.T.to(basis) @ basis).contiguous(), eigenvalues=evals.to(sketch.eigenvalues))
        SKETCHES.append(out)
        return out

    return refined


def control_variate(lin: Linearization, nbeta: float, gamma: float) -> np.ndarray:
    """P_q (Sigma_k - Cov(alpha)) P_i^T from the recorded draws of the last run and its (refined) sketch."""
    basis = SKETCHES[-1].basis.double()
    known = PRECONDITIONERS[-1].double()  # diag(1 / (nbeta s + gamma)) after the engine's stability scaling
    alphas = torch.stack([a for chain in RECORDED for a in chain])
    centred = alphas - alphas.mean(0)
    sample = centred.T @ centred / (len(alphas) - 1)
    proj = lin.grads.double() @ basis.T  # [N, k]
    diff = torch.diag(known) - sample
    return (proj[lin.n :] @ diff @ proj[: lin.n].T).numpy()


def _split(flat: torch.Tensor, like) -> List[torch.Tensor]:
    views, offset = [], 0
    for t in like:
        views.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return views


def estimates(space: Subspace, values: torch.Tensor, alpha: torch.Tensor) -> Dict[str, np.ndarray]:
    n = space.lin.n
    plain = covariance(values, n)
    surrogate = alpha @ space.grads_k.T  # [D, N] a_i = g_i . (w - w*)
    return {"": plain, " + CV": plain - covariance(surrogate, n) + space.linear_exact()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["uci", "digits"], default="uci")
    parser.add_argument("--retrains", type=int, default=60)
    parser.add_argument("--setting", type=float, nargs=2, default=[1e4, 1e3], metavar=("NBETA", "LOCALIZATION"))
    parser.add_argument("--ranks", type=int, nargs="*", default=[128, 100000])
    parser.add_argument("--span", default="top", help="top (GN eigenvectors), sketch, sketch1 (1 power iteration)...")
    parser.add_argument("--steps", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--draws", type=int, default=1600)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--burnin", type=int, default=50)
    parser.add_argument(
        "--library",
        default='[{}, {"subspace": true}, {"subspace": true, "sketch_rank": 512}]',
        help="JSON list of BIFArguments overrides for sketch_sgld runs through the Analyzer; subspace: true patches "
        "in SubspaceSketchSGLD",
    )
    parser.add_argument("--cache", default="./benchmark_results")
    parser.add_argument("--float32", action="store_true")
    args = parser.parse_args()
    set_threads(1)
    setup = LDSSetup.load(args.task, args.retrains, args.cache)
    model = prepare_model(setup.fit(setup.train, 0), setup.task)
    analyzer = Analyzer(f"ss_{args.task}", model, setup.task, cpu=True, output_dir=str(setup.out), disable_tqdm=True)
    ekfac, _ = setup.score(analyzer, "ekfac")
    dtype = torch.float32 if args.float32 else torch.float64
    lin = Linearization(setup.fit(setup.train, 0).to(dtype).eval(), setup, dtype=dtype)
    nbeta, gamma = args.setting
    rows: List[Dict[str, Any]] = []

    def add(what: str, scores: np.ndarray, secs: float, **extra) -> None:
        rows.append({"what": what, "lds": setup.lds(scores), "spearman": agreement(ekfac, scores)[0], "seconds": secs})
        rows[-1].update(extra)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)

    add("EK-FAC", ekfac, float("nan"))
    gen = torch.Generator().manual_seed(0)
    for rank in args.ranks:
        space = Subspace(lin, nbeta, gamma, rank, args.span)
        dim = len(space.precision)
        k = f"{dim} {args.span}"
        add(f"exact first order on V_{k}", space.linear_exact(), float("nan"))
        t0 = time.perf_counter()
        eta = torch.randn(args.draws, dim, generator=gen, dtype=dtype) / space.precision.sqrt()
        values = space.losses(eta)
        secs = time.perf_counter() - t0
        for suffix, est in estimates(space, values, eta).items():
            add(f"iid span k={k}{suffix}", est, secs)
        for step in args.steps:
            t0 = time.perf_counter()
            try:
                runs = [space.chain(args.draws // args.chains, args.burnin, step, gen) for _ in range(args.chains)]
            except FloatingPointError as exc:
                rows.append({"what": f"chain span k={k} step {step}", "error": str(exc)})
                print(json.dumps(rows[-1]), flush=True)
                continue
            secs = time.perf_counter() - t0
            values = torch.cat([r["losses"] for r in runs])
            alpha = torch.cat([r["alpha"] for r in runs])
            trace = torch.stack([r["losses"][:, : lin.n].mean(1) for r in runs]).numpy()
            health = rhat_ess(trace)
            for suffix, est in estimates(space, values, alpha).items():
                add(f"chain span k={k} step {step}{suffix}", est, secs, **health)
    for overrides in json.loads(args.library):
        subspace = overrides.pop("subspace", False)
        refine = overrides.pop("rr", False)
        settings = {"num_draws": args.draws // 4, "checkpoint_interval": 0, "sampler": "sketch_sgld"}
        settings.update(nbeta=nbeta, localization=gamma, sampler_batch_size=lin.n, **overrides)
        name = ("subspace " if subspace else "") + " ".join(f"{k}={v}" for k, v in overrides.items())
        name += " (Rayleigh-Ritz)" if refine else ""
        original, original_sketch = engine.SketchSGLD, engine.sketch_fisher
        engine.SketchSGLD = SubspaceSketchSGLD if subspace else original
        if refine:
            engine.sketch_fisher = rayleigh_ritz(lin, original_sketch)
        RECORDED.clear()
        SKETCHES.clear()
        PRECONDITIONERS.clear()
        try:
            scores, secs = setup.score(analyzer, "ss_bif", "bif", BIFArguments(**settings))
            health = chain_health(setup.out / f"ss_{args.task}" / "scores_ss_bif", settings["num_draws"])
            add(f"library sketch_sgld full batch {name}", scores, secs, **health)
            if subspace and refine:
                add(f"library sketch_sgld full batch {name} + CV", scores + control_variate(lin, nbeta, gamma), secs)
        except Exception as exc:  # noqa: BLE001 - a diverging sampler is a result
            rows.append({"what": f"library {name}", "error": str(exc).splitlines()[0][:120]})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            engine.SketchSGLD, engine.sketch_fisher = original, original_sketch
    lines = [
        f"### {args.task}: nbeta {nbeta:g}, localization {gamma:g}, {args.draws} draws, LDS vs {len(setup.masks)} "
        "retrains",
        "",
        "| estimate | LDS | Spearman vs EK-FAC | time (s) | R-hat | ESS fraction |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['what']} | diverged | | | | |")
            continue
        health = f"{r['rhat']:.2f} | {r['ess_fraction']:.2f}" if "rhat" in r else " | "
        secs = "" if r["seconds"] != r["seconds"] else f"{r['seconds']:.1f}"
        lines.append(f"| {r['what']} | {r['lds']:.3f} | {r['spearman']:.3f} | {secs} | {health} |")
    text = "\n".join(lines)
    print("\n" + text)
    tag = f"{args.task}_{nbeta:g}_{gamma:g}"
    (setup.out / f"subspace_{tag}.md").write_text(text + "\n")
    (setup.out / f"subspace_{tag}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
