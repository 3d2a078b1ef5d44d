"""Calibration: short chains over a grid, the largest usable step is recommended; the CLI drives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import PlainRegressionTask, assert_bitwise_equal, make_mlp, make_regression, state_copy

from kronfluence_bif import BIFArguments, calibrate, prepare_model
from kronfluence_bif.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
BASE = BIFArguments(sampler="sgld", nbeta=100.0, localization=100.0, num_burnin_steps=20, sampler_batch_size=16)


def _trained():
    data = make_regression(48, seed=0)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(data.tensors[0]), data.tensors[1]).backward()
        opt.step()
    return model, data


def test_recommends_the_largest_usable_step_and_restores_the_model():
    model, data = _trained()
    task = PlainRegressionTask()
    model = prepare_model(model, task)
    saved = state_copy(model)
    # 1e-13: the chain does not move (flat); 1e-3: healthy (eps * lambda_max ~ 0.7); 2e-2: far past the
    # stability limit eps * lambda_max = 4 (diverges, or is flagged). The recommendation is the healthy step.
    result = calibrate(
        model, task, data, base_args=BASE, step_sizes=[1e-13, 1e-3, 2e-2], num_draws=60, disable_tqdm=True
    )
    status = {row["step_size"]: row["status"] for row in result.rows}
    assert "flat" in status[1e-13]
    assert status[1e-3].startswith("ok")
    assert status[2e-2] == "diverged" or status[2e-2].startswith("blocked")
    assert result.recommended.step_size == 1e-3
    assert result.recommended.nbeta == BASE.nbeta and result.recommended.num_draws == BASE.num_draws
    assert "Recommended: step_size=0.001" in result.to_table()
    assert_bitwise_equal(model, saved)


def test_invalid_settings_are_listed_and_nothing_usable_gives_none():
    model, data = _trained()
    task = PlainRegressionTask()
    result = calibrate(model, task, data, base_args=BASE, step_sizes=[1e-13, 0.5], num_draws=20, disable_tqdm=True)
    assert [row["status"] for row in result.rows][1] == "invalid"  # 0.5 x localization 100 >= 4
    table = result.to_table()
    assert result.recommended is None and "No setting was usable" in table
    # every row that is not usable says why in the table (not only in --json), and the advice matches the reason
    why = table.split("\nWhy:\n")[1]
    assert "step_size=0.5, nbeta=100, localization=100 (invalid): BIFArguments.step_size * localization" in why
    assert "step_size=1e-13" in why and "Raise `step_size`" in why
    assert "lower `step_size` or `localization`" in result.notes[0] and "flat chains" in result.notes[0]
    assert "larger localization" not in table


def test_cli_calibrate_with_a_factory_file(tmp_path, capsys):
    factory = tmp_path / "setup_bif.py"
    factory.write_text(
        textwrap.dedent(
            """
            import torch
            from kronfluence_bif import RegressionTask

            def make():
                g = torch.Generator().manual_seed(0)
                x = torch.randn(40, 3, generator=g)
                y = x.sum(1, keepdim=True)
                model = torch.nn.Sequential(torch.nn.Linear(3, 1))
                with torch.no_grad():
                    model[0].weight.fill_(1.0)
                    model[0].bias.zero_()
                base = {"sampler": "sgld", "nbeta": 40.0, "localization": 10.0, "num_burnin_steps": 10}
                return {"model": model, "task": RegressionTask(), "train_dataset": torch.utils.data.TensorDataset(x, y),
                        "base_args": base}
            """
        )
    )
    code = cli(["calibrate", f"{factory}:make", "--steps", "1e-3", "1e-2", "--draws", "40", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["recommended"]["step_size"] in (1e-3, 1e-2)
    assert len(out["rows"]) == 2
    assert cli(["calibrate", "no_colon_here"]) == 2
    assert "MODULE:FUNCTION" in capsys.readouterr().err


FACTORY_MODULE = """
import torch
from kronfluence_bif import RegressionTask


def make_bif_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1))
    with torch.no_grad():  # the least-squares solution: w* is the minimum
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return {"model": model, "task": RegressionTask(), "train_dataset": data,
            "base_args": {"sampler": "sgld", "nbeta": 40.0, "localization": 10.0, "num_burnin_steps": 5}}
"""


def _console(project, monkeypatch, capsys, *argv):
    """`kronfluence-bif ARGV` run from `project` as its console script runs: the cwd is not on sys.path."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(project))])
    for name in [m for m in sys.modules if m.split(".")[0] in ("my_project", "needs_dep")]:
        monkeypatch.delitem(sys.modules, name)
    code = cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_calibrate_finds_a_module_of_the_working_directory(tmp_path, monkeypatch, capsys):
    project = tmp_path / "proj"
    (project / "my_project").mkdir(parents=True)
    (project / "my_project" / "__init__.py").write_text("")
    (project / "my_project" / "setup.py").write_text(FACTORY_MODULE)
    argv = ["calibrate", "my_project.setup:make_bif_inputs", "--steps", "1e-3", "--draws", "10", "--json"]
    code, out, err = _console(project, monkeypatch, capsys, *argv)
    assert code == 0, err
    assert json.loads(out)["recommended"]["step_size"] == 1e-3


def test_cli_calibrate_factory_errors_exit_2_with_the_fix(tmp_path, monkeypatch, capsys):
    project = tmp_path / "proj"
    project.mkdir()
    code, _, err = _console(project, monkeypatch, capsys, "calibrate", "my_project.setup:make_bif_inputs")
    assert code == 2 and "Traceback" not in err
    assert "cannot import `my_project.setup`: no module named `my_project`" in err
    assert str(project) in err and "path/to/setup.py:FUNCTION" in err
    # a module the factory imports is missing: its traceback, then the error line (exit 2, not 1)
    (project / "needs_dep.py").write_text("import not_installed_anywhere_xyz\n")
    code, _, err = _console(project, monkeypatch, capsys, "calibrate", "needs_dep:make")
    assert code == 2 and "Traceback" in err and "not_installed_anywhere_xyz" in err
    assert "importing `needs_dep` raised ModuleNotFoundError" in err


def test_cli_console_script_finds_the_working_directory(tmp_path):
    """The real thing once: a script outside the project (as the console script is), run from the project."""
    project = tmp_path / "proj"
    (project / "my_project").mkdir(parents=True)
    (project / "my_project" / "__init__.py").write_text("")
    (project / "my_project" / "setup.py").write_text("def make_bif_inputs():\n    return 3\n")
    script = tmp_path / "bin" / "kronfluence-bif.py"
    script.parent.mkdir()
    script.write_text("import sys\nfrom kronfluence_bif.cli import main\nsys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, str(script), "calibrate", "my_project.setup:make_bif_inputs"]
    done = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    # found and imported (it returns the wrong thing, which is exit 2 with the contract, not a traceback)
    assert done.returncode == 2 and "returned int; it must be a function" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "body, message",
    [
        ("def make():\n    return 3\n", "returned int; it must be a function with no arguments returning a dict"),
        ("def make():\n    return {'model': 1}\n", "returned ['model']; it must be"),
        ("def other():\n    pass\n", "has no function `make`; it defines ['other']"),
        ("def make():\n    raise KeyError('oops')\n", "make()` raised KeyError"),
    ],
)
def test_cli_calibrate_bad_factories_exit_2(tmp_path, capsys, body, message):
    factory = tmp_path / "bad_factory.py"
    factory.write_text(body)
    assert cli(["calibrate", f"{factory}:make"]) == 2
    assert message in capsys.readouterr().err
