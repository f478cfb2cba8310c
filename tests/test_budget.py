"""Time-budgeted training: calibrated on the real device, ending inside the budget, resumable to the same length."""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from training_runs import STARTUP_TIMEOUT_S, train_command
from transformers.trainer_callback import TrainerState

from helpers import budget, config, plan, runs
from helpers.curate import curate
from helpers.dataset import has_curated
from helpers.hardware import Hardware
from helpers.runs import RunDir

BUDGET_MINUTES = 2.0  # loading and calibration take ~40 s on a quiet 2-core CPU, ~60 s on a CI box 1.5x slower
TOLERANCE = 0.15  # the run may overshoot its budget by this share: steps vary, the last eval and save are estimated


def _command(run_dir: Path) -> list[str]:
    # the whole epoch is the cap (19 steps of 4 books); the budget decides where the run stops
    return train_command(run_dir, "--max-steps", "-1", "--save-steps", "100", "--time-budget", str(BUDGET_MINUTES))


def test_steps_within_counts_each_evaluation_and_checkpoint_on_the_way():
    # 10 s left, 1 s a step, 2 s an evaluation every 5 steps, 1 s a save every 5: from step 4,
    # steps 5..7 cost 3 + one evaluation (2) + one save (1) + the final evaluation (2) and two saves (2) = 10
    assert budget.steps_within(10, 4, 100, step=1, evaluation=2, save=1, eval_every=5, save_every=5) == 7
    assert budget.steps_within(10, 4, 6, step=1, evaluation=2, save=1, eval_every=5, save_every=5) == 6  # the cap
    assert budget.steps_within(1, 4, 100, step=1, evaluation=2, save=1, eval_every=5, save_every=5) == 4  # spent


def _card(home: Path, run: str, rate: float, machine: str | None) -> None:
    card = RunDir(home / "runs" / "lite" / run).card
    card.parent.mkdir(parents=True)
    fields = {"device": "Tesla T4", "base_model": config.get_profile("lite").base_model, "tokens_per_second": rate}
    card.write_text(json.dumps({**fields, **({"machine": machine} if machine else {})}), encoding="utf-8")


def test_a_measured_rate_from_a_run_card_changes_the_plan(tmp_path, monkeypatch):
    lite = config.get_profile("lite")
    t4 = replace(Hardware.card("T4"), machine="colab-a (Intel Xeon, 2 cores)")
    before = plan.make_plan(lite, t4, books=19_800, tokens_per_book=180)
    assert before.speed.kind == "published"
    _card(tmp_path, "qlora", 400.0, t4.machine)
    monkeypatch.setattr(config, "HOME", tmp_path)
    after = plan.make_plan(lite, t4, books=19_800, tokens_per_book=180)
    assert after.speed.kind == "measured here" and after.speed.tokens_per_second == 400.0
    assert "runs/lite/qlora 400" in after.speed.source and after.minutes < before.minutes
    assert after.budgeted_steps > before.budgeted_steps


def test_measured_here_only_for_this_machines_runs_and_one_slow_run_does_not_stand_for_it(tmp_path):
    here, there = "colab-a (Intel Xeon, 2 cores)", "laptop (AMD Ryzen, 8 cores)"
    _card(tmp_path, "qlora", 400.0, here)
    _card(tmp_path, "qlora-r4", 420.0, here)
    _card(tmp_path, "qlora-busy", 90.0, here)  # a run on a loaded machine
    _card(tmp_path, "elsewhere", 999.0, there)
    pair = ("T4", config.get_profile("lite").base_model)
    mine = plan.measured_throughputs(replace(Hardware.card("T4"), machine=here), home=tmp_path)[pair]
    assert (mine.kind, mine.tokens_per_second) == ("measured here", 400.0)  # the median of this machine's three
    assert "median of 3 run card(s) on this machine" in mine.source and "qlora-busy 90" in mine.source
    other = plan.measured_throughputs(replace(Hardware.card("T4"), machine="another box"), home=tmp_path)[pair]
    assert other.kind == "measured" and other.tokens_per_second == 410.0 and there in other.source
    assert config.THROUGHPUTS["cpu", "smollm2"].kind == "published"  # the authors' figure is not this machine's


def test_a_budget_spent_by_calibration_says_so_and_cards_no_after_loss():
    spent = budget.Calibration(0.5, 4, 7.5, 3.0, 1.0, elapsed_seconds=45.0, chosen_steps=4, capped=False,
                               done_steps=4)
    assert spent.spent and "calibration alone took 45 s of the 0.5 min budget" in spent.line(4)
    assert "Training 4 steps" not in spent.line(4) and "no evaluation after training" in spent.line(4)
    room = replace(spent, chosen_steps=9, elapsed_seconds=20.0)
    assert not room.spent and "Training 9 steps (36 books) to end inside 0.5 min" in room.line(4)


def test_the_plan_of_a_budgeted_run_says_it_is_an_estimate_until_calibration():
    lite = config.get_profile("lite")
    planned = plan.make_plan(lite, Hardware.card("T4"), books=19_800, tokens_per_book=180)
    text = str(planned)
    assert "time budget 60 min" in text and "an estimate until calibration" in text and "WARNING" not in text
    assert planned.budgeted_steps < planned.steps  # a T4 does not read lite's 19,800 books in an hour


@pytest.fixture(scope="module")
def budgeted_run(tmp_path_factory) -> tuple[RunDir, str, float]:
    smoke = config.get_profile("smoke")
    if not has_curated(smoke):
        curate(smoke)
    run = RunDir(tmp_path_factory.mktemp("budget"))
    started = time.monotonic()
    done = subprocess.run(_command(run.path), cwd=config.REPO_ROOT, capture_output=True, text=True,
                          timeout=STARTUP_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done.stdout, time.monotonic() - started


@pytest.mark.slow
def test_a_budgeted_run_ends_inside_its_budget(budgeted_run):
    run, stdout, _ = budgeted_run
    card = run.read_card()
    assert card["wall_seconds"] <= BUDGET_MINUTES * 60 * (1 + TOLERANCE)
    chosen = run.recorded()["budgeted_steps"]
    assert card["global_step"] == chosen == card["time_budget"]["chosen_steps"] > config.CALIBRATION_STEPS
    assert f"Training {chosen:,} steps" in stdout and "Calibrated on 4 steps" in stdout


@pytest.mark.slow
def test_the_learning_rate_reaches_its_floor_at_the_last_step(budgeted_run):
    # The Trainer logs the rate each step used; a cosine of N steps uses its last positive rate at step N and
    # stands at 0 after it. From the step after calibration on, the rates are those of the chosen length.
    import torch
    from transformers import get_cosine_schedule_with_warmup

    run, _, _ = budgeted_run
    recorded = run.recorded()
    chosen, base = recorded["budgeted_steps"], recorded["training"]["learning_rate"]
    state = TrainerState.load_from_json(str(run.last_checkpoint() / runs.TRAINER_STATE))
    rates = {log["step"]: log["learning_rate"] for log in state.log_history if "learning_rate" in log}
    assert max(rates) == state.global_step == state.max_steps == chosen

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    warmup = math.ceil(recorded["training"]["warmup_ratio"] * chosen)
    cosine = get_cosine_schedule_with_warmup(optimizer, warmup, chosen)
    expected = {}
    for step in range(1, chosen + 1):
        expected[step] = cosine.get_last_lr()[0]
        optimizer.step()
        cosine.step()
    after = [step for step in rates if step > config.CALIBRATION_STEPS]
    assert after and [rates[step] for step in after] == pytest.approx([expected[step] for step in after], rel=1e-6)
    assert 0 < rates[chosen] == min(rates[step] for step in after) and cosine.get_last_lr()[0] == 0.0
    assert all(rate > 0 for step, rate in rates.items() if step > 1)  # calibration's steps too (step 1: warm-up at 0)
    scheduler = torch.load(run.last_checkpoint() / "scheduler.pt", weights_only=False)
    assert scheduler["last_epoch"] == chosen and set(scheduler["_last_lr"]) == {0.0}  # every parameter group


@pytest.mark.slow
def test_a_run_killed_after_calibration_resumes_to_the_same_total_steps(budgeted_run, tmp_path):
    import os
    import signal

    finished, _, _ = budgeted_run
    run = RunDir(tmp_path / "run")
    calibration = run.checkpoints / f"checkpoint-{config.CALIBRATION_STEPS}" / runs.TRAINER_STATE
    first = subprocess.Popen(_command(run.path), cwd=config.REPO_ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (calibration.exists() and "budgeted_steps" in (run.recorded() or {})) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    chosen = run.recorded()["budgeted_steps"]
    assert not run.card.exists(), "the run finished before it was killed"
    resumed = subprocess.run(_command(run.path), cwd=config.REPO_ROOT, capture_output=True, text=True,
                             timeout=STARTUP_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    card = run.read_card()
    assert card["resumed_from"] == f"checkpoint-{config.CALIBRATION_STEPS}" and "Calibrated" not in resumed.stdout
    assert card["global_step"] == chosen == run.recorded()["budgeted_steps"]
