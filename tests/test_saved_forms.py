"""The saved forms' table: one row per form of one fine-tune, however many notebooks recorded its 4-bit model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_item

from helpers import config, models, saved_forms
from helpers.evaluate import Evaluation
from helpers.hardware import Hardware
from helpers.leaderboard import leaderboard

TRUTHS = np.array([10.0, 20.0, 30.0, 40.0])
NAME = "Fine-tuned (QLoRA r=8), SmolLM2-135M-Instruct"
ERRORS = {"": [2, 4, 2, 4], ", merged bfloat16": [1, 3, 2, 2], ", GGUF f16": [1, 3, 2, 2],
          ", GGUF q8_0": [3, 4, 3, 6]}  # each form's errors, by what its name adds to the 4-bit model's


# llama.cpp's own q4_K_M is scored where llama.cpp runs the GGUF files (tests/test_llamacpp.py); stubbed here, the
# GGUF files are read by transformers
FORMS = [form for form in saved_forms.FORMS if form != "GGUF q4_K_M"]
ITEMS = [make_item(asin=f"B{index:09d}", title=f"Book {index}", price=price) for index, price in enumerate(TRUTHS)]


def _evaluation(name: str) -> Evaluation:
    errors = np.array(ERRORS[name.removeprefix(NAME)], dtype=float)
    return Evaluation(name, TRUTHS, TRUTHS + errors, failures=[])


@pytest.fixture
def scored(tmp_path, monkeypatch):
    """``score_saved_forms`` of the smoke profile under a fresh HOME, its models and their scoring stubbed (the
    leaderboard and its keys are the real ones): call it to score every form once more."""
    monkeypatch.setattr(config, "HOME", tmp_path)
    profile = config.get_profile("smoke")
    fake = SimpleNamespace(dtype=torch.float32, peft_config={"default": SimpleNamespace(r=8)})
    monkeypatch.setattr(models, "load_finetuned", lambda *args, **kwargs: (fake, None))
    monkeypatch.setattr(models, "finetuned_name", lambda *args: NAME)
    monkeypatch.setattr(saved_forms.AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: fake)
    monkeypatch.setattr(saved_forms.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: None)
    monkeypatch.setattr(saved_forms, "load_gguf", lambda *args: (fake, None))
    monkeypatch.setattr(saved_forms, "llm_predictor", lambda *args: None)
    monkeypatch.setattr(saved_forms.llamacpp, "installed", lambda: False)
    monkeypatch.setattr(saved_forms, "evaluate", lambda name, *args, **kwargs: _evaluation(name))
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps({"dtype": "bfloat16"}), encoding="utf-8")
    ggufs = {kind: tmp_path / f"gguf-{kind}" for kind in ("f16", "q8_0")}

    def score():
        return saved_forms.score_saved_forms(profile, None, Hardware.card("cpu"), merged=merged, ggufs=ggufs,
                                             items=ITEMS)
    return profile, score


def test_the_4_bit_model_keeps_one_row_after_notebook_05_and_the_saved_forms_scored_it(scored):
    """Notebook 05 records the adapter under its folder; the saved forms' 4-bit row is that same row (before,
    it was a second row of the same name, and the table showed it with form and size nan)."""
    profile, score = scored
    board = leaderboard(profile)
    adapter = models.adapter_source(profile, None)
    board.record(_evaluation(NAME), key=adapter)  # notebook 05
    for _ in range(2):  # re-running the saved forms replaces their rows
        table = score()
        assert table["form"].tolist() == FORMS and table["key"].is_unique
        assert table["size_mb"].notna().all() and table.loc[0, "key"] == adapter
        assert (board.table()["name"] == NAME).sum() == 1 and len(board.table()) == len(FORMS)
    assert table["diff"].tolist() == pytest.approx([0.0, -1.0, -1.0, 1.0])


def test_a_4_bit_row_notebook_05_scored_again_is_still_the_one_row_of_its_form(scored):
    profile, score = scored
    score()
    board = leaderboard(profile)
    board.record(_evaluation(NAME), key=models.adapter_source(profile, None))  # notebook 05 again: no form, no size
    table = saved_forms.saved_forms(board, models.adapter_source(profile, None))
    assert table["form"].tolist() == FORMS
    assert "| 4-bit + adapter | - | - | - | 3.00 |" in saved_forms.markdown(table)  # no size, reader or speed


def test_each_book_gets_each_form_s_price_as_scored(scored):
    profile, score = scored
    score()
    table = saved_forms.by_book(leaderboard(profile), models.adapter_source(profile, None), ITEMS)
    assert table.columns.tolist() == ["book", "true price", *FORMS]
    assert table["GGUF q8_0"].tolist() == pytest.approx(TRUTHS + np.array(ERRORS[", GGUF q8_0"]))
    lines = saved_forms.by_book_markdown(table, count=2).splitlines()
    assert len(lines) == 4 and lines[2] == "| Book 0 | 10.00 | 12.00 | 11.00 | 11.00 | 13.00 |"
    with pytest.raises(ValueError, match="score the saved forms on them first"):
        saved_forms.by_book(leaderboard(profile), models.adapter_source(profile, None), ITEMS[:2])
