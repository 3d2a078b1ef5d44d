"""pytest plugin: kronfluence's own test suite against `kronfluence_bif.Analyzer` (used by kronfluence_suite.py).

Loaded with `-p kronfluence_suite_plugin` before kronfluence's test modules are imported, it replaces
`kronfluence.Analyzer` and `kronfluence.prepare_model` (in both places the tests import them from) with
kronfluence-bif's. `KBIF_GATE_STRATEGY` picks the mode:

- `stock`: nothing replaced (the baseline);
- `default`: kronfluence-bif's Analyzer with no strategy flag, which must behave exactly as kronfluence;
- `bif`: `Analyzer(..., strategy="bif")`, so every fit is BIF whatever `FactorArguments` the test passes
  (the one-flag swap), with short chains: this mode checks layout, shapes, dtypes, indices, partitions, files and
  argument handling, not numbers.
"""

from __future__ import annotations

import os

import kronfluence
import kronfluence.analyzer

MODE = os.environ.get("KBIF_GATE_STRATEGY", "default")

if MODE != "stock":
    import kronfluence_bif
    from kronfluence_bif import BIFArguments

    GATE_BIF_ARGS = BIFArguments(sampler="sgld", num_chains=2, num_draws=8, num_burnin_steps=4, step_size=1e-5)

    class GateAnalyzer(kronfluence_bif.Analyzer):
        """kronfluence-bif's Analyzer, with the strategy flag of this mode."""

        def __init__(self, *args, **kwargs) -> None:
            if MODE == "bif":
                kwargs.setdefault("strategy", "bif")
                kwargs.setdefault("bif_args", GATE_BIF_ARGS)
            super().__init__(*args, **kwargs)

    kronfluence.Analyzer = kronfluence.analyzer.Analyzer = GateAnalyzer
    kronfluence.prepare_model = kronfluence.analyzer.prepare_model = kronfluence_bif.prepare_model


def pytest_report_header(config) -> str:
    return f"kronfluence suite gate: mode {MODE!r} (KBIF_GATE_STRATEGY)"
