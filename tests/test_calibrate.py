"""Calibration: short chains over a grid, the largest usable step is recommended; the CLI drives it."""

from __future__ import annotations

import json
import textwrap

import torch
from conftest import PlainRegressionTask, assert_bitwise_equal, make_mlp, make_regression, state_copy

from kronfluence_bif import BIFArguments, calibrate, prepare_model
from kronfluence_bif.cli import main as cli

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
    assert result.recommended is None and "No setting was usable" in result.to_table()


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
