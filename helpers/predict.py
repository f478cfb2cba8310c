"""Turn a language model into a batched price predictor for the evaluation harness.

Two decoders, both reading the prompt that ends with "Price is $":

* :class:`NumberTokenPredictor`: when the tokenizer writes every whole number 1..999 as ONE
  token (Llama 3.1 does), one forward pass reads the next-token distribution over those
  999 tokens: its argmax is a price, and its probability-weighted mean another;
* :class:`GeneratePredictor`: greedy generation of a few tokens, parsed as a number; it works
  with any tokenizer, including those that split numbers into digits (SmolLM2 does).

Both predictors are called as ``predictor(items) -> list[price | None]``; use them with
``evaluate(name, predictor, items, batched=True)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftConfig, PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from helpers import assets, config, finetune
from helpers.items import Item

LARGEST_PRICE = 999  # every price in the course rounds to 1..999 dollars
MAX_NEW_TOKENS = 6  # "999.00" digit by digit; a whole-number tokenizer needs 3 ("999", ".", "00")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name


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


@dataclass
class NumberPredictions:
    """The two readings of the next-token distribution over the numbers 1..999."""

    argmax: np.ndarray  # the single most likely whole-dollar price
    expected: np.ndarray  # the probability-weighted mean price


class NumberTokenPredictor:
    """One forward pass per batch: the next-token distribution restricted to the numbers 1..999.

    Calling it returns the argmax, the price greedy generation would write, only faster;
    :meth:`predict` returns both readings (argmax and expected price) from one pass.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> None:
        ids = number_token_ids(tokenizer)
        if ids is None:
            raise ValueError(f"{type(tokenizer).__name__} (vocabulary {len(tokenizer):,}) does not write every "
                             f"number 1..{LARGEST_PRICE} as a single token, so one forward pass cannot read a "
                             "price: use GeneratePredictor (or llm_predictor, which picks it for you).")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.number_ids = torch.tensor(ids)
        self.prices = torch.arange(1, LARGEST_PRICE + 1, dtype=torch.float32)

    def distribution(self, prompts: list[str]) -> torch.Tensor:
        """``(len(prompts), 999)`` probabilities of the next token being 1..999 (renormalised)."""
        device = self.model.device
        rows = torch.empty(len(prompts), LARGEST_PRICE)
        with torch.inference_mode():
            for batch in _batches(prompts, self.batch_size, "Forward passes"):
                inputs = _left_padded(self.tokenizer, [prompts[index] for index in batch], device)
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :]
                rows[batch] = torch.softmax(logits[:, self.number_ids.to(device)].float(), dim=-1).cpu()
        return rows

    def predict(self, items: list[Item]) -> NumberPredictions:
        """Both readings for ``items`` from one forward pass."""
        probabilities = self.distribution([item.test_prompt for item in items])
        return NumberPredictions(
            argmax=(probabilities.argmax(dim=-1) + 1).numpy().astype(float),
            expected=(probabilities @ self.prices).numpy().astype(float),
        )

    def argmax(self, items: list[Item]) -> list[float]:
        return self.predict(items).argmax.tolist()

    def expected(self, items: list[Item]) -> list[float]:
        return self.predict(items).expected.tolist()

    def __call__(self, items: list[Item]) -> list[float]:
        return self.argmax(items)


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


def llm_predictor(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  profile: config.Profile) -> NumberTokenPredictor | GeneratePredictor:
    """The fastest predictor the tokenizer allows.

    Llama 3.1 (full profile) writes every number 1..999 as one token, so a single forward
    pass prices a whole batch (:class:`NumberTokenPredictor`). SmolLM2 (smoke profile)
    splits "21" into "2" and "1", so no single next token can hold a price: it takes the
    generate path (:class:`GeneratePredictor`), a few decoding steps per batch.
    """
    if number_token_ids(tokenizer) is not None:
        return NumberTokenPredictor(model, tokenizer, profile.predict_batch_size)
    return GeneratePredictor(model, tokenizer, profile.predict_batch_size)


def _adapter_config(adapter: str, profile: config.Profile, default: bool) -> PeftConfig:
    """The adapter's configuration, read before the base model loads; a missing one names the fix."""
    folder = Path(adapter).expanduser()
    if folder.is_dir() or not _HUB_ID.match(adapter):
        if not (folder / "adapter_config.json").exists():
            fix = (f"run notebook 04 or `python -m helpers.train --profile {profile.name}` first, or set "
                   "ADAPTER to a trained adapter" if default else "set ADAPTER to a trained adapter")
            raise FileNotFoundError(f"No LoRA adapter in {folder} (no adapter_config.json): {fix}: its folder "
                                    "(a run's `qlora/adapter`) or its hub id (owner/name).")
        return PeftConfig.from_pretrained(str(folder))
    try:
        return PeftConfig.from_pretrained(adapter, **assets.hub_options())
    except ValueError as error:
        raise FileNotFoundError(
            f"{adapter!r} is neither a folder here nor a LoRA adapter on the Hugging Face hub "
            f"({error.__cause__ or error}). Check the hub id (owner/name) or the folder; a private hub repo "
            "needs HF_TOKEN (Colab: Secrets)."
        ) from error


def load_finetuned(profile: config.Profile, adapter: str | Path | None = None) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The 4-bit base model with a trained LoRA adapter attached, ready for inference.

    ``adapter``: a folder holding ``adapter_config.json``, or the hub id of an adapter repo (say, the one a
    workshop's teacher trained and shared); default: this profile's run (``runs/<profile>/qlora/adapter``).
    The adapter must have been trained on this profile's base model.
    """
    source = str(adapter or finetune.adapter_dir(finetune.default_run_dir(profile)))
    trained_on = _adapter_config(source, profile, default=not adapter).base_model_name_or_path
    expected = assets.model_path(profile.base_model)
    if trained_on and Path(trained_on).name.lower() != Path(expected).name.lower():
        raise ValueError(f"The adapter {source} was trained on {trained_on}, but profile {profile.name!r} loads "
                         f"{expected}: set PROFILE to the profile the adapter was trained with.")
    base, tokenizer = finetune.load_base_model(profile)  # the tokenizer saved with the adapter is this one
    model = PeftModel.from_pretrained(base, source, **assets.hub_options())
    model.eval()
    return model, tokenizer
