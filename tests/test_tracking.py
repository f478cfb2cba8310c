"""Experiment tracking: TensorBoard by default in the run folder, W&B only on request, runs compared."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import replace

import pytest
from torch.utils.tensorboard import SummaryWriter

from helpers import config, recipe, tracking
from helpers.hardware import Hardware
from helpers.runs import RunDir


def test_tensorboard_logs_by_default_and_is_added_by_the_trainer_not_report_to(tmp_path):
    profile = config.get_profile("smoke")
    assert tracking.trackers(profile.training.report_to) == ["tensorboard"]
    args = recipe.sft_config(profile.training, RunDir(tmp_path), Hardware.card("cpu"))
    assert args.report_to == []  # "none": our own callback logs to the run folder


def test_wandb_is_opt_in_and_named_in_the_fix_when_missing(tmp_path, monkeypatch):
    profile = config.get_profile("smoke")
    wandb = replace(profile, training=replace(profile.training, report_to="tensorboard, wandb"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "wandb"
                        else real_find_spec(name, *args))
    with pytest.raises(ImportError, match="pip install wandb.*wandb login"):
        recipe.sft_config(wandb.training, RunDir(tmp_path), Hardware.card("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())
    assert tracking.trackers("tensorboard, wandb") == ["tensorboard", "wandb"]
    settings = recipe.sft_config(wandb.training, RunDir(tmp_path / "qlora-r4"), Hardware.card("cpu"))
    assert settings.report_to == ["wandb"] and settings.run_name == "qlora-r4"


@pytest.mark.parametrize("report_to, expected", [("none", []), ("", []), ("TensorBoard", ["tensorboard"])])
def test_tracker_names_are_read_leniently(report_to, expected):
    assert tracking.trackers(report_to) == expected


def test_an_unknown_tracker_names_the_choices():
    with pytest.raises(ValueError, match="Unknown tracker.*mlflow.*'tensorboard', 'wandb'"):
        tracking.trackers("mlflow")


def _log(run_dir, steps, purge_step, value):
    # Event files are read in name order: time in seconds, host, pid, then a per-process counter that sorts as
    # text (".10" before ".9"). Real runs start seconds apart; these writers would share a second.
    time.sleep(1.05)
    with SummaryWriter(str(tracking.log_dir(run_dir)), purge_step=purge_step) as writer:
        for step in steps:
            writer.add_scalar("train/loss", value, step)


def test_a_resumed_run_keeps_its_curve_up_to_the_checkpoint_and_drops_the_rest(tmp_path):
    _log(tmp_path, range(1, 6), 0, 1.0)  # an interrupted run logged steps 1-5, its last checkpoint is step 2
    _log(tmp_path, range(3, 7), 3, 2.0)  # what tensorboard_callback(run_dir, resumed_step=2) writes with
    curve = tracking.read_scalars(tmp_path).query("tag == 'train/loss'")
    assert curve["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert curve["value"].tolist() == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    _log(tmp_path, range(1, 3), 0, 3.0)  # started afresh: older curves go
    assert tracking.read_scalars(tmp_path).query("tag == 'train/loss'")["value"].tolist() == [3.0, 3.0]


def test_runs_are_compared_from_their_cards_and_curves(tmp_path):
    runs = {}
    for rank in (4, 8):
        run_dir = tmp_path / f"qlora-r{rank}"
        _log(run_dir, range(1, 4), 0, 1.0 / rank)
        hyperparameters = {**vars(config.TrainingConfig(lora_r=rank, lora_alpha=2 * rank))}
        RunDir(run_dir).write_card({"hyperparameters": hyperparameters, "eval_loss_after": 1.0 / rank})
        runs[f"r={rank}"] = run_dir
    table = tracking.compare_runs(runs)
    assert table.loc["lora_r"].tolist() == ["4", "8"] and table.loc["eval_loss_after"].tolist() == ["0.25", "0.125"]
    assert table.loc["wall_seconds"].tolist() == ["-", "-"]  # not on these cards: a dash, not None
    figure = tracking.plot_runs(runs, path=tmp_path / "runs.png")
    assert (tmp_path / "runs.png").stat().st_size > 0
    assert [len(axes.lines) for axes in figure.axes] == [2, 2]  # both runs in both panels (no eval: empty lines)
