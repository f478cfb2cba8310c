"""Small, self-made data for the tests: hand-built Items and Items from the shipped sample."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from peft import get_peft_model

from helpers import config, export, gguf_export, models, recipe
from helpers.curate import curate
from helpers.data import parse_price
from helpers.dataset import has_curated
from helpers.hardware import Hardware
from helpers.items import FORMATS, Item, describe
from helpers.runs import RunDir

_WORDS = ("dragon kingdom romance mystery detective murder garden cooking recipe history war "
          "empire science physics chemistry biology engineering textbook edition manual guide "
          "children picture poetry novel journey family love secret ocean mountain city night").split()
_CATEGORIES = ("Literature & Fiction", "History", "Science & Math", "Children's Books", "Cookbooks")


def make_item(**overrides: object) -> Item:
    """A plausible book; any field can be overridden."""
    fields = {
        "asin": "B000000001",
        "title": "A Book",
        "price": 19.99,
        "text": "A Book\nAuthor: Jane Doe\nCategory: History\nPages: 320\nA sweeping history of the sea.",
        "token_count": 155,
        "category": "History",
        "format": "paperback",
        "pages": 320.0,
        "weight_oz": 12.0,
        "year": 2015.0,
        "rating_number": 42.0,
        "average_rating": 4.4,
        "description_chars": 300,
    }
    return Item(**{**fields, **overrides})


def make_books(count: int, seed: int = 0) -> list[Item]:
    """``count`` varied synthetic books whose price follows pages, format and a few words."""
    rng = np.random.default_rng(seed)
    books = []
    for index in range(count):
        book_format = FORMATS[index % len(FORMATS)]
        category = _CATEGORIES[index % len(_CATEGORIES)]
        pages = float(rng.integers(40, 1200))
        words = rng.choice(_WORDS, size=30).tolist()
        price = 5 + pages / 20 + 25 * ("textbook" in words) + 15 * (book_format == "hardcover")
        text = f"Book {index}\nFormat: {book_format}\nCategory: {category}\nPages: {pages:.0f}\n{' '.join(words)}"
        books.append(make_item(
            asin=f"B{index:09d}", title=f"Book {index}", price=round(price * rng.uniform(0.8, 1.2), 2),
            text=text, category=category, format=book_format, pages=pages if index % 7 else math.nan,
            weight_oz=pages / 25, year=float(rng.integers(1950, 2023)),
            rating_number=float(rng.integers(0, 5000)), average_rating=float(rng.uniform(1, 5)),
            description_chars=len(text), token_count=len(text.split()),
        ))
    return books


@pytest.fixture
def books() -> list[Item]:
    """60 synthetic books (train-sized for the baselines)."""
    return make_books(60)


@pytest.fixture(scope="session")
def sample_items() -> list[Item]:
    """Items built from the real records shipped in data/sample (those with a usable price)."""
    items = []
    with open(config.SAMPLE_PATH, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            price, _ = parse_price(record.get("price"))
            if price is None:
                continue
            described = describe(record)
            text = described.pop("content")
            items.append(Item(**described, price=price, text=text, token_count=len(text.split())))
    return items


SHORT_BOOKS = 3  # the shortest books of the sample: the digit tree costs a few passes per book on a CPU


@pytest.fixture(scope="session")
def short_books(sample_items) -> list[Item]:
    """The sample's shortest books, on which the GGUF readers are compared with the merged model."""
    return sorted(sample_items, key=lambda item: len(item.text))[:SHORT_BOOKS]


def distance(first: np.ndarray, second: np.ndarray) -> float:
    """The largest total variation distance between the books' price distributions (one row a book) of two models."""
    return float(0.5 * np.abs(first - second).sum(axis=1).max())


def _save_smoke_adapter(profile: config.Profile, folder) -> None:
    torch.manual_seed(config.SEED)
    base, tokenizer = models.load_base_model(profile, Hardware.card("cpu"), quantized=False)
    settings = recipe.lora_config(profile.training)
    settings.init_lora_weights = False
    model = get_peft_model(base, settings)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="session")
def save_adapter():
    """``save_adapter(profile, folder)``: a trained-looking LoRA adapter (random, non-zero B) for ``profile``'s base
    model, saved with its tokenizer to ``folder``: what a run leaves, without the minutes of training."""
    return _save_smoke_adapter


@pytest.fixture(scope="module")
def as_full_data(tmp_path_factory):
    """The curated smoke books posing as full's curated data (lite and lite-open read full's), in a temporary
    folder that ``config.DATA_DIR`` points at for the module's tests."""
    data = tmp_path_factory.mktemp("data")
    smoke = config.get_profile("smoke")
    if not has_curated(smoke):
        curate(smoke)
    shutil.copytree(smoke.curated_dir, data / "curated" / "full")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "DATA_DIR", data)
        yield data


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict[str, object]:
    """What `python -m helpers.export --gguf f16 q8_0` leaves for a trained-looking smoke run (a LoRA adapter whose
    B matrices are not zero, a run card beside it): the merged folder and a GGUF folder per type. Made once for
    the session: the GGUF tests and llama.cpp's read the same files. Also the adapter's folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "HOME", tmp_path_factory.mktemp("home"))
        profile = config.get_profile("smoke")
        _save_smoke_adapter(profile, RunDir.default(profile).adapter)
        RunDir.default(profile).write_card({"profile": "smoke", "global_step": 12, "train_items": 48})
        run = RunDir(tmp_path_factory.mktemp("export"))
        export.main(["--profile", "smoke", "--output-dir", str(run.merged), "--gguf", "f16", "q8_0"])
        adapter = RunDir.default(profile).adapter
    return {"adapter": adapter, "merged": run.merged, **{kind: run.gguf(kind) for kind in gguf_export.GGUF_TYPES}}
