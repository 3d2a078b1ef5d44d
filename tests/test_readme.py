"""README holds true: its BIFArguments table, its quick start code and its A/B snippet run as written."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PlainRegressionTask, fit, make_mlp, make_regression

from kronfluence_bif import Analyzer, BIFArguments, prepare_model

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def python_blocks(after: str) -> str:
    """The first ```python block of README after the text `after`."""
    start = README.index(after)
    match = re.search(r"```python\n(.*?)```", README[start:], re.S)
    return match.group(1)


def test_bif_arguments_table_lists_every_field_with_its_default_and_help():
    defaults = BIFArguments()
    help_texts = BIFArguments.field_help()
    for field in dataclasses.fields(BIFArguments):
        row = re.search(rf"^\| `{field.name}` \| `(.*?)` \| (.*) \|$", README, re.M)
        assert row, f"README's BIFArguments table has no row for {field.name}"
        assert row.group(2) == help_texts[field.name], field.name
        shown = "None" if field.name == "step_size" else repr(getattr(defaults, field.name))
        assert row.group(1) == shown, field.name


def test_readme_shows_the_quick_start_file_as_it_is():
    code = (REPO / "examples" / "quickstart.py").read_text(encoding="utf-8")
    assert code[code.index("import time") :] == python_blocks("## The one-flag swap")


def test_the_ab_snippet_runs_with_fewer_queries_than_its_batch(tmp_path, monkeypatch):
    """kronfluence's EK-FAC arm raises an IndexError when per_device_query_batch_size exceeds the queries."""
    monkeypatch.chdir(tmp_path)  # the snippet writes to kronfluence's default ./influence_results
    train, q = make_regression(48), make_regression(5, seed=1)
    task = PlainRegressionTask()
    model = prepare_model(fit(make_mlp(), train), task)
    names = {"Analyzer": Analyzer, "model": model, "task": task, "train": train, "q": q}
    monkeypatch.setattr(BIFArguments, "__init__", _fast_defaults(BIFArguments.__init__))
    exec(python_blocks("one Analyzer holds EK-FAC and BIF factors side by side"), names)
    assert names["ekfac"].shape == names["bif"].shape == torch.Size([5, 48])


def _fast_defaults(init):
    """BIFArguments() with fewer draws, so the snippet's default BIF arm takes a second."""

    def fast(self, *args, **kwargs):
        kwargs = {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 10, **kwargs}
        init(self, *args, **kwargs)

    return fast


@pytest.mark.slow
def test_the_quick_start_runs_as_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "BIF scores [103, 927] in ./influence_results/run/scores_s/" in done.stdout
    assert (tmp_path / "influence_results" / "run" / "scores_s" / "pairwise_scores.safetensors").is_file()
