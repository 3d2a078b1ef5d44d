"""What LDS can BIF's leading term reach at a given damping? Exact damped Gauss-Newton influence, by damping.

    python benchmarks/damping_ceiling.py --task uci --retrains 60
    python benchmarks/damping_ceiling.py --task digits --retrains 40

Under a Laplace approximation the local BIF is g_q^T (nbeta H + localization I)^-1 g_i plus higher-order terms
(paper, App. A.2), i.e. a damped influence function with damping d = localization / nbeta. This script computes
that leading term exactly for the demo MLPs, with the Gauss-Newton H of the mean loss in kernel form
(per-example output Jacobians, Woodbury: an [n*C, n*C] solve instead of a [p, p] inverse), and reports its LDS
for d from 1e-4 to 1. For UCI it also reports the exact Gaussian second-order covariance
4 r_i r_q C_iq + 2 C_iq^2 at nbeta = 1000 (regression outputs only), and what i.i.d. draws from that Gaussian
give with 200, 1600 and 6400 draws (the Monte Carlo limit of a perfectly mixing sampler).
Not a test: about a minute (UCI) or three (digits) on 2 cores.
"""

from __future__ import annotations

import argparse

import torch
from defaults_grid import LDSSetup, lds
from torch.func import functional_call, jacrev, vmap

from kronfluence_bif.threads import set_threads

DAMPINGS = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 1.0]


def jacobians(model, inputs):
    """Per-example output Jacobians [n, C, p] over all parameters, float64."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x[None],))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, inputs)
    return torch.cat([jac[k].reshape(len(inputs), jac[k].shape[1], -1) for k in params], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["uci", "digits"], default="uci")
    parser.add_argument("--retrains", type=int, default=60)
    parser.add_argument("--cache", default="./benchmark_results")
    args = parser.parse_args()
    set_threads(2)
    setup = LDSSetup.load(args.task, args.retrains, args.cache)
    train, query, masks, losses = setup.train, setup.query, setup.masks, setup.losses
    model = setup.fit(train, 0).double().eval()
    x, y = train.tensors
    xq, yq = query.tensors
    x, xq = x.double(), xq.double()
    jac, jac_q = jacobians(model, x), jacobians(model, xq)
    n = len(x)
    with torch.no_grad():
        out_train, out_query = model(x), model(xq)
    if args.task == "uci":  # loss (f - y)^2: g = 2 r J, Gauss-Newton 2 J^T J
        resid, resid_q = (out_train - y.double())[:, 0], (out_query - yq.double())[:, 0]
        grads, grads_q = 2 * resid[:, None] * jac[:, 0], 2 * resid_q[:, None] * jac_q[:, 0]
        root = jac[:, 0] * 2**0.5  # B with B^T B = sum_i Gauss-Newton_i
    else:  # cross-entropy: g = J^T (p - e_y), Gauss-Newton J^T (diag p - p p^T) J
        probs, probs_q = out_train.softmax(-1), out_query.softmax(-1)
        classes = probs.shape[1]
        grads = torch.einsum("nc,ncp->np", probs - torch.nn.functional.one_hot(y, classes).double(), jac)
        grads_q = torch.einsum("nc,ncp->np", probs_q - torch.nn.functional.one_hot(yq, classes).double(), jac_q)
        lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        evals, evecs = torch.linalg.eigh(lam)
        sqrt_lam = evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.transpose(1, 2)
        root = torch.einsum("ncd,ndp->ncp", sqrt_lam, jac).reshape(n * classes, -1)
    kernel = root @ root.T
    b_train, b_query = root @ grads.T, root @ grads_q.T
    print(f"{args.task}: {n} train, {len(xq)} query, {jac.shape[-1]} weights, {len(masks)} retrains")
    print(f"largest eigenvalue of the mean Gauss-Newton: {torch.linalg.eigvalsh(kernel)[-1].item() / n:.3g}")
    print(f"identity (gradient similarity): LDS {lds((grads_q @ grads.T).numpy(), masks, losses):.3f}")
    eye = torch.eye(kernel.shape[0], dtype=kernel.dtype)
    for damping in DAMPINGS:
        # (H + d I)^-1 with H = B^T B / n: (1/d) (I - B^T (n d I + B B^T)^-1 B)
        scores = grads_q @ grads.T - b_query.T @ torch.linalg.solve(n * damping * eye + kernel, b_train)
        line = f"damping {damping:g}: damped Gauss-Newton IF LDS {lds(scores.numpy(), masks, losses):.3f}"
        if args.task == "uci":
            line += _second_order(jac[:, 0], jac_q[:, 0], resid, resid_q, damping, masks, losses)
        print(line, flush=True)


def _second_order(jac, jac_q, resid, resid_q, damping, masks, losses, nbeta=1000.0) -> str:
    """Exact Gaussian covariance of the losses (f linearized) at nbeta, and i.i.d. draws from it."""
    n = len(jac)
    gamma = damping * nbeta
    every = torch.cat([jac, jac_q])
    kernel = every @ every.T
    lam = gamma / (2 * nbeta / n)
    cov = kernel - kernel[:, :n] @ torch.linalg.solve(
        lam * torch.eye(n, dtype=kernel.dtype) + kernel[:n, :n], kernel[:n]
    )
    cov = (cov + cov.T) / (2 * gamma)
    r = torch.cat([resid, resid_q])
    exact = 4 * r[:, None] * r[None, :] * cov + 2 * cov**2
    text = f"; Gaussian second order (nbeta 1e3) {lds(exact[n:, :n].numpy(), masks, losses):.3f}"
    evals, evecs = torch.linalg.eigh(cov)
    factor = evecs * evals.clamp_min(0).sqrt()
    gen = torch.Generator().manual_seed(0)
    for draws in (200, 1600, 6400):
        z = torch.randn(draws, len(r), generator=gen, dtype=cov.dtype) @ factor.T
        values = 2 * r * z + z**2
        values -= values.mean(0)
        estimate = values.T @ values / (draws - 1)
        text += f", {draws} iid draws {lds(estimate[n:, :n].numpy(), masks, losses):.3f}"
    return text


if __name__ == "__main__":
    main()
