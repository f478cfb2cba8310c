"""Error by segment: every model on the leaderboard, its MAE and bootstrap interval within each format, top-level
category, page-count band and price band of the test books, with the number of books in each."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from helpers import config
from helpers.evaluate import bootstrap_ci
from helpers.items import Item
from helpers.leaderboard import Leaderboard

PAGE_BANDS = (0, 150, 300, 500, math.inf)  # pages: short, medium, long, very long
SEGMENTS = ("format", "category", "pages", "price")


def _band(value: float, edges: Sequence[float], unit: str) -> str:
    if math.isnan(value):
        return "unknown"
    for low, high in zip(edges, edges[1:]):
        if low <= value < high:
            return f"{unit}{low:g}+" if math.isinf(high) else f"{unit}{low:g}-{high:g}"
    return "unknown"


def segment_of(item: Item) -> dict[str, str]:
    """The book's value for each segment: its format, top-level category, page band and price band."""
    return {"format": item.format, "category": item.category, "pages": _band(item.pages, PAGE_BANDS, ""),
            "price": _band(item.price, config.PRICE_BUCKETS, "$")}


def segment_errors(board: Leaderboard, items: Sequence[Item], models: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (segment, value, model): its books ``n``, MAE and bootstrap interval; ``models`` are leaderboard
    keys (default: every model scored on these books). The rows of one segment add up to the test books."""
    books = board.predictions_of(items)
    names = board.display_names()
    models = [key for key in (models or names) if key in books]
    labels = pd.DataFrame([segment_of(item) for item in items])
    rows = []
    for segment in SEGMENTS:
        for value, members in labels.groupby(segment).groups.items():
            index = np.asarray(members)
            for key in models:
                errors = np.abs(books[key].to_numpy()[index] - books["truth"].to_numpy()[index])
                errors = errors[~np.isnan(errors)]
                low, high = bootstrap_ci(errors) if len(errors) else (math.nan, math.nan)
                rows.append({"segment": segment, "value": value, "n": len(index), "model": names.get(key, key),
                             "key": key, "mae": errors.mean() if len(errors) else math.nan,
                             "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def summary(errors: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """A table to read: one row per segment value (with its book count), one column per model in ``models``
    (display names), each cell "MAE (low-high)" in dollars."""
    chosen = errors[errors["model"].isin(models)].copy()
    chosen["cell"] = [f"${mae:.2f} ({low:.0f}-{high:.0f})" if not math.isnan(mae) else "-"
                      for mae, low, high in zip(chosen["mae"], chosen["ci_low"], chosen["ci_high"])]
    table = chosen.pivot_table(index=["segment", "value", "n"], columns="model", values="cell", aggfunc="first",
                               sort=False)
    return table.reindex(columns=[model for model in models if model in table.columns]).reset_index()


def plot(errors: pd.DataFrame, models: Sequence[str], segment: str) -> Figure:
    """One segment's MAE per value, a bar per model with its bootstrap interval, the book count on each group."""
    chosen = errors[(errors["segment"] == segment) & errors["model"].isin(models)]
    values = list(dict.fromkeys(chosen.sort_values("n", ascending=False, kind="stable")["value"]))
    figure = Figure(figsize=(max(6.0, 1.1 * len(values) * max(1, len(models)) / 2), 4))
    axes = figure.subplots()
    width = 0.8 / max(1, len(models))
    for offset, model in enumerate(models):
        rows = chosen[chosen["model"] == model].set_index("value").reindex(values)
        x = np.arange(len(values)) + offset * width
        axes.bar(x, rows["mae"], width, label=model,
                 yerr=[rows["mae"] - rows["ci_low"], rows["ci_high"] - rows["mae"]], capsize=2)
    counts = chosen.drop_duplicates("value").set_index("value")["n"].reindex(values)
    axes.set_xticks(np.arange(len(values)) + 0.4 - width / 2,
                    [f"{value}\n(n={count})".replace("$", r"\$") for value, count in zip(values, counts)], fontsize=8)
    axes.set(ylabel="mean absolute error ($)", title=f"Error by {segment}, with 95% bootstrap intervals")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure
