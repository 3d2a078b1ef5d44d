"""Resume from per-chain checkpoints (in one process), the work plan, and model wrappers."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import PlainRegressionTask, assert_bitwise_equal, check_pinned, state_copy

from kronfluence_bif import Analyzer, BIFArguments, prepare_model, storage
from kronfluence_bif.checkpoints import CHECKPOINT_DIR, CheckpointStore
from kronfluence_bif.distributed import plan_work, split_evenly, unwrap_model

ARGS = dict(num_chains=3, num_draws=40, num_burnin_steps=5, sampler_batch_size=8, draws_per_block=8)


def _scores(tmp_path, model, task, small_data, name="s", overwrite=False, **bif):
    train, query = small_data
    args = BIFArguments(**{**ARGS, **bif})
    analyzer = Analyzer("r", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(
        name,
        "f",
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=5,
        overwrite_output_dir=overwrite,
    )
    return analyzer.load_pairwise_scores(name)["all_modules"]


@pytest.fixture()
def prepared(trained_mlp):
    task = PlainRegressionTask()
    return prepare_model(trained_mlp, task), task


class Interrupt(Exception):
    pass


def _interrupt_after_saves(monkeypatch, saves: int) -> list:
    """Ctrl-C right after the `saves`-th checkpoint write, as a kill at that moment would."""
    written = []
    real = CheckpointStore.save

    def save(self, chain, tensors, meta):
        real(self, chain, tensors, meta)
        written.append((chain, meta["draws_done"], meta["done"]))
        if len(written) == saves:
            raise Interrupt

    monkeypatch.setattr(CheckpointStore, "save", save)
    return written


def test_interrupted_run_resumes_bitwise(tmp_path, prepared, small_data, monkeypatch):
    model, task = prepared
    reference = _scores(tmp_path / "ref", model, task, small_data, checkpoint_interval=16)
    saved = state_copy(model)
    # chain 0 finishes (2 partial + 1 final checkpoint), chain 1 is stopped after its first checkpoint at draw 16
    written = _interrupt_after_saves(monkeypatch, saves=4)
    with pytest.raises(Interrupt):
        _scores(tmp_path / "run", model, task, small_data, checkpoint_interval=16)
    assert written == [(0, 16, False), (0, 32, False), (0, 40, True), (1, 16, False)]
    assert_bitwise_equal(model, saved)
    folder = tmp_path / "run" / "r" / "scores_s"
    assert not (folder / "pairwise_scores.safetensors").exists()
    monkeypatch.undo()
    resumed = _scores(tmp_path / "run", model, task, small_data, checkpoint_interval=16)
    assert torch.equal(resumed, reference)
    check_pinned("resume/pairwise", resumed)
    assert not (folder / CHECKPOINT_DIR).exists()


def test_an_interrupted_mirrored_chain_resumes_its_mirrored_noise(tmp_path, prepared, small_data, monkeypatch):
    """Antithetic pairs: chain 1 draws chain 0's noise negated; stopped after its first checkpoint, it resumes from
    its own generator's saved state, so the scores are bitwise those of the uninterrupted run (and differ from the
    unpaired run's)."""
    model, task = prepared
    paired = dict(sampler="sgld", step_size=1e-4, antithetic_chains=True, checkpoint_interval=16)
    reference = _scores(tmp_path / "ref", model, task, small_data, **paired)
    written = _interrupt_after_saves(monkeypatch, saves=4)
    with pytest.raises(Interrupt):
        _scores(tmp_path / "run", model, task, small_data, **paired)
    assert written[-1] == (1, 16, False)  # the mirrored chain, part way
    monkeypatch.undo()
    assert torch.equal(_scores(tmp_path / "run", model, task, small_data, **paired), reference)
    unpaired = _scores(tmp_path / "free", model, task, small_data, **{**paired, "antithetic_chains": False})
    assert not torch.equal(unpaired, reference)


def test_rerun_with_other_arguments_raises_and_overwrite_clears_checkpoints(
    tmp_path, prepared, small_data, monkeypatch
):
    model, task = prepared
    _interrupt_after_saves(monkeypatch, saves=1)
    with pytest.raises(Interrupt):
        _scores(tmp_path, model, task, small_data, checkpoint_interval=16)
    monkeypatch.undo()
    ckpt = tmp_path / "r" / "scores_s" / CHECKPOINT_DIR
    assert any(ckpt.glob("*.safetensors"))
    with pytest.raises(ValueError, match="differ from the saved"):
        _scores(tmp_path, model, task, small_data, checkpoint_interval=16, num_draws=48)
    fresh = _scores(tmp_path, model, task, small_data, overwrite=True, checkpoint_interval=16, num_draws=48)
    assert fresh.shape == (10, 48) and not ckpt.exists()


def test_keep_checkpoints_and_disabled_checkpoints(tmp_path, prepared, small_data):
    model, task = prepared
    kept = _scores(tmp_path / "a", model, task, small_data, keep_checkpoints=True)
    files = sorted(p.name for p in (tmp_path / "a" / "r" / "scores_s" / CHECKPOINT_DIR).glob("*"))
    assert files == [f"pairwise_all_chain{c}.safetensors" for c in range(3)]
    off = _scores(tmp_path / "b", model, task, small_data, checkpoint_interval=0)
    assert not (tmp_path / "b" / "r" / "scores_s" / CHECKPOINT_DIR).exists()
    assert torch.equal(kept, off)  # checkpoints never change the numbers


def test_checkpoint_of_another_computation_is_ignored(tmp_path):
    store = CheckpointStore(tmp_path, "pairwise_all", fingerprint="aaaa")
    store.save(0, {"x": torch.zeros(2)}, {"draws_done": 8})
    assert store.load(0)[1]["draws_done"] == 8
    assert CheckpointStore(tmp_path, "pairwise_all", fingerprint="bbbb").load(0) is None
    store.path(1).write_bytes(b"not a safetensors file")
    assert store.load(1) is None


@pytest.mark.parametrize(
    "chains, procs, expected",
    [
        (4, 1, [[0, 1, 2, 3]]),
        (4, 2, [[0, 2], [1, 3]]),
        (4, 3, [[0, 3], [1], [2]]),
        (2, 3, [[0, 1], [0, 1], [0, 1]]),  # more processes than chains: one group that shards the evaluation
        (2, 4, [[0], [1], [0], [1]]),  # two groups of two
        (3, 4, [[0, 2], [1], [0, 2], [1]]),
    ],
)
def test_work_plan(chains, procs, expected):
    plans = [plan_work(chains, procs, r) for r in range(procs)]
    assert [p.chains for p in plans] == expected
    for rank, p in enumerate(plans):  # the members of a group run the same chains and shard the evaluation
        assert p.group_ranks[p.shard] == rank
        assert all(plans[r].chains == p.chains for r in p.group_ranks)
    leaders = [c for p in plans if p.is_group_leader for c in p.chains]
    assert sorted(leaders) == list(range(chains))


def test_split_evenly_is_contiguous_and_balanced():
    parts = split_evenly([8, 8, 8, 8, 4, 4], 3)
    assert [i for part in parts for i in part] == list(range(6))
    assert [sum([8, 8, 8, 8, 4, 4][i] for i in part) for part in parts] == [16, 8, 16]
    assert split_evenly([5], 3) == [[], [0], []]


def test_unwrap_model_ddp_and_fsdp(tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        inner = torch.nn.Sequential(torch.nn.Linear(3, 2))
        assert unwrap_model(torch.nn.parallel.DistributedDataParallel(inner)) is inner
        from torch.distributed.fsdp import FullyShardedDataParallel

        with pytest.warns(UserWarning):
            sharded = FullyShardedDataParallel(
                torch.nn.Sequential(torch.nn.Linear(3, 2)), device_id=torch.device("cpu")
            )
        with pytest.raises(ValueError, match="FSDP.*before `apply_fsdp`"):
            unwrap_model(sharded)
    finally:
        dist.destroy_process_group()


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    storage.save_json({"a": 1}, tmp_path / "a.json")
    storage.save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    mask = os.umask(0)
    os.umask(mask)
    for name in ("a.json", "t.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


def test_storage_removes_killed_writes(tmp_path):
    (tmp_path / ".pairwise_scores.safetensors.abc.tmp").write_bytes(b"half")
    (tmp_path / "pairwise_scores.safetensors").write_bytes(b"kept")
    assert len(storage.remove_temporaries(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["pairwise_scores.safetensors"]


def test_run_settings_may_change_between_runs(tmp_path, prepared, small_data, monkeypatch):
    """checkpoint_interval / keep_checkpoints / cache_batches do not change results, so a rerun may change them."""
    model, task = prepared
    _interrupt_after_saves(monkeypatch, saves=1)
    with pytest.raises(Interrupt):
        _scores(tmp_path, model, task, small_data, checkpoint_interval=16)
    monkeypatch.undo()
    resumed = _scores(tmp_path, model, task, small_data, checkpoint_interval=8, cache_batches=False)
    reference = _scores(tmp_path / "ref", model, task, small_data)
    assert torch.equal(resumed, reference)
    saved = storage.load_json(tmp_path / "r" / "factors_f" / storage.BIF_ARGUMENTS_FILE)
    assert saved["checkpoint_interval"] == 8 and saved["cache_batches"] is False  # the newest run settings
