"""Calibrated price intervals: split-conformal calibration of an LLM's own quantiles (conformalized quantile
regression, MAPIE's ``ConformalizedQuantileRegressor`` on prefit "regressors" that read the model's quantiles).

The model reads each book's whole price distribution, so its 80% interval is its 10% and 90% quantiles. Whether
80% of true prices land inside is an empirical question; conformal calibration widens (or narrows) the interval
by the amount that made it hold on books the model neither trained on nor is scored on (the held-out books,
:func:`helpers.dataset.held_out_items`). It works on log prices: a book's interval is stretched by a factor,
not by a fixed number of dollars, which suits prices from $1 to $999.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from mapie.regression import ConformalizedQuantileRegressor
from matplotlib.figure import Figure
from sklearn.base import BaseEstimator, RegressorMixin

from helpers.charts import dollars
from helpers.dataset import check_unseen
from helpers.evaluate import Evaluation
from helpers.items import Item

LEVELS = (0.5, 0.8, 0.9)  # the interval levels calibrated and reported


def min_books(level: float) -> int:
    """The fewest held-out books that can calibrate a ``level`` interval (MAPIE's rule for one correction)."""
    return int(np.ceil(max(1 / level, 1 / (1 - level)) - 1e-9))


class QuantileColumn(RegressorMixin, BaseEstimator):
    """A "fitted regressor" whose prediction is one column of its input: the LLM's own quantile of each book,
    handed to MAPIE as if a quantile regressor had predicted it."""

    def __init__(self, column: int = 0) -> None:
        self.column = column

    def fit(self, features: np.ndarray, target: np.ndarray | None = None) -> QuantileColumn:
        self.n_features_in_ = np.asarray(features).shape[1]
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=float)[:, self.column]


def _features(evaluation: Evaluation, level: float) -> np.ndarray:
    """Per book, log of the ``level`` interval's bounds and of the median: what the three "regressors" read."""
    low, high = evaluation.intervals[level]
    return np.log(np.column_stack([low, high, evaluation.predictions]))


class ConformalIntervals:
    """The model's intervals at each of ``levels``, conformalized on held-out books."""

    def __init__(self, levels: Sequence[float] = LEVELS) -> None:
        self.levels = tuple(levels)
        self.calibrators: dict[float, ConformalizedQuantileRegressor] = {}
        self.books = 0

    def fit(self, held_out: Evaluation, held_out_items: Sequence[Item], scored_items: Sequence[Item]
            ) -> ConformalIntervals:
        """Calibrate on ``held_out`` (the model's reading of ``held_out_items``); refuses a scored book."""
        check_unseen(held_out_items, scored_items, "The interval calibration")
        if held_out.reading != "median" or not held_out.intervals:
            raise ValueError(f"{held_out.name} gives no price distribution (reading {held_out.reading!r}): only a "
                             "model whose whole distribution is read has intervals to calibrate.")
        answered = ~np.isnan(held_out.predictions)
        for level in [level for level in self.levels if answered.sum() >= min_books(level)]:
            estimators = [QuantileColumn(column).fit(_features(held_out, level)) for column in range(3)]
            calibrator = ConformalizedQuantileRegressor(estimators, confidence_level=level, prefit=True)
            self.calibrators[level] = calibrator.conformalize(_features(held_out, level)[answered],
                                                              np.log(held_out.truths[answered]))
        self.books = int(answered.sum())
        return self

    def intervals(self, evaluation: Evaluation) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        """The calibrated (low, high) per level for the books of ``evaluation``, in dollars."""
        calibrated = {}
        for level, calibrator in self.calibrators.items():
            # one correction for both bounds, as in Romano et al.'s CQR (it needs half the books of two corrections)
            _, bounds = calibrator.predict_interval(_features(evaluation, level), allow_infinite_bounds=True,
                                                    symmetric_correction=True)
            calibrated[level] = (np.exp(bounds[:, 0, 0]), np.exp(bounds[:, 1, 0]))
        return calibrated

    def table(self, evaluation: Evaluation) -> pd.DataFrame:
        """Per level: nominal coverage, observed coverage and mean width on the scored books, raw and calibrated."""
        calibrated = self.intervals(evaluation)
        rows = []
        nothing = (np.full(len(evaluation.truths), np.nan),) * 2  # a level with too few books to calibrate
        for level in self.levels:
            row = {"nominal": level}
            for kind, (low, high) in (("raw", evaluation.intervals[level]),
                                      ("calibrated", calibrated.get(level, nothing))):
                row[f"observed, {kind}"] = float(np.mean((low <= evaluation.truths) & (evaluation.truths <= high)))
                row[f"mean width, {kind} ($)"] = float(np.mean(high - low))
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, table: pd.DataFrame, name: str, books: int) -> Figure:
        """Nominal against observed coverage, raw and calibrated, each point labelled with its mean width."""
        figure = Figure(figsize=(5.5, 4.5))
        axes = figure.subplots()
        axes.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfectly calibrated")
        for kind, color, marker in (("raw", "darkorange", "o"), ("calibrated", "steelblue", "s")):
            axes.plot(table["nominal"], table[f"observed, {kind}"], marker=marker, color=color,
                      label=f"{kind} (calibrated on {self.books} held-out books)" if kind == "calibrated" else kind)
            for nominal, observed, width in zip(table["nominal"], table[f"observed, {kind}"],
                                                table[f"mean width, {kind} ($)"]):
                axes.annotate(f"{dollars(width)} wide", (nominal, observed), textcoords="offset points",
                              xytext=(6, -10 if kind == "raw" else 6), fontsize=7, color=color)
        axes.set(xlim=(0.4, 1), ylim=(0, 1.1), xlabel="nominal coverage (the interval's level)",
                 ylabel=f"observed coverage on {books} test books", title=f"Interval calibration\n{name}")
        axes.legend(fontsize=8, loc="lower right")
        figure.tight_layout()
        return figure


def table_markdown(table: pd.DataFrame) -> str:
    """The calibration table for a page: percentages and dollars."""
    lines = ["| level | observed, raw | observed, calibrated | mean width, raw | mean width, calibrated |",
             "|---|---|---|---|---|"]
    def money(value: float) -> str:
        if np.isnan(value):
            return "too few held-out books"
        return f"${value:,.2f}" if np.isfinite(value) else "unbounded"

    def share(value: float) -> str:
        return "-" if np.isnan(value) else f"{value:.0%}"

    for row in table.itertuples(index=False):
        lines.append(f"| {row[0]:.0%} | {share(row[1])} | {share(row[3])} | {money(row[2])} | {money(row[4])} |")
    return "\n".join(lines)
