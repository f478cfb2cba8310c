"""Classical baselines: the scores an LLM has to beat before it is worth its GPU bill.

Each learned model has a *builder* that returns it unfitted (:func:`linear_model`, :func:`bag_of_words_model`,
:func:`word2vec_model`, :func:`gradient_boosting_model`): the very objects notebook 02 builds in view, cell by
cell (tests/test_baselines.py runs those cells and checks they equal these). ``fit_<name>(train, seed)`` fits one
and returns a :class:`helpers.pricing.Predictor` (``list[Item] -> np.ndarray``) for
:func:`helpers.evaluate.evaluate` with ``batched=True``. Same data and seed, same predictions. Every price
comes back clipped to the curated range [config.MIN_PRICE, config.MAX_PRICE].

The learned models fit ``log1p(price)`` and turn predictions back with ``expm1`` (:func:`log_price`): book
prices are heavy-tailed, so on the raw scale a few $500 textbooks would dominate the squared
error, while on the log scale an error means "off by a factor", which fits prices better.

The two text models regress with *ridge* (least squares with a small L2 penalty), not plain least squares:
with 1,000 word columns (or 100 Word2Vec dimensions) and a hundred smoke books there are more unknowns than
equations, and OLS would fit the train set exactly and guess wildly elsewhere. On 400k books it barely differs.
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


def log_price(regressor: RegressorMixin) -> TransformedTargetRegressor:
    """``regressor`` (items -> a number) set to learn log1p(price) and answer in dollars (expm1); unfitted."""
    return TransformedTargetRegressor(regressor=regressor, func=np.log1p, inverse_func=np.expm1, check_inverse=False)


def fit_model(model: RegressorMixin, train: list[Item]) -> ModelPricer:
    """Fit ``model`` (items -> dollars, such as a builder's) on ``train``; it predicts clipped dollars."""
    return ModelPricer(model.fit(train, prices(train)))


def fit_random(train: list[Item], seed: int = config.SEED) -> RandomPricer:
    """Guess uniformly between the cheapest and the dearest train price: the floor."""
    train_prices = prices(train)
    return RandomPricer(float(train_prices.min()), float(train_prices.max()), seed)


def fit_constant(train: list[Item], seed: int = config.SEED) -> ConstantPricer:
    """Always guess the train mean (``seed`` unused, kept for a common signature)."""
    return ConstantPricer(float(prices(train).mean()))


# --- the learned models, unfitted: notebook 02's cells build the same objects ----------------
def linear_model(seed: int = config.SEED) -> TransformedTargetRegressor:
    """Ordinary least squares on the standardised hand features, for log1p(price) (``seed`` unused)."""
    return log_price(make_pipeline(hand_features(), StandardScaler(), LinearRegression()))


def bag_of_words_model(seed: int = config.SEED) -> TransformedTargetRegressor:
    """Word counts (top :data:`BOW_MAX_FEATURES` words, stop words out) -> ridge on log1p(price) (``seed`` unused)."""
    return log_price(make_pipeline(item_texts(), CountVectorizer(max_features=BOW_MAX_FEATURES, stop_words="english"),
                                   Ridge(alpha=RIDGE_ALPHA)))


def word2vec_model(seed: int = config.SEED) -> TransformedTargetRegressor:
    """Word2Vec trained on the train texts, mean vector per book -> ridge on log1p(price)."""
    return log_price(make_pipeline(item_texts(), MeanWordVectors(seed=seed), Ridge(alpha=RIDGE_ALPHA)))


def gradient_boosting_model(seed: int = config.SEED) -> TransformedTargetRegressor:
    """Histogram gradient boosting on hand features + :data:`SVD_COMPONENTS` text "topics", for log1p(price).

    The text goes through TF-IDF then a truncated SVD (latent semantic analysis), so the
    trees get a few dense columns instead of thousands of sparse ones.
    """
    text = make_pipeline(item_texts(),
                         TfidfVectorizer(max_features=SVD_TEXT_MAX_FEATURES, stop_words="english", sublinear_tf=True),
                         TruncatedSVD(n_components=SVD_COMPONENTS, random_state=seed))
    features = FeatureUnion([("hand", hand_features()), ("text", text)])
    return log_price(make_pipeline(features, HistGradientBoostingRegressor(random_state=seed)))


def fit_linear_features(train: list[Item], seed: int = config.SEED) -> ModelPricer:
    """:func:`linear_model`, fitted on ``train``."""
    return fit_model(linear_model(seed), train)


def fit_bag_of_words(train: list[Item], seed: int = config.SEED) -> ModelPricer:
    """:func:`bag_of_words_model`, fitted on ``train``."""
    return fit_model(bag_of_words_model(seed), train)


def fit_word2vec(train: list[Item], seed: int = config.SEED) -> ModelPricer:
    """:func:`word2vec_model`, fitted on ``train``."""
    return fit_model(word2vec_model(seed), train)


def fit_gradient_boosting(train: list[Item], seed: int = config.SEED) -> ModelPricer:
    """:func:`gradient_boosting_model`, fitted on ``train``."""
    return fit_model(gradient_boosting_model(seed), train)


BASELINES: dict[str, Callable[[list[Item], int], Predictor]] = {
    "Random": fit_random,
    "Constant (train mean)": fit_constant,
    "Linear regression (hand features)": fit_linear_features,
    "Bag of words + ridge regression": fit_bag_of_words,
    "Word2Vec + ridge regression": fit_word2vec,
    "Gradient boosting (text + features)": fit_gradient_boosting,
}


# --- fitted baselines on disk: notebook 02 saves them, the demo loads the best one ------------
def saved_path(name: str, profile: config.Profile) -> Path:
    """Where baseline ``name`` fitted on ``profile``'s data is saved: ``runs/<profile>/baselines/<name>.joblib``."""
    return profile.runs_dir / "baselines" / f"{chart_stem(name)}.joblib"


def _data_key(profile: config.Profile) -> dict:
    """What a saved baseline was fitted on: the curated train split's hash and the subset size."""
    return {"train_sha256": load_manifest(profile)["sha256"][split_file("train")], "train_subset": profile.train_subset}


def save_fitted(name: str, profile: config.Profile, predictor: Predictor) -> Predictor:
    """Save ``predictor``, baseline ``name`` fitted on ``profile``'s curated train split (see :func:`saved_path`),
    for :func:`load_fitted`; returns it."""
    write_file_atomically(saved_path(name, profile), lambda tmp: joblib.dump(
        {"data": _data_key(profile), "predictor": predictor}, tmp))
    return predictor


def fit_and_save(name: str, profile: config.Profile, train: list[Item]) -> Predictor:
    """Fit baseline ``name`` on ``profile``'s ``train`` items and save it (see :func:`saved_path`)."""
    return save_fitted(name, profile, BASELINES[name](train))


def load_fitted(name: str, profile: config.Profile) -> Predictor:
    """Baseline ``name`` as notebook 02 saved it; fitted (and saved) now if it is missing or was fitted on
    other curated data."""
    path = saved_path(name, profile)
    if path.exists():
        saved = joblib.load(path)
        if saved["data"] == _data_key(profile):
            return saved["predictor"]
    return fit_and_save(name, profile, load_curated(profile)[0])
