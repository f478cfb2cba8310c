"""The ungated GPU profile (lite-open): SmolLM2-1.7B's settings through the real path, on its real widths.

A randomly initialised Llama with SmolLM2-1.7B's widths and vocabulary (49,152) but ONE decoder layer,
saved with SmolLM2's own tokenizer (the smoke model's, the same vocabulary) in a folder named like the
hub model, is the profile's base model: its tokenizer sets max_length, its prices come from the digit
tree, and its export carries its Apache-2.0 license.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from helpers import assets, config, export, finetune, licensing, plan
from helpers.dataset import load_curated
from helpers.hardware import Hardware
from helpers.models import load_finetuned, save_random_model
from helpers.predict import DistributionPredictor
from helpers.runs import RunDir

CPU = Hardware.card("cpu")


@pytest.fixture(scope="module")
def open_profile(tmp_path_factory, as_full_data) -> config.Profile:
    folder = tmp_path_factory.mktemp("models") / "SmolLM2-1.7B"  # a local copy keeps the hub model's name
    save_random_model(plan.SMOLLM2_1_7B_SHAPE, folder, assets.load_tokenizer("smollm2"), layers=1)
    lite_open = config.get_profile("lite-open")
    return config.get_profile("lite-open", base_model=str(folder), train_subset=12, eval_size=4,
                              training=replace(lite_open.training, max_steps=2, batch_size=2,
                                               gradient_accumulation_steps=1))


def test_the_open_profile_needs_no_gated_model():
    lite_open = config.get_profile("lite-open")
    assert config.base_license(lite_open.base_model) == "apache-2.0"
    assert lite_open.curated_from == "full" and lite_open.training.max_length is None


def test_its_own_tokenizer_sets_max_length(open_profile):
    planned = plan.make_plan(open_profile, CPU)
    items = plan.training_items(open_profile)[0]
    tokenizer = assets.load_tokenizer("smollm2")
    longest = max(len(ids) + 1 for ids in tokenizer([item.prompt for item in items])["input_ids"])
    assert longest <= planned.training.max_length < longest + plan.MAX_LENGTH_MULTIPLE
    llama_tokens = plan.mean_tokens(assets.llama3_tokenizer_offline(), items)
    assert plan.mean_tokens(tokenizer, items) > llama_tokens  # a digit tokenizer writes the same prompts longer


@pytest.mark.slow
def test_the_open_profile_trains_through_train_and_prices_by_the_digit_tree(open_profile, tmp_path):
    planned = plan.make_plan(open_profile, CPU, run=RunDir(tmp_path / "run"))
    result = finetune.train(open_profile, CPU, planned)
    assert result.status == "trained" and result.run_card["global_step"] == 2
    assert result.run_card["hyperparameters"]["max_length"] == planned.training.max_length
    model, tokenizer = load_finetuned(open_profile, result.adapter_dir, CPU)
    predictor = DistributionPredictor(model, tokenizer, batch_size=2)
    assert predictor.path == "digit tree"
    books = load_curated(open_profile)[1][:3]
    distributions = predictor.predict(books)
    assert distributions.probabilities.shape == (3, 999)
    assert abs(distributions.probabilities.sum(axis=1) - 1).max() < 1e-9


def test_its_export_carries_its_own_license_and_no_llama_naming_rule(open_profile, monkeypatch):
    assert licensing.license_files(open_profile) == {"LICENSE.txt": config.REPO_ROOT / "LICENSE"}
    assert "Apache License" in licensing.notice(open_profile)
    monkeypatch.setattr(export, "hub_write_token", lambda: "a token")
    export.check_push(open_profile, "you/book-pricer")  # no "Llama" prefix needed


def test_a_tokenizer_that_writes_prices_neither_way_stops_the_plan(open_profile, monkeypatch):
    class Words:
        """A tokenizer that spells every number as one word piece per character pair: no path applies."""

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [sum(map(ord, text[index:index + 2])) for index in range(0, len(text), 2)]

        def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
            return {"input_ids": [self.encode(text) for text in texts]}

        def batch_decode(self, sequences: list[list[int]], **options: object) -> list[str]:
            return ["?" * len(ids) for ids in sequences]

        def decode(self, ids: list[int], **options: object) -> str:
            return "?" * len(ids)

    with pytest.raises(ValueError, match="neither as single tokens.*nor digit by digit.*another base model"):
        plan.check_price_tokens(Words(), "someone/odd-model")
