"""Curation: price parsing, scrubbing, prompts, the token filter, the split, saving."""

import json

import pandas as pd
import pytest
from conftest import make_item

from helpers import config
from helpers.assets import llama3_tokenizer_offline
from helpers.curate import balance, curate, split
from helpers.data import open_source, parse_price
from helpers.dataset import load_curated, load_manifest, split_file
from helpers.items import author_name, book_format, describe, parse_details, scrub
from helpers.tokens import count_and_cut_batch


@pytest.fixture(scope="module")
def tokenizer():
    return llama3_tokenizer_offline()


@pytest.mark.parametrize("raw, price", [
    ("8.23", 8.23), ("$12.99", 12.99), ("1,299.00", None), (" 45 ", 45.0), (7, 7.0), (0.5, 0.5),
    ("999.49", 999.49),
])
def test_parse_price_accepts_real_prices(raw, price):
    parsed, reason = parse_price(raw)
    if price is None:  # 1,299.00 parses but is above the range
        assert parsed is None and reason == "price above range"
    else:
        assert parsed == pytest.approx(price) and reason is None


@pytest.mark.parametrize("raw, reason", [
    ("None", "no price"), ("", "no price"), (None, "no price"), (float("nan"), "no price"),
    ("nan", "no price"), (float("inf"), "no price"), ("abc", "unparsable price"),
    ("-3.00", "price below range"), ("0.49", "price below range"), ("0", "price below range"),
    ("1e9", "price above range"), ("999.50", "price above range"), (True, "no price"),
])
def test_parse_price_skips_bad_values_with_a_reason(raw, reason):
    assert parse_price(raw) == (None, reason)


def test_scrub_removes_markup_codes_and_whitespace_runs():
    text = "<p>Great&nbsp;book!</p>   ISBN-13: 978-0701169855 code B07XYZ1234 and   2nd  ed.\n\n\nEnd"
    cleaned = scrub(text)
    assert "<" not in cleaned and "978" not in cleaned and "B07XYZ1234" not in cleaned
    assert "  " not in cleaned and "\n\n" not in cleaned
    assert "Great book!" in cleaned and "2nd ed." in cleaned  # short words with digits stay


def test_scrub_removes_dollar_amounts_so_no_text_gives_the_price_away():
    cleaned = scrub("A $29.99 value! List Price is $1,299.00 (US$ 5)")
    assert "$" not in cleaned and "29" not in cleaned and "1,299" not in cleaned
    assert config.ANSWER_PREFIX not in scrub("Price is $12.00")


def test_scrub_keeps_words_of_six_chars_with_digits_and_removes_seven():
    assert scrub("abc123 abcd123") == "abc123"


def test_details_parse_both_json_and_sentence_forms():
    hub = json.dumps({"Publisher": "Chatto & Windus; First Edition (January 1, 2004)", "Language": "English",
                      "Hardcover": "196 pages", "ISBN-10": "0701169850", "Item Weight": "1.5 pounds"})
    sentence = ("Published by Chatto & Windus, the first edition of this book was released on January 1, "
                "2004. It is written in English and comes in a hardcover format, comprising 196 pages. "
                "The book has an ISBN-10 of 0701169850. Weighing 10.1 ounces, its dimensions are 5 x 7 inches.")
    from_hub, from_text = parse_details(hub), parse_details(sentence)
    assert from_hub["publisher"] == from_text["publisher"] == "Chatto & Windus"
    assert from_hub["pages"] == from_text["pages"] == 196
    assert from_hub["year"] == from_text["year"] == 2004
    assert from_hub["weight_oz"] == 24 and from_text["weight_oz"] == 10.1
    assert "ISBN-10" not in from_hub["useful"]


def test_author_and_format_helpers():
    assert author_name('{"name": "Peter Ackroyd", "about": []}', None) == "Peter Ackroyd"
    assert author_name(None, "Remington Kane (Author)   Format: Kindle Edition") == "Remington Kane"
    assert book_format("Paperback – May 8, 2012") == "paperback"
    assert book_format("", "", "Format: Kindle Edition") == "kindle"
    assert book_format("Pamphlet") == "other"


def test_describe_puts_no_product_codes_or_isbns_in_content():
    record = json.loads(config.SAMPLE_PATH.read_text().splitlines()[0])
    described = describe(record)
    assert record["parent_asin"] not in described["content"]
    assert "ISBN" not in described["content"]
    assert described["content"].startswith("Chaucer")


@pytest.mark.parametrize("price, dollars", [(0.5, 1), (1.49, 1), (2.5, 3), (24.99, 25), (999.49, 999)])
def test_prompts_round_half_up_and_end_where_the_answer_goes(price, dollars):
    item = make_item(price=price, text="Some book")
    assert item.test_prompt == f"{config.QUESTION}\n\nSome book\n\n{config.ANSWER_PREFIX}"
    assert item.prompt == f"{item.test_prompt}{dollars}.00"
    assert item.prompt.startswith("How much does this cost to the nearest dollar?\n\n")


def test_every_answer_from_1_to_999_is_one_llama_token(tokenizer):
    prefix_ids = tokenizer.encode(make_item(price=1).test_prompt, add_special_tokens=False)
    for dollars in range(1, 1000):
        ids = tokenizer.encode(make_item(price=dollars).prompt, add_special_tokens=False)
        assert ids[: len(prefix_ids)] == prefix_ids
        assert ids[len(prefix_ids)] == tokenizer.convert_tokens_to_ids(str(dollars))
        assert tokenizer.decode(ids[len(prefix_ids)]) == str(dollars)


def test_length_filter_keeps_more_than_150_tokens_and_cuts_to_160(tokenizer):
    word = " book"  # one token each
    contents = [word * 150, word * 151, word * 500]
    out = count_and_cut_batch({"content": contents, "skip_reason": ["", "", ""]}, tokenizer)
    assert out["skip_reason"] == ["too few tokens", "", ""]
    assert out["token_count"] == [150, 151, 160]
    assert out["text"][2] == word * 160


def test_price_skip_reason_wins_over_token_reason(tokenizer):
    out = count_and_cut_batch({"content": ["short"], "skip_reason": ["no price"]}, tokenizer)
    assert out["skip_reason"] == ["no price"]


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"asin": [f"A{i:04d}" for i in range(n)], "price": [5.0 + (i % 7) for i in range(n)]})


def test_split_is_seeded_and_independent_of_input_order():
    data = frame(100)
    train, test = split(data, 20, seed=1)
    train2, test2 = split(data.sample(frac=1, random_state=3), 20, seed=1)
    assert list(test["asin"]) == list(test2["asin"]) and len(train) == 80
    assert set(train["asin"]).isdisjoint(test["asin"])
    assert list(split(data, 20, seed=2)[1]["asin"]) != list(test["asin"])


def test_split_refuses_too_little_data():
    with pytest.raises(ValueError, match="too few"):
        split(frame(30), 20)


def test_balance_caps_each_dollar_and_is_reproducible():
    data = frame(140)  # 7 price values, 20 items each
    balanced = balance(data, max_per_dollar=5)
    assert balanced.groupby("price").size().max() == 5 and len(balanced) == 35
    assert list(balance(data.iloc[::-1], 5)["asin"]) == list(balanced["asin"])


def test_sample_loads_through_the_parser_with_the_raw_schema():
    source = open_source(str(config.SAMPLE_PATH))
    tables = list(source.read_shard(0, batch_size=100))
    assert [table.num_rows for table in tables] == [100, 79]
    assert set(config.RAW_COLUMNS) <= set(tables[0].column_names) and source.head(1)[0]["title"] == "Chaucer"
    with pytest.raises(FileNotFoundError, match="sample"):
        open_source("no/such/file.jsonl")


@pytest.fixture(scope="module")
def curated(tokenizer, tmp_path_factory):
    """The smoke sample curated into a temporary data folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "DATA_DIR", tmp_path_factory.mktemp("data"))
        profile = config.get_profile("smoke")
        yield profile, curate(profile, tokenizer)


def test_curation_of_the_sample_counts_every_record(curated):
    profile, curation = curated
    funnel = curation.funnel.set_index("stage")
    assert funnel.loc["raw records", "items"] == 179
    assert funnel["dropped"].sum() == 179 - len(curation.train) - len(curation.test)
    assert len(curation.test) == profile.test_size
    for item in curation.train + curation.test:
        assert config.MIN_PRICE <= item.price <= config.MAX_PRICE
        assert config.MIN_TOKENS < item.token_count <= config.MAX_TOKENS


def test_curated_data_round_trips_from_disk(curated):
    profile, curation = curated
    train, test = load_curated(profile)

    def as_frame(items: list) -> pd.DataFrame:
        return pd.DataFrame([item.to_row() for item in items])

    pd.testing.assert_frame_equal(as_frame(test), as_frame(curation.test))  # NaN-aware
    assert len(train) == len(curation.train)
    manifest = load_manifest(profile)
    assert set(manifest["sha256"]) == {split_file("train"), split_file("test")} and manifest["seed"] == config.SEED


def test_a_tampered_file_is_refused(curated):
    profile, _ = curated
    (profile.curated_dir / split_file("test")).write_bytes(b"half a file")
    with pytest.raises(ValueError, match="manifest"):
        load_curated(profile)


def test_curation_is_identical_with_several_processes_and_other_batches(curated, tokenizer, tmp_path):
    _, single = curated
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "DATA_DIR", tmp_path)
        parallel = curate(config.get_profile("smoke", num_proc=2, batch_size=16), tokenizer)
    assert parallel.manifest["sha256"] == single.manifest["sha256"]
