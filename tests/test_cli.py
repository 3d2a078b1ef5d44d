"""Command line: exit codes 0/1/2, JSON output, inspect's sign convention, diagnose's summaries."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kronfluence_bif
from kronfluence_bif import storage
from kronfluence_bif.cli import format_diagnostics, inspect_scores, main
from kronfluence_bif.storage import BIF_DIAGNOSTICS_FILE, BIF_TRACES_FILE
from kronfluence_bif.testing import write_score_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def folders(tmp_path):
    """Three score folders on the same datasets: A, B close to A, C unrelated."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 40))
    close = a + 0.2 * rng.normal(size=a.shape)
    return {
        name: str(write_score_folder(tmp_path / f"scores_{name}", torch.tensor(x, dtype=torch.float32)))
        for name, x in (("a", a), ("b", close), ("c", rng.normal(size=a.shape)))
    }


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------- compare
def test_compare_passes_with_table_and_exit_0(folders, capsys):
    code, out, err = run(["compare", folders["a"], folders["b"], "--min-spearman", "0.9", "--k", "5"], capsys)
    assert code == 0, err
    assert "Spearman" in out and "top-5 overlap" in out and "All thresholds passed." in out and err == ""


def test_compare_fails_threshold_with_exit_1(folders, capsys):
    code, out, err = run(["compare", folders["a"], folders["c"], "--min-spearman", "0.5"], capsys)
    assert code == 1
    assert "Spearman" in out and "FAILED: mean Spearman" in err and "threshold 0.5" in err


def test_compare_json(folders, capsys):
    argv = ["compare", folders["a"], folders["c"], "--min-topk-overlap", "0.9", "--k", "3", "--json"]
    code, out, _ = run(argv, capsys)
    data = json.loads(out)
    assert code == 1 and data["passed"] is False and len(data["failures"]) == 1
    assert data["k"] == 3 and data["n_query"] == 5 and data["n_train"] == 40
    assert data["thresholds"] == {"min_spearman": None, "min_topk_overlap": 0.9}
    assert len(data["per_query"]["spearman"]) == 5 and set(data["summary"]["spearman"]) >= {"mean", "median", "min"}
    code, out, _ = run(["compare", folders["a"], folders["b"], "--json"], capsys)
    assert code == 0 and json.loads(out)["passed"] is True


@pytest.mark.parametrize(
    "argv_tail,message",
    [
        (["--k", "0"], "expected an integer >= 1"),
        (["--min-spearman", "high"], "invalid float value"),
        (["--min-spearman", "3"], "`min_spearman` must be a number in [-1, 1]"),
    ],
)
def test_compare_usage_errors_exit_2(folders, capsys, argv_tail, message):
    code, _, err = run(["compare", folders["a"], folders["b"], *argv_tail], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_compare_input_errors_exit_2_without_traceback(folders, tmp_path, capsys):
    code, out, err = run(["compare", folders["a"], str(tmp_path / "nope")], capsys)
    assert code == 2 and out == "" and "no such file or folder" in err and "Traceback" not in err
    other = write_score_folder(tmp_path / "scores_other", torch.zeros(5, 40), train_dataset_metadata={"type": "X"})
    code, _, err = run(["compare", folders["a"], str(other)], capsys)
    assert code == 2 and "train datasets differ" in err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    code, _, err = run(["compare", folders["a"], str(broken)], capsys)
    assert code == 2 and "error" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- inspect
@pytest.fixture()
def known(tmp_path):
    row = np.array([0.5, -2.0, 3.0, 0.0, -0.1, 1.0, -4.0, 2.0])
    scores = np.stack([row, -row, np.zeros_like(row)])
    train_meta = {"type": "TensorDataset", "dataset_size": 100, "indices": [10 * i for i in range(8)]}
    query_meta = {"type": "TensorDataset", "dataset_size": 20, "indices": [7, 3, 9]}
    folder = write_score_folder(
        tmp_path / "scores_k",
        torch.tensor(scores),
        query_dataset_metadata=query_meta,
        train_dataset_metadata=train_meta,
    )
    return str(folder)


def test_inspect_lists_helpful_as_positive_and_harmful_as_negative(known):
    result = inspect_scores(known, query=0, top=3)
    # kronfluence sign: positive = helpful. Columns 2 (3.0), 7 (2.0), 5 (1.0); harmful: 6 (-4.0), 1 (-2.0), 4 (-0.1).
    assert [e["column"] for e in result["helpful"]] == [2, 7, 5]
    assert [e["train_index"] for e in result["helpful"]] == [20, 70, 50]  # through train_indices
    assert [e["column"] for e in result["harmful"]] == [6, 1, 4]
    assert result["helpful"][0]["score"] == 3.0 and result["query_dataset_index"] == 7
    zero = inspect_scores(known, query=2, top=3)
    assert zero["helpful"] == [] and zero["harmful"] == []  # zero scores are neither


def test_inspect_text_and_json(known, capsys):
    code, out, _ = run(["inspect", known, "--query", "1", "--top", "2"], capsys)
    assert code == 0
    assert "query 1 (query dataset index 3)" in out and "Most helpful" in out and "Most harmful" in out
    helpful = [line.split() for line in out.split("Most helpful")[1].split("Most harmful")[0].splitlines()[2:]]
    assert helpful[:2] == [["1", "60", "4"], ["2", "10", "2"]]  # -row: columns 6 (+4.0), 1 (+2.0)
    code, out, _ = run(["inspect", known, "--query", "1", "--top", "2", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and [e["train_index"] for e in data["helpful"]] == [60, 10]
    assert [e["score"] for e in data["harmful"]] == [-3.0, -2.0]
    code, _, err = run(["inspect", known, "--query", "3"], capsys)
    assert code == 2 and "--query 3 is out of range" in err and "(0..2)" in err
    code, _, err = run(["inspect", known, "--query", "-1"], capsys)
    assert code == 2


def test_inspect_self_scores(tmp_path, capsys):
    folder = str(write_score_folder(tmp_path / "scores_self", torch.tensor([1.0, 5.0, 3.0, 0.5])))
    code, out, _ = run(["inspect", folder, "--top", "2", "--json"], capsys)
    data = json.loads(out)
    assert (
        code == 0
        and [e["column"] for e in data["highest"]] == [1, 2]
        and [e["column"] for e in data["lowest"]] == [3, 0]
    )
    code, out, _ = run(["inspect", folder, "--top", "2"], capsys)
    assert code == 0 and "Highest 2 self-influence" in out
    code, _, err = run(["inspect", folder, "--query", "0"], capsys)
    assert code == 2 and "no query axis" in err


# ---------------------------------------------------------------------------------------------- diagnose
def write_diagnostics(folder: Path) -> None:
    chains = [
        {"chain": 0, "initial_mean_loss": 0.25, "mean_loss": 0.5, "final_distance_from_w_star": 0.125},
        {"chain": 1, "initial_mean_loss": 0.25, "mean_loss": 0.75, "final_distance_from_w_star": 0.0625, "extra": 7},
    ]
    storage.save_json({"chains": chains}, folder / BIF_DIAGNOSTICS_FILE)
    traces = {
        "mean_train_loss": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64),
        "mean_measurement": torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]], dtype=torch.float64),
    }
    storage.save_tensors(folder / BIF_TRACES_FILE, traces)


def test_diagnose_prints_chain_summaries_and_trace_means(tmp_path, capsys):
    folder = write_score_folder(tmp_path / "scores_bif", torch.zeros(2, 3))
    write_diagnostics(folder)
    text = format_diagnostics(folder)
    assert "initial_mean_loss" in text and "final_distance_from_w_star" in text and "extra" in text
    assert "0.0625" in text and "0.75" in text
    trace_part = text.split(BIF_TRACES_FILE)[1]
    assert "2 chains x 3 draws" in trace_part
    lines = [line.split() for line in trace_part.splitlines()[2:]]
    assert lines[0] == ["0", "2", "1"] and lines[1] == ["1", "5", "1"]
    code, out, _ = run(["diagnose", str(folder)], capsys)
    assert code == 0 and out.strip() == text


def test_diagnose_without_bif_files_exit_2(folders, tmp_path, capsys):
    code, _, err = run(["diagnose", folders["a"]], capsys)
    assert code == 2 and "only scores computed with strategy 'bif'" in err
    code, _, err = run(["diagnose", str(tmp_path / "missing")], capsys)
    assert code == 2 and "no such folder" in err


# ---------------------------------------------------------------------------------------------- plumbing
def test_help_version_and_missing_command(capsys):
    for argv in (["--help"], ["compare", "--help"], ["inspect", "--help"], ["diagnose", "--help"]):
        code, out, _ = run(argv, capsys)
        assert code == 0 and "usage: kronfluence-bif" in out
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"kronfluence-bif {kronfluence_bif.__version__}"
    code, _, err = run([], capsys)
    assert code == 2 and "choose a command" in err
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2 and "invalid choice" in err


def test_python_dash_m_entry_point(folders):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kronfluence_bif.cli",
            "compare",
            folders["a"],
            folders["c"],
            "--min-spearman",
            "0.5",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["passed"] is False and "Traceback" not in proc.stderr
