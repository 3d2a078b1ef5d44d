"""Wall time of the demo and the quick start alone and next to CPU-bound processes pinned to the same cores.

    python benchmarks/shared_cpu.py --cases demo quickstart --hogs 0 1 2 --repeats 2 --json shared.json
    python benchmarks/shared_cpu.py --env OMP_NUM_THREADS=1 ...            # the same with a thread setting
    python benchmarks/shared_cpu.py --pythonpath /path/to/older/checkout   # another version of the package

Each run is a fresh process running exactly what a user types (`python -m kronfluence_bif.demo`,
`python examples/quickstart.py`) in an empty directory. A hog is `python -c "while True: pass"` pinned to the same
cores as the run (`os.sched_setaffinity`). Before every run the script samples how busy the machine already is
(from /proc/stat, over one second): other jobs on a shared machine show up there, and a "quiet" figure measured at
50% busy is not quiet.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from common import write_json

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "demo": [sys.executable, "-m", "kronfluence_bif.demo", "--quiet", "--output-dir", "out"],
    "quickstart": [sys.executable, str(REPO / "examples" / "quickstart.py")],
}
HOG = [sys.executable, "-c", "while True: pass"]


def machine_busy(seconds: float = 1.0) -> Optional[float]:
    """Fraction of all cores busy over `seconds` (Linux /proc/stat), None elsewhere."""

    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return sum(fields), fields[3] + fields[4]

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def start_hogs(count: int, cores: List[int]) -> List[subprocess.Popen]:
    return [
        subprocess.Popen(HOG, preexec_fn=lambda: os.sched_setaffinity(0, cores), stdout=subprocess.DEVNULL)
        for _ in range(count)
    ]


def timed_run(case: str, env: Dict[str, str], timeout: float) -> float:
    """Seconds for one fresh run of `case` in an empty directory; raises when it fails."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        done = subprocess.run(CASES[case], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["demo", "quickstart"])
    parser.add_argument("--hogs", type=int, nargs="+", default=[0, 1], help="competing processes per measurement")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE settings for the runs, e.g. OMP_NUM_THREADS=1")
    parser.add_argument("--pythonpath", default=str(REPO), help="where kronfluence_bif is imported from")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", default="")
    opts = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    env = {**os.environ, "PYTHONPATH": opts.pythonpath}
    env.update(dict(item.split("=", 1) for item in opts.env))
    print(f"cores {cores}, settings {opts.env or 'torch defaults'}, package from {opts.pythonpath}", flush=True)
    rows = []
    for case in opts.cases:
        for hogs in opts.hogs:
            for repeat in range(opts.repeats):
                busy = machine_busy()
                running = start_hogs(hogs, cores)
                try:
                    seconds = timed_run(case, env, opts.timeout)
                finally:
                    for hog in running:
                        hog.kill()
                        hog.wait()
                rows.append({"case": case, "hogs": hogs, "repeat": repeat, "seconds": seconds, "busy_before": busy})
                shown = "?" if busy is None else f"{100 * busy:.0f}%"
                print(f"{case:10s} hogs {hogs}  {seconds:7.1f} s   (machine {shown} busy before)", flush=True)
    write_json(opts.json, {"cores": cores, "env": opts.env, "pythonpath": opts.pythonpath, "rows": rows})


if __name__ == "__main__":
    main()
