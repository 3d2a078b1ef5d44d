"""Shared fixtures: tiny models and data that make every test run in seconds on 2 CPU cores."""

from __future__ import annotations

import gc
import logging
import os
import platform
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from kronfluence.task import Task
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

# the suite runs in 2 pytest-xdist workers on 2 cores (pyproject's addopts): one thread each, since two 2-thread
# processes on 2 cores spin against each other (seen 13x slower); alone (-n 0), both cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
logging.getLogger("kronfluence_bif").setLevel(logging.WARNING)


@pytest.fixture(scope="module", autouse=True)
def _freeze_long_lived_objects():
    """Before each test module, move what is alive (millions of objects from the imports: torch, transformers,
    kronfluence) out of the garbage collector's reach. kronfluence calls `gc.collect()` in every fit and score call
    (`kronfluence.utils.state.release_memory`); over that heap each full collection took ~0.3 s, 18 s of the 29 s
    of test_layout's fixture. Frozen objects are still freed by reference counting; only cycles among them stay.
    Per module, so modules imported lazily by the tests (transformers, the demo) are frozen too."""
    gc.collect()
    gc.freeze()
    yield


class PlainRegressionTask(Task):
    """A plain kronfluence Task (no per-example methods): BIF must derive per-example values itself."""

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model)


def make_regression(n: int, d: int = 6, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, 1, generator=gen)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=gen)
    return TensorDataset(x, y)


def make_mlp(d: int = 6, width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def fit(model: nn.Module, data: TensorDataset, steps: int = 300, lr: float = 1e-2) -> nn.Module:
    x, y = data.tensors
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def small_data():
    return make_regression(48, seed=0), make_regression(10, seed=1)


@pytest.fixture(scope="session")
def _trained_mlp_state(small_data):
    """The weights `fit(make_mlp(), train)` gives, trained once per session (deterministic: seeded, full batch)."""
    train, _ = small_data
    return state_copy(fit(make_mlp(), train))


@pytest.fixture()
def trained_mlp(_trained_mlp_state):
    """A fresh trained MLP per test (tests wrap and move it): `make_mlp()` (which reseeds torch's global RNG, as
    training from scratch did) with the cached trained weights, bitwise those of training it here."""
    model = make_mlp()
    model.load_state_dict(_trained_mlp_state)
    return model.eval()


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(model: nn.Module, saved: dict) -> None:
    current = model.state_dict()
    assert current.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(current[key], value), f"parameter {key} changed"


# ---------------------------------------------------------------------------------------------- pinned numbers
PINS = Path(__file__).parent / "data" / "pinned_scores.safetensors"  # recorded before the refactor (AVX512)
# the same runs recorded on other CPUs (after the refactor, which kept the original ones bitwise), one file per
# environment; the file name is the environment's slug
PINS_ELSEWHERE = Path(__file__).parent / "data" / "pinned_scores.{slug}.safetensors"
RECORD_PINS = os.environ.get("KBIF_RECORD_PINS") == "1"
# the BIFArguments of the pinned sampler runs (test_pinned.py), also used to compare other paths with them
PIN_ARGS = dict(
    sampler="rmsprop_sgld",  # the default sampler when the pins were recorded
    num_chains=2,
    num_draws=24,
    num_burnin_steps=10,
    sampler_batch_size=8,
    draws_per_block=8,
    step_size=1e-3,
    nbeta=40.0,
    localization=20.0,
    num_threads=1,
    seed=7,
)


def _cpu_model() -> str:
    """The CPU's vendor and model name: two CPUs on the same torch code path can still round differently (an
    AMD EPYC and an Intel Xeon, both AVX512, do: their oneDNN/MKL kernels differ)."""
    fields = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('vendor_id', platform.processor() or 'unknown')} {fields.get('model name', '')}".strip()


def pin_environment() -> str:
    """What bitwise equality of float kernels depends on: torch's build, the CPU code path it takes, the CPU."""
    torch_version = torch.__version__.split("+")[0]
    return f"torch {torch_version} / {platform.machine()} / {torch.backends.cpu.get_cpu_capability()} / {_cpu_model()}"


def _recorded_here(path: Path) -> bool:
    """Whether the pin file `path` exists and was recorded in this environment."""
    return path.exists() and safe_open(str(path), "pt").metadata().get("environment") == pin_environment()


def _pin_file() -> Path:
    """The pins of this environment: the original file where they were recorded, else this environment's own."""
    if _recorded_here(PINS):
        return PINS
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", pin_environment()).strip("_")
    return Path(str(PINS_ELSEWHERE).format(slug=slug))


def check_pinned(key: str, value: torch.Tensor) -> None:
    """`value` must equal the number recorded under `key` before the architecture refactor (issue 13).

    Bitwise where the pins of this environment (torch build, CPU code path and CPU model) were recorded; elsewhere,
    where float kernels round differently and a chain's rounding differences grow step by step, within 1e-4
    relative to the largest entry of the original pins (AVX2 against AVX512 measured at most 1.9e-5).
    `KBIF_RECORD_PINS=1` records this environment's pins (its own file unless it is the original's).
    """
    value = value.detach().cpu().contiguous()
    own = _pin_file()
    if RECORD_PINS:
        stored = load_file(str(own)) if own.exists() else {}
        stored[key] = value.clone()
        save_file(stored, str(own), metadata={"environment": pin_environment()})
        return
    exact = _recorded_here(own)
    stored = load_file(str(own if exact else PINS))
    assert key in stored, f"no pinned value for {key!r}: record with KBIF_RECORD_PINS=1"
    expected = stored[key]
    assert value.shape == expected.shape and value.dtype == expected.dtype, key
    if exact:
        assert torch.equal(value, expected), f"{key}: not bitwise equal to the pinned scores"
    else:
        scale = expected.double().abs().max().clamp_min(1e-30)
        assert float((value.double() - expected.double()).abs().max() / scale) < 1e-4, key


def record_step_gradients(monkeypatch) -> list:
    """Patch the chains' `StepGradient`: per step, True where its gradient came from the last draw's forwards."""
    from kronfluence_bif.engine.gradients import StepGradient

    calls, real = [], StepGradient.__call__

    def recorded(self, batch, batch_size, given=None):
        calls.append(given is not None)
        return real(self, batch, batch_size, given)

    monkeypatch.setattr(StepGradient, "__call__", recorded)
    return calls
