"""The harness's charts: truth against prediction, error by price bucket, calibration; and saving any figure.

Every chart is a matplotlib ``Figure`` (no pyplot state), returned and, given a path, saved as a PNG.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from helpers import config
from helpers.config import Profile
from helpers.evaluate import Evaluation
from helpers.storage import write_file_atomically


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
