"""Turn a language model into a batched price predictor for the evaluation harness.

:class:`DistributionPredictor` reads the model's whole distribution over the prices 1..999 after
the prompt that ends with "Price is $", by the path the tokenizer allows:

* single-token numbers (Llama 3.1 writes every number 1..999 as ONE token): one forward pass, the
  next-token softmax over those 999 tokens;
* digit tokenizers (SmolLM2, Qwen, Gemma, Mistral write "21" as "2", "1"): the chain rule over
  the digit tree, P(d1) P(d2|d1) P(d3|d1 d2), with P(end | digits) read from the "." that follows
  a price ("21.00"), from one prompt pass and two batched single-token steps on its KV cache.

Its readings (:class:`PriceDistributions`): the median (the answer that minimises the expected
absolute error, the default), the mean, the argmax, and central intervals. :class:`GeneratePredictor`
(greedy generation, parsed as a number) works with any tokenizer; it is the benchmark's reference
and the fallback for a tokenizer that fits neither path. Every predictor is called as
``predictor(items)``; use it with ``evaluate(name, predictor, items, batched=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from helpers import config
from helpers.items import Item

LARGEST_PRICE = 999  # every price in the course rounds to 1..999 dollars
MAX_NEW_TOKENS = 6  # "999.00" digit by digit; a whole-number tokenizer needs 3 ("999", ".", "00")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def parse_price(text: str) -> float | None:
    """The first number in generated ``text`` ("21.00" -> 21.0, "1,299" -> 1299.0), else None."""
    match = _NUMBER.search(text)
    return float(match.group().replace(",", "")) if match else None


def number_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """Token ids of the numbers 1..999 (index n-1 holds n), or None if one is not a single token."""
    ids = []
    for number in range(1, LARGEST_PRICE + 1):
        encoded = tokenizer.encode(str(number), add_special_tokens=False)
        if len(encoded) != 1:
            return None
        ids.append(encoded[0])
    return ids


def _batches(prompts: list[str], batch_size: int, description: str) -> tqdm:
    """Indices of ``prompts`` in batches of similar length (less padding), longest first, with a progress bar."""
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return tqdm(batches, desc=description, unit="batch", leave=False)


def _left_padded(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device) -> dict:
    """Prompts as one left-padded batch, so that every row's last position is its last token."""
    return tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt").to(device)


def digit_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], int] | None:
    """``(ids of the digits 0..9, id of ".")`` if the tokenizer writes a price digit by digit after
    "Price is $" ("21.00" -> "2", "1", ".", ...), else None."""
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in [*"0123456789", "."]]
    if any(len(encoded) != 1 for encoded in ids):
        return None
    digits, end = [encoded[0] for encoded in ids[:10]], ids[10][0]
    prefix = tokenizer.encode(config.ANSWER_PREFIX, add_special_tokens=False)
    written = tokenizer.encode(f"{config.ANSWER_PREFIX}905.", add_special_tokens=False)
    return (digits, end) if written == [*prefix, digits[9], digits[0], digits[5], end] else None


Reading = Literal["median", "mean", "argmax"]
_PRICES = np.arange(1, LARGEST_PRICE + 1, dtype=float)


@dataclass
class PriceDistributions(Sequence):
    """P(price = n) for n in 1..999, one row per book, and its readings.

    As a sequence it holds one price per book, the chosen ``reading``; the evaluation harness also
    reads :meth:`interval` from it to score the intervals' coverage.
    """

    probabilities: np.ndarray  # (books, 999); row b, column n-1: P(price = n), each row sums to 1
    reading: Reading = "median"

    def quantile(self, level: float) -> np.ndarray:
        """Per book, the smallest price n with P(price <= n) >= ``level``."""
        reached = np.cumsum(self.probabilities, axis=1) >= level - 1e-9  # float tolerance
        return (reached.argmax(axis=1) + 1).astype(float)

    @property
    def median(self) -> np.ndarray:
        """The 50% quantile: the answer with the lowest expected absolute error."""
        return self.quantile(0.5)

    @property
    def mean(self) -> np.ndarray:
        """The probability-weighted mean price (the answer with the lowest expected squared error)."""
        return self.probabilities @ _PRICES

    @property
    def argmax(self) -> np.ndarray:
        """The single most likely whole-dollar price."""
        return (self.probabilities.argmax(axis=1) + 1).astype(float)

    def interval(self, level: float = config.INTERVAL_LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """The central ``level`` interval per book: its (1-level)/2 and (1+level)/2 quantiles."""
        return self.quantile((1 - level) / 2), self.quantile((1 + level) / 2)

    def plot(self, index: int = 0, truth: float | None = None, level: float = config.INTERVAL_LEVEL) -> Figure:
        """Book ``index``'s distribution on a log price axis, with its readings, its ``level`` interval and
        (if given) the true price."""
        figure = Figure(figsize=(8, 3.5))
        axes = figure.subplots()
        axes.bar(_PRICES, self.probabilities[index], width=0.08 * _PRICES, color="steelblue", label="P(price)")
        low, high = (bound[index] for bound in self.interval(level))
        axes.axvspan(low, high, color="steelblue", alpha=0.12, label=f"{level:.0%} interval ${low:.0f}-${high:.0f}")
        marks = [("median", self.median[index], "black", "-"), ("mean", self.mean[index], "darkorange", "--"),
                 ("argmax", self.argmax[index], "purple", ":")]
        if truth is not None:
            marks.append(("truth", truth, "green", "-"))
        for name, price, color, style in marks:
            axes.axvline(price, color=color, linestyle=style, linewidth=1.5, label=f"{name} ${price:.0f}")
        axes.set(xscale="log", xlim=(1, LARGEST_PRICE), xlabel="price ($)", ylabel="probability",
                 title="The model's price distribution for one book")
        axes.legend(fontsize=8, loc="upper right")
        figure.tight_layout()
        return figure

    @property
    def prices(self) -> np.ndarray:
        """The chosen reading, one price per book."""
        return getattr(self, self.reading)

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, index: int) -> float:
        return float(self.prices[index])

    def __iter__(self) -> Iterator[float]:  # the reading computed once, not once per book
        return iter(self.prices.tolist())


class DistributionPredictor:
    """P(price = n), n in 1..999, per book, from any causal LM whose tokenizer writes a price either
    as one token (every number 1..999 a single token) or digit by digit.

    Digit path: P(n) is proportional to P(digits of n, then "." | prompt) for n < 100 and to
    P(digits of n | prompt) for n >= 100 (a fourth digit would leave 1..999); the 999 values are
    renormalised to sum to 1, as the single-token path renormalises the 999 number tokens. Each book
    costs one prompt pass, then 9 and 90 continuations in two batched single-token steps on its
    KV cache (one book at a time: the 90 rows of its cache are the batch).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                 reading: Reading = "median") -> None:
        self.model, self.tokenizer, self.batch_size, self.reading = model, tokenizer, batch_size, reading
        self.number_ids = number_token_ids(tokenizer)
        self.digits = None if self.number_ids is not None else digit_token_ids(tokenizer)
        if self.number_ids is None and self.digits is None:
            raise ValueError(f"{type(tokenizer).__name__} (vocabulary {len(tokenizer):,}) writes prices neither as "
                             f"single tokens 1..{LARGEST_PRICE} nor digit by digit, so no distribution can be read: "
                             "use GeneratePredictor (or llm_predictor, which picks it for you).")

    @property
    def path(self) -> str:
        """``"single-token"`` or ``"digit tree"``."""
        return "single-token" if self.number_ids is not None else "digit tree"

    def distribution(self, prompts: list[str]) -> np.ndarray:
        """``(len(prompts), 999)`` probabilities of the prices 1..999 (each row renormalised to sum to 1)."""
        rows = np.empty((len(prompts), LARGEST_PRICE))
        with torch.inference_mode():
            if self.number_ids is not None:
                ids = torch.tensor(self.number_ids, device=self.model.device)
                for batch in _batches(prompts, self.batch_size, "Forward passes"):
                    inputs = _left_padded(self.tokenizer, [prompts[index] for index in batch], self.model.device)
                    logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :]
                    rows[batch] = torch.softmax(logits[:, ids].double(), dim=-1).cpu().numpy()
            else:
                for index in tqdm(range(len(prompts)), desc="Digit trees", unit="book", leave=False):
                    rows[index] = torch.softmax(self._digit_tree_scores(prompts[index]), dim=-1).cpu().numpy()
        return rows

    def _step(self, tokens: torch.Tensor, cache: object, length: int) -> tuple[torch.Tensor, object]:
        """One single-token step for each row of ``tokens`` on ``cache`` (``length`` tokens so far)."""
        rows = len(tokens)
        output = self.model(input_ids=tokens.view(rows, 1), past_key_values=cache, use_cache=True,
                            attention_mask=torch.ones(rows, length + 1, dtype=torch.long, device=tokens.device),
                            position_ids=torch.full((rows, 1), length, device=tokens.device))
        return torch.log_softmax(output.logits[:, -1, :].double(), dim=-1), output.past_key_values

    def _digit_tree_scores(self, prompt: str) -> torch.Tensor:
        """log P(n written, then its end) for n = 1..999 (not normalised), from one prompt pass."""
        digit_ids, end = self.digits
        device = self.model.device
        digits = torch.tensor(digit_ids, device=device)
        inputs = self.tokenizer(prompt, return_tensors="pt").to(device)
        length = inputs["input_ids"].shape[1]
        output = self.model(**inputs, use_cache=True)
        first = torch.log_softmax(output.logits[0, -1, :].double(), dim=-1)[digits[1:]]  # (9,) d1 = 1..9
        cache = output.past_key_values
        cache.batch_repeat_interleave(9)
        after_one, cache = self._step(digits[1:], cache, length)  # (9, vocab): after d1
        cache.batch_repeat_interleave(10)
        after_two, _ = self._step(digits.repeat(9), cache, length + 1)  # (90, vocab): after d1 d2
        two = first[:, None] + after_one[:, digits]  # (9, 10): log P(d1 d2)
        return torch.cat([
            first + after_one[:, end],  # 1..9
            (two + after_two[:, end].view(9, 10)).flatten(),  # 10..99
            (two[:, :, None] + after_two[:, digits].view(9, 10, 10)).flatten(),  # 100..999
        ])

    def predict(self, items: list[Item]) -> PriceDistributions:
        """The price distribution of each item, read by this predictor's ``reading``."""
        return PriceDistributions(self.distribution([item.test_prompt for item in items]), self.reading)

    def __call__(self, items: list[Item]) -> PriceDistributions:
        return self.predict(items)


class GeneratePredictor:
    """Greedy generation of a few tokens after each prompt, read as a number (None if there is none)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def generate(self, prompts: list[str]) -> list[str]:
        """The text each prompt is continued with."""
        texts: list[str] = [""] * len(prompts)
        with torch.inference_mode():
            for batch in _batches(prompts, self.batch_size, "Generating"):
                inputs = _left_padded(self.tokenizer, [prompts[index] for index in batch], self.model.device)
                output = self.model.generate(
                    **inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                new_tokens = output[:, inputs["input_ids"].shape[1]:]
                for index, text in zip(batch, self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    texts[index] = text
        return texts

    def __call__(self, items: list[Item]) -> list[float | None]:
        return [parse_price(text) for text in self.generate([item.test_prompt for item in items])]


def llm_predictor(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, profile: config.Profile,
                  reading: Reading = "median") -> DistributionPredictor | GeneratePredictor:
    """The price distribution when the tokenizer allows it (single-token numbers or digits), read by ``reading``;
    greedy generation (:class:`GeneratePredictor`) for any other tokenizer."""
    if number_token_ids(tokenizer) is not None or digit_token_ids(tokenizer) is not None:
        return DistributionPredictor(model, tokenizer, profile.predict_batch_size, reading)
    return GeneratePredictor(model, tokenizer, profile.predict_batch_size)
