"""`benchmarks/gpu.py --smoke` runs on the CPU (so the GPU check cannot rot while no GPU is at hand)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_smoke_runs_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ran on: cpu" in proc.stdout
    for section in ("floor_ratio", "batched_chains", "throughput"):
        assert f"## {section}" in proc.stdout
    assert "| BIF / floor |" in proc.stdout and "tokens/s" in proc.stdout and "gain |" in proc.stdout
    assert out.exists()
