"""The harness's charts: truth against prediction, error by price bucket, calibration; and saving any figure.

Every chart is a matplotlib ``Figure`` (no pyplot state), returned and, given a path, saved as a PNG.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

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
    return (f"{evaluation.name}\nMAE \\${m['mae']:.2f}, RMSLE {m['rmsle']:.2f}, "
            f"hits {m['hit_rate']:.0%} (n={m['n']}{failed})")


def dollars(value: float) -> str:
    """``"\\$12"``: a price for a matplotlib label, its ``$`` escaped (two unescaped ``$`` start mathtext)."""
    return rf"\${value:,.0f}" if value >= 1 else rf"\${value:.2g}"


def price_limits(*prices: np.ndarray | float, margin: float = 1.4) -> tuple[float, float]:
    """Log-axis limits around ``prices`` (NaNs ignored): from the lowest / ``margin`` to the highest x ``margin``,
    within the prices a model can answer."""
    values = np.concatenate([np.atleast_1d(np.asarray(price, dtype=float)) for price in prices])
    values = values[np.isfinite(values)]
    low, high = (values.min(), values.max()) if len(values) else (config.MIN_PRICE, config.MAX_PRICE)
    return max(low / margin, config.MIN_PRICE), min(high * margin, config.MAX_PRICE + 1)


def dollar_axis(axis: Axis) -> None:
    """Label a log price axis in dollars ("$5", "$20", "$100"): every decade, and 2 and 5 times it when the
    axis spans less than two decades."""
    low, high = axis.get_view_interval()
    few = high / max(low, 1e-9) < 100

    def minor(value: float, _position: int) -> str:
        return dollars(value) if few and f"{value:.0e}"[0] in "25" else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _position: dollars(value)))
    axis.set_minor_formatter(FuncFormatter(minor))


def plot_scatter(evaluation: Evaluation, path: Path | None = None) -> Figure:
    """Truth against prediction on log-log axes fitted to the books, coloured by how far off each guess is
    (legend: the colour's rule and count), with the perfect y = x line."""
    figure = Figure(figsize=(6, 6))
    axes = figure.subplots()
    ok = ~np.isnan(evaluation.predictions)
    colors = np.array(evaluation.colors)
    limits = price_limits(evaluation.truths, evaluation.predictions[ok])
    shown = np.clip(evaluation.predictions[ok], *limits)  # a $0 guess sits on the edge, not off the chart
    axes.scatter(evaluation.truths[ok], shown, c=colors[ok], s=18, alpha=0.7)
    axes.plot(limits, limits, color="grey", linewidth=1, linestyle="--")
    rules = {"green": f"hit: off by < {dollars(config.GREEN_DOLLARS)} or < {config.GREEN_FRACTION:.0%}",
             "orange": f"close: < {dollars(config.ORANGE_DOLLARS)} or < {config.ORANGE_FRACTION:.0%}",
             "red": "far off"}
    handles = [Line2D([], [], color="grey", linestyle="--", label="perfect guess")]
    handles += [Line2D([], [], marker="o", linestyle="", color=color, label=f"{rule} ({(colors[ok] == color).sum()})")
                for color, rule in rules.items()]
    axes.set(xscale="log", yscale="log", xlim=limits, ylim=limits, xlabel="true price", ylabel="predicted price",
             title=_metrics_title(evaluation))
    dollar_axis(axes.xaxis)
    dollar_axis(axes.yaxis)
    axes.legend(handles=handles, loc="upper left", fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def bucket_labels() -> list[str]:
    """``["\\$0-10", "\\$10-20", ..., "\\$200+"]`` for :data:`config.PRICE_BUCKETS` (``$`` escaped for matplotlib)."""
    edges = config.PRICE_BUCKETS
    return [rf"\${low}-{high}" if math.isfinite(high) else rf"\${low}+" for low, high in zip(edges, edges[1:])]


def plot_error_by_bucket(evaluation: Evaluation, path: Path | None = None) -> Figure:
    """Mean absolute error per true-price bucket holding test books (successful predictions), with book counts."""
    ok = ~np.isnan(evaluation.predictions)
    buckets = pd.cut(pd.Series(evaluation.truths[ok]), config.PRICE_BUCKETS, right=False, labels=bucket_labels())
    stats = pd.Series(evaluation.errors[ok]).groupby(buckets, observed=True).agg(["mean", "count"])  # books' buckets
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
