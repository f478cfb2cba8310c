"""Classical baselines and their features: they fit, they repeat, and they never see a price; and notebook 02's
cells build the very models the package does."""

from __future__ import annotations

import re

import nbformat
import numpy as np
import pandas as pd
import pytest
from conftest import make_books, make_item
from sklearn.base import BaseEstimator
from sklearn.feature_extraction.text import CountVectorizer

from helpers import baselines, config
from helpers.baselines import BASELINES, fit_bag_of_words, fit_constant, fit_random
from helpers.evaluate import evaluate
from helpers.features import MeanWordVectors, hand_features, item_text, vectoriser_texts
from helpers.items import prices

TEXT_BASELINES = ("Bag of words + ridge regression", "Word2Vec + ridge regression",
                  "Gradient boosting (text + features)")
(NOTEBOOK,) = (config.REPO_ROOT / "notebooks").glob("02_*.ipynb")
SOLUTIONS = config.REPO_ROOT / "notebooks" / "solutions" / "02_solutions.ipynb"
# notebook 02's cells that build a model, in notebook order (each may use what the ones before imported or built):
# (cell id, the variable it builds, the package's builder)
MODEL_CELLS = [("02-16", "linear_regression", baselines.linear_model),
               ("02-19", "bag_of_words", baselines.bag_of_words_model),
               ("02-28", "word2vec_ridge", baselines.word2vec_model),
               ("02-32", "gradient_boosting", baselines.gradient_boosting_model)]
HAND_CELL, RANDOM_CELL, CONSTANT_CELL, WORD2VEC_CELLS = "02-13", "02-07", "02-10", ("02-24", "02-26")
# what a Word2Vec model was trained with (gensim's attribute names)
WORD2VEC_SETTINGS = ("vector_size", "window", "min_count", "epochs", "workers", "seed", "sg", "hs", "negative",
                     "ns_exponent", "cbow_mean", "sample", "alpha", "min_alpha", "max_vocab_size", "max_final_vocab",
                     "sorted_vocab", "batch_words", "shrink_windows", "corpus_total_words")
LEAKED = "A fine book.\n\nPrice is $12.00"


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_prices_books_within_range(name: str, books) -> None:
    test = make_books(15, seed=1)
    predictor = BASELINES[name](books)
    predictions = predictor(test)
    assert predictions.shape == (15,)
    assert np.isfinite(predictions).all()
    assert (predictions >= config.MIN_PRICE).all() and (predictions <= config.MAX_PRICE).all()
    assert evaluate(name, predictor, test, batched=True).metrics["n_failed"] == 0


@pytest.mark.parametrize("name", BASELINES)
def test_same_data_and_seed_give_same_predictions(name: str, books) -> None:
    test = make_books(15, seed=1)
    first = BASELINES[name](books, seed=7)
    np.testing.assert_array_equal(first(test), BASELINES[name](books, seed=7)(test))
    np.testing.assert_array_equal(first(test), first(test))


def test_random_baseline_depends_on_its_seed_and_stays_in_the_train_range(books) -> None:
    test = make_books(15, seed=1)
    assert not np.array_equal(fit_random(books, seed=1)(test), fit_random(books, seed=2)(test))
    train_prices = [book.price for book in books]
    predictions = fit_random(books)(test)
    assert min(train_prices) <= predictions.min() and predictions.max() <= max(train_prices)


def test_hand_features_impute_with_train_medians() -> None:
    train = [make_item(pages=100.0), make_item(pages=300.0), make_item(pages=float("nan"))]
    features = hand_features().fit(train)
    table = features.transform([make_item(pages=float("nan"), format="kindle", category="Never seen")])
    assert table.loc[0, "pages"] == 200.0 and table.loc[0, "missingindicator_pages"] == 1.0
    assert table.loc[0, "format_kindle"] == 1.0
    assert not table.isna().any().any()


def test_vectoriser_refuses_a_text_holding_the_answer() -> None:
    with pytest.raises(ValueError, match="Price is"):
        vectoriser_texts([make_item(), make_item(text=LEAKED)])
    with pytest.raises(ValueError, match="Price is"):
        fit_bag_of_words(make_books(30) + [make_item(text=LEAKED)])
    predictor = fit_bag_of_words(make_books(30))
    with pytest.raises(ValueError, match="Price is"):
        predictor([make_item(text=LEAKED)])


@pytest.mark.parametrize("name", TEXT_BASELINES)
def test_texts_the_baselines_vectorise_from_real_items_hold_no_price(name: str, sample_items,
                                                                     monkeypatch) -> None:
    assert all(config.ANSWER_PREFIX in item.prompt for item in sample_items)  # the trap is there
    seen: list[str] = []

    def spy(method):
        def recording(self, texts, *args, **kwargs):
            texts = list(texts)
            seen.extend(texts)
            return method(self, texts, *args, **kwargs)
        return recording

    for owner, method in [(CountVectorizer, "fit_transform"), (CountVectorizer, "transform"),
                          (MeanWordVectors, "fit"), (MeanWordVectors, "transform")]:
        monkeypatch.setattr(owner, method, spy(getattr(owner, method)))
    train, test = sample_items[:120], sample_items[120:]
    BASELINES[name](train)(test)
    assert seen, "the spy saw no text: did the vectoriser change?"
    assert not any(config.ANSWER_PREFIX in text for text in seen)
    assert set(seen) <= {item_text(item) for item in sample_items}


# --- notebook 02 builds the package's models in view --------------------------------------------
def notebook_cells(*ids: str, **namespace: object) -> dict:
    """Run notebook 02's cells ``ids`` in order in one namespace (what the notebook's earlier cells define, plus
    ``namespace``); return it."""
    cells = {cell.id: cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells}
    namespace = {"config": config, "np": np, **namespace}
    for cell in ids:
        exec(cells[cell], namespace)
    return namespace


def described(value: object) -> object:
    """An estimator as plain data, comparable with ``==``: its class and ``get_params(deep=False)``, every nested
    estimator (in steps, transformer lists, wrapped regressors) described in turn."""
    if isinstance(value, BaseEstimator):
        return type(value).__name__, {key: described(param) for key, param in value.get_params(deep=False).items()}
    if isinstance(value, (list, tuple)):
        return type(value)(described(item) for item in value)
    return value


@pytest.mark.parametrize(("cell", "variable", "builder"), MODEL_CELLS, ids=[row[1] for row in MODEL_CELLS])
def test_the_notebook_cell_builds_the_package_model(cell: str, variable: str, builder) -> None:
    before = [row[0] for row in MODEL_CELLS]
    built = notebook_cells(HAND_CELL, *before[:before.index(cell) + 1])[variable]
    assert described(built) == described(builder())
    assert built.get_params().keys() == builder().get_params().keys()


def test_the_notebook_hand_features_are_the_package_hand_features() -> None:
    hand = notebook_cells(HAND_CELL)["hand"]
    assert described(hand) == described(hand_features())
    train, test = make_books(40), make_books(10, seed=1)  # set_output(transform="pandas") is no parameter
    pd.testing.assert_frame_equal(hand.fit(train).transform(test), hand_features().fit(train).transform(test))


def test_the_notebook_random_and_constant_pricers_are_the_package_ones(books) -> None:
    cells = notebook_cells(RANDOM_CELL, CONSTANT_CELL, train_prices=prices(books))
    assert cells["random_pricer"] == fit_random(books)
    assert cells["constant_pricer"] == fit_constant(books)


def test_the_notebook_word2vec_is_the_one_the_package_trains(books) -> None:
    cells = notebook_cells(*WORD2VEC_CELLS, train=books)
    texts = vectoriser_texts(books)
    package = MeanWordVectors(seed=config.SEED).fit(texts)
    notebook = cells["word2vec"]
    assert {name: getattr(notebook, name) for name in WORD2VEC_SETTINGS} == \
        {name: getattr(package.word2vec_, name) for name in WORD2VEC_SETTINGS}
    assert notebook.wv.index_to_key == package.word2vec_.wv.index_to_key
    np.testing.assert_array_equal(notebook.wv.vectors, package.word2vec_.wv.vectors)
    np.testing.assert_allclose(np.stack([cells["book_vector"](text) for text in texts]), package.transform(texts),
                               rtol=1e-6)
    # the model cell's MeanWordVectors holds the settings the notebook's Word2Vec cell trains with
    model = notebook_cells(HAND_CELL, *[row[0] for row in MODEL_CELLS])["word2vec_ridge"]
    step = model.regressor.named_steps["meanwordvectors"]
    settings = ("vector_size", "window", "min_count", "epochs", "seed")
    assert {name: getattr(step, name) for name in settings} == {name: getattr(notebook, name) for name in settings}


def test_the_notebook_scores_every_package_baseline_under_its_name() -> None:
    code = "\n".join(cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code")
    assert re.findall(r'score\("([^"]+)"', code) == list(BASELINES)
