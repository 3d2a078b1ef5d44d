"""The sampler protocol: a registered sampler runs end to end without touching anything outside `samplers/`."""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
import torch
from conftest import PlainRegressionTask

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.samplers import SAMPLERS, SGLD, RMSpropSGLD, Sampler, SketchSGLD, register_sampler, sampler_class
from kronfluence_bif.samplers.base import check_localization_limit

SCALE = 0.25  # a power of two: G = SCALE is exact, so this sampler equals SGLD with step SCALE * eps bit for bit


class ScaledSGLD(Sampler):
    """Test-only: SGLD with a constant scalar preconditioner G = SCALE (declares only its G and its limit)."""

    default_step_size = 1e-3

    def __init__(self, params, anchors, step_size, nbeta, localization, generator) -> None:
        super().__init__(params, anchors, step_size, nbeta, localization, generator)
        self._g = [torch.full_like(p, SCALE) for p in self.params]
        self._root = [torch.full_like(p, SCALE**0.5) for p in self.params]

    @classmethod
    def check_arguments(cls, args: BIFArguments) -> None:
        check_localization_limit(args, SCALE, label=" * 0.25", fix=".")

    def _diagonal(self) -> Tuple[Optional[List[torch.Tensor]], Optional[List[torch.Tensor]]]:
        return self._g, self._root

    @property
    def preconditioner(self) -> List[torch.Tensor]:
        return self._g


@pytest.fixture()
def scaled_sampler():
    register_sampler("test_scaled_sgld")(ScaledSGLD)
    yield "test_scaled_sgld"
    SAMPLERS.pop("test_scaled_sgld")


COMMON = dict(
    num_chains=2,
    num_draws=16,
    num_burnin_steps=4,
    sampler_batch_size=8,
    draws_per_block=8,
    nbeta=40.0,
    localization=20.0,
    num_threads=1,
    checkpoint_interval=0,
)


def _scores(tmp_path, name, model, train, query, args):
    task = PlainRegressionTask()
    analyzer = Analyzer(name, model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args)
    analyzer.compute_pairwise_scores("pw", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=4)
    return analyzer.load_pairwise_scores("pw")["all_modules"]


def test_a_registered_sampler_runs_through_the_analyzer(tmp_path, trained_mlp, small_data, scaled_sampler):
    train, query = small_data
    model = prepare_model(trained_mlp, PlainRegressionTask())
    args = BIFArguments(sampler=scaled_sampler, **COMMON)
    assert args.step_size == ScaledSGLD.default_step_size
    with pytest.raises(ValueError, match=r"step_size \* localization \* 0.25 must be < 4"):
        BIFArguments(sampler=scaled_sampler, **{**COMMON, "step_size": 1.0})
    scaled = _scores(tmp_path, "scaled", model, train, query, args)
    plain_args = BIFArguments(sampler="sgld", step_size=SCALE * 1e-3, **COMMON)
    plain = _scores(tmp_path, "plain", model, train, query, plain_args)
    assert torch.isfinite(scaled).all() and scaled.abs().max() > 0
    assert torch.equal(scaled, plain)  # G = 1/4 at step eps is plain SGLD at step eps / 4, exactly


def test_registry_names_classes_and_rejects_unknown_and_duplicate_names():
    assert {"sgld": SGLD, "rmsprop_sgld": RMSpropSGLD, "sketch_sgld": SketchSGLD}.items() <= SAMPLERS.items()
    assert sampler_class("sgld") is SGLD and SGLD.name == "sgld"
    with pytest.raises(ValueError, match="BIFArguments.sampler must be one of"):
        sampler_class("langevin")
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("sgld")(ScaledSGLD)
    for name, cls in SAMPLERS.items():
        assert BIFArguments(sampler=name).step_size == cls.default_step_size


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"step_size": 0.0}, "Invalid step_size"),
        ({"nbeta": -1.0}, "Invalid nbeta"),
        ({"localization": -1.0}, "Invalid localization"),
    ],
)
def test_constructors_validate_their_settings(kwargs, match):
    w = [torch.zeros(3)]
    settings = {"step_size": 1e-3, "nbeta": 1.0, "localization": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        SGLD(w, [torch.zeros(3)], generator=torch.Generator(), **settings)
    with pytest.raises(ValueError, match="Invalid alpha"):
        RMSpropSGLD(w, [torch.zeros(3)], 1e-3, 1.0, 1.0, torch.Generator(), alpha=1.0)
    with pytest.raises(ValueError, match="Invalid eps"):
        RMSpropSGLD(w, [torch.zeros(3)], 1e-3, 1.0, 1.0, torch.Generator(), eps=0.0)


@pytest.mark.parametrize("cls", [SGLD, RMSpropSGLD])
def test_state_dict_resumes_a_chain_bitwise(cls):
    """A sampler restored from its state (plus the weights) continues exactly as the uninterrupted one."""
    lam = torch.tensor([[4.0, 1.0], [1.0, 2.0]])

    def run(sampler, steps):
        for _ in range(steps):
            sampler.step([lam @ sampler.params[0]], batch_size=1)

    w = torch.ones(2)
    first = cls([w], [torch.zeros(2)], 0.05, 1.0, 0.5, torch.Generator().manual_seed(3))
    run(first, 5)
    first.freeze()
    saved, saved_w = {k: v.clone() for k, v in first.state_dict().items()}, w.clone()
    run(first, 5)
    w2 = saved_w.clone()
    second = cls([w2], [torch.zeros(2)], 0.05, 1.0, 0.5, torch.Generator())
    second.load_state_dict(saved)
    run(second, 5)
    assert torch.equal(w, w2) and second.num_steps == first.num_steps == 10
