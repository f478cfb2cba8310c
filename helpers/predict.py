"""Turn a language model into a batched price predictor for the evaluation harness.

:class:`DistributionPredictor` reads the model's whole distribution over the prices 1..999 after
the prompt that ends with "Price is $", by the path the tokenizer allows:

* single-token numbers (Llama 3.1 writes every number 1..999 as ONE token): one forward pass per
  batch, the next-token softmax over those 999 tokens;
* digit tokenizers (SmolLM2, Qwen, Gemma write "21" as "2", "1"): the chain rule over the digit
  tree, P(d1) P(d2|d1) P(d3|d1 d2), with P(end | digits) read from the "." that follows a price
  ("21.00"), also one forward pass per batch: the left-padded prompts, each followed by its 99
  branch tokens under a tree-shaped attention mask.

Which path a tokenizer allows is read from how it writes every price 1..999 after the prompt
(:func:`number_token_ids`, :func:`digit_token_ids`). Its readings (:class:`PriceDistributions`):
the median (the answer that minimises the expected absolute error, the default), the mean, the
argmax, and central intervals. :class:`GeneratePredictor` (greedy generation, parsed as a number)
works with any tokenizer; it is the benchmark's reference and the fallback for a tokenizer that fits
neither path. Every predictor is a :class:`helpers.pricing.Predictor`, called as ``predictor(items)``, with a
``path`` ("single-token", "digit tree" or "greedy generation") and a ``reading`` (a distribution's "median",
"mean" or "argmax", or "point"); use it with ``evaluate(name, predictor, items, batched=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from helpers import config
from helpers.charts import dollar_axis, dollars, price_limits
from helpers.items import Item
from helpers.pricing import POINT, Reading

LARGEST_PRICE = 999  # every price in the course rounds to 1..999 dollars
MAX_NEW_TOKENS = 6  # "999.00" digit by digit; a whole-number tokenizer needs 3 ("999", ".", "00")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def parse_price(text: str) -> float | None:
    """The first number in generated ``text`` ("21.00" -> 21.0, "1,299" -> 1299.0), else None."""
    match = _NUMBER.search(text)
    return float(match.group().replace(",", "")) if match else None


_ANSWER_CONTEXT = f"\n\n{config.ANSWER_PREFIX}"  # how every test prompt ends (Item.test_prompt)


def _written_prices(tokenizer: PreTrainedTokenizerBase) -> list[list[int]] | None:
    """Per price n = 1..999 (index n-1), the token ids the tokenizer writes after a prompt for the answer the model
    learns ("Price is $21.00", Item.completion), or None if the prompt's own tokens change when a price follows."""
    context = tokenizer.encode(_ANSWER_CONTEXT, add_special_tokens=False)
    written = tokenizer([f"{_ANSWER_CONTEXT}{number}.00" for number in range(1, LARGEST_PRICE + 1)],
                        add_special_tokens=False)["input_ids"]
    if any(ids[:len(context)] != context or len(ids) == len(context) for ids in written):
        return None
    return [ids[len(context):] for ids in written]


def number_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """Token ids of the numbers 1..999 (index n-1 holds n) if the tokenizer writes every price after the prompt as
    ONE token ("Price is $905.00" -> ..., "905", ".", ...), else None."""
    written = _written_prices(tokenizer)
    if written is None:
        return None
    ids = [tokens[0] for tokens in written]
    texts = tokenizer.batch_decode([[token] for token in ids])
    return ids if all(text.strip() == str(number) for number, text in enumerate(texts, start=1)) else None


@dataclass(frozen=True)
class DigitTokens:
    """How a tokenizer writes a price digit by digit after the prompt: "21.00" as the first digit "2", the digit
    "1", then the end "."."""

    first: tuple[int, ...]  # index d-1: the id of a first digit d = 1..9 (" 2" for a tokenizer that writes "$ 21")
    digits: tuple[int, ...]  # index d: the id of a later digit d = 0..9
    end: int  # the "." after the last digit

    def path(self, number: int) -> list[int]:
        """The ids of ``number``'s digits, as written after the prompt."""
        first, *rest = str(number)
        return [self.first[int(first) - 1], *(self.digits[int(digit)] for digit in rest)]


def digit_token_ids(tokenizer: PreTrainedTokenizerBase) -> DigitTokens | None:
    """The digit and end ids if the tokenizer writes every price 1..999 after the prompt digit by digit and then "."
    ("Price is $905.00" -> ..., "9", "0", "5", ".", ...), else None (say "21" is one token, or "." is not)."""
    written = _written_prices(tokenizer)
    if written is None or any(len(tokens) <= len(str(number)) for number, tokens in enumerate(written, start=1)):
        return None
    tokens = DigitTokens(first=tuple(written[digit - 1][0] for digit in range(1, 10)),  # "1.00" .. "9.00"
                         digits=tuple(written[9 + digit][1] for digit in range(10)),  # "10.00" .. "19.00"
                         end=written[0][1])
    texts = [text.strip() for text in tokenizer.batch_decode([[token] for token in (*tokens.first, *tokens.digits,
                                                                                      tokens.end)])]
    if texts != [*"123456789", *"0123456789", "."]:
        return None
    every_price = all(ids[:len(str(number)) + 1] == [*tokens.path(number), tokens.end]
                      for number, ids in enumerate(written, start=1))
    return tokens if every_price else None


def _batches(prompts: list[str], batch_size: int, description: str) -> tqdm:
    """Indices of ``prompts`` in batches of similar length (less padding), longest first, with a progress bar."""
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return tqdm(batches, desc=description, unit="batch", leave=False, disable=config.progress_bars_off())


def _left_padded(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device) -> dict:
    """Prompts as one left-padded batch, so that every row's last position is its last token."""
    return tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt").to(device)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens (left padding does not count; a pad gets 0)."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


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
        axes.axvspan(low, high, color="steelblue", alpha=0.12,
                     label=f"{level:.0%} interval {dollars(low)}-{dollars(high)}")
        marks = [("median", self.median[index], "black", "-"), ("mean", self.mean[index], "darkorange", "--"),
                 ("argmax", self.argmax[index], "purple", ":")]
        if truth is not None:
            marks.append(("truth", truth, "green", "-"))
        for name, price, color, style in marks:
            axes.axvline(price, color=color, linestyle=style, linewidth=1.5, label=f"{name} {dollars(price)}")
        mass = self.quantile(0.005)[index], self.quantile(0.995)[index]  # where 99% of the probability lies
        axes.set(xscale="log", xlim=price_limits(*mass, *(mark[1] for mark in marks)), xlabel="price",
                 ylabel="probability", title="The model's price distribution for one book")
        dollar_axis(axes.xaxis)
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


def digit_tree_scores(logits: torch.Tensor, scored: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``(books, 999)`` log P(n written, then its end), n = 1..999 (not normalised), from ``logits``: ``(books, 100
    positions, vocabulary)`` at the prompt's last token, then after each first digit d1 (9), then after each d1 d2
    (90, d1 by d1); ``scored``: the ids of the first digits 1..9, the digits 0..9 and the end (:class:`DigitTokens`)."""
    log_p = (logits[..., scored] - logits.logsumexp(dim=-1, keepdim=True)).double()  # (books, 100, 20)
    books = len(log_p)
    first = log_p[:, 0, :9]  # (books, 9): log P(d1)
    after_one = log_p[:, 1:10, 9:]  # (books, 9, 11): after d1, log P(d2) and log P(end)
    after_two = log_p[:, 10:, 9:].reshape(books, 9, 10, 11)  # after d1 d2, log P(d3) and log P(end)
    two = first[..., None] + after_one[..., :10]  # (books, 9, 10): log P(d1 d2)
    return torch.cat([
        first + after_one[..., 10],  # 1..9
        (two + after_two[..., 10]).flatten(1),  # 10..99
        (two[..., None] + after_two[..., :10]).flatten(1),  # 100..999
    ], dim=1)


TREE_BRANCHES = 99  # the tokens after each prompt in the digit tree: 9 first digits d1, then 10 digits d2 after each
_TREE_ATTENTION = ("sdpa", "eager")  # attention implementations that take the digit tree's 4D mask as it is


class DistributionPredictor:
    """P(price = n), n in 1..999, per book, from any causal LM whose tokenizer writes a price either
    as one token (every number 1..999 a single token) or digit by digit.

    Digit path: P(n) is proportional to P(digits of n, then "." | prompt) for n < 100 and to
    P(digits of n | prompt) for n >= 100 (a fourth digit would leave 1..999); the 999 values are
    renormalised to sum to 1, as the single-token path renormalises the 999 number tokens. A batch of
    books costs ONE forward pass: each left-padded prompt is followed by its 99 branch tokens (the 9
    first digits d1, then the 10 digits d2 after each d1) under a tree-shaped attention mask, in which
    a branch token sees its book's real prompt tokens, its own d1 and itself, at the position it would
    have after the prompt alone. The logits at the prompt's last token give P(d1), at a d1 P(d2 | d1)
    and P(end | d1), at a d2 P(d3 | d1 d2) and P(end | d1 d2).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                 reading: Reading = "median") -> None:
        self.model, self.tokenizer, self.batch_size, self.reading = model, tokenizer, batch_size, reading
        self.number_ids = number_token_ids(tokenizer)
        self.digits = None if self.number_ids is not None else digit_token_ids(tokenizer)
        if self.number_ids is None and self.digits is None:
            raise ValueError(
                f"{type(tokenizer).__name__} (vocabulary {len(tokenizer):,}) writes a price neither as one token "
                f"(1..{LARGEST_PRICE}) nor digit by digit and then '.' (it writes '{config.ANSWER_PREFIX}905.00' as "
                f"{tokenizer.tokenize(f'{config.ANSWER_PREFIX}905.00')}), so no price distribution can be read: use "
                "GeneratePredictor (greedy generation), or llm_predictor, which picks it for such a tokenizer.")
        if self.digits is not None:
            attention = model.config._attn_implementation
            if attention not in _TREE_ATTENTION:
                raise ValueError(f"The digit tree needs a custom 4D attention mask, which {attention!r} attention "
                                 "does not take: load the model with attn_implementation='sdpa' (or 'eager').")
            device = model.device
            self._branches = torch.tensor([*self.digits.first, *self.digits.digits * 9], device=device)
            self._depths = torch.tensor([0] * 9 + [1] * 90, device=device)  # a d1 one past the prompt, a d2 two
            self._scored = torch.tensor([*self.digits.first, *self.digits.digits, self.digits.end], device=device)
            seen = torch.eye(TREE_BRANCHES, dtype=torch.bool, device=device)  # among the branches: itself and its d1
            seen[torch.arange(9, TREE_BRANCHES), torch.arange(90) // 10] = True
            self._branches_seen = seen

    @property
    def path(self) -> str:
        """``"single-token"`` or ``"digit tree"``."""
        return "single-token" if self.number_ids is not None else "digit tree"

    def distribution(self, prompts: list[str]) -> np.ndarray:
        """``(len(prompts), 999)`` probabilities of the prices 1..999 (each row renormalised to sum to 1)."""
        rows = np.empty((len(prompts), LARGEST_PRICE))
        scores = self._number_scores if self.number_ids is not None else self._digit_tree_scores
        with torch.inference_mode():
            for batch in _batches(prompts, self.batch_size, "Forward passes"):
                rows[batch] = torch.softmax(scores([prompts[index] for index in batch]), dim=-1).cpu().numpy()
        return rows

    def _number_scores(self, prompts: list[str]) -> torch.Tensor:
        """``(books, 999)`` logits of the number tokens 1..999 after each prompt, from one forward pass."""
        inputs = _left_padded(self.tokenizer, prompts, self.model.device)
        logits = self.model(**inputs, position_ids=_positions(inputs["attention_mask"]), logits_to_keep=1).logits
        return logits[:, -1, self.number_ids].double()

    def _tree_mask(self, real: torch.Tensor) -> torch.Tensor:
        """The ``(books, 1, query, key)`` attention mask of left-padded prompts (``real``: their attention mask)
        followed by their branch tokens: a prompt token sees its book's real tokens up to itself, a branch token
        its book's real prompt tokens, its d1 and itself, a pad only itself (no row is empty)."""
        books, length = real.shape
        size = length + TREE_BRANCHES
        seen = torch.zeros(books, size, size, dtype=torch.bool, device=real.device)
        causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
        seen[:, :length, :length] = causal & real[:, None, :]
        seen[:, length:, :length] = real[:, None, :]
        seen[:, length:, length:] = self._branches_seen
        seen.diagonal(dim1=1, dim2=2).fill_(True)
        if self.model.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
            dtype = self.model.get_input_embeddings().weight.dtype
            return torch.zeros(seen.shape, dtype=dtype, device=real.device).masked_fill_(
                ~seen, torch.finfo(dtype).min)[:, None]
        return seen[:, None]

    def _digit_tree_scores(self, prompts: list[str]) -> torch.Tensor:
        """``(books, 999)`` log P(n written, then its end), n = 1..999 (not normalised), from one forward pass."""
        inputs = _left_padded(self.tokenizer, prompts, self.model.device)
        real = inputs["attention_mask"].bool()
        books = len(real)
        positions = torch.cat([_positions(inputs["attention_mask"]), real.sum(dim=1, keepdim=True) + self._depths],
                              dim=1)
        logits = self.model(input_ids=torch.cat([inputs["input_ids"], self._branches.expand(books, -1)], dim=1),
                            attention_mask=self._tree_mask(real), position_ids=positions,
                            logits_to_keep=TREE_BRANCHES + 1, use_cache=False).logits.float()
        return digit_tree_scores(logits, self._scored)

    def predict(self, items: list[Item]) -> PriceDistributions:
        """The price distribution of each item, read by this predictor's ``reading``."""
        return PriceDistributions(self.distribution([item.test_prompt for item in items]), self.reading)

    def __call__(self, items: list[Item]) -> PriceDistributions:
        return self.predict(items)


class GeneratedPrices(list[float | None]):
    """The price greedy generation wrote for each book (None where it wrote no number): one answer, no
    distribution, so the harness scores no interval."""

    def plot(self, index: int = 0, truth: float | None = None) -> Figure:
        """Book ``index``'s answer (and, if given, the true price) on the log price axis of
        :meth:`PriceDistributions.plot`."""
        figure = Figure(figsize=(8, 3.5))
        axes = figure.subplots()
        price = self[index]
        marks = [("generated", price, "black", "-")] if price is not None else []
        if truth is not None:
            marks.append(("truth", truth, "green", "-"))
        for name, value, color, style in marks:
            axes.axvline(value, color=color, linestyle=style, linewidth=1.5, label=f"{name} {dollars(value)}")
        answer = "no number written" if price is None else "one price, no distribution"
        limits = price_limits(*(mark[1] for mark in marks), margin=3) if marks else (1, LARGEST_PRICE)
        axes.set(xscale="log", xlim=limits, xlabel="price", yticks=[],
                 title=f"Greedy generation's answer for one book: {answer}")
        dollar_axis(axes.xaxis)
        if marks:
            axes.legend(fontsize=8, loc="upper right")
        figure.tight_layout()
        return figure


class GeneratePredictor:
    """Greedy generation of a few tokens after each prompt, read as a number (None if there is none)."""

    path = "greedy generation"
    reading = POINT

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

    def __call__(self, items: list[Item]) -> GeneratedPrices:
        return GeneratedPrices(parse_price(text) for text in self.generate([item.test_prompt for item in items]))


def llm_predictor(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, profile: config.Profile,
                  reading: Reading = "median") -> DistributionPredictor | GeneratePredictor:
    """The price distribution (:class:`DistributionPredictor`) when the tokenizer allows it (single-token numbers
    or digits), read by ``reading``; greedy generation (:class:`GeneratePredictor`) for any other tokenizer."""
    if number_token_ids(tokenizer) is not None or digit_token_ids(tokenizer) is not None:
        return DistributionPredictor(model, tokenizer, profile.predict_batch_size, reading)
    return GeneratePredictor(model, tokenizer, profile.predict_batch_size)
