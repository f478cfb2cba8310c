"""The one harness every model in the course is judged by: its metrics, checked answers and failures.

A *predictor* prices books. Per item (``batched=False``) it is ``Item -> price``; batched
(``batched=True``) it is a :class:`helpers.pricing.Predictor`, ``list[Item] -> sequence of prices``.
Whatever it returns is checked: an exception, ``None``, NaN/inf, a negative number or a non-number is
a *failed prediction*, recorded with its reason, and never stops the evaluation. Two exceptions to that
rule stop it, with their message and the fix: a *machine* failure (out of memory, a CUDA error), which says nothing
about the model's answers (:func:`is_machine_failure`); and a predictor that raised on *every*
book, which priced nothing: that is a bug in the predictor (say, inputs on another device than the
model), not a score to put on the leaderboard.

Metrics are computed over the successful predictions only; failures are reported
separately (``n_failed`` and :attr:`Evaluation.failures`). The one exception is
``hit_rate``: greens divided by *all* items, so a failure counts as a miss and a model
cannot raise its hit rate by refusing the hard books.

A batched predictor may return a price *distribution* per book (any sequence of prices that also
has ``reading``, the name of the point reading it holds, and ``interval(level) -> (low, high)``,
like :class:`helpers.predict.PriceDistributions`): the harness then scores the coverage of its
:data:`config.INTERVAL_LEVEL` interval. The charts are in :mod:`helpers.charts`; the leaderboard, which
compares the models by a paired bootstrap, in :mod:`helpers.leaderboard`.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from helpers import config
from helpers.items import Item, prices
from helpers.pricing import POINT, Predictor

# --- how good is a guess -------------------------------------------------------------------
FAILURES_IN_SUMMARY = 3
METRIC_COLUMNS = ("n", "n_failed", "mae", "mae_ci_low", "mae_ci_high", "median_ae", "rmsle", "hit_rate", "coverage")
ItemPredictor = Callable[[Item], object]  # a predictor called per book (batched=False)


def as_price(value: object) -> tuple[float | None, str | None]:
    """``(price, None)`` for a usable prediction, else ``(None, reason)``; never raises."""
    if value is None:
        return None, "returned None"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, f"returned {type(value).__name__} {value!r:.40}, not a number"
    price = float(value)
    if not math.isfinite(price):
        return None, f"returned {price}"
    if price < 0:
        return None, f"returned a negative price ({price:g})"
    return price, None


def _describe_error(error: Exception) -> str:
    return f"raised {type(error).__name__}: {error}"


# How the CUDA runtime and its libraries word their failures (case-sensitive: "cuda:0" in a message about
# tensors on two devices is a bug in the code, not a failing machine).
MACHINE_MESSAGES = ("CUDA error:", "CUDA out of memory", "CUBLAS_STATUS_", "cuDNN error:")


def is_machine_failure(error: BaseException) -> bool:
    """True for out of memory and accelerator runtime errors: the machine failed, not the model's answer.

    That is a ``MemoryError``, a ``torch.OutOfMemoryError`` or ``torch.AcceleratorError``, or a
    ``RuntimeError`` holding one of :data:`MACHINE_MESSAGES`.
    """
    torch = sys.modules.get("torch")  # a torch error needs torch loaded; the classical baselines never load it
    torch_errors = tuple(getattr(torch, name) for name in ("OutOfMemoryError", "AcceleratorError")
                         if hasattr(torch, name))  # AcceleratorError is new in torch 2.8; Colab keeps its own torch
    return (isinstance(error, (MemoryError, *torch_errors))
            or isinstance(error, RuntimeError) and any(message in str(error) for message in MACHINE_MESSAGES))


def _stop_on_machine_failure(name: str, error: Exception) -> None:
    """Re-raise ``error`` (as a RuntimeError naming the fix) when it is a machine failure; else return."""
    if is_machine_failure(error):
        raise RuntimeError(f"Evaluating {name!r} stopped: {type(error).__name__}: {error}\nFix: lower the "
                           "profile's predict_batch_size (get_profile(..., predict_batch_size=...)) or free "
                           "the accelerator's memory, then run the evaluation again.") from error


@dataclass(frozen=True)
class Evaluation:
    """One model's predictions on a list of items (NaN where a prediction failed); not changed once made."""

    name: str
    truths: np.ndarray
    predictions: np.ndarray
    failures: list[tuple[int, str]]
    reading: str = POINT  # which reading of a distribution the predictions are, else "point"
    intervals: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # level -> (low, high)

    @property
    def errors(self) -> np.ndarray:
        """Absolute error per item in dollars (NaN where the prediction failed)."""
        return np.abs(self.predictions - self.truths)

    @property
    def colors(self) -> list[str]:
        """``"green"``, ``"orange"`` or ``"red"`` per item; a failed prediction is red."""
        errors, truths = self.errors, self.truths
        with np.errstate(invalid="ignore"):  # NaN compares False: failures fall through to red
            green = (errors < config.GREEN_DOLLARS) | (errors < config.GREEN_FRACTION * truths)
            orange = (errors < config.ORANGE_DOLLARS) | (errors < config.ORANGE_FRACTION * truths)
        return np.where(green, "green", np.where(orange, "orange", "red")).tolist()

    def coverage(self, level: float = config.INTERVAL_LEVEL) -> float:
        """The share of books whose true price lies inside their ``level`` interval (NaN without intervals)."""
        if level not in self.intervals:
            return math.nan
        low, high = self.intervals[level]
        return float(np.mean((low <= self.truths) & (self.truths <= high)))

    def calibration(self) -> pd.DataFrame:
        """Nominal against observed coverage for every interval level the predictor gave."""
        levels = sorted(self.intervals)
        return pd.DataFrame({"nominal": levels, "observed": [self.coverage(level) for level in levels]})

    @cached_property
    def metrics(self) -> dict[str, float | int]:
        """n, n_failed, MAE with its bootstrap CI, median AE, RMSLE (successes only), hit rate (all items),
        coverage of the :data:`config.INTERVAL_LEVEL` interval (NaN without intervals)."""
        ok = ~np.isnan(self.predictions)
        errors, truths, predictions = self.errors[ok], self.truths[ok], self.predictions[ok]
        n = len(self.truths)
        values: dict[str, float | int] = {
            "n": n, "n_failed": n - int(ok.sum()), "hit_rate": self.colors.count("green") / n if n else math.nan,
            "coverage": self.coverage(),
        }
        if ok.any():
            values["mae_ci_low"], values["mae_ci_high"] = bootstrap_ci(errors)
            values["mae"] = float(errors.mean())
            values["median_ae"] = float(np.median(errors))
            values["rmsle"] = float(np.sqrt(np.mean((np.log1p(predictions) - np.log1p(truths)) ** 2)))
        return {column: values.get(column, math.nan) for column in METRIC_COLUMNS}

    def summary(self) -> str:
        """One line: the headline metrics, the failure count and the first few reasons."""
        m = self.metrics
        line = (f"{self.name}: MAE ${m['mae']:.2f} "
                f"({config.CONFIDENCE:.0%} CI ${m['mae_ci_low']:.2f}-${m['mae_ci_high']:.2f}), "
                f"median AE ${m['median_ae']:.2f}, RMSLE {m['rmsle']:.3f}, hits {m['hit_rate']:.0%} "
                f"on {m['n']} items, {m['n_failed']} failed")
        if self.reading != POINT:
            line += f"; {self.reading} reading, {config.INTERVAL_LEVEL:.0%} interval covers {m['coverage']:.0%}"
        if self.failures:
            shown = "; ".join(f"#{index} {reason}" for index, reason in self.failures[:FAILURES_IN_SUMMARY])
            more = " ..." if len(self.failures) > FAILURES_IN_SUMMARY else ""
            line += f" ({shown}{more})"
        return line


def bootstrap_ci(values: np.ndarray) -> tuple[float, float]:
    """Percentile-bootstrap interval (:data:`config.CONFIDENCE`) of the mean of ``values``, seeded with config.SEED.

    Given per-book differences of two models' absolute errors, it is the *paired* bootstrap of the
    MAE difference: each resample keeps both models' answers on the same books together.
    """
    rng = np.random.default_rng(config.SEED)
    resamples = rng.integers(0, len(values), size=(config.BOOTSTRAP_RESAMPLES, len(values)))
    means = values[resamples].mean(axis=1)
    tail = (1 - config.CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def evaluate(name: str, predictor: ItemPredictor | Predictor, items: list[Item], *,
             batched: bool = False) -> Evaluation:
    """Price ``items`` with ``predictor`` and keep every answer, good or failed.

    Bad outputs never stop the run. Three things raise, each a fault to fix rather than a bad guess: a
    batched predictor that returns the wrong number of prices (``ValueError``); a machine failure such as
    out of memory, and a predictor that raised on every book (``RuntimeError``, the original error as
    its cause).
    """
    outputs: list[tuple[object, str | None]]  # (value, reason it failed before returning)
    first_error: Exception | None = None  # only the first: a traceback holds its frames' tensors
    raised = 0
    reading, intervals = POINT, {}
    if batched:
        try:
            values = predictor(list(items))
        except Exception as error:  # any failure of the model is a result to report, unless the machine failed
            _stop_on_machine_failure(name, error)
            first_error, raised = first_error or error, raised + 1
            outputs = [(None, _describe_error(error))] * len(items)
        else:
            count = len(values) if hasattr(values, "__len__") else None
            if count != len(items):
                got = f"{count} predictions" if count is not None else f"a {type(values).__name__}"
                label = getattr(predictor, "__name__", type(predictor).__name__)
                raise ValueError(f"Batched predictor {label} of {name!r} returned {got} for {len(items)} "
                                 f"items: it must return one price per item.")
            outputs = [(value, None) for value in values]
            if callable(getattr(values, "interval", None)):  # a distribution: its reading and intervals
                reading = str(values.reading)
                intervals = {level: tuple(np.asarray(bound, dtype=float) for bound in values.interval(level))
                             for level in sorted({config.INTERVAL_LEVEL, *config.CALIBRATION_LEVELS})}
    else:
        outputs = []
        for item in tqdm(items, desc=name, leave=False, disable=config.progress_bars_off()):
            try:
                outputs.append((predictor(item), None))
            except Exception as error:  # any failure of the model is a result to report, unless the machine failed
                _stop_on_machine_failure(name, error)
                first_error, raised = first_error or error, raised + 1
                outputs.append((None, _describe_error(error)))
    if first_error is not None and raised == (1 if batched else len(items)):
        raise RuntimeError(f"Evaluating {name!r} stopped: every prediction raised; the first "
                           f"{_describe_error(first_error)}\nFix: that is a bug in the predictor or its model, not a "
                           "bad guess; fix it (the traceback above shows where), then evaluate again.") from first_error
    predictions = np.full(len(items), np.nan)
    failures = []
    for index, (value, reason) in enumerate(outputs):
        price, problem = as_price(value) if reason is None else (None, reason)
        if price is None:
            failures.append((index, problem))
        else:
            predictions[index] = price
    return Evaluation(name=name, truths=prices(items), predictions=predictions, failures=failures,
                      reading=reading, intervals=intervals)
