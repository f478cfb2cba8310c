"""The demo page, served for real and called through gradio_client, and what it prices: curation's own Item."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from gradio_client import Client
from httpx import HTTPError

from helpers import assets, baselines, config, demo
from helpers.curate import curate, curate_batch, item_from_record
from helpers.data import open_source
from helpers.dataset import has_curated, load_curated
from helpers.hardware import Hardware
from helpers.items import Item
from helpers.runs import RunDir
from helpers.tokens import KEPT


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """The smoke profile with its runs and results under a fresh folder (the curated sample stays shared)."""
    profile = config.get_profile("smoke")
    if not has_curated(profile):
        curate(profile)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "HOME", tmp_path_factory.mktemp("home"))
        yield profile


@pytest.fixture(scope="module")
def pricer(profile, save_adapter) -> demo.Pricer:
    """The demo's models for the smoke profile's run (a trained-looking adapter)."""
    save_adapter(profile, RunDir.default(profile).adapter)
    return demo.Pricer(profile, None, Hardware.detect())


@pytest.fixture(scope="module")
def page(pricer):
    """The demo page, served on a free local port."""
    page = demo.build(pricer)
    page.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield page
    page.close()


@pytest.fixture(scope="module")
def sample_records() -> dict[str, dict]:
    lines = config.SAMPLE_PATH.read_text(encoding="utf-8").splitlines()
    return {record["parent_asin"]: record for record in map(json.loads, lines)}


SERVER_START_TIMEOUT_S = 240  # loading the 4-bit model on a busy 2-core CPU


@pytest.mark.slow
def test_a_real_sample_book_gets_a_price_through_the_served_page(page, profile, sample_records):
    test_book = load_curated(profile)[1][0]
    book = demo.Book.from_record(sample_records[test_book.asin])
    answer, chart, prompt = Client(page.local_url, verbose=False).predict(*demo.form_values(book),
                                                                          api_name=f"/{demo.API_NAME}")
    assert answer.startswith("### $") and f"{config.INTERVAL_LEVEL:.0%} interval $" in answer
    assert "Best classical baseline, **Gradient boosting (text + features)**: $" in answer
    assert chart  # the distribution's plot came back
    assert prompt == test_book.test_prompt  # the prompt this book was curated with, nothing else
    assert prompt.startswith(config.QUESTION) and prompt.endswith(config.ANSWER_PREFIX) and book.title in prompt


@pytest.mark.slow
@pytest.mark.parametrize("book, message", [
    (demo.Book("", blurb="   "), "Type at least a title or a blurb"),
    (demo.Book("?!", blurb="..."), "Type at least a title or a blurb"),
    (demo.Book("A Book", pages=-3, blurb="A blurb."), "Pages must be between 1 and 20,000"),
    (demo.Book("A Book", format="paperback", subtitle="Hardcover – May 1, 2001"), "The subtitle says hardcover"),
    (demo.Book("A Book", details="Weight: 2 pounds"), "More details takes one 'Key: value' a line"),
])
def test_an_empty_absurd_or_contradictory_form_gets_a_clear_message(page, book, message):
    answer, chart, prompt = Client(page.local_url, verbose=False).predict(*demo.form_values(book),
                                                                          api_name=f"/{demo.API_NAME}")
    assert answer.startswith("**Cannot price this yet.**") and message in answer and "Traceback" not in answer
    assert chart is None and prompt == ""


@pytest.mark.slow
def test_a_short_book_is_priced_with_a_note(pricer):
    quote = pricer.quote(demo.Book("Dune", author="Frank Herbert", format="hardcover", pages=412))
    assert quote.item.token_count < config.MIN_TOKENS and 1 <= quote.price <= 999
    assert quote.skip_reason == "too few tokens" and "curation would have skipped this book" in quote.markdown()


def test_a_curated_book_becomes_the_same_item_in_the_demo(profile, sample_records):
    """The demo's path (one raw record) and curation's (batches of records) make the same Item."""
    tokenizer = assets.load_tokenizer(profile.tokenizer_source)
    for curated in load_curated(profile)[1][:5]:
        item, reason = item_from_record(sample_records[curated.asin], tokenizer, price=curated.price)
        assert reason == KEPT and json.dumps(item.to_row()) == json.dumps(curated.to_row())  # NaN == NaN here


def _curated_sample(tokenizer) -> list[tuple[dict, Item]]:
    """Every record of the shipped sample that curation keeps, with the Item curation makes of it: read and
    curated by curation's own code (the source reader, then ``curate_batch``), before dedup and balancing."""
    kept = []
    for table in open_source(str(config.SAMPLE_PATH)).read_shard(0, 1_000):
        for record, row in zip(table.to_pylist(), curate_batch(table, tokenizer).to_pylist()):
            if row["asin"] is not None:
                kept.append((record, Item.from_row(row)))
    return kept


def test_every_kept_sample_book_typed_into_the_form_gets_its_training_prompt(profile):
    """The form holding a real book (``Book.from_record``) makes the very prompt curation made of its record:
    the same lines, cut to the same MAX_TOKENS tokens; and the same format, category and pages for the baseline."""
    tokenizer = assets.load_tokenizer(profile.tokenizer_source)
    kept = _curated_sample(tokenizer)
    assert len(kept) > 100  # most of the 179 records (the rest have no price or too few tokens)
    for record, curated in kept:
        book = demo.Book.from_record(record)
        assert book.problem() is None, curated.title
        item, reason = book.item(tokenizer)
        assert reason == KEPT and item.test_prompt == curated.test_prompt, curated.title
        assert (item.format, item.category, item.token_count) == (curated.format, curated.category,
                                                                  curated.token_count)
        assert item.pages == curated.pages or math.isnan(item.pages) and math.isnan(curated.pages)
    on_disk = {item.asin: item for items in load_curated(profile) for item in items}  # after dedup and balancing
    prompts = {curated.asin: curated.test_prompt for _, curated in kept}
    assert on_disk and all(prompts[asin] == item.test_prompt for asin, item in on_disk.items())


def test_every_sample_record_typed_into_the_form_gets_the_text_curation_makes_of_it(profile):
    """All 179 records, the skipped ones included (no price, too few tokens): the form holding the record reads
    the very text, format and category curation's own path makes of it, and the same skip reason."""
    tokenizer = assets.load_tokenizer(profile.tokenizer_source)
    records = [json.loads(line) for line in config.SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 179
    for record in records:
        from_form, form_reason = demo.Book.from_record(record).item(tokenizer)
        from_curation, reason = item_from_record(record, tokenizer)
        assert (from_form.text, from_form.format, from_form.category, form_reason) == (
            from_curation.text, from_curation.format, from_curation.category, reason), record["title"]


def test_a_typed_book_reads_like_a_training_book(profile):
    """A book typed without a subtitle gets its format's name there (as the hub's bare subtitles), and each field
    one line of its own; the form's pages make a Pages line, and nothing else."""
    book = demo.Book("Dune", author="Frank Herbert", format="hardcover", pages=412, category="Fiction > Classics",
                     publisher="Chilton", blurb="A desert planet.", details="Reading age: 12 years and up")
    item, _ = book.item(assets.load_tokenizer(profile.tokenizer_source))
    assert item.text.splitlines() == ["Dune", "Hardcover", "Author: Frank Herbert", "Category: Fiction > Classics",
                                      "Publisher: Chilton", "Pages: 412", "Language: English",
                                      "Reading age: 12 years and up", "A desert planet."]
    assert (item.format, item.category, item.pages) == ("hardcover", "Fiction", 412)
    assert demo.Book.from_record(book.record()) == demo.Book(**{**vars(book), "subtitle": "Hardcover"})


def test_the_demo_baseline_is_the_one_notebook_02_saved(profile, monkeypatch):
    name = "Linear regression (hand features)"
    train, test = load_curated(profile)
    saved = baselines.fit_and_save(name, profile, train)
    monkeypatch.setitem(baselines.BASELINES, name, lambda *args: pytest.fail("fitted again"))
    assert (baselines.load_fitted(name, profile)(test) == saved(test)).all()
    monkeypatch.setattr(baselines, "_data_key", lambda profile: {"train_sha256": "other data"})
    with pytest.raises(pytest.fail.Exception, match="fitted again"):  # fitted on other data: fitted anew
        baselines.load_fitted(name, profile)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_command_serves_the_page(pricer, profile, sample_records):
    """``python -m helpers.demo`` in its own process, its state under HOME, answers a real book."""
    home = config.HOME
    shutil.copytree(profile.curated_dir, home / "data" / "curated" / profile.name, dirs_exist_ok=True)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "helpers.demo", "--profile", profile.name, "--port", str(port)],
                              cwd=config.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, config.HOME_ENV: str(home), config.CACHE_ENV: str(config.CACHE_DIR)})
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except (HTTPError, ConnectionError, ValueError):
                assert time.monotonic() < deadline, "the demo did not start"
                time.sleep(1)
        book = demo.Book.from_record(sample_records[load_curated(profile)[1][0].asin])
        answer, _, _ = client.predict(*demo.form_values(book), api_name=f"/{demo.API_NAME}")
        assert answer.startswith("### $") and "interval" in answer
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_gguf_served_through_llama_cpp_prices_a_book_on_the_same_page(profile, exported, sample_records,
                                                                         monkeypatch):
    """``python -m helpers.demo --gguf PATH``'s page: no torch model is loaded, llama.cpp gives the price and its
    distribution, and the prompt is the training prompt."""
    pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: make llama-cpp (make test installs it)")
    monkeypatch.setattr(demo, "load_finetuned", lambda *args, **kwargs: pytest.fail("a torch model was loaded"))
    page = demo.build(demo.Pricer(profile, None, Hardware.detect(), gguf=exported["q8_0"]))
    page.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    test_book = load_curated(profile)[1][0]
    try:
        answer, chart, prompt = Client(page.local_url, verbose=False).predict(
            *demo.form_values(demo.Book.from_record(sample_records[test_book.asin])), api_name=f"/{demo.API_NAME}")
    finally:
        page.close()
    assert answer.startswith("### $") and f"{config.INTERVAL_LEVEL:.0%} interval $" in answer
    assert "**SmolLM2-135M-Instruct Book Pricer, GGUF q8_0, llama.cpp**, the median of its price distribution" in answer
    assert chart and prompt == test_book.test_prompt


def test_gguf_serves_a_saved_file_not_an_adapter(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--gguf", "runs/smoke/qlora/gguf-q8_0", "--adapter", "someone/adapter"])
    assert "--gguf serves a saved GGUF file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # a refusal in words, no traceback
        demo.main(["--gguf", "runs/no-such-run/gguf-q8_0"])
    assert refused.value.code == 2
    assert "no GGUF file at runs/no-such-run/gguf-q8_0: write one first" in capsys.readouterr().err
