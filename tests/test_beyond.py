"""Evaluation beyond the leaderboard, with known answers: calibrated intervals on data drawn from a known
distribution, the ensemble and the calibration refusing test books, the segment table adding up, the human row
scored on exactly the books it answered."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from helpers import config, conformal, dataset, ensemble, human, segments
from helpers.evaluate import Evaluation, evaluate
from helpers.leaderboard import Leaderboard


def _books(count: int, start: int = 0) -> list[SimpleNamespace]:
    return [SimpleNamespace(asin=f"B{index:05d}") for index in range(start, start + count)]


def _too_narrow_model(count: int, seed: int) -> Evaluation:
    """A model that knows each book's log-price mean but believes its spread is half what it is: true log prices
    ~ N(mu, 0.6), the model's quantiles those of N(mu, 0.3). Its raw intervals cover far less than they say."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(np.log(5), np.log(60), count)
    truths = np.exp(mu + 0.6 * rng.standard_normal(count))
    intervals = {level: (np.exp(mu + 0.3 * norm.ppf((1 - level) / 2)), np.exp(mu + 0.3 * norm.ppf((1 + level) / 2)))
                 for level in conformal.LEVELS}
    return Evaluation("too narrow", truths, np.exp(mu), [], reading="median", intervals=intervals)


def test_calibrated_coverage_is_nominal_within_sampling_error():
    calibration, test = _too_narrow_model(2_000, seed=1), _too_narrow_model(4_000, seed=2)
    intervals = conformal.ConformalIntervals().fit(calibration, _books(2_000), _books(4_000, start=2_000))
    table = intervals.table(test)
    for row in table.itertuples(index=False):
        nominal, raw, calibrated = row[0], row[1], row[3]
        error = 3 * math.sqrt(nominal * (1 - nominal) / 4_000) + 1 / 2_000  # 3 standard errors, + the finite-n term
        assert raw < nominal - 0.1  # the raw intervals were too narrow ...
        assert abs(calibrated - nominal) <= error, (nominal, calibrated)  # ... the calibrated ones hold
    assert (table["mean width, calibrated ($)"] > table["mean width, raw ($)"]).all()


def test_the_calibration_and_the_ensemble_refuse_a_test_book():
    model, books = _too_narrow_model(50, seed=3), _books(50)
    with pytest.raises(dataset.TestBookLeak, match="interval calibration would be fitted on 1 test book"):
        conformal.ConformalIntervals().fit(model, books, _books(1, start=49) + _books(5, start=100))
    classical = {name: model.predictions for name in ensemble.MEMBERS}
    with pytest.raises(dataset.TestBookLeak, match="The ensemble"):
        ensemble.StackedEnsemble().fit(books, model, classical, books[:3])


def test_the_ensemble_learns_to_lean_on_the_member_that_knows():
    """One member knows the price up to small noise, the others are noise: the blend follows the one."""
    rng = np.random.default_rng(4)
    held_out, test = _too_narrow_model(300, seed=5), _too_narrow_model(300, seed=6)

    def members(model: Evaluation) -> dict[str, np.ndarray]:
        noise = {name: np.exp(rng.uniform(np.log(5), np.log(60), len(model.truths))) for name in ensemble.MEMBERS}
        return {**noise, ensemble.MEMBERS[-1]: model.truths * np.exp(0.05 * rng.standard_normal(len(model.truths)))}

    blend = ensemble.StackedEnsemble().fit(_books(300), held_out, members(held_out), _books(300, start=300))
    weights = blend.weights()
    assert weights.abs().idxmax() == ensemble.MEMBERS[-1] and not blend.leans_on_nothing()
    prices = blend.predict(test, members(test))
    assert np.mean(np.abs(prices - test.truths)) < np.mean(np.abs(test.predictions - test.truths)) / 2


def _item(asin: str, price: float, fmt: str, category: str, pages: float) -> SimpleNamespace:
    return SimpleNamespace(asin=asin, price=price, format=fmt, category=category, pages=pages, title=asin, text=asin)


@pytest.fixture
def scored(tmp_path):
    """Six test books and two models on a leaderboard."""
    items = [_item("a", 5, "paperback", "History", 120), _item("b", 12, "paperback", "History", 250),
             _item("c", 30, "hardcover", "Science", 400), _item("d", 8, "kindle", "History", math.nan),
             _item("e", 60, "hardcover", "Science", 700), _item("f", 15, "paperback", "Romance", 300)]
    board = Leaderboard(tmp_path / "leaderboard.csv")
    for name, prices in (("good", [6, 11, 28, 9, 55, 14]), ("bad", [20] * 6)):
        board.record(evaluate(name, lambda books, prices=prices: prices, items, batched=True), train_items=6)
    return board, items


def test_each_segment_adds_up_to_the_test_books(scored):
    board, items = scored
    errors = segments.segment_errors(board, items)
    for segment in segments.SEGMENTS:
        rows = errors[(errors["segment"] == segment) & (errors["model"] == "good")]
        assert rows["n"].sum() == len(items), segment
    pages = errors[(errors["segment"] == "pages") & (errors["model"] == "good")].set_index("value")["n"]
    assert pages.to_dict() == {"0-150": 1, "150-300": 1, "300-500": 2, "500+": 1, "unknown": 1}
    science = errors[(errors["value"] == "Science") & (errors["model"] == "bad")]
    assert science["mae"].item() == pytest.approx((10 + 40) / 2)
    table = segments.summary(errors, ["good", "bad"])
    assert list(table.columns) == ["segment", "value", "n", "good", "bad"] and len(table) == len(
        errors.drop_duplicates(["segment", "value"]))


def test_the_human_row_is_scored_on_exactly_the_books_it_answered(scored, tmp_path):
    board, items = scored
    sheet = human.write_sheet(tmp_path / "sheet.csv", items, count=4)
    filled = pd.read_csv(sheet, dtype={"asin": str})
    assert list(filled["asin"]) == ["a", "b", "c", "d"] and filled[human.ANSWER].isna().all()
    filled[human.ANSWER] = ["7", "", "about 30", ""]  # one number, one text: only the number counts
    filled.to_csv(sheet, index=False)
    answers = human.read_answers(sheet)
    assert answers == {"a": 7.0}
    answers["c"] = 33.0
    evaluation, positions = human.score(answers, items)
    assert positions == [0, 2] and list(evaluation.truths) == [5, 30] and evaluation.metrics["mae"] == 2.5
    table = human.versus_models(evaluation, positions, board, items, best="good")
    good = table[table["model"].str.startswith("good")].iloc[0]
    assert good["books"] == 2 and good["MAE ($)"] == "1.50"  # |6-5| and |28-30|, on the two answered books only
    assert good[f"vs {evaluation.name} ($)"].startswith("-1.00")
    with pytest.raises(ValueError, match="not test books"):
        human.score({"zzz": 3.0}, items)
    assert config.REPO_ROOT in human.RECORDED.parents
