"""The sampling phase, in parts: `evaluation` (sides, layout, one draw into a row), `chain` (one chain: burn-in,
draws, resume, checkpoints), `lockstep` (a process's fresh chains together, batched over chains), `guards`
(divergence), `engine` (the chains loop and the pooling)."""

from kronfluence_bif.engine.chain import (
    NORM_TRACES,
    STEP_TRACE_INTERVAL,
    STEP_TRACES,
    TRACE_NAMES,
    Chain,
    RunState,
    traced_draws,
)
from kronfluence_bif.engine.engine import TQDM_BAR_FORMAT, SamplingEngine, SamplingResult
from kronfluence_bif.engine.evaluation import MONITOR_ROWS, Evaluator, Side, _Layout, monitor_rows, reduced_dim
from kronfluence_bif.engine.guards import DivergenceGuard, probe_sharpness
from kronfluence_bif.engine.lockstep import Lockstep, run_chains
from kronfluence_bif.engine.seeds import chain_seed

__all__ = [
    "Chain",
    "DivergenceGuard",
    "Evaluator",
    "Lockstep",
    "MONITOR_ROWS",
    "NORM_TRACES",
    "RunState",
    "STEP_TRACES",
    "STEP_TRACE_INTERVAL",
    "SamplingEngine",
    "SamplingResult",
    "Side",
    "TQDM_BAR_FORMAT",
    "TRACE_NAMES",
    "_Layout",
    "chain_seed",
    "monitor_rows",
    "probe_sharpness",
    "reduced_dim",
    "run_chains",
    "traced_draws",
]
