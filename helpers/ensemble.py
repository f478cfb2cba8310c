"""A validated ensemble: the LLM's median and 80% interval and the classical models' prices, stacked by a ridge
regression on log prices (scikit-learn), fitted on the held-out books only, then scored on the test books like
any model.

Hand-picked weights are fitted on nothing held out; here the weights are learned where no model has looked, and
the paired bootstrap against each member says whether the blend beats it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from helpers import config
from helpers.dataset import check_unseen
from helpers.evaluate import Evaluation
from helpers.items import Item

# the classical members: every baseline that reads the book (Random and the constant read nothing)
MEMBERS = ("Linear regression (hand features)", "Bag of words + ridge regression", "Word2Vec + ridge regression",
           "Gradient boosting (text + features)")
RIDGE_ALPHAS = np.logspace(-2, 3, 11)  # chosen by leave-one-out on the held-out books (RidgeCV's default cv)


def features(llm: Evaluation, classical: dict[str, np.ndarray]) -> np.ndarray:
    """One row per book: the log of the LLM's median and 80% interval bounds, then each classical member's log
    price (clipped to the prices a model may answer)."""
    low, high = llm.intervals[config.INTERVAL_LEVEL]
    columns = [llm.predictions, low, high, *(classical[name] for name in classical)]
    return np.log(np.clip(np.column_stack(columns), config.MIN_PRICE, config.MAX_PRICE))


class StackedEnsemble:
    """``RidgeCV`` on standardised log-price features: a few weights, fitted on the held-out books."""

    def __init__(self) -> None:
        self.model: Pipeline = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
        self.columns: list[str] = []
        self.books = 0

    def fit(self, held_out_items: Sequence[Item], llm: Evaluation, classical: dict[str, np.ndarray],
            scored_items: Sequence[Item]) -> StackedEnsemble:
        """Fit on the held-out books (``llm`` and ``classical``: each member's prices for them); refuses a
        scored book."""
        check_unseen(held_out_items, scored_items, "The ensemble")
        x = features(llm, classical)
        answered = np.isfinite(x).all(axis=1)
        self.columns = [f"LLM {part}" for part in ("median", "10% quantile", "90% quantile")] + list(classical)
        self.model.fit(x[answered], np.log(llm.truths[answered]))
        self.books = int(answered.sum())
        return self

    def predict(self, llm: Evaluation, classical: dict[str, np.ndarray]) -> np.ndarray:
        """The blended price of each book of ``llm`` (NaN where the LLM failed)."""
        x = features(llm, classical)
        prices = np.full(len(x), np.nan)
        answered = np.isfinite(x).all(axis=1)
        if answered.any():
            prices[answered] = np.clip(np.exp(self.model.predict(x[answered])), config.MIN_PRICE, config.MAX_PRICE)
        return prices

    def predictor(self, items: Sequence[Item], llm: Evaluation, classical: dict[str, np.ndarray]
                  ) -> Callable[[list[Item]], np.ndarray]:
        """A batched predictor for the harness: the blend of the members' prices for exactly ``items``."""
        prices, asins = self.predict(llm, classical), [item.asin for item in items]

        def blended(books: list[Item]) -> np.ndarray:
            if [book.asin for book in books] != asins:
                raise ValueError("The ensemble's members priced other books: price these books with each member "
                                 "first.")
            return prices
        return blended

    def leans_on_nothing(self) -> bool:
        """True when leave-one-out chose the largest penalty: the weights are shrunk to about nothing."""
        return bool(self.model[-1].alpha_ == RIDGE_ALPHAS.max())

    def weights(self) -> pd.Series:
        """Each feature's weight on the standardised log price (how much the blend leans on it), and the ridge's
        chosen penalty."""
        ridge = self.model[-1]
        return pd.Series(ridge.coef_, index=self.columns, name=f"weight (ridge alpha {ridge.alpha_:g})")
