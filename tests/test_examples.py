"""examples/*/run.py: the A/B end to end with tiny settings, its output files, and resumable seeded retraining."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kronfluence_bif import RegressionTask
from kronfluence_bif.demo import ab

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = ("uci_concrete", "digits")
# the example's files and tables are under test here, not the sampler (test_agreement runs the defaults)
TINY_BIF = {"num_chains": 1, "num_draws": 20, "num_burnin_steps": 5, "sampler": "rmsprop_sgld"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def restore_threads():
    """The examples set torch's thread count; give the rest of the suite back its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_example(name: str, output_dir: Path, monkeypatch, *extra: str) -> None:
    script = REPO / "examples" / name / "run.py"
    argv = [str(script), "--retrains", "4", "--epochs", "2", "--quiet", "--output-dir", str(output_dir), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_writes_summary_markdown_plot_and_scores(name, tmp_path, monkeypatch, capsys, restore_threads):
    run_example(name, tmp_path, monkeypatch, "--bif-args", json.dumps(TINY_BIF))
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / ab.SUMMARY_FILE).read_text())
    assert tuple(summary) == ab.SUMMARY_KEYS and summary["problem"]["name"] == name
    settings = summary["settings"]
    assert settings["n_retrains"] == 4 and settings["bif_overrides"] == TINY_BIF
    assert settings["bif_args"]["num_draws"] == 20
    assert list(summary["methods"]) == ["ekfac", "identity", "bif"]
    for method in summary["methods"].values():
        lds = method["lds"]
        assert -1.0 <= lds["mean"] <= 1.0 and lds["n_subsets"] == 4 and method["seconds"] > 0
        assert len(lds["per_query"]) == settings["n_query"]
    assert set(summary["agreement"]) == {"bif_vs_ekfac", "identity_vs_ekfac"}
    for agreement in summary["agreement"].values():
        assert -1.0 <= agreement["spearman"] <= 1.0 and 0.0 <= agreement["topk_overlap"] <= 1.0
    assert summary["timings"]["retrains_computed"] == 4
    for folder in summary["files"]["scores"].values():
        assert (Path(folder) / "pairwise_scores.safetensors").is_file()
    markdown = (tmp_path / ab.MARKDOWN_FILE).read_text()
    assert markdown in printed and "| EK-FAC |" in markdown and "BIF (num_chains=1" in markdown
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert summary["files"]["plot"] is None
    else:
        assert (tmp_path / ab.PLOT_FILE).read_bytes()[:8] == PNG_MAGIC


def test_bad_bif_args_fail_before_training(tmp_path, monkeypatch, capsys, restore_threads):
    with pytest.raises(SystemExit) as exc:
        run_example("uci_concrete", tmp_path, monkeypatch, "--bif-args", '{"num_drawz": 3}')
    assert exc.value.code == 2 and "num_drawz" in capsys.readouterr().err
    assert not (tmp_path / ab.SUMMARY_FILE).exists()


class Interrupted(RuntimeError):
    pass


def fake_problem(seeds, fail_after=None):
    """A problem whose 'training' is instant: the model predicts the mean target of its subset plus its seed."""
    gen = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(20, 3, generator=gen), torch.randn(20, 1, generator=gen))
    query = TensorDataset(torch.randn(4, 3, generator=gen), torch.randn(4, 1, generator=gen))

    def fit(data, seed):
        if fail_after is not None and len(seeds) >= fail_after:
            raise Interrupted("killed")
        seeds.append(seed)
        model = nn.Linear(3, 1)
        nn.init.zeros_(model.weight)
        nn.init.constant_(model.bias, data.tensors[1].mean().item() + 1e-3 * seed)
        return model

    return ab.ABProblem("fake", "fake", train, query, RegressionTask(), fit, "r", "squared error")


def test_retrains_resume_with_the_seed_of_each_subset(tmp_path):
    cache = tmp_path / "retrains.safetensors"
    seeds = []
    with pytest.raises(Interrupted):
        ab.retrain_measurements(fake_problem(seeds, fail_after=3), 6, cache)
    resumed, computed, _ = ab.retrain_measurements(fake_problem(seeds), 6, cache)
    assert computed == 3 and seeds == [ab.RETRAIN_SEED_BASE + i for i in range(6)]
    fresh, computed, _ = ab.retrain_measurements(fake_problem([]), 6, tmp_path / "fresh.safetensors")
    assert computed == 6
    np.testing.assert_array_equal(resumed.masks, fresh.masks)
    np.testing.assert_allclose(resumed.measurements, fresh.measurements)
    problem = fake_problem([])  # measurement = the query's squared error under the model of subset 0
    (x, y), (xq, yq) = problem.train.tensors, problem.query.tensors
    keep = torch.from_numpy(resumed.masks[0])
    model = problem.fit(TensorDataset(x[keep], y[keep]), seed=ab.RETRAIN_SEED_BASE)
    expected = ((model(xq) - yq) ** 2).sum(1).detach().numpy()
    np.testing.assert_allclose(resumed.measurements[0], expected, rtol=1e-6)


def test_demo_imports_without_scipy():
    code = "import sys; sys.modules['scipy'] = None; import kronfluence_bif.demo.__main__, kronfluence_bif.demo.ab"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
