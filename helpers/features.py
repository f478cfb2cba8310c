"""What the classical models read: hand features from an Item's fields, and its text.

Two rules keep the comparison with the LLM honest:

* Imputation and one-hot vocabularies are learned in ``fit`` from the TRAIN items only.
* A vectoriser only ever sees :func:`item_text` (the item's description, never a prompt),
  through :func:`vectoriser_texts`, which refuses any text holding the answer prefix
  ("Price is $"): a price leaking into the features would make any model look brilliant.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from gensim.models import Word2Vec
from gensim.utils import simple_preprocess
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder

from helpers import config
from helpers.items import FORMATS, Item

NUMERIC_FEATURES = ("pages", "weight_oz", "year", "rating_number", "average_rating",
                    "description_chars", "token_count")
LOG_FEATURES = ("rating_number",)  # heavy-tailed counts: log1p tames them
MAX_CATEGORIES = 30  # top-level categories kept by name; rarer ones share one "infrequent" column
W2V_VECTOR_SIZE = 100
W2V_WINDOW = 5
W2V_MIN_COUNT = 2
W2V_EPOCHS = 5  # a few passes: enough on 400k books, and keeps the full run in minutes


# --- hand features -----------------------------------------------------------------------
def item_frame(items: Sequence[Item]) -> pd.DataFrame:
    """The raw hand features, one row per item (NaN where unknown; ``rating_number`` as log1p)."""
    frame = pd.DataFrame({name: [getattr(item, name) for item in items] for name in
                          (*NUMERIC_FEATURES, "format", "category")})
    frame[list(NUMERIC_FEATURES)] = frame[list(NUMERIC_FEATURES)].astype(float)
    for name in LOG_FEATURES:
        frame[name] = np.log1p(frame[name])
    return frame


def hand_features() -> Pipeline:
    """An unfitted transformer: items -> numeric DataFrame of hand features.

    Numbers: NaN -> the TRAIN median (plus an "was missing" indicator column); a column
    that is empty in train becomes 0. Format: one-hot over :data:`helpers.items.FORMATS`.
    Category: one-hot over the :data:`MAX_CATEGORIES` most frequent train categories.
    """
    columns = ColumnTransformer(
        [
            ("number", SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
             list(NUMERIC_FEATURES)),
            ("format", OneHotEncoder(categories=[list(FORMATS)], handle_unknown="ignore",
                                     sparse_output=False), ["format"]),
            ("category", OneHotEncoder(max_categories=MAX_CATEGORIES, handle_unknown="infrequent_if_exist",
                                       sparse_output=False), ["category"]),
        ],
        verbose_feature_names_out=False,
    )
    return make_pipeline(FunctionTransformer(item_frame), columns).set_output(transform="pandas")


# --- text ----------------------------------------------------------------------------------
def item_text(item: Item) -> str:
    """The only text a classical model reads: the item's description, never its prompt."""
    return item.text


def vectoriser_texts(items: Sequence[Item]) -> list[str]:
    """:func:`item_text` of each item; ``ValueError`` if one holds the answer prefix."""
    texts = [item_text(item) for item in items]
    leaks = [index for index, text in enumerate(texts) if config.ANSWER_PREFIX in text]
    if leaks:
        raise ValueError(f"{len(leaks)} text(s) given to a vectoriser contain {config.ANSWER_PREFIX!r} "
                         f"(first at index {leaks[0]}): the answer would leak into the features.")
    return texts


def item_texts() -> FunctionTransformer:
    """Pipeline step: items -> their guarded texts (see :func:`vectoriser_texts`)."""
    return FunctionTransformer(vectoriser_texts)


class MeanWordVectors(TransformerMixin, BaseEstimator):
    """Texts -> the mean Word2Vec vector of their words, Word2Vec trained on the fit texts.

    One worker thread and a fixed seed make training reproducible; a text with no known
    word maps to the zero vector.
    """

    def __init__(self, vector_size: int = W2V_VECTOR_SIZE, window: int = W2V_WINDOW,
                 min_count: int = W2V_MIN_COUNT, epochs: int = W2V_EPOCHS, seed: int = config.SEED) -> None:
        self.vector_size = vector_size
        self.window = window
        self.min_count = min_count
        self.epochs = epochs
        self.seed = seed

    def fit(self, texts: Sequence[str], y: object = None) -> MeanWordVectors:
        self.word2vec_ = Word2Vec([simple_preprocess(text) for text in texts], vector_size=self.vector_size,
                                  window=self.window, min_count=self.min_count, epochs=self.epochs,
                                  workers=1, seed=self.seed)
        return self

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        vectors, index = self.word2vec_.wv.vectors, self.word2vec_.wv.key_to_index
        means = np.zeros((len(texts), self.vector_size), dtype=np.float32)
        for row, text in enumerate(texts):
            known = [index[word] for word in simple_preprocess(text) if word in index]
            if known:
                means[row] = vectors[known].mean(axis=0)
        return means
