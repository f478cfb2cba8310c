"""Time-budgeted training: time the first steps on the real device, then fix the run's length to fit.

A plan's minutes come from a speed table; a run with ``time_budget_minutes`` does not trust them.
:class:`TimeBudget` lets the Trainer run ``CALIBRATION_STEPS`` optimizer steps, has it write a
checkpoint, and then knows what a step, an evaluation and a checkpoint really cost here. It fixes
the number of steps so that training (with its evaluations, checkpoints and final save) ends inside
the budget, counted from the start of :func:`helpers.finetune.train`, model loading included, and
reshapes the learning-rate schedule, from the next step on, into a cosine of exactly that many steps
(the warm-up stays the recipe's ratio of the new total): the last step trains at its smallest rate and
the schedule stands at 0 after it. The choice is recorded in the run's settings, so a run killed after
calibration resumes to the same total.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from helpers import config
from helpers.hardware import Hardware


@dataclass(frozen=True)
class Calibration:
    """What the first steps measured, and the steps chosen from it."""

    budget_minutes: float
    calibration_steps: int
    seconds_per_step: float
    eval_seconds: float
    save_seconds: float
    elapsed_seconds: float  # since train() started, at the decision
    chosen_steps: int
    capped: bool  # True when the planned steps fit the budget (the budget did not shorten the run)
    done_steps: int = 0  # steps trained when the choice was made (a run chosen at this number ends there)

    @property
    def spent(self) -> bool:
        """Loading and calibration alone used the budget up: the run ends after its calibration steps."""
        return not self.capped and self.chosen_steps <= self.done_steps

    def line(self, books_per_step: int) -> str:
        measured = (f"Calibrated on {self.calibration_steps} steps: {self.seconds_per_step:.2f} s a step, "
                    f"{self.eval_seconds:.1f} s an evaluation, {self.save_seconds:.1f} s a checkpoint.")
        if self.spent:
            return (f"{measured} Loading and calibration alone took {self.elapsed_seconds:.0f} s of the "
                    f"{self.budget_minutes:g} min budget: the run stops after those {self.done_steps:,} steps "
                    f"({self.done_steps * books_per_step:,} books), with no evaluation after training. Give it a "
                    "longer budget to train past calibration.")
        ending = ("the planned steps fit" if self.capped else "the budget stops the run there")
        return (f"{measured} Training {self.chosen_steps:,} steps ({self.chosen_steps * books_per_step:,} books) "
                f"to end inside {self.budget_minutes:g} min: {ending}.")


def steps_within(budget_seconds: float, done: int, cap: int, step: float, evaluation: float, save: float,
                 eval_every: int, save_every: int) -> int:
    """The most steps (at least ``done``, at most ``cap``) whose cost fits ``budget_seconds`` from now on.

    Each further step costs ``step``, each evaluation and checkpoint on the way their measured cost,
    and the end one more evaluation and two saves (the final checkpoint and the adapter).
    """
    def cost(total: int) -> float:
        steps = total - done
        evaluations = total // eval_every - done // eval_every + 1
        saves = total // save_every - done // save_every + 2  # and the adapter
        return steps * step + evaluations * evaluation + saves * save

    total = done
    while total < cap and cost(total + 1) <= budget_seconds:
        total += 1
    return total


def reshape_schedule(scheduler: object, args: TrainingArguments, steps: int) -> None:
    """Point a ``LambdaLR`` schedule of the Trainer (cosine, linear...) at ``steps`` total steps, from the next step."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps it
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas or not all(isinstance(rule, functools.partial) and "num_training_steps" in rule.keywords
                              for rule in lambdas):
        raise ValueError(f"A time budget needs a schedule that is told its length (cosine, linear), not "
                         f"{args.lr_scheduler_type}: change lr_scheduler_type or drop time_budget_minutes.")
    scheduler.lr_lambdas = [functools.partial(rule.func, **{**rule.keywords, "num_training_steps": steps,
                                                             "num_warmup_steps": args.get_warmup_steps(steps)})
                            for rule in lambdas]
    # the next step already uses the new shape (LambdaLR would apply it only after that step)
    rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


class TimeBudget(TrainerCallback):
    """Calibrate on the first steps, then stop the run inside ``minutes`` (see the module docstring).

    ``started``: ``time.perf_counter()`` when :func:`helpers.finetune.train` began; ``decided(calibration)``
    is called on every process once the steps are chosen (the main process's measurement wins).
    """

    def __init__(self, minutes: float, started: float, hardware: Hardware,
                 decided: Callable[[Calibration], None], calibration_steps: int = config.CALIBRATION_STEPS) -> None:
        self.minutes, self.started, self.hardware, self.decided = minutes, started, hardware, decided
        self.calibration_steps = calibration_steps
        self.began = self.step_began = self.step_ended = 0.0
        self.eval_seconds: float | None = None
        self.steps: list[float] = []
        self.calibrating = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_began = time.perf_counter()
        if self.eval_seconds is None:  # the evaluation on start ran before the first step
            self.eval_seconds = self.step_began - self.began

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.step_ended = time.perf_counter()
        if not self.calibrating:
            return
        self.steps.append(self.step_ended - self.step_began)
        if len(self.steps) >= self.calibration_steps and state.global_step < state.max_steps:
            control.should_save = True  # a checkpoint now: its cost is measured, and a kill after it resumes here

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not self.calibrating or len(self.steps) < self.calibration_steps:
            return
        self.calibrating = False
        now = time.perf_counter()
        measured = self.hardware.agree({
            "step": statistics.median(self.steps[1:] or self.steps),  # the first step warms kernels and caches
            "evaluation": self.eval_seconds or 0.0, "save": now - self.step_ended,
            "elapsed": now - self.started})
        remaining = self.minutes * 60 - measured["elapsed"]
        chosen = steps_within(remaining, state.global_step, state.max_steps, measured["step"], measured["evaluation"],
                              measured["save"], args.eval_steps or math.inf, args.save_steps or math.inf)
        calibration = Calibration(self.minutes, len(self.steps), measured["step"], measured["evaluation"],
                                  measured["save"], measured["elapsed"], chosen, chosen == state.max_steps,
                                  state.global_step)
        state.max_steps = chosen
        reshape_schedule(kwargs["lr_scheduler"], args, chosen)
        if chosen <= state.global_step:
            control.should_training_stop = True
        self.decided(calibration)


class EvaluateAtTheEnd(TrainerCallback):
    """One evaluation at the last step, wherever it falls, so every run card has its final eval loss."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
