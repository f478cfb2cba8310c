"""Data parallelism for real: two processes (torchrun, gloo on this CPU) train ONE model through the 4-bit path.

The run: the smoke profile for a quarter epoch, so the Trainer's own step count shows whether the books
were shared out (each process reading half of them) or each process read them all.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import replace

import pytest
from training_runs import STARTUP_TIMEOUT_S, kill_after_first_checkpoint, train_command
from transformers.trainer_callback import TrainerState

from helpers import config, plan, runs, tracking
from helpers.dataset import has_curated
from helpers.hardware import Hardware
from helpers.runs import RunDir

PROCESSES = 2
EPOCHS = 0.25
pytestmark = pytest.mark.slow


def _command(run_dir) -> list[str]:
    return train_command(run_dir, "--max-steps", "-1", "--set", f"epochs={EPOCHS}", processes=PROCESSES)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[RunDir, str]:
    """Killed after its first checkpoint, then resumed, both under 2 processes."""
    smoke = config.get_profile("smoke")
    if not has_curated(smoke):
        from helpers.curate import curate

        curate(smoke)
    run = RunDir(tmp_path_factory.mktemp("ddp"))
    kill_after_first_checkpoint(_command(run.path), run.path)
    resumed = subprocess.run(_command(run.path), cwd=config.REPO_ROOT, capture_output=True, text=True,
                             timeout=STARTUP_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run, resumed.stdout


@pytest.fixture(scope="module")
def planned() -> plan.TrainingPlan:
    smoke = config.get_profile("smoke")
    profile = replace(smoke, training=replace(smoke.training, max_steps=-1, epochs=EPOCHS))
    return plan.make_plan(profile, Hardware.card("cpu", processes=PROCESSES))


def test_the_plan_keeps_the_effective_batch_across_processes(planned):
    smoke = config.get_profile("smoke").training
    assert planned.effective_batch == smoke.batch_size * smoke.gradient_accumulation_steps
    assert planned.training.batch_size * PROCESSES == planned.effective_batch
    per_process = math.ceil(planned.books / (planned.training.batch_size * PROCESSES))
    assert planned.steps == math.ceil(EPOCHS * per_process)


def test_both_processes_hold_the_same_adapter(two_processes):
    run, _ = two_processes
    card = run.read_card()
    assert card["processes"] == PROCESSES and card["replicas_identical"] is True


def test_each_step_reads_the_effective_batch_shared_out_and_the_trainer_counts_the_plans_steps(two_processes,
                                                                                                planned):
    run, _ = two_processes
    final = TrainerState.load_from_json(str(run.last_checkpoint() / runs.TRAINER_STATE))
    recorded = run.recorded()
    assert final.max_steps == final.global_step == planned.steps == recorded["planned_steps"]
    assert final.train_batch_size == planned.training.batch_size  # per process: 2 x 2 = the effective 4
    books_per_process = math.ceil(planned.books / PROCESSES)
    assert final.epoch == pytest.approx(planned.steps * planned.training.batch_size / books_per_process, rel=0.1)
    assert run.read_card()["books_seen"] == planned.steps * planned.effective_batch
    assert recorded["processes"] == PROCESSES and recorded["effective_batch"] == planned.effective_batch


def test_a_run_killed_under_two_processes_resumes_under_two(two_processes):
    run, stdout = two_processes
    assert "Resumed from" in stdout and run.read_card()["resumed_from"] == "checkpoint-2"
    losses = [log["step"] for log in TrainerState.load_from_json(
        str(run.last_checkpoint() / runs.TRAINER_STATE)).log_history if "loss" in log]
    assert losses == list(range(1, len(losses) + 1))


def test_one_process_prints_and_writes(two_processes):
    run, stdout = two_processes
    assert stdout.count("Plan for profile") == 1 and stdout.count("Resumed from") == 1
    assert len(list(run.tensorboard.glob("events.out.tfevents.*"))) == 2  # the killed run's and the resumed run's
    steps = tracking.read_scalars(run.path).query("tag == 'train/loss'")["step"].tolist()
    assert steps == sorted(set(steps))  # one curve, no step twice


def test_a_rerun_under_two_processes_finds_the_run_finished(two_processes):
    run, _ = two_processes
    card = run.card.read_text()
    again = subprocess.run(_command(run.path), cwd=config.REPO_ROOT, capture_output=True, text=True,
                           timeout=STARTUP_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished") == 1 and run.card.read_text() == card
    assert json.loads(card)["global_step"] == run.recorded()["planned_steps"]
