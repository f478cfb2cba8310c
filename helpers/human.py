"""A human row: price a handful of test books yourself, from the same text the models read, and be scored like
any model, on exactly the books you answered, with the paired difference against the best model on them.

The answer sheet is a CSV (``results/<profile>/human-answers.csv``): one book a row, its title and text, and an
empty ``your_price`` column to fill in (a spreadsheet will do). Rows left empty are not scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from helpers import config
from helpers.evaluate import Evaluation, bootstrap_ci, evaluate
from helpers.items import Item
from helpers.leaderboard import Leaderboard
from helpers.storage import write_file_atomically

SHEET_BOOKS = 10  # enough to compare, few enough to price in ten minutes
ANSWER = "your_price"
# the recorded sheet scored until a learner fills theirs (and in CI): smoke's first 10 test books priced by a rule of
# thumb on the format alone (paperback $15, hardcover $25), not by a person (data/sample/README.md)
RECORDED = config.REPO_ROOT / "data" / "sample" / "human-answers-smoke.csv"
RECORDED_NAME = "Rule of thumb by format (recorded sheet)"


def sheet_path(profile: config.Profile) -> Path:
    return profile.results_dir / "human-answers.csv"


def write_sheet(path: Path, items: Sequence[Item], count: int = SHEET_BOOKS) -> Path:
    """The answer sheet of the first ``count`` test books: ``asin``, ``title``, ``text`` (what the models read)
    and an empty ``your_price``. An existing sheet is kept: it may hold answers."""
    if not path.exists():
        sheet = pd.DataFrame({"asin": [item.asin for item in items[:count]],
                              "title": [item.title for item in items[:count]],
                              "text": [item.text for item in items[:count]], ANSWER: math.nan})
        write_file_atomically(path, lambda tmp: sheet.to_csv(tmp, index=False, encoding="utf-8"))
    return path


def read_answers(path: Path) -> dict[str, float]:
    """The prices written in a sheet, by book (rows without a number are left out)."""
    sheet = pd.read_csv(path, dtype={"asin": str}, encoding="utf-8")
    prices = pd.to_numeric(sheet[ANSWER], errors="coerce")
    return dict(zip(sheet.loc[prices.notna(), "asin"], prices[prices.notna()].astype(float)))


def score(answers: dict[str, float], items: Sequence[Item], name: str = "Human") -> tuple[Evaluation, list[int]]:
    """The harness's evaluation of ``answers`` on the test books they cover, and those books' positions in
    ``items``; answers for books that are not test books are an error."""
    unknown = set(answers) - {item.asin for item in items}
    if unknown:
        raise ValueError(f"{len(unknown)} answer(s) for books that are not test books: {sorted(unknown)[:3]}")
    positions = [index for index, item in enumerate(items) if item.asin in answers]
    answered = [items[index] for index in positions]
    return evaluate(name, lambda books: [answers[book.asin] for book in books], answered, batched=True), positions


def versus_models(human: Evaluation, positions: list[int], board: Leaderboard, items: Sequence[Item],
                  best: str | None = None) -> pd.DataFrame:
    """The human and every model on the leaderboard, on the answered books only: MAE, and each model's paired
    difference against the human (MAE of the model minus the human's; negative: the model errs less)."""
    books = board.predictions_of(items)
    labels = board.display_names()
    truths = books["truth"].to_numpy()[positions]
    rows = [{"model": human.name, "books": len(positions), "MAE ($)": f"{np.nanmean(human.errors):.2f}",
             f"vs {human.name} ($)": "reference"}]
    for key in [key for key in labels if key in books]:
        errors = np.abs(books[key].to_numpy()[positions] - truths)
        difference = errors - human.errors
        difference = difference[~np.isnan(difference)]
        low, high = bootstrap_ci(difference) if len(difference) else (math.nan, math.nan)
        rows.append({"model": labels[key] + (" (best on the leaderboard)" if key == best else ""),
                     "books": len(positions), "MAE ($)": f"{np.nanmean(errors):.2f}",
                     f"vs {human.name} ($)": f"{difference.mean():+.2f} ({low:+.2f} to {high:+.2f})"})
    return pd.DataFrame(rows)
