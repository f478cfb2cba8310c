"""Time-budgeted training: calibrated on the real device, ending inside the budget, resumable to the same length."""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from transformers.trainer_callback import TrainerState

from helpers import budget, config, plan, runs
from helpers.hardware import Hardware
from helpers.runs import RunDir
from training_runs import STARTUP_TIMEOUT_S, train_command

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


def test_a_measured_rate_from_a_run_card_changes_the_plan(tmp_path, monkeypatch):
    lite, t4 = config.get_profile("lite"), Hardware.card("T4")
    before = plan.make_plan(lite, t4, books=19_800, tokens_per_book=180)
    assert before.speed.kind == "published"
    card = tmp_path / "runs" / "lite" / "qlora" / "run_card.json"
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps({"device": "Tesla T4", "base_model": lite.base_model, "tokens_per_second": 400.0}))
    monkeypatch.setattr(config, "HOME", tmp_path)
    after = plan.make_plan(lite, t4, books=19_800, tokens_per_book=180)
    assert after.speed.kind == "measured here" and after.speed.tokens_per_second == 400.0
    assert "runs/lite/qlora/run_card.json" in after.speed.source and after.minutes < before.minutes
    assert after.budgeted_steps > before.budgeted_steps


def test_the_plan_of_a_budgeted_run_says_it_is_an_estimate_until_calibration():
    lite = config.get_profile("lite")
    planned = plan.make_plan(lite, Hardware.card("T4"), books=19_800, tokens_per_book=180)
    text = str(planned)
    assert "time budget 60 min" in text and "an estimate until calibration" in text and "WARNING" not in text
    assert planned.budgeted_steps < planned.steps  # a T4 does not read lite's 19,800 books in an hour


@pytest.fixture(scope="module")
def budgeted_run(tmp_path_factory) -> tuple[RunDir, str, float]:
    smoke = config.get_profile("smoke")
    if not (smoke.curated_dir / "manifest.json").exists():
        from helpers.curate import curate

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
