"""The leaderboard: every model's metrics and per-book predictions on disk, compared by a paired bootstrap.

    python -m helpers.leaderboard [--profile P] [--reference M]

prints a profile's leaderboard as Markdown. Every model is compared with the best classical baseline (or a
reference you name) on the same books.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from helpers import config
from helpers.charts import save_figure
from helpers.config import Profile
from helpers.evaluate import METRIC_COLUMNS, Evaluation, bootstrap_ci
from helpers.items import Item
from helpers.pricing import POINT
from helpers.storage import write_file_atomically

OTHER_BOOKS = "other books"  # the mark for a row scored on another set of books than the latest
OUTLIER_FACTOR = 3  # a model this many times the median MAE has its bar cut, so the close ones can be told apart


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

    def predictions_of(self, items: Sequence[Item], fix: str = "score the models on them first") -> pd.DataFrame:
        """:meth:`predictions`, row i being ``items[i]``: a ValueError naming ``fix`` when the latest books are
        not these."""
        books = self.predictions()
        if len(books) != len(items) or not np.allclose(books["truth"], [item.price for item in items]):
            raise ValueError(f"The latest books of {self.predictions_path} are not these {len(items)} books: {fix}.")
        return books

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

    def display_names(self) -> dict[str, str]:
        """Each model's key and its display name (:meth:`labels`), best (lowest) MAE first, as :meth:`table` orders
        them."""
        rows = self._rows().sort_values("mae", kind="stable")
        return dict(zip(rows["key"], self.labels(rows)))

    @staticmethod
    def labels(table: pd.DataFrame) -> pd.Series:
        """Each row's display name, with its key added where names repeat: ``"QLoRA r=8 [runs/a/adapter]"``."""
        repeated = table["name"].duplicated(keep=False)
        return table["name"].where(~repeated, table["name"] + " [" + table["key"] + "]")

    def summary(self, reference: str | None = None) -> pd.DataFrame:
        """The table a learner reads, best first, one string per cell: the model, its MAE and bootstrap interval,
        the paired difference against ``reference`` (default: the best classical baseline), the median error, the
        hit rate, the interval coverage and the reading (with failures). The CSV keeps every column."""
        table = self.table(reference)
        reference = table["vs_reference"].iloc[0] if len(table) else None

        def versus(row) -> str:
            if row.key == reference:
                return "reference"
            if not row.latest_books:
                return OTHER_BOOKS
            if math.isnan(row.diff):
                return "-"
            return f"{row.diff:+.2f} ({row.diff_ci_low:+.2f} to {row.diff_ci_high:+.2f})"

        def reading(row) -> str:
            return f"{row.reading}, {row.n_failed} of {row.n} failed" if row.n_failed else row.reading

        return pd.DataFrame({
            "model": self.labels(table),
            "MAE": [f"${mae:.2f}" for mae in table["mae"]],
            f"{config.CONFIDENCE:.0%} CI": [f"${low:.2f}-{high:.2f}" for low, high in
                                             zip(table["mae_ci_low"], table["mae_ci_high"])],
            "vs reference ($)": [versus(row) for row in table.itertuples()],
            "median error": [f"${error:.2f}" for error in table["median_ae"]],
            "hit rate": [f"{rate:.0%}" for rate in table["hit_rate"]],
            f"{config.INTERVAL_LEVEL:.0%} covered": ["-" if math.isnan(c) else f"{c:.0%}" for c in table["coverage"]],
            "reading": [reading(row) for row in table.itertuples()],
        })

    def reference_label(self, reference: str | None = None) -> str | None:
        """The display name of the model every row of :meth:`summary` is compared with, or None."""
        table = self.table(reference)
        if not len(table) or not isinstance(table["vs_reference"].iloc[0], str):
            return None
        return str(self.labels(table)[table["key"] == table["vs_reference"].iloc[0]].iloc[0])

    def markdown(self, reference: str | None = None) -> str:
        """:meth:`summary` as Markdown, with the reference named under it, and a note when some rows were scored
        on other books."""
        summary = self.summary(reference)
        lines = ["| " + " | ".join(summary.columns) + " |", "|" + "---|" * len(summary.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in summary.itertuples(index=False)]
        named = self.reference_label(reference)
        lines += ["", f"*vs reference*: the paired MAE difference against {named} on the same books, with its "
                      f"{config.CONFIDENCE:.0%} bootstrap interval (negative: fewer dollars off)."] if named else []
        if (summary["vs reference ($)"] == OTHER_BOOKS).any():
            lines += ["", f"Rows marked *{OTHER_BOOKS}* were scored on another set of books than the latest: their "
                          "MAE is not comparable with the others', and they are compared with nothing until "
                          "evaluated again."]
        return "\n".join(lines)

    def plot(self, path: Path | None = None) -> Figure:
        """Horizontal bars of MAE with their bootstrap intervals and values, best model on top. A model far worse
        than the rest (the random guesser) would squash them: its bar is cut at the axis edge and labelled."""
        table = self.table().dropna(subset=["mae"]).reset_index(drop=True)
        if table.empty:
            raise ValueError(f"No scored models in {self.path} yet: record an evaluation first.")
        labels = self.labels(table)
        figure = Figure(figsize=(8, 0.45 * len(table) + 1.6))
        axes = figure.subplots()
        spread = [table["mae"] - table["mae_ci_low"], table["mae_ci_high"] - table["mae"]]
        axes.barh(labels, table["mae"], xerr=spread, color="steelblue", capsize=3,
                  label=f"MAE with its {config.CONFIDENCE:.0%} bootstrap interval")
        rest = table["mae_ci_high"][table["mae"] < OUTLIER_FACTOR * table["mae"].median()]
        edge = (rest.max() if len(rest) else table["mae_ci_high"].max()) * 1.25
        for position, (mae, high) in enumerate(zip(table["mae"], table["mae_ci_high"])):
            cut = mae > edge
            text = rf"\${mae:.2f}" + (" (bar cut)" if cut else "")
            # the value past its interval's whisker, or inside the cut bar
            axes.annotate(text, (edge if cut else high, position), xytext=(-4 if cut else 4, 0),
                          textcoords="offset points", va="center", ha="right" if cut else "left",
                          color="white" if cut else "black", fontsize=8)
        axes.set_xlim(0, edge)
        axes.invert_yaxis()
        axes.set(xlabel="mean absolute error (dollars off per book)",
                 title=f"Leaderboard on {int(table['n'].max())} test books (shorter is better)")
        axes.legend(loc="lower right", fontsize=8)
        figure.tight_layout()
        return save_figure(figure, path)


def leaderboard(profile: Profile) -> Leaderboard:
    """The profile's leaderboard: ``results/<profile>/leaderboard.csv``."""
    return Leaderboard(profile.results_dir / "leaderboard.csv")


def main(argv: list[str] | None = None) -> None:
    """Print a profile's leaderboard as Markdown: ``python -m helpers.leaderboard [--profile P] [--reference M]``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default=None,
                        help=f"default: ${config.PROFILE_ENV} or smoke")
    parser.add_argument("--reference", default=None,
                        help="the model (key or name) every row is compared with; default: the best classical baseline")
    arguments = parser.parse_args(argv)
    board = leaderboard(config.get_profile(arguments.profile))
    if not board.path.exists():
        raise SystemExit(f"No leaderboard at {board.path}: run the notebooks first (make smoke).")
    print(board.markdown(arguments.reference))


if __name__ == "__main__":
    main()
