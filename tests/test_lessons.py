"""The lessons' visible steps agree with the package: notebook 01's walk of one record builds the prompt that
curation saves for it, and notebook 03's hand reading of one book gives the package reader's distribution."""

from __future__ import annotations

import contextlib
import io
import re

import nbformat
import numpy as np
import pytest
import torch
from conftest import make_item
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import assets, config
from helpers import curate as curation_steps
from helpers.data import parse_price
from helpers.items import Item, scrub
from helpers.predict import DistributionPredictor, digit_token_ids, number_token_ids

NOTEBOOKS = config.REPO_ROOT / "notebooks"
WALK_CELLS = ("01-03", "01-05", "01-08", "01-10", "01-12", "01-14", "01-16", "01-18", "01-20")
READING_CELLS = ("03-09", "03-11", "03-13", "03-15", "03-17")


def cells(number: str) -> dict[str, str]:
    """The source of each cell of lesson ``number``, by cell id."""
    (path,) = NOTEBOOKS.glob(f"{number}_*.ipynb")
    return {cell.id: cell.source for cell in nbformat.read(path, as_version=4).cells}


def run_cells(number: str, ids: tuple[str, ...], namespace: dict) -> tuple[dict, str]:
    """Exec the cells ``ids`` of lesson ``number`` in ``namespace`` (IPython magics dropped): it, and what they
    printed."""
    sources = cells(number)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for cell in ids:
            exec(re.sub(r"^%.*$", "", sources[cell], flags=re.M), namespace)
    return namespace, printed.getvalue()


# --- notebook 01: one record, step by step ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def walk() -> tuple[dict, str]:
    return run_cells("01", WALK_CELLS, {"PROFILE": "smoke", "HOME": "", "BASE_MODEL": ""})


def test_the_walked_record_is_the_item_curation_saves(walk, tmp_path):
    namespace, printed = walk
    walked, record = namespace["walked"], namespace["record"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "DATA_DIR", tmp_path)
        curation = curation_steps.curate(config.get_profile("smoke"), namespace["tokenizer"])
    (curated,) = [item for item in curation.train + curation.test if item.asin == namespace["WALK_ASIN"]]
    assert isinstance(walked, Item) and walked.prompt == curated.prompt
    assert walked.prompt.startswith(config.QUESTION) and walked.prompt.endswith(f"{config.ANSWER_PREFIX}7.00")
    assert walked.to_row() == pytest.approx(curated.to_row(), nan_ok=True)
    packaged, reason = curation_steps.item_from_record(record, namespace["tokenizer"], parse_price(record["price"])[0])
    assert reason == "" and packaged.to_row() == pytest.approx(walked.to_row(), nan_ok=True)
    assert "item_from_record builds the same prompt: True" in printed


def test_the_walked_record_shows_what_the_markdown_says(walk):
    """The record was chosen to show the scrubber at work: a dollar amount in its blurb, ISBNs in its details;
    and its text is long enough to be kept and cut."""
    namespace, printed = walk
    blurb, details = namespace["record"]["features"][0], namespace["record"]["details"]
    assert "$150,000" in blurb and "$" not in scrub(blurb)
    assert "978-0871138255" in details and "0871138255" not in scrub(details)
    assert len(namespace["ids"]) > config.MAX_TOKENS and namespace["walked"].token_count == config.MAX_TOKENS
    assert "kept (the rule: more than 150)" in printed


def test_the_funnel_ends_with_the_split_and_the_time_reads_as_text(walk, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "DATA_DIR", tmp_path)
        curation = curation_steps.curate(config.get_profile("smoke"), walk[0]["tokenizer"])
    last = curation.funnel.iloc[-1]
    assert last["stage"] == f"split: {len(curation.train)} train + {len(curation.test)} test"
    assert last["items"] == len(curation.train) + len(curation.test) and last["dropped"] == 0
    assert re.fullmatch(r"\d+\.\d s \(curating the shards \d+\.\d s; dedup, balance and split \d+\.\d s\)",
                        curation_steps.timing(curation.manifest))


# --- notebook 03: one book's distribution, by hand ----------------------------------------------------------------
def random_model(tokenizer) -> LlamaForCausalLM:
    """A random 2-layer Llama with ``tokenizer``'s vocabulary, in float32 (no 4-bit rounding)."""
    torch.manual_seed(config.SEED)
    settings = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                           attn_implementation="sdpa")
    return LlamaForCausalLM(settings).eval()


@pytest.mark.parametrize("tokenizer_source, path", [("smollm2", "digit tree"), ("llama-models", "single-token")])
def test_the_hand_reading_of_one_book_is_the_package_readers(tokenizer_source, path):
    tokenizer = assets.load_tokenizer(tokenizer_source)
    model = random_model(tokenizer)
    book = make_item()  # a short prompt: the cell keeps the logits of every position
    namespace = {"PROFILE": "smoke", "BASE_MODEL": "", "profile": config.get_profile("smoke"), "items": [book],
                 "model": model, "tokenizer": tokenizer}
    imports = cells("03")["03-03"].split("\nprofile = ")[0]  # the lesson's imports, without its data and leaderboard
    exec(re.sub(r"^%.*$", "", imports, flags=re.M), namespace)
    namespace, printed = run_cells("03", READING_CELLS, namespace)
    predictor = namespace["predictor"]
    assert predictor.path == path and isinstance(predictor, DistributionPredictor)
    assert (namespace["number_ids"] is None) == (number_token_ids(tokenizer) is None)
    assert (namespace["digits"] is None) == (digit_token_ids(tokenizer) is None)
    package = DistributionPredictor(model, tokenizer, batch_size=2).distribution([book.test_prompt])[0]
    np.testing.assert_allclose(namespace["probabilities"], package, rtol=1e-5, atol=1e-12)
    assert namespace["by_hand"].median[0] == namespace["packaged"].median[0]
    assert [bound[0] for bound in namespace["by_hand"].interval()] == [bound[0] for bound in
                                                                       namespace["packaged"].interval()]
    assert f"path: {path}" in printed and "By hand: median $" in printed and "Package: median $" in printed
