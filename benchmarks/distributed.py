"""Wall time of one BIF sampling phase on 1 vs N processes (torchrun, gloo on CPU, nccl on GPUs).

    python benchmarks/distributed.py                      # 1 and 2 processes, 1 thread each, 3 repeats
    python benchmarks/distributed.py --procs 1 2 4 --threads 1 --repeats 5 --json out.json

The UCI concrete MLP of the demo (927 train x 103 query, default BIFArguments) is trained once; each launch
loads it, so every process and every layout scores the same w*. Per-process threads are pinned
(OMP_NUM_THREADS and torch.set_num_threads), so the speedup measures the work split, not thread contention.
Reports the median over repeats of the compute_pairwise_scores wall time on rank 0 (what a user waits for),
and checks that every layout gives the same scores as 1 process. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kronfluence_bif.threads import set_threads

ROOT = Path(__file__).resolve().parents[1]


def worker(opts: argparse.Namespace) -> None:
    """One process of a launch: load w*, score, report the time on rank 0."""
    import logging
    import warnings

    from safetensors.torch import load_file

    from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, prepare_model
    from kronfluence_bif.demo.uci import load_concrete, make_mlp

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("kronfluence_bif").setLevel(logging.WARNING)
    set_threads(opts.threads)
    train, query = load_concrete()
    task = RegressionTask()
    model = make_mlp()
    model.load_state_dict(load_file(opts.model))
    model = prepare_model(model, task)
    device_cpu = not torch.cuda.is_available()
    if not device_cpu:
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    analyzer = Analyzer("bench", model, task, cpu=device_cpu, output_dir=opts.out, disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors(
        "bif", train, bif_args=BIFArguments(sampler="rmsprop_sgld", checkpoint_interval=0), overwrite_output_dir=True
    )
    start = time.perf_counter()
    analyzer.compute_pairwise_scores(
        "bif",
        "bif",
        query,
        train,
        per_device_query_batch_size=len(query),
        per_device_train_batch_size=len(train),
        overwrite_output_dir=True,
    )
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:
        Path(opts.report).write_text(json.dumps({"seconds": seconds}))


def launch(procs: int, threads: int, model: str, out: Path) -> float:
    report = out / "report.json"
    args = ["--worker", "--model", model, "--out", str(out), "--threads", str(threads), "--report", str(report)]
    if procs == 1:
        command = [sys.executable, __file__, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", __file__]
        command += args
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"launch with {procs} process(es) failed:\n{proc.stderr[-4000:]}")
    return json.loads(report.read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--report", default="", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        return worker(opts)

    from safetensors.torch import save_file

    from kronfluence_bif import storage
    from kronfluence_bif.demo.uci import load_concrete, train_mlp

    machine = {
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads_per_process": opts.threads,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }
    print("machine:", json.dumps(machine))
    with tempfile.TemporaryDirectory() as tmp:
        model_path = str(Path(tmp) / "model.safetensors")
        save_file(
            {k: v.contiguous() for k, v in train_mlp(load_concrete()[0], epochs=100).state_dict().items()}, model_path
        )
        rows, reference = [], None
        for procs in opts.procs:
            times = []
            for r in range(opts.repeats):
                out = Path(tmp) / f"p{procs}_r{r}"
                times.append(launch(procs, opts.threads, model_path, out))
            scores = storage.load_tensors(out / "bench" / "scores_bif" / "pairwise_scores.safetensors")["all_modules"]
            reference = scores if reference is None else reference
            diff = float((scores.double() - reference.double()).abs().max() / reference.double().abs().max())
            rows.append(
                {"processes": procs, "median_seconds": statistics.median(times), "times": times, "max_rel_diff": diff}
            )
    base = rows[0]["median_seconds"]
    print("\n| processes | median wall (s) | speedup | max rel. diff vs first |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        row["speedup"] = base / row["median_seconds"]
        print(
            f"| {row['processes']} | {row['median_seconds']:.2f} | {row['speedup']:.2f}x | {row['max_rel_diff']:.1e} |"
        )
    if opts.json:
        Path(opts.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
