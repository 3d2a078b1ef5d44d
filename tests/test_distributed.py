"""Multi-process sampling (torchrun, gloo on CPU), resume after SIGKILL, and crash-safe writes.

Every run goes through `tests/scripts/run_bif.py` in a subprocess with one thread per process, so the
same chain computes bit-identical values whichever process runs it; what may differ between layouts is only
the float64 summation order of the pooled sums (relative 1e-15), far inside the 1e-5 asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import check_pinned
from safetensors.torch import save_file

from kronfluence_bif import storage

SCRIPT = Path(__file__).parent / "scripts" / "run_bif.py"
ROOT = Path(__file__).resolve().parents[1]
SCORE_DIRS = {"pairwise": "dist/scores_pw", "self": "dist/scores_self"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small trained MLP and its data, shared by every subprocess."""
    folder = tmp_path_factory.mktemp("dist_data")
    torch.manual_seed(0)  # the model's initialization: the same model whichever tests ran before
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 4, generator=g)
    y = (x @ torch.randn(4, 1, generator=g)).tanh() + 0.1 * torch.randn(70, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        ((model(x[:60]) - y[:60]) ** 2).mean().backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    save_file(
        {"x_train": x[:60], "y_train": y[:60], "x_query": x[60:], "y_query": y[60:]}, str(folder / "data.safetensors")
    )
    return folder


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _command(nproc: int, data_dir: Path, out: Path, *extra: str) -> list:
    args = [str(SCRIPT), "--data", str(data_dir), "--out", str(out), *extra]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run(nproc: int, data_dir: Path, out: Path, *extra: str) -> str:
    """Run to completion; returns the log."""
    proc = subprocess.run(
        _command(nproc, data_dir, out, *extra), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def run_layouts(nproc: int, data_dir: Path, out: Path, layouts: dict) -> Path:
    """Several runs in one launch (`run_bif.py --next`), run `name` into `out / name`; returns `out`."""
    extra = []
    for i, (name, args) in enumerate(layouts.items()):
        extra += (["--next", "--data", str(data_dir), "--out", str(out / name)] if i else []) + list(args)
    first = next(iter(layouts))
    run(nproc, data_dir, out / first, *extra)
    return out


def start(nproc: int, data_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        _command(nproc, data_dir, out, *extra),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker (torchrun starts its workers in sessions of their own)."""
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs([p for p in map(_process, family) if p is not None], timeout=30)


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the moment the test waits for"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def scores(out: Path, kind: str) -> torch.Tensor:
    return storage.load_tensors(out / SCORE_DIRS[kind] / f"{kind}_scores.safetensors")["all_modules"]


def listing(out: Path) -> set:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith("writes_rank")}


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# the runs of one launch: (layout name -> run_bif.py arguments); each launch costs every process an import of torch
DEFAULTS = ("--defaults", "--draws", "16", "--checkpoint-interval", "8")  # the package's defaults, 4 chains x 16
ONE_PROCESS = {"plain": (), "defaults": DEFAULTS, "two_chains": ("--chains", "2"), "calibration": ("--calibrate",)}
TWO_PROCESSES = {"plain": (), "untracked": ("--untracked",), "defaults": DEFAULTS, "calibration": ("--calibrate",)}


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """One process: 4 chains (`plain`, the result every other layout must reproduce), the defaults, 2 chains, and
    the calibration grid."""
    return run_layouts(1, data_dir, tmp_path_factory.mktemp("one"), ONE_PROCESS)


@pytest.fixture(scope="module")
def reference(one_process):
    return one_process / "plain"


@pytest.fixture(scope="module")
def two_processes(data_dir, tmp_path_factory):
    """torchrun with 2 processes: `one_process`'s runs but for 2 chains, and the MLP from bare parameters."""
    return run_layouts(2, data_dir, tmp_path_factory.mktemp("two"), TWO_PROCESSES)


def test_two_processes_equal_one(reference, two_processes):
    tmp_path = two_processes / "plain"
    for kind in SCORE_DIRS:
        assert max_rel_diff(scores(tmp_path, kind), scores(reference, kind)) < 1e-5
        check_pinned(f"one_process/{kind}", scores(reference, kind))
        check_pinned(f"two_processes/{kind}", scores(tmp_path, kind))
        traces = storage.load_tensors(tmp_path / SCORE_DIRS[kind] / "bif_traces.safetensors")
        ref_traces = storage.load_tensors(reference / SCORE_DIRS[kind] / "bif_traces.safetensors")
        for name, value in ref_traces.items():
            assert torch.allclose(traces[name], value, rtol=1e-12, atol=0, equal_nan=True), name
    # the same complete set of files, no temporaries, no checkpoints left behind
    assert listing(tmp_path) == listing(reference)
    assert not [p for p in listing(tmp_path) if p.endswith(".tmp") or "bif_checkpoints" in p]
    # exactly one writer of results: rank 1 wrote nothing but its own chains' checkpoints
    rank1 = (tmp_path / "writes_rank1.txt").read_text().split()
    assert rank1 and all("bif_checkpoints" in line for line in rank1)
    rank0 = (tmp_path / "writes_rank0.txt").read_text().split()
    assert any("pairwise_scores.safetensors" in line for line in rank0)


@pytest.mark.slow  # lockstep is opt-in; lockstep == one chain at a time runs by default in test_lockstep.py
def test_two_processes_equal_one_with_chains_in_lockstep(data_dir, reference, tmp_path):
    """batch_chains=True: 4 chains in lockstep in one process, 2 per process in two; one chain at a time within
    float32 rounding (the batched products round differently), and bitwise between the layouts here (a batched
    product of K chains computes each chain as with fewer chains)."""
    run(1, data_dir, tmp_path / "one", "--batch-chains")
    log = run(2, data_dir, tmp_path / "two", "--batch-chains")
    assert "2 chains run in lockstep" in log
    for kind in SCORE_DIRS:
        one, two = scores(tmp_path / "one", kind), scores(tmp_path / "two", kind)
        assert max_rel_diff(one, scores(reference, kind)) < 1e-5
        assert max_rel_diff(two, one) < 1e-12


def test_two_processes_equal_one_with_the_defaults(one_process, two_processes):
    """sampler="auto" (subspace-SGLD here): every process builds the same sketch, Ritz pairs and gradient at w*,
    so 2 processes x 2 chains give the scores of 1 process x 4 chains (checkpoints at draw 8 included)."""
    for kind in SCORE_DIRS:  # (the linear control variate's secants split over the two processes' groups)
        one, two = scores(one_process / "defaults", kind), scores(two_processes / "defaults", kind)
        assert torch.isfinite(one).all() and one.abs().max() > 0
        assert max_rel_diff(two, one) < 1e-5
        report = json.loads((two_processes / "defaults" / SCORE_DIRS[kind] / "bif_diagnostics.json").read_text())
        assert report["sampler_arguments"]["sampler"] == "subspace_sgld"
        assert report["sampler_arguments"]["antithetic_chains"] is True  # pairs, whichever process holds each chain
        # the temperature pilot's verdicts are gathered: both layouts sample at the same rung
        alone = json.loads((one_process / "defaults" / SCORE_DIRS[kind] / "bif_diagnostics.json").read_text())
        for name in ("nbeta", "localization", "calibrate_temperature"):
            assert report["sampler_arguments"][name] == alone["sampler_arguments"][name], name


@pytest.mark.slow  # two more launches; the sharded evaluation itself runs by default (rmsprop_sgld, just below)
def test_three_processes_two_chains_with_the_defaults(data_dir, tmp_path):
    """The defaults (subspace-SGLD with the linear control variate) in evaluation groups: each member's secants at
    w* are exchanged like its draws, so 3 processes x 2 chains give the scores of 1 process x 2 chains. Not to 1e-5
    as the other layouts: one process takes each full-batch step's gradient from its draw's forwards, summed over
    the evaluation batches, while a group member (whose evaluation is sharded) runs one full-batch forward for it;
    the two gradients differ by float32 summation order (~1e-7 relative), which the chains carry along their steps
    (1.45e-5 measured)."""
    one = run_layouts(1, data_dir, tmp_path / "one", {"d": ["--chains", "2", "--defaults"]})
    log = run(3, data_dir, tmp_path / "three" / "d", "--chains", "2", "--defaults")
    assert "linear_control_variate: the values' linear part" in log
    for kind in SCORE_DIRS:
        assert max_rel_diff(scores(tmp_path / "three" / "d", kind), scores(one / "d", kind)) < 5e-5


def test_two_processes_on_a_model_with_nothing_tracked(reference, two_processes):
    """torchrun on the same MLP from bare parameters (nothing to track, so no DDP wrapper): the same scores."""
    for kind in SCORE_DIRS:
        assert max_rel_diff(scores(two_processes / "untracked", kind), scores(reference, kind)) < 1e-5


def test_three_processes_two_chains_shard_evaluation(data_dir, one_process, tmp_path):
    """P > C: all three processes run both chains and split the evaluation; the DDP wrapper is unwrapped."""
    run(3, data_dir, tmp_path / "three", "--chains", "2", "--ddp")
    for kind in SCORE_DIRS:
        assert max_rel_diff(scores(tmp_path / "three", kind), scores(one_process / "two_chains", kind)) < 1e-5


def test_one_failing_member_of_an_evaluation_group_stops_every_process(data_dir, tmp_path):
    """P > C: rank 1 alone fails mid-chain; its partners learn it at the next exchange instead of waiting forever."""
    command = _command(3, data_dir, tmp_path, "--chains", "2", "--fail-rank", "1")
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "injected failure" in log and "Process 1 of this evaluation group failed" in log
    assert not (tmp_path / SCORE_DIRS["pairwise"] / "pairwise_scores.safetensors").exists()


@pytest.mark.slow
def test_four_processes_two_chains_use_groups(data_dir, one_process, tmp_path):
    """P=4, C=2: two groups of two processes, each group sharding the evaluation of its chain."""
    run(4, data_dir, tmp_path / "four", "--chains", "2")
    for kind in SCORE_DIRS:
        assert max_rel_diff(scores(tmp_path / "four", kind), scores(one_process / "two_chains", kind)) < 1e-5


def test_killed_run_resumes_to_the_uninterrupted_scores(data_dir, reference, tmp_path):
    """SIGKILL two processes after a checkpoint exists; one process resumes and finishes the same computation."""
    ckpt = tmp_path / SCORE_DIRS["pairwise"] / "bif_checkpoints"
    proc = start(2, data_dir, tmp_path, "--checkpoint-interval", "16", "--slow", "0.02")
    wait_for(lambda: ckpt.is_dir() and any(ckpt.glob("*.safetensors")), proc)
    kill(proc)
    assert not (tmp_path / SCORE_DIRS["pairwise"] / "pairwise_scores.safetensors").exists()
    partial = [storage.load_metadata(p) for p in ckpt.glob("*.safetensors")]
    assert any('"done": false' in m["meta"] for m in partial)  # killed mid-chain, not between chains
    log = run(1, data_dir, tmp_path, "--checkpoint-interval", "16")
    assert "resuming from its checkpoint at draw" in log
    for kind in SCORE_DIRS:
        assert torch.allclose(scores(tmp_path, kind), scores(reference, kind), rtol=1e-12, atol=0)
    assert not ckpt.exists()  # removed once the final file is written


def test_kill_during_final_write_leaves_no_result(data_dir, reference, tmp_path):
    marker = tmp_path / "hanging"
    out = tmp_path / "run"
    proc = start(1, data_dir, out, "--hang-final-write", str(marker), "--only", "pairwise")
    wait_for(marker.exists, proc)
    kill(proc)
    folder = out / SCORE_DIRS["pairwise"]
    assert not (folder / "pairwise_scores.safetensors").exists()
    assert list(folder.glob(".pairwise_scores.safetensors.*.tmp"))  # the write really was under way
    assert (folder / "bif_traces.safetensors").exists()  # written before the scores, which commit the run
    log = run(1, data_dir, out, "--only", "pairwise")
    assert "complete in its checkpoint; not sampled again" in log  # the kill lost no sampling
    assert torch.allclose(scores(out, "pairwise"), scores(reference, "pairwise"), rtol=1e-12, atol=0)
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


def test_calibration_is_split_over_processes_with_the_same_table(one_process, two_processes):
    """torchrun splits the calibration grid over the processes; every row equals the one-process run's."""
    files = [out / "calibration" / "calibration.json" for out in (one_process, two_processes)]
    results = [json.loads(f.read_text()) for f in files]
    assert results[1] == results[0] and len(results[0]["rows"]) == 3
