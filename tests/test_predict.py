"""The LLM predictors: one-forward-pass number reading, generation parsing, the path choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import assets, config
from helpers.items import Item
from helpers.predict import (LARGEST_PRICE, GeneratePredictor, NumberTokenPredictor, llm_predictor,
                             number_token_ids, parse_price)


@pytest.fixture(scope="module")
def llama_tokenizer():
    return assets.llama3_tokenizer_offline()


@pytest.fixture(scope="module")
def tiny_llama(llama_tokenizer) -> LlamaForCausalLM:
    """A random 2-layer Llama with the real Llama 3.1 vocabulary (128,256 tokens)."""
    torch.manual_seed(config.SEED)
    settings = LlamaConfig(vocab_size=len(llama_tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           pad_token_id=llama_tokenizer.pad_token_id)
    return LlamaForCausalLM(settings).eval()


def book(index: int, words: int) -> Item:
    return Item(asin=f"B{index}", title=f"Book {index}", price=10.0 + index, text=" ".join(["page"] * words),
                token_count=words, category="Fiction", format="paperback", pages=100.0, weight_oz=8.0,
                year=2020.0, rating_number=3.0, average_rating=4.0, description_chars=100)


@pytest.fixture(scope="module")
def books() -> list[Item]:
    return [book(index, words) for index, words in enumerate((3, 12, 7, 20, 1))]


def test_every_llama_number_is_one_token(llama_tokenizer):
    ids = number_token_ids(llama_tokenizer)
    assert ids is not None and len(set(ids)) == LARGEST_PRICE
    assert llama_tokenizer.decode([ids[41]]) == "42"


def test_number_token_prices_are_in_range(tiny_llama, llama_tokenizer, books):
    predictor = NumberTokenPredictor(tiny_llama, llama_tokenizer, batch_size=2)
    predictions = predictor.predict(books)
    assert predictions.argmax.shape == predictions.expected.shape == (len(books),)
    assert set(predictions.argmax) <= set(range(1, LARGEST_PRICE + 1))
    assert np.all((predictions.expected >= 1) & (predictions.expected <= LARGEST_PRICE))
    assert predictor(books) == predictions.argmax.tolist()


def test_argmax_is_the_argmax_of_the_restricted_distribution(tiny_llama, llama_tokenizer, books):
    predictor = NumberTokenPredictor(tiny_llama, llama_tokenizer, batch_size=2)
    for item, argmax in zip(books, predictor.argmax(books)):
        inputs = llama_tokenizer(item.test_prompt, return_tensors="pt")  # alone: no padding at all
        with torch.inference_mode():
            logits = tiny_llama(**inputs).logits[0, -1]
        restricted = logits[predictor.number_ids]
        assert argmax == int(restricted.argmax()) + 1


def test_left_padding_does_not_change_a_prediction(tiny_llama, llama_tokenizer, books):
    one_by_one = [NumberTokenPredictor(tiny_llama, llama_tokenizer, batch_size=1).expected([item])[0]
                  for item in books]
    batched = NumberTokenPredictor(tiny_llama, llama_tokenizer, batch_size=len(books)).expected(books)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-4)


def test_digit_splitting_tokenizer_is_refused_with_the_fix(tiny_llama):
    with pytest.raises(ValueError, match="GeneratePredictor"):
        NumberTokenPredictor(tiny_llama, assets.load_tokenizer("smollm2"), batch_size=2)


def test_llm_predictor_picks_the_path_the_tokenizer_allows(tiny_llama, llama_tokenizer):
    profile = config.get_profile("smoke")
    assert isinstance(llm_predictor(tiny_llama, llama_tokenizer, profile), NumberTokenPredictor)
    assert isinstance(llm_predictor(tiny_llama, assets.load_tokenizer("smollm2"), profile), GeneratePredictor)


@pytest.mark.parametrize(("text", "price"), [
    ("21.00", 21.0), (" 1,299.00 and more", 1299.0), ("about $7", 7.0), ("12.5", 12.5),
    ("abc", None), ("", None), ("$.", None),
])
def test_parse_price(text, price):
    assert parse_price(text) == price


def test_generate_predictor_returns_a_number_or_none(tiny_llama, llama_tokenizer, books):
    predictor = GeneratePredictor(tiny_llama, llama_tokenizer, batch_size=2, max_new_tokens=3)
    texts = predictor.generate([item.test_prompt for item in books])
    predictions = predictor(books)
    assert len(texts) == len(predictions) == len(books)
    assert predictions == [parse_price(text) for text in texts]
