"""The one harness every model in the course is judged by: metrics, charts, leaderboard.

A *predictor* prices books. Per item (``batched=False``) it is ``Item -> price``; batched
(``batched=True``) it is ``list[Item] -> sequence of prices``. Whatever it returns is checked:
an exception, ``None``, NaN/inf, a negative number or a non-number is a *failed prediction*,
recorded with its reason, and never stops the evaluation. Two exceptions to that rule stop it, with
their message and the fix: a *machine* failure (out of memory, a CUDA error), which says nothing
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
:data:`config.INTERVAL_LEVEL` interval and draws its calibration chart. The leaderboard compares
every model with the best classical baseline (or a reference you name) by a paired bootstrap on the same books.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from helpers import config
from helpers.config import Profile
from helpers.items import Item, prices
from helpers.storage import write_file_atomically

# --- how good is a guess -------------------------------------------------------------------
FAILURES_IN_SUMMARY = 3
METRIC_COLUMNS = ("n", "n_failed", "mae", "mae_ci_low", "mae_ci_high", "median_ae", "rmsle", "hit_rate", "coverage")
POINT = "point"  # the reading of a predictor that answers one price per book
OTHER_BOOKS = "other books"  # the leaderboard's mark for a row scored on another set of books than the latest

ItemPredictor = Callable[[Item], object]
BatchPredictor = Callable[[list[Item]], Sequence[object]]


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


def evaluate(name: str, predictor: ItemPredictor | BatchPredictor, items: list[Item], *,
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
        for item in tqdm(items, desc=name, leave=False):
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


# --- charts --------------------------------------------------------------------------------
def save_figure(figure: Figure, path: Path | None) -> Figure:
    """Write ``figure`` as a PNG to ``path`` (atomically; nothing when ``path`` is None); return it."""
    if path is not None:
        write_file_atomically(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    return figure


def _metrics_title(evaluation: Evaluation) -> str:
    m = evaluation.metrics
    failed = f", {m['n_failed']} failed" if m["n_failed"] else ""
    return (f"{evaluation.name}\nMAE ${m['mae']:.2f}, RMSLE {m['rmsle']:.2f}, "
            f"hits {m['hit_rate']:.0%} (n={m['n']}{failed})")


def plot_scatter(evaluation: Evaluation, path: Path | None = None) -> Figure:
    """Truth against prediction on log-log axes, coloured by error, with the perfect y = x line."""
    figure = Figure(figsize=(6, 6))
    axes = figure.subplots()
    ok = ~np.isnan(evaluation.predictions)
    colors = np.array(evaluation.colors)
    limits = (config.MIN_PRICE, config.MAX_PRICE + 1)
    shown = np.clip(evaluation.predictions[ok], *limits)  # a $0 guess sits on the edge, not off the chart
    axes.scatter(evaluation.truths[ok], shown, c=colors[ok], s=14, alpha=0.7)
    axes.plot(limits, limits, color="grey", linewidth=1, linestyle="--", label="perfect guess")
    axes.set(xscale="log", yscale="log", xlim=limits, ylim=limits, xlabel="true price ($)",
             ylabel="predicted price ($)", title=_metrics_title(evaluation))
    axes.legend(loc="upper left")
    figure.tight_layout()
    return save_figure(figure, path)


def bucket_labels() -> list[str]:
    """``["$0-10", "$10-20", ..., "$200+"]`` for :data:`config.PRICE_BUCKETS`."""
    edges = config.PRICE_BUCKETS
    return [f"${low}-{high}" if math.isfinite(high) else f"${low}+" for low, high in zip(edges, edges[1:])]


def plot_error_by_bucket(evaluation: Evaluation, path: Path | None = None) -> Figure:
    """Mean absolute error per true-price bucket (successful predictions), with item counts."""
    ok = ~np.isnan(evaluation.predictions)
    buckets = pd.cut(pd.Series(evaluation.truths[ok]), config.PRICE_BUCKETS, right=False, labels=bucket_labels())
    stats = pd.Series(evaluation.errors[ok]).groupby(buckets, observed=False).agg(["mean", "count"])
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    bars = axes.bar(stats.index.astype(str), stats["mean"].fillna(0), color="steelblue")
    axes.bar_label(bars, labels=[f"n={count}" for count in stats["count"]], padding=2)
    axes.set(xlabel="true price", ylabel="mean absolute error ($)", title=_metrics_title(evaluation))
    axes.margins(y=0.15)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_calibration(evaluation: Evaluation, path: Path | None = None) -> Figure:
    """Observed against nominal coverage of the predictor's central intervals; on the diagonal is calibrated."""
    if not evaluation.intervals:
        raise ValueError(f"{evaluation.name!r} gave no intervals: only a price distribution has a calibration.")
    table = evaluation.calibration()
    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--", label="calibrated")
    axes.plot(table["nominal"], table["observed"], marker="o", color="steelblue", label="observed")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="interval level (nominal coverage)",
             ylabel="share of true prices inside (observed)", title=f"{evaluation.name}\n(n={len(evaluation.truths)})")
    axes.legend(loc="upper left")
    figure.tight_layout()
    return save_figure(figure, path)


def chart_stem(name: str) -> str:
    """A file-name-safe form of a model name: ``"Bag of words + LR"`` -> ``"bag-of-words-lr"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


def save_charts(evaluation: Evaluation, profile: Profile) -> dict[str, Path]:
    """Save the charts as PNGs under ``results/<profile>/charts`` (calibration when there are intervals);
    return their paths by kind."""
    folder = profile.results_dir / "charts"
    stem = chart_stem(evaluation.name)
    paths = {"scatter": folder / f"{stem}-scatter.png", "error_by_bucket": folder / f"{stem}-error-by-bucket.png"}
    plot_scatter(evaluation, paths["scatter"])
    plot_error_by_bucket(evaluation, paths["error_by_bucket"])
    if evaluation.intervals:
        paths["calibration"] = folder / f"{stem}-calibration.png"
        plot_calibration(evaluation, paths["calibration"])
    return paths


# --- the leaderboard -----------------------------------------------------------------------
class Leaderboard:
    """Every model's metrics in one CSV, one row per model *key* (a re-run replaces its row), and every model's
    per-book predictions on the latest set of books in a second CSV next to it (``<stem>-predictions.csv``, one
    column per key) for paired comparisons.

    A key says which model a row is (an adapter folder, a hub id); it defaults to the display name, so two
    models of one name (two runs of the same rank, say) keep two rows only when recorded with their own keys.
    Wherever a model is asked for, its key or its name (when only one row has it) will do.

    The reference of the paired comparison is the best *classical baseline* on the latest books: the
    lowest-MAE row recorded with ``train_items`` (notebook 02 records every baseline so), unless a
    ``reference`` is named. Recording a different set of books starts the predictions afresh: the rows
    scored on the old books keep their metrics, but ``latest_books`` is False and they are compared with
    nothing until they are evaluated again.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.predictions_path = self.path.with_name(f"{self.path.stem}-predictions.csv")

    def _rows(self) -> pd.DataFrame:
        if not self.path.exists():
            return pd.DataFrame(columns=["name", "key", *METRIC_COLUMNS, "reading"])
        rows = pd.read_csv(self.path, dtype={"name": str, "key": str})
        if "key" not in rows:  # written before rows had keys: each name was its own key
            rows.insert(1, "key", rows["name"])
        rows["key"] = rows["key"].fillna(rows["name"])
        return rows

    def predictions(self) -> pd.DataFrame:
        """One row per book: ``truth``, then one column of predictions per model key (NaN where it failed)."""
        return pd.read_csv(self.predictions_path) if self.predictions_path.exists() else pd.DataFrame()

    def record(self, evaluation: Evaluation, key: str | os.PathLike | None = None, **extra: object) -> None:
        """Write ``evaluation``'s metrics, reading (and ``extra`` columns) under ``key`` (default: its name),
        replacing any row of the same key, and its per-book predictions (a different set of books starts the
        predictions file afresh)."""
        key = evaluation.name if key is None else str(key)
        if key == "truth":
            raise ValueError("'truth' is the predictions file's column of true prices: record this model under "
                             "another key (record(evaluation, key=...)).")
        new = pd.DataFrame([{"name": evaluation.name, "key": key, **evaluation.metrics, "reading": evaluation.reading,
                             **extra}])
        kept = self._rows()
        kept = kept[kept["key"] != key]
        rows = pd.concat([kept, new], ignore_index=True) if len(kept) else new
        books = self.predictions()
        if "truth" not in books or not np.array_equal(books["truth"].to_numpy(), evaluation.truths):
            books = pd.DataFrame({"truth": evaluation.truths})
        books[key] = evaluation.predictions
        write_file_atomically(self.predictions_path, lambda tmp: books.to_csv(tmp, index=False))
        write_file_atomically(self.path, lambda tmp: rows.to_csv(tmp, index=False))

    def _key(self, rows: pd.DataFrame, model: str) -> str | None:
        """The key of ``model``, given as a key or as a name only one row has; None when no row matches."""
        if (rows["key"] == model).any():
            return model
        keys = rows.loc[rows["name"] == model, "key"].tolist()
        if len(keys) > 1:
            raise ValueError(f"{len(keys)} rows of {self.path} are named {model!r}: name one by its key "
                             f"({', '.join(sorted(keys))}).")
        return keys[0] if keys else None

    def reference(self) -> str | None:
        """The key of the best classical baseline on the latest books (lowest MAE among rows with
        ``train_items``), or None."""
        rows = self._rows()
        if "train_items" not in rows:
            return None
        baselines = rows[rows["train_items"].notna() & rows["key"].isin(self.predictions().columns)]
        baselines = baselines.dropna(subset=["mae"]).sort_values("mae", kind="stable")
        return None if baselines.empty else str(baselines["key"].iloc[0])

    @staticmethod
    def _paired(books: pd.DataFrame, key: str, reference: str) -> tuple[float, float, float]:
        if key not in books or reference not in books:
            return math.nan, math.nan, math.nan
        truths = books["truth"].to_numpy()
        difference = (np.abs(books[key].to_numpy() - truths) - np.abs(books[reference].to_numpy() - truths))
        difference = difference[~np.isnan(difference)]
        if not len(difference):
            return math.nan, math.nan, math.nan
        return (float(difference.mean()), *bootstrap_ci(difference))

    def paired(self, name: str, reference: str) -> tuple[float, float, float]:
        """MAE of ``name`` minus MAE of ``reference`` (keys, or names) on the books both priced, and its
        paired-bootstrap CI (negative: ``name`` errs less); NaNs when either has no predictions on these books."""
        rows = self._rows()
        key, reference = self._key(rows, name), self._key(rows, reference)
        if key is None or reference is None:
            return math.nan, math.nan, math.nan
        return self._paired(self.predictions(), key, reference)

    def table(self, reference: str | None = None) -> pd.DataFrame:
        """All rows, best (lowest) MAE first, with each row's paired MAE difference against ``reference`` (a key
        or a name; default :meth:`reference`): ``vs_reference`` (its key), ``diff``, ``diff_ci_low``,
        ``diff_ci_high``; and ``latest_books``, False for a row scored on other books than the latest."""
        rows = self._rows().sort_values("mae", kind="stable").reset_index(drop=True)
        rows = rows.reindex(columns=list(dict.fromkeys(["name", "key", *METRIC_COLUMNS, "reading", *rows.columns])))
        rows["reading"] = rows["reading"].fillna(POINT)
        versus = self.reference() if reference is None else self._key(rows, reference)
        if reference is not None and versus is None:
            raise ValueError(f"No model named or keyed {reference!r} in {self.path} to compare with: record it "
                             f"first, or pick one of {', '.join(rows['key'])}.")
        books = self.predictions()
        rows["latest_books"] = rows["key"].isin(books.columns)
        rows["vs_reference"] = versus
        paired = [self._paired(books, key, versus) if versus else (math.nan,) * 3 for key in rows["key"]]
        columns = ["diff", "diff_ci_low", "diff_ci_high"]
        rows[columns] = pd.DataFrame(paired, index=rows.index, columns=columns, dtype=float)
        return rows

    @staticmethod
    def labels(table: pd.DataFrame) -> pd.Series:
        """Each row's display name, with its key added where names repeat: ``"QLoRA r=8 [runs/a/adapter]"``."""
        repeated = table["name"].duplicated(keep=False)
        return table["name"].where(~repeated, table["name"] + " [" + table["key"] + "]")

    def markdown(self, reference: str | None = None) -> str:
        """The table as Markdown, best first: MAE with its interval, the paired difference against ``reference``
        (default: the best classical baseline), median error, RMSLE, hit rate, interval coverage, the reading,
        failures; a note under it when some rows were scored on other books."""
        table = self.table(reference)
        labels = self.labels(table)
        reference = table["vs_reference"].iloc[0] if len(table) else None
        versus = (f"vs {labels[table['key'] == reference].iloc[0]} ({config.CONFIDENCE:.0%} CI)" if reference
                  else "vs best baseline")
        lines = [f"| model | MAE ($) | {config.CONFIDENCE:.0%} CI ($) | {versus} ($) | median AE ($) | RMSLE | "
                 f"hit rate | {config.INTERVAL_LEVEL:.0%} interval coverage | reading | failed |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for label, row in zip(labels, table.itertuples()):
            paired = ("reference" if row.key == reference else OTHER_BOOKS if not row.latest_books else
                      "-" if math.isnan(row.diff) else
                      f"{row.diff:+.2f} ({row.diff_ci_low:+.2f} to {row.diff_ci_high:+.2f})")
            coverage = "-" if math.isnan(row.coverage) else f"{row.coverage:.0%}"
            lines.append(f"| {label} | {row.mae:.2f} | {row.mae_ci_low:.2f}-{row.mae_ci_high:.2f} | {paired} | "
                         f"{row.median_ae:.2f} | {row.rmsle:.2f} | {row.hit_rate:.0%} | {coverage} | {row.reading} | "
                         f"{row.n_failed} of {row.n} |")
        if not table["latest_books"].all():
            lines += ["", f"Rows marked *{OTHER_BOOKS}* were scored on another set of books than the latest: their "
                          "MAE is not comparable with the others', and they are compared with nothing until "
                          "evaluated again."]
        return "\n".join(lines)

    def plot(self, path: Path | None = None) -> Figure:
        """Horizontal bars of MAE with their bootstrap intervals, best model on top."""
        table = self.table().dropna(subset=["mae"])
        if table.empty:
            raise ValueError(f"No scored models in {self.path} yet: record an evaluation first.")
        figure = Figure(figsize=(8, 0.5 * len(table) + 1.5))
        axes = figure.subplots()
        spread = [table["mae"] - table["mae_ci_low"], table["mae_ci_high"] - table["mae"]]
        axes.barh(self.labels(table), table["mae"], xerr=spread, color="steelblue", capsize=3)
        axes.invert_yaxis()
        axes.set(xlabel=f"mean absolute error ($), with {config.CONFIDENCE:.0%} bootstrap interval",
                 title=f"Leaderboard ({int(table['n'].max())} test books)")
        figure.tight_layout()
        return save_figure(figure, path)


def leaderboard(profile: Profile) -> Leaderboard:
    """The profile's leaderboard: ``results/<profile>/leaderboard.csv``."""
    return Leaderboard(profile.results_dir / "leaderboard.csv")


def eval_items(test: list[Item], profile: Profile) -> list[Item]:
    """The fixed subset every model is scored on: the first ``profile.eval_size`` test items.

    The test split is already shuffled with config.SEED, so the head is a fair sample.
    """
    if not test:
        raise ValueError("The test split is empty: curate the data first (python -m helpers.curate).")
    return test[: profile.eval_size]


def main() -> None:
    """Print a profile's leaderboard as Markdown: ``python -m helpers.evaluate [--profile P] [--reference M]``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default=None,
                        help=f"default: ${config.PROFILE_ENV} or smoke")
    parser.add_argument("--reference", default=None,
                        help="the model (key or name) every row is compared with; default: the best classical baseline")
    arguments = parser.parse_args()
    board = leaderboard(config.get_profile(arguments.profile))
    if not board.path.exists():
        raise SystemExit(f"No leaderboard at {board.path}: run the notebooks first (make smoke).")
    print(board.markdown(arguments.reference))


if __name__ == "__main__":
    main()
