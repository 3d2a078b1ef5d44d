"""The sampling phase: chains x draws of SGLD, evaluating every example at every kept draw.

Per draw the engine evaluates the per-example values x (train losses of the scored examples) and y (query
measurements, or the same examples' measurements for self scores), buffers them, and every `draws_per_block`
draws updates the float64 moments with one GEMM, checking for divergence at the same time (one host sync per
block). The model leaves this module with exactly w*, whatever happens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kronfluence_bif.arguments import BIFArguments
from kronfluence_bif.data import EvalBatches, MinibatchStream
from kronfluence_bif.errors import SamplerDivergenceError
from kronfluence_bif.logs import logger, warn_once
from kronfluence_bif.loss_views import LossViews, PerExampleView
from kronfluence_bif.moments import CrossMoments
from kronfluence_bif.parameters import SampledWeights
from kronfluence_bif.sampler import SGLD, RMSpropSGLD

TQDM_BAR_FORMAT = (
    "{desc} [{n_fmt}/{total_fmt}] {percentage:3.0f}%|{bar}{postfix} [time left: {remaining}, time spent: {elapsed}]"
)


def chain_seed(seed: int, chain: int) -> int:
    """Seed of chain `chain`: depends on (seed, chain) only, never on the process layout."""
    return int(np.random.SeedSequence([seed, chain, 0xB1F]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class Side:
    """One side of the covariance: which batches, which per-example view, and an optional reduction."""

    batches: EvalBatches
    view: PerExampleView
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # [k, n_raw] -> [k, n_out]

    @property
    def size(self) -> int:
        return self.batches.size


@dataclass
class SamplingResult:
    moments: CrossMoments
    chain_summaries: List[Dict[str, float]] = field(default_factory=list)
    traces: Dict[str, torch.Tensor] = field(default_factory=dict)


class SamplingEngine:
    """Runs the chains of one BIF computation and returns pooled moments."""

    def __init__(
        self,
        model: nn.Module,
        views: LossViews,
        weights: SampledWeights,
        stream: MinibatchStream,
        x: Side,
        y: Optional[Side],
        args: BIFArguments,
        diagonal: bool = False,
        amp_dtype: Optional[torch.dtype] = None,
        disable_tqdm: bool = False,
    ) -> None:
        self.model = model
        self.views = views
        self.weights = weights
        self.stream = stream
        self.x, self.y = x, y  # y None: self-influence Var(x), y = x
        self.diagonal = diagonal or y is None  # self-influence pairs example i with itself only
        self._checked_steps = 0
        self.args = args
        self.amp_dtype = amp_dtype
        self.disable_tqdm = disable_tqdm
        self.device = weights.params[0].device

    # ------------------------------------------------------------------ evaluation
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _evaluate(self, side: Side, out: torch.Tensor) -> None:
        offset = 0
        with torch.inference_mode(), self._autocast():
            for batch in side.batches:
                values = side.view(batch, self.model)
                out[offset : offset + values.shape[0]] = values.reshape(-1)
                offset += values.shape[0]

    def check_views(self) -> None:
        """The per-example contract on the first batch of each side, at w*, in full precision."""
        with torch.inference_mode():
            self.x.view.check(self.x.batches.first(), self.model)
            if self.y is not None:
                self.y.view.check(self.y.batches.first(), self.model)

    # ------------------------------------------------------------------ sampling
    def _make_sampler(self, chain: int) -> SGLD:
        generator = torch.Generator(device=self.device).manual_seed(chain_seed(self.args.seed, chain))
        common = dict(
            params=self.weights.masters,
            anchors=self.weights.anchors,
            step_size=self.args.step_size,
            nbeta=self.args.nbeta,
            localization=self.args.localization,
            generator=generator,
        )
        if self.args.sampler == "rmsprop_sgld":
            return RMSpropSGLD(alpha=self.args.rmsprop_alpha, eps=self.args.rmsprop_eps, **common)
        return SGLD(**common)

    def _sgld_step(self, sampler: SGLD, losses: torch.Tensor, index: int) -> None:
        batch = self.stream.next()
        with torch.enable_grad():
            loss = self.views.summed_train_loss(batch, self.model)
        grads = torch.autograd.grad(loss, self.weights.params)
        sampler.step(grads, self.stream.batch_size)
        self.weights.sync()
        losses[index] = loss.detach()

    def run(self, chains: Optional[List[int]] = None) -> SamplingResult:
        args = self.args
        chains = list(range(args.num_chains)) if chains is None else chains
        n_x_raw = self.x.size
        n_y_raw = self.y.size if self.y is not None else 0
        f32 = {"dtype": torch.float32, "device": self.device}
        shift_x = torch.empty(n_x_raw, **f32)
        shift_y = torch.empty(n_y_raw, **f32)
        self._evaluate(self.x, shift_x)
        if self.y is not None:
            self._evaluate(self.y, shift_y)
        init_mean = float(shift_x.double().mean()) if n_x_raw else 0.0
        if not math.isfinite(init_mean) or not bool(torch.isfinite(shift_y).all()):
            raise SamplerDivergenceError(
                "The losses/measurements at the trained weights w* are not finite; BIF cannot start. "
                "Check the model and the Task."
            )
        self._limit = args.divergence_loss_ratio * init_mean if init_mean > 0 else math.inf
        shift_x, shift_y = shift_x.double(), shift_y.double()
        self._init_mean = init_mean

        dim_x = self._reduced_dim(self.x, n_x_raw)
        dim_y = dim_x if self.y is None else self._reduced_dim(self.y, n_y_raw)
        moments = CrossMoments(dim_x, dim_y, diagonal=self.diagonal, device=self.device)
        block = args.draws_per_block
        buf_x = torch.empty(block, n_x_raw, **f32)
        buf_y = torch.empty(block, n_y_raw, **f32)
        steps_per_chain = args.num_burnin_steps + args.num_draws * args.draw_interval
        step_losses = torch.empty(steps_per_chain, **f32)
        trace_x = torch.empty(len(chains), args.num_draws, dtype=torch.float64, device=self.device)
        trace_y = torch.empty_like(trace_x)
        summaries = []

        if args.sampler == "rmsprop_sgld" and args.num_burnin_steps == 0:
            warn_once(
                "rmsprop-no-burnin",
                "RMSprop-SGLD with num_burnin_steps=0: its preconditioner starts from V=0 (the largest steps), "
                "so early draws are biased. Set num_burnin_steps > 0 (the default is 100).",
            )
        bar = tqdm(
            total=len(chains) * args.num_draws,
            desc="Sampling BIF draws",
            bar_format=TQDM_BAR_FORMAT,
            disable=self.disable_tqdm,
        )
        try:
            for ci, chain in enumerate(chains):
                self.weights.reset()
                sampler = self._make_sampler(chain)
                self.stream.reset(torch.Generator().manual_seed(chain_seed(args.seed, chain) ^ 0x5EED))
                step = 0
                for _ in range(args.num_burnin_steps):
                    self._sgld_step(sampler, step_losses, step)
                    step += 1
                if args.freeze_preconditioner:
                    sampler.freeze()
                self._checked_steps = 0
                self._check_steps(step_losses[:step], chain)
                filled, first_draw = 0, 0
                for draw in range(args.num_draws):
                    for _ in range(args.draw_interval):
                        self._sgld_step(sampler, step_losses, step)
                        step += 1
                    self._evaluate(self.x, buf_x[filled])
                    if self.y is not None:
                        self._evaluate(self.y, buf_y[filled])
                    filled += 1
                    if filled == block or draw == args.num_draws - 1:
                        bx, by = buf_x[:filled], buf_y[:filled]
                        mean_x = bx.double().mean(1)
                        self._raise_if_diverged(mean_x, bx, by, chain, first_draw)
                        self._flush(moments, bx, by, shift_x, shift_y)
                        trace_x[ci, first_draw : first_draw + filled] = mean_x
                        trace_y[ci, first_draw : first_draw + filled] = by.double().mean(1) if n_y_raw else mean_x
                        self._check_steps(step_losses[:step], chain)
                        bar.update(filled)
                        first_draw += filled
                        filled = 0
                summary = {
                    "chain": chain,
                    "initial_mean_loss": init_mean,
                    "mean_loss": float(trace_x[ci].mean()),
                    "final_distance_from_w_star": float(self.weights.distance_from_anchor()),
                }
                summaries.append(summary)
                logger.info(
                    "Chain %d: mean train loss %.4g at w*, %.4g over draws; distance from w* %.3g at the end.",
                    chain,
                    summary["initial_mean_loss"],
                    summary["mean_loss"],
                    summary["final_distance_from_w_star"],
                )
        finally:
            bar.close()
        traces = {"mean_train_loss": trace_x.cpu(), "mean_measurement": trace_y.cpu()}
        return SamplingResult(moments=moments, chain_summaries=summaries, traces=traces)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _reduced_dim(side: Side, n_raw: int) -> int:
        if side.reduce is None:
            return n_raw
        return int(side.reduce(torch.zeros(1, n_raw)).shape[1])

    def _raise_if_diverged(self, means, bx, by, chain: int, first_draw: int) -> None:
        """Non-finite values, or a draw whose mean train loss passed divergence_loss_ratio times its value at w*."""
        finite = torch.isfinite(bx).all(1) & torch.isfinite(by).all(1)
        bad = (~finite) | (means > self._limit)
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            what = "non-finite losses" if not bool(finite[k]) else f"mean train loss {float(means[k]):.4g}"
            self._raise(chain, f"draw {first_draw + k}", what)

    def _flush(self, moments: CrossMoments, bx, by, shift_x, shift_y) -> None:
        """Shift (by the float64 values at w*), reduce, and add a block of draws to the moments."""
        x = bx.double() - shift_x
        if self.x.reduce is not None:
            x = self.x.reduce(x)
        if self.y is None:
            moments.update(x, x)
            return
        y = by.double() - shift_y
        if self.y.reduce is not None:
            y = self.y.reduce(y)
        moments.update(x, y)

    def _check_steps(self, losses: torch.Tensor, chain: int) -> None:
        """Non-finite minibatch losses among the steps not checked yet."""
        new = losses[self._checked_steps :]
        if new.numel() and not bool(torch.isfinite(new).all()):
            k = self._checked_steps + int((~torch.isfinite(new)).nonzero()[0, 0])
            self._raise(chain, f"SGLD step {k}", "a non-finite minibatch loss")
        self._checked_steps = losses.numel()

    def _raise(self, chain: int, where: str, what: str) -> None:
        a = self.args
        raise SamplerDivergenceError(
            f"SGLD chain {chain} diverged at {where}: {what} (mean train loss at w* was {self._init_mean:.4g}; "
            f"the limit is divergence_loss_ratio={a.divergence_loss_ratio:g} times that). Lower "
            f"`step_size` (now {a.step_size:g}) or `nbeta` (now {a.nbeta:g}), or raise `localization` "
            f"(now {a.localization:g}) in BIFArguments. No scores were written; the model is unchanged."
        )
