"""The leaderboard: every model's metrics and per-book predictions on disk, compared by a paired bootstrap.

    python -m helpers.leaderboard [--profile P] [--reference M]

prints a profile's leaderboard as Markdown. Every model is compared with the best classical baseline (or a
reference you name) on the same books.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from helpers import config
from helpers.charts import save_figure
from helpers.config import Profile
from helpers.evaluate import METRIC_COLUMNS, Evaluation, bootstrap_ci
from helpers.pricing import POINT
from helpers.storage import write_file_atomically

OTHER_BOOKS = "other books"  # the mark for a row scored on another set of books than the latest


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
