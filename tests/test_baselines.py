"""Classical baselines and their features: they fit, they repeat, and they never see a price."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_books, make_item
from sklearn.feature_extraction.text import CountVectorizer

from helpers import config
from helpers.baselines import BASELINES, fit_bag_of_words, fit_random
from helpers.evaluate import evaluate
from helpers.features import MeanWordVectors, hand_features, item_text, vectoriser_texts

TEXT_BASELINES = ("Bag of words + linear regression", "Word2Vec + linear regression",
                  "Gradient boosting (text + features)")
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
