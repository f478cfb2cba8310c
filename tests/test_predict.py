"""The LLM predictors: the price distribution (single-token and digit-tree paths), its readings, generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import assets, config
from helpers.items import Item
from helpers.predict import (LARGEST_PRICE, DistributionPredictor, GeneratePredictor, PriceDistributions,
                             digit_token_ids, llm_predictor, number_token_ids, parse_price)


@pytest.fixture(scope="module")
def llama_tokenizer():
    return assets.llama3_tokenizer_offline()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return assets.load_tokenizer("smollm2")


def random_llama(tokenizer) -> LlamaForCausalLM:
    """A random 2-layer Llama with ``tokenizer``'s real vocabulary."""
    torch.manual_seed(config.SEED)
    settings = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(settings).eval()


@pytest.fixture(scope="module")
def tiny_llama(llama_tokenizer) -> LlamaForCausalLM:
    """Single-token numbers: the Llama 3.1 vocabulary (128,256 tokens)."""
    return random_llama(llama_tokenizer)


@pytest.fixture(scope="module")
def tiny_digit_model(smollm2_tokenizer) -> LlamaForCausalLM:
    """Digit tokenizer: SmolLM2's vocabulary (49,152 tokens, "21" is "2", "1")."""
    return random_llama(smollm2_tokenizer)


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


def test_single_token_readings_are_in_range(tiny_llama, llama_tokenizer, books):
    predictor = DistributionPredictor(tiny_llama, llama_tokenizer, batch_size=2)
    distributions = predictor(books)
    assert predictor.path == "single-token" and distributions.probabilities.shape == (len(books), LARGEST_PRICE)
    np.testing.assert_allclose(distributions.probabilities.sum(axis=1), 1, atol=1e-9)
    for reading in (distributions.median, distributions.mean, distributions.argmax):
        assert reading.shape == (len(books),) and np.all((reading >= 1) & (reading <= LARGEST_PRICE))
    assert list(distributions) == distributions.median.tolist()


def test_argmax_is_the_argmax_of_the_restricted_distribution(tiny_llama, llama_tokenizer, books):
    predictor = DistributionPredictor(tiny_llama, llama_tokenizer, batch_size=2)
    for item, argmax in zip(books, predictor(books).argmax):
        inputs = llama_tokenizer(item.test_prompt, return_tensors="pt")  # alone: no padding at all
        with torch.inference_mode():
            logits = tiny_llama(**inputs).logits[0, -1]
        assert argmax == int(logits[predictor.number_ids].argmax()) + 1


def test_left_padding_does_not_change_a_distribution(tiny_llama, llama_tokenizer, books):
    one_by_one = [DistributionPredictor(tiny_llama, llama_tokenizer, batch_size=1)([item]).mean[0] for item in books]
    batched = DistributionPredictor(tiny_llama, llama_tokenizer, batch_size=len(books))(books).mean
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-4)


def brute_force_log_scores(model, tokenizer, prompt: str) -> np.ndarray:
    """log P(candidate | prompt) of every completion "1.", ..., "99.", "100", ..., "999", scored in full."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    candidates = [f"{n}." if n < 100 else str(n) for n in range(1, LARGEST_PRICE + 1)]
    scores = np.empty(len(candidates))
    for length in (2, 3):  # tokens per candidate: "5." or "42." and "123"
        chosen = [index for index, text in enumerate(candidates) if len(text) == length]
        tails = torch.tensor([tokenizer.encode(candidates[index], add_special_tokens=False) for index in chosen])
        sequences = torch.cat([torch.tensor(prompt_ids).expand(len(chosen), -1), tails], dim=1)
        with torch.inference_mode():  # the logits that predict each tail token: the last length + 1 but one
            logits = model(sequences, logits_to_keep=length + 1).logits[:, :-1]
        steps = torch.log_softmax(logits.double(), dim=-1).gather(2, tails[:, :, None])
        scores[chosen] = steps.sum(dim=(1, 2)).numpy()
    return scores


def test_digit_tree_matches_brute_force_scoring_of_every_price(tiny_digit_model, smollm2_tokenizer, books):
    predictor = DistributionPredictor(tiny_digit_model, smollm2_tokenizer, batch_size=2)
    assert predictor.path == "digit tree" and number_token_ids(smollm2_tokenizer) is None
    distributions = predictor(books[:2])
    np.testing.assert_allclose(distributions.probabilities.sum(axis=1), 1, atol=1e-9)
    for item, row in zip(books[:2], distributions.probabilities):
        scores = brute_force_log_scores(tiny_digit_model, smollm2_tokenizer, item.test_prompt)
        expected = np.exp(scores - scores.max())
        np.testing.assert_allclose(row, expected / expected.sum(), rtol=1e-4, atol=1e-9)


def test_readings_of_a_known_distribution():
    probabilities = np.zeros((1, LARGEST_PRICE))
    probabilities[0, [9, 19, 99]] = [0.3, 0.3, 0.4]  # $10, $20, $100
    distributions = PriceDistributions(probabilities)
    assert distributions.median.tolist() == [20] and distributions.argmax.tolist() == [100]
    assert distributions.mean.tolist() == pytest.approx([0.3 * 10 + 0.3 * 20 + 0.4 * 100])
    low, high = distributions.interval(0.8)  # the 10% and 90% quantiles
    assert (low.tolist(), high.tolist()) == ([10], [100])
    assert list(PriceDistributions(probabilities, reading="mean")) == pytest.approx([49.0])
    labels = distributions.plot(0, truth=15.0).axes[0].get_legend_handles_labels()[1]
    assert {"median $20", "argmax $100", "truth $15", "80% interval $10-$100"} <= set(labels)


def test_digit_tokenizer_probe(llama_tokenizer, smollm2_tokenizer):
    digits, end = digit_token_ids(smollm2_tokenizer)
    assert smollm2_tokenizer.decode(digits) == "0123456789" and smollm2_tokenizer.decode([end]) == "."
    assert digit_token_ids(llama_tokenizer) is None  # "905" is one Llama token


def test_llm_predictor_reads_the_distribution_for_both_tokenizers(tiny_llama, llama_tokenizer, smollm2_tokenizer):
    profile = config.get_profile("smoke")
    for tokenizer, path in ((llama_tokenizer, "single-token"), (smollm2_tokenizer, "digit tree")):
        predictor = llm_predictor(tiny_llama, tokenizer, profile)
        assert isinstance(predictor, DistributionPredictor) and predictor.path == path
        assert predictor.reading == "median"


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
