"""Classical baselines: the scores an LLM has to beat before it is worth its GPU bill.

Each ``fit_<name>(train, seed)`` returns a :class:`helpers.pricing.Predictor` (``list[Item] -> np.ndarray``)
for :func:`helpers.evaluate.evaluate` with ``batched=True``. Same data and seed, same
predictions. Every price comes back clipped to the curated range
[config.MIN_PRICE, config.MAX_PRICE].

The learned models fit ``log1p(price)`` and turn predictions back with ``expm1``: book
prices are heavy-tailed, so on the raw scale a few $500 textbooks would dominate the squared
error, while on the log scale an error means "off by a factor", which fits prices better.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
from sklearn.base import RegressorMixin
from sklearn.compose import TransformedTargetRegressor
from sklearn.decomposition import TruncatedSVD
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.pipeline import FeatureUnion, make_pipeline
from sklearn.preprocessing import StandardScaler

from helpers import config
from helpers.charts import chart_stem
from helpers.dataset import load_curated, load_manifest, split_file
from helpers.features import MeanWordVectors, hand_features, item_texts
from helpers.items import Item, prices
from helpers.pricing import Predictor
from helpers.storage import write_file_atomically

BOW_MAX_FEATURES = 1_000  # the 1,000 most frequent words (stop words out)
RIDGE_ALPHA = 1.0
SVD_TEXT_MAX_FEATURES = 5_000  # TF-IDF vocabulary before the SVD squeeze
SVD_COMPONENTS = 50  # "topics" the gradient-boosted trees see from the text


def clip_prices(predictions: object) -> np.ndarray:
    """Predictions as floats inside the curated price range."""
    return np.clip(np.asarray(predictions, dtype=float), config.MIN_PRICE, config.MAX_PRICE)


@dataclass(frozen=True)
class RandomPricer:
    """Uniform prices over [low, high]; each call restarts the generator, so calls repeat."""

    low: float
    high: float
    seed: int

    def __call__(self, items: list[Item]) -> np.ndarray:
        return clip_prices(np.random.default_rng(self.seed).uniform(self.low, self.high, len(items)))


@dataclass(frozen=True)
class ConstantPricer:
    """The same price for every book."""

    price: float

    def __call__(self, items: list[Item]) -> np.ndarray:
        return clip_prices(np.full(len(items), self.price))


@dataclass(frozen=True)
class ModelPricer:
    """A fitted scikit-learn regressor that reads Items and predicts dollars."""

    model: RegressorMixin

    def __call__(self, items: list[Item]) -> np.ndarray:
        return clip_prices(self.model.predict(items))


def fit_log_price(estimator: RegressorMixin, train: list[Item]) -> ModelPricer:
    """Fit ``estimator`` (items -> log1p(price)) on ``train``; predict in dollars."""
    model = TransformedTargetRegressor(regressor=estimator, func=np.log1p, inverse_func=np.expm1,
                                       check_inverse=False)
    return ModelPricer(model.fit(train, prices(train)))


def fit_random(train: list[Item], seed: int = config.SEED) -> RandomPricer:
    """Guess uniformly between the cheapest and the dearest train price: the floor."""
    train_prices = prices(train)
    return RandomPricer(float(train_prices.min()), float(train_prices.max()), seed)


def fit_constant(train: list[Item], seed: int = config.SEED) -> ConstantPricer:
    """Always guess the train mean (``seed`` unused, kept for a common signature)."""
    return ConstantPricer(float(prices(train).mean()))


def fit_linear_features(train: list[Item], seed: int = config.SEED) -> ModelPricer:
    """Ordinary least squares on the standardised hand features, for log1p(price)."""
    return fit_log_price(make_pipeline(hand_features(), StandardScaler(), LinearRegression()), train)


def fit_bag_of_words(train: list[Item], seed: int = config.SEED) -> ModelPricer:
    """Word counts (top :data:`BOW_MAX_FEATURES` words) -> ridge regression on log1p(price).

    Ridge, not plain least squares: with 1,000 word columns and a hundred smoke books there
    are more unknowns than equations, and OLS would fit the train set exactly and guess
    wildly elsewhere. The small L2 penalty keeps it stable; on 400k books it barely differs.
    """
    vectoriser = CountVectorizer(max_features=BOW_MAX_FEATURES, stop_words="english")
    return fit_log_price(make_pipeline(item_texts(), vectoriser, Ridge(alpha=RIDGE_ALPHA)), train)


def fit_word2vec(train: list[Item], seed: int = config.SEED) -> ModelPricer:
    """Word2Vec trained on the train texts, mean vector per book -> ridge on log1p(price).

    Ridge for the same reason as :func:`fit_bag_of_words` (100 dimensions, few smoke books).
    """
    return fit_log_price(make_pipeline(item_texts(), MeanWordVectors(seed=seed), Ridge(alpha=RIDGE_ALPHA)),
                         train)


def fit_gradient_boosting(train: list[Item], seed: int = config.SEED) -> ModelPricer:
    """Histogram gradient boosting on hand features + :data:`SVD_COMPONENTS` text "topics".

    The text goes through TF-IDF then a truncated SVD (latent semantic analysis), so the
    trees get a few dense columns instead of thousands of sparse ones.
    """
    text = make_pipeline(item_texts(),
                         TfidfVectorizer(max_features=SVD_TEXT_MAX_FEATURES, stop_words="english", sublinear_tf=True),
                         TruncatedSVD(n_components=SVD_COMPONENTS, random_state=seed))
    features = FeatureUnion([("hand", hand_features()), ("text", text)])
    return fit_log_price(make_pipeline(features, HistGradientBoostingRegressor(random_state=seed)), train)


BASELINES: dict[str, Callable[[list[Item], int], Predictor]] = {
    "Random": fit_random,
    "Constant (train mean)": fit_constant,
    "Linear regression (hand features)": fit_linear_features,
    "Bag of words + linear regression": fit_bag_of_words,
    "Word2Vec + linear regression": fit_word2vec,
    "Gradient boosting (text + features)": fit_gradient_boosting,
}


# --- fitted baselines on disk: notebook 02 saves them, the demo loads the best one ------------
def saved_path(name: str, profile: config.Profile) -> Path:
    """Where baseline ``name`` fitted on ``profile``'s data is saved: ``runs/<profile>/baselines/<name>.joblib``."""
    return profile.runs_dir / "baselines" / f"{chart_stem(name)}.joblib"


def _data_key(profile: config.Profile) -> dict:
    """What a saved baseline was fitted on: the curated train split's hash and the subset size."""
    return {"train_sha256": load_manifest(profile)["sha256"][split_file("train")], "train_subset": profile.train_subset}


def fit_and_save(name: str, profile: config.Profile, train: list[Item]) -> Predictor:
    """Fit baseline ``name`` on ``profile``'s ``train`` items and save it (see :func:`saved_path`)."""
    predictor = BASELINES[name](train)
    write_file_atomically(saved_path(name, profile), lambda tmp: joblib.dump(
        {"data": _data_key(profile), "predictor": predictor}, tmp))
    return predictor


def load_fitted(name: str, profile: config.Profile) -> Predictor:
    """Baseline ``name`` as notebook 02 saved it; fitted (and saved) now if it is missing or was fitted on
    other curated data."""
    path = saved_path(name, profile)
    if path.exists():
        saved = joblib.load(path)
        if saved["data"] == _data_key(profile):
            return saved["predictor"]
    return fit_and_save(name, profile, load_curated(profile)[0])
