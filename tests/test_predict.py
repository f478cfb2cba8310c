"""The LLM predictors: the price distribution (single-token and digit-tree paths), its readings, generation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from helpers import assets, config
from helpers.charts import plot_error_by_bucket, plot_scatter, save_charts
from helpers.evaluate import evaluate
from helpers.items import Item
from helpers.leaderboard import leaderboard
from helpers.predict import (
    LARGEST_PRICE,
    DistributionPredictor,
    GeneratedPrices,
    GeneratePredictor,
    PriceDistributions,
    digit_token_ids,
    llm_predictor,
    number_token_ids,
    parse_price,
)


@pytest.fixture(scope="module")
def llama_tokenizer():
    return assets.llama3_tokenizer_offline()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return assets.load_tokenizer("smollm2")


def random_llama(tokenizer, attention: str = "sdpa") -> LlamaForCausalLM:
    """A random 2-layer Llama with ``tokenizer``'s real vocabulary."""
    torch.manual_seed(config.SEED)
    settings = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           pad_token_id=tokenizer.pad_token_id, attn_implementation=attention)
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


@pytest.fixture(scope="module")
def unequal_prompts() -> list[str]:
    """Four prompts of clearly different lengths: one left-padded batch pads the short ones by up to 59 tokens."""
    return [book(index, words).test_prompt for index, words in enumerate((9, 60, 1, 30))]


# --- synthetic tokenizers, for the cases no tokenizer that can be had offline shows ---------------------------
_WORDS = ["How", "much", "does", "this", "cost", "to", "the", "nearest", "dollar", "?", "Price", "is", "$", "page",
          " ", "\n\n", "."]


def word_tokenizer(pattern: str, pieces: list[str], normalizer: normalizers.Normalizer | None = None,
                   ) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: the (normalised) text split by ``pattern``, each piece one token (else [UNK])."""
    vocabulary = {piece: index for index, piece in enumerate(dict.fromkeys(["[PAD]", "[UNK]", "[EOS]", *pieces]))}
    backend = Tokenizer(WordLevel(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    if normalizer is not None:
        backend.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]")


_DIGITS = [*"0123456789"]
_PAIRS = [f"{first}{second}" for first in _DIGITS for second in _DIGITS]


@pytest.fixture(scope="module")
def paired_digits() -> PreTrainedTokenizerFast:
    """Digits merged in pairs: "21" is one token, "905" is "90", "5"."""
    return word_tokenizer(r"\d{1,2}|[^\W\d]+|\s+|[^\w\s]", [*_WORDS, *_DIGITS, *_PAIRS])


@pytest.fixture(scope="module")
def spaced_digits() -> PreTrainedTokenizerFast:
    """ "$21.00" written "$ 21.00": the first digit is the token " 2", a later one "1"."""
    return word_tokenizer(r" ?\d|[^\W\d]+|\s+|[^\w\s]", [*_WORDS, *_DIGITS, *(f" {digit}" for digit in _DIGITS)],
                          normalizers.Replace(Regex(r"\$(?=\d)"), "$ "))


@pytest.fixture(scope="module")
def no_dot() -> PreTrainedTokenizerFast:
    """Digit by digit, but "." is no token of its vocabulary."""
    return word_tokenizer(r"\d|[^\W\d]+|\s+|[^\w\s]", [*(word for word in _WORDS if word != "."), *_DIGITS])


@pytest.fixture(scope="module")
def no_numbers() -> PreTrainedTokenizerFast:
    """No digit in its vocabulary: every number, "21" or "905", is the one token [UNK]."""
    return word_tokenizer(r"\d+|[^\W\d]+|\s+|[^\w\s]", _WORDS)


# --- the single-token path ------------------------------------------------------------------------------------
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


def test_left_padding_does_not_change_a_distribution(tiny_llama, llama_tokenizer, unequal_prompts):
    alone = np.vstack([DistributionPredictor(tiny_llama, llama_tokenizer, batch_size=1).distribution([prompt])
                       for prompt in unequal_prompts])
    batched = DistributionPredictor(tiny_llama, llama_tokenizer, batch_size=len(unequal_prompts))
    np.testing.assert_allclose(batched.distribution(unequal_prompts), alone, rtol=1e-5, atol=1e-12)


# --- the digit tree -------------------------------------------------------------------------------------------
def brute_force_log_scores(model, tokenizer, prompt: str) -> np.ndarray:
    """log P(candidate | prompt) of every completion "1.", ..., "99.", "100", ..., "999", each scored in full
    in its own unpadded sequence, as the tokenizer writes it after the prompt."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    written = tokenizer([prompt + (f"{n}." if n < 100 else str(n)) for n in range(1, LARGEST_PRICE + 1)])["input_ids"]
    assert all(ids[:len(prompt_ids)] == prompt_ids for ids in written)  # the prompt's own tokens stay as they are
    tails = [ids[len(prompt_ids):] for ids in written]
    scores = np.empty(len(tails))
    for length in {len(tail) for tail in tails}:  # tokens per candidate: "5." and "42." or "123"
        chosen = [index for index, tail in enumerate(tails) if len(tail) == length]
        tail = torch.tensor([tails[index] for index in chosen])
        sequences = torch.cat([torch.tensor(prompt_ids).expand(len(chosen), -1), tail], dim=1)
        predicting = torch.arange(sequences.shape[1] - length - 1, sequences.shape[1] - 1)  # the tail's logits
        with torch.inference_mode():
            logits = model(sequences, logits_to_keep=predicting).logits
        steps = logits.gather(2, tail[:, :, None])[..., 0].double() - logits.logsumexp(dim=-1).double()
        scores[chosen] = steps.sum(dim=1).numpy()
    return scores


def brute_force_distribution(model, tokenizer, prompts: list[str]) -> np.ndarray:
    """Every price scored in full (:func:`brute_force_log_scores`), renormalised over 1..999."""
    scores = np.vstack([brute_force_log_scores(model, tokenizer, prompt) for prompt in prompts])
    expected = np.exp(scores - scores.max(axis=1, keepdims=True))
    return expected / expected.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def smollm2_brute_force(tiny_digit_model, smollm2_tokenizer, unequal_prompts) -> np.ndarray:
    return brute_force_distribution(tiny_digit_model, smollm2_tokenizer, unequal_prompts)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("batch_size", [3, 8])  # fewer books than prompts in a batch (and a batch of one), more
def test_digit_tree_matches_brute_force_scoring_of_every_price(attention, batch_size, smollm2_tokenizer,
                                                               unequal_prompts, smollm2_brute_force):
    model = random_llama(smollm2_tokenizer, attention)  # the weights of tiny_digit_model: the same seed
    predictor = DistributionPredictor(model, smollm2_tokenizer, batch_size=batch_size)
    assert predictor.path == "digit tree" and number_token_ids(smollm2_tokenizer) is None
    probabilities = predictor.distribution(unequal_prompts)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-9)
    np.testing.assert_allclose(probabilities, smollm2_brute_force, rtol=1e-5, atol=1e-12)


def test_digit_tree_of_a_book_is_the_same_alone_and_in_a_batch(tiny_digit_model, smollm2_tokenizer,
                                                              unequal_prompts):
    batched = DistributionPredictor(tiny_digit_model, smollm2_tokenizer, batch_size=4).distribution(unequal_prompts)
    alone = DistributionPredictor(tiny_digit_model, smollm2_tokenizer, batch_size=1)
    for prompt, row in zip(unequal_prompts, batched):
        np.testing.assert_allclose(row, alone.distribution([prompt])[0], rtol=1e-5, atol=1e-12)


def test_digit_tree_with_a_space_before_the_first_digit(spaced_digits, unequal_prompts):
    tokens = digit_token_ids(spaced_digits)
    assert spaced_digits.convert_ids_to_tokens(tokens.path(905)) == [" 9", "0", "5"]
    model = random_llama(spaced_digits)
    probabilities = DistributionPredictor(model, spaced_digits, batch_size=3).distribution(unequal_prompts)
    expected = brute_force_distribution(model, spaced_digits, unequal_prompts)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-12)


def test_digit_tree_needs_an_attention_that_takes_its_mask(smollm2_tokenizer):
    model = random_llama(smollm2_tokenizer)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        DistributionPredictor(model, smollm2_tokenizer, batch_size=2)


# --- which path a tokenizer allows ----------------------------------------------------------------------------
def test_smollm2_writes_prices_digit_by_digit(llama_tokenizer, smollm2_tokenizer):
    tokens = digit_token_ids(smollm2_tokenizer)
    assert smollm2_tokenizer.decode(tokens.digits) == "0123456789" and smollm2_tokenizer.decode([tokens.end]) == "."
    assert tokens.first == tokens.digits[1:]  # no space before the first digit
    assert digit_token_ids(llama_tokenizer) is None  # "905" is one Llama token


def test_llama4_writes_every_price_as_one_token():
    from llama_models.llama4.tokenizer import Tokenizer as Llama4Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    source = assets.package_file("llama_models", "llama4/tokenizer.model")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=TikTokenConverter(
        vocab_file=str(source), pattern=Llama4Tokenizer.O200K_PATTERN).converted())
    ids = number_token_ids(tokenizer)
    assert ids is not None and tokenizer.decode([ids[904]]) == "905" and digit_token_ids(tokenizer) is None


@pytest.mark.parametrize("tokenizer_name", ["paired_digits", "no_dot", "no_numbers"])
def test_a_tokenizer_that_fits_neither_path_names_the_fix(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    assert number_token_ids(tokenizer) is None and digit_token_ids(tokenizer) is None
    model = random_llama(tokenizer)
    with pytest.raises(ValueError, match="use GeneratePredictor"):
        DistributionPredictor(model, tokenizer, batch_size=2)
    predictor = llm_predictor(model, tokenizer, config.get_profile("smoke"))
    assert isinstance(predictor, GeneratePredictor)
    assert (predictor.path, predictor.reading) == ("greedy generation", "point")


def test_llm_predictor_reads_the_distribution_for_both_tokenizers(tiny_llama, llama_tokenizer, smollm2_tokenizer,
                                                                  spaced_digits):
    profile = config.get_profile("smoke")
    for tokenizer, path in ((llama_tokenizer, "single-token"), (smollm2_tokenizer, "digit tree"),
                            (spaced_digits, "digit tree")):
        predictor = llm_predictor(tiny_llama, tokenizer, profile)
        assert isinstance(predictor, DistributionPredictor) and predictor.path == path
        assert predictor.reading == "median"


# --- the readings ---------------------------------------------------------------------------------------------
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
    labels = [label.replace("\\$", "$") for label in labels]  # escaped, so that matplotlib shows the $
    assert {"median $20", "argmax $100", "truth $15", "80% interval $10-$100"} <= set(labels)


# --- greedy generation ----------------------------------------------------------------------------------------
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


def test_generated_prices_plot_an_answer():
    labels = GeneratedPrices([21.0, None]).plot(0, truth=15.0).axes[0].get_legend_handles_labels()[1]
    assert labels == ["generated \\$21", "truth \\$15"]  # escaped, so that matplotlib shows the $ (not mathtext)
    assert "no number written" in GeneratedPrices([21.0, None]).plot(1).axes[0].get_title()


def test_the_fallback_predictor_runs_notebook_05(paired_digits, monkeypatch, tmp_path):
    """Notebook 05's calls on its predictor, as its cells make them, for a tokenizer that falls back to generation."""
    monkeypatch.setattr(config, "HOME", tmp_path)
    profile = config.get_profile("smoke")
    items = [book(index, words) for index, words in enumerate((2, 8, 4, 16, 1, 6))]
    board = leaderboard(profile)
    predictor = llm_predictor(random_llama(paired_digits), paired_digits, profile)  # cell 5
    assert (type(predictor).__name__, predictor.path, predictor.reading) == (
        "GeneratePredictor", "greedy generation", "point")
    evaluation = evaluate("Fine-tuned (paired digits)", predictor, items, batched=True)  # cell 6
    board.record(evaluation)
    charts = save_charts(evaluation, profile)
    assert all(path.exists() for path in charts.values()) and "calibration" not in charts
    assert evaluation.reading == "point" and evaluation.metrics["n_failed"] < len(items)
    assert "interval" not in evaluation.summary()
    plot_scatter(evaluation)  # cell 7
    predictor(items[:1]).plot(0, truth=items[0].price)  # cell 9
    table = board.table()[["name", "reading", "mae", "mae_ci_low", "mae_ci_high", "vs_reference", "diff",  # cell 11
                           "diff_ci_low", "diff_ci_high", "coverage", "n_failed"]]
    assert table["reading"].tolist() == ["point"]
    board.plot(profile.results_dir / "leaderboard.png")  # cell 12
    errors = pd.DataFrame({"title": [item.title for item in items], "truth": evaluation.truths,  # cell 14
                           "prediction": evaluation.predictions, "absolute error": evaluation.errors})
    errors.sort_values("absolute error", ascending=False).head(10).round(2)
    plot_error_by_bucket(evaluation)  # cell 16
