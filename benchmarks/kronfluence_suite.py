"""Compatibility gate: kronfluence 1.0.1's own test suite against `kronfluence_bif.Analyzer`.

    python benchmarks/kronfluence_suite.py --kronfluence-src PATH   # a checkout of kronfluence at tag v1.0.1
    python benchmarks/kronfluence_suite.py                          # clones it (needs github.com) into the cache

Runs kronfluence's `tests/` (without `gpu_tests`) three times, through `kronfluence_suite_plugin.py`:
`stock` (kronfluence itself), `default` (kronfluence-bif's Analyzer, no strategy flag) and `bif`
(`Analyzer(..., strategy="bif")`: every fit is BIF). The gate passes when
(a) every test that passes in `stock` passes in `default`, and
(b) every test fails in `bif` only if it is excluded below (it checks EK-FAC numbers or factor files) or needs a
    model hub download (it fails in `stock` too, offline).
kronfluence's code is never copied into this repository: the tests run from a temporary copy of the checkout.
Needs `pip install datasets` (kronfluence's test tasks import it). Measured on 2 shared CPU cores, one thread:
stock 69 min, default 65 min, bif 8 min; `--reuse MODE` reads a mode's JUnit file from `--reports` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
REPOSITORY = "https://github.com/pomonam/kronfluence"
TAG = "v1.0.1"
MODES = ("stock", "bif", "default")

# Tests excluded in the "bif" mode (regular expressions over test ids), with why: each asserts EK-FAC numbers or
# kronfluence's factor files, or asks for what BIF refuses by design.
EXCLUDED_IN_BIF = {
    r"^tests/factors/": "fits and checks EK-FAC factor files (covariances, eigendecompositions, lambdas)",
    r"^tests/modules/": "checks kronfluence's TrackedModule internals (per-sample gradients, matmul), not scores",
    r"^tests/scores/.*::test_per_module_scores_equivalence\[": (
        "asserts that per-module scores add up to the all-modules score: true of EK-FAC's block-diagonal Hessian "
        "approximation, not of BIF's per-module weight-restricted posteriors (README)"
    ),
    r"^tests/scores/.*::test_per_token_scores_equivalence\[": (
        "per-token scores of the MLP/conv test Tasks, which define no per-token losses: BIF refuses them with a "
        "TaskContractError naming the methods to add (kronfluence reads token positions off activations)"
    ),
    # ids: [seed-train_size-query_size-compute_per_token_scores-compute_per_module_scores-...]
    r"^tests/scores/.*::test_pairwise_scores_partition_equivalence\[\d+-\d+-\d+-True-": (
        "the same per-token refusal (these parametrizations set compute_per_token_scores=True)"
    ),
}
HUB_MARKERS = ("offline", "huggingface.co", "LocalEntryNotFoundError", "couldn't connect", "Connection", "hub")


def kronfluence_checkout(path: str | None) -> Path:
    if path:
        src = Path(path).expanduser().resolve()
        if not (src / "tests").is_dir():
            raise SystemExit(f"--kronfluence-src {src} has no tests/ folder: pass a checkout of kronfluence {TAG}.")
        return src
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kronfluence-bif" / f"kronfluence-{TAG}"
    if not (cache / "tests").is_dir():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["git", "clone", "--quiet", "--depth", "1", "--branch", TAG, REPOSITORY, str(cache)]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"Could not clone {REPOSITORY} at {TAG}; pass --kronfluence-src with a local checkout.")
    return cache


def run_mode(mode: str, suite: Path, reports: Path, pytest_args: List[str]) -> Dict[str, Dict[str, str]]:
    """Run the suite in one mode; per test id: outcome (passed/failed/skipped) and the failure message."""
    report = reports / f"{mode}.xml"
    env = dict(os.environ, KBIF_GATE_STRATEGY=mode, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(suite), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "kronfluence_suite_plugin", "-p", "no:cacheprovider"]
    cmd += ["--junitxml", str(report), "-o", "junit_family=xunit1", "tests", *pytest_args]
    print(f"[{mode}] {' '.join(cmd[2:])}", flush=True)
    with open(reports / f"{mode}.log", "w") as log:  # pytest's own output, to follow progress
        subprocess.run(cmd, cwd=suite, env=env, stdout=log, stderr=subprocess.STDOUT)
    return parse_junit(report)


def parse_junit(path: Path) -> Dict[str, Dict[str, str]]:
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        node = f"{file}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "") + "\n" + (child.text or "")
            elif child.tag == "skipped":
                outcome = "skipped"
        results[node] = {"outcome": outcome, "message": message}
    return results


def exclusion(node: str) -> str | None:
    for pattern, reason in EXCLUDED_IN_BIF.items():
        if re.search(pattern, node):
            return reason
    return None


def gate(stock, default, bif) -> dict:
    failed = [n for n, r in stock.items() if r["outcome"] == "failed"]
    hub = sorted(n for n in failed if any(m in stock[n]["message"] for m in HUB_MARKERS))
    stock_failing = sorted(n for n in failed if n not in hub)
    passing = [n for n, r in stock.items() if r["outcome"] == "passed"]
    broken_a = [n for n in passing if default.get(n, {}).get("outcome") != "passed"]
    considered = [n for n in bif if n not in hub and exclusion(n) is None]
    broken_b = [n for n in considered if bif[n]["outcome"] == "failed"]
    excluded = {n: exclusion(n) for n in bif if n not in hub and exclusion(n) is not None}
    return {
        "tests": len(stock),
        "needs_hub": len(hub),
        "stock_failing_offline_not_hub": stock_failing,
        "a_default": {"stock_passed": len(passing), "failed_in_default": broken_a},
        "b_bif": {
            "considered": len(considered),
            "passed": sum(bif[n]["outcome"] == "passed" for n in considered),
            "skipped": sum(bif[n]["outcome"] == "skipped" for n in considered),
            "failed": {n: bif[n]["message"].strip().splitlines()[0][:300] for n in broken_b},
            "excluded": len(excluded),
            "excluded_passing_anyway": sum(bif[n]["outcome"] == "passed" for n in excluded),
            "excluded_by_reason": _count_by_reason(excluded),
        },
        "passed": not broken_a and not broken_b,
    }


def _count_by_reason(excluded: Dict[str, str]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for reason in excluded.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kronfluence-src", help=f"a checkout of kronfluence at {TAG} (default: clone it)")
    parser.add_argument("--out", default="benchmark_results/kronfluence_suite.json")
    parser.add_argument("--reports", default="benchmark_results/kronfluence_suite", help="folder of the JUnit files")
    parser.add_argument(
        "--reuse", nargs="*", default=[], choices=MODES, help="modes whose JUnit file in --reports is read, not rerun"
    )
    parser.add_argument("--only", nargs="*", default=list(MODES), choices=MODES, help="run only these modes")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments, e.g. -k partition")
    opts = parser.parse_args()
    src = kronfluence_checkout(opts.kronfluence_src)
    reports = Path(opts.reports).resolve()
    reports.mkdir(parents=True, exist_ok=True)
    results = {mode: parse_junit(reports / f"{mode}.xml") for mode in opts.reuse}
    with tempfile.TemporaryDirectory(prefix="kronfluence-suite-") as tmp:
        suite = Path(tmp)
        shutil.copytree(src / "tests", suite / "tests", ignore=shutil.ignore_patterns("gpu_tests", "__pycache__"))
        for mode in opts.only:
            if mode not in results:
                results[mode] = run_mode(mode, suite, reports, opts.pytest_args)
    if not all(mode in results for mode in MODES):
        print(f"Ran {sorted(results)}; the gate needs all of {list(MODES)} (--reuse the others).")
        return 0
    summary = gate(results["stock"], results["default"], results["bif"])
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "results": results}, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"Gate {'PASSED' if summary['passed'] else 'FAILED'}; details in {out}.")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
