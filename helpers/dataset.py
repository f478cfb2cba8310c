"""The curated data as every stage after curation reads it: the saved splits, their manifest, the test subset
every model is scored on, and the held-out test books nothing is scored on (with the guard that keeps them apart).

:mod:`helpers.curate` writes the folder (``data/curated/<profile>``); everything else reads it through here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from helpers import config
from helpers.items import Item
from helpers.storage import sha256_of

MANIFEST = "manifest.json"
SPLITS = ("train", "test")


def split_file(split: str) -> str:
    """The parquet file a split is saved in: ``train.parquet``, ``test.parquet``."""
    return f"{split}.parquet"


def manifest_path(folder: Path) -> Path:
    """The manifest of a curated folder."""
    return Path(folder) / MANIFEST


def has_curated(profile: config.Profile) -> bool:
    """Whether ``profile``'s curated data has been saved (its manifest is written last)."""
    return manifest_path(profile.curated_dir).exists()


def load_manifest(profile: config.Profile) -> dict:
    """The manifest of the saved curation of ``profile``, with the fix if there is none."""
    path = manifest_path(profile.curated_dir)
    if not path.exists():
        raise FileNotFoundError(f"No curated data in {profile.curated_dir}: run notebook 01 or "
                                f"`python -m helpers.curate --profile {profile.name}` first.")
    return json.loads(path.read_text(encoding="utf-8"))


def load_curated(profile: config.Profile) -> tuple[list[Item], list[Item]]:
    """The saved (train, test) items of ``profile``, checked against their manifest.

    A profile with ``train_subset`` (lite) gets a seeded subset of the train items, in their saved order.
    """
    manifest = load_manifest(profile)
    splits = []
    for name in SPLITS:
        path = profile.curated_dir / split_file(name)
        if sha256_of(path) != manifest["sha256"][path.name]:
            raise ValueError(f"{path} does not match its manifest: curate again.")
        splits.append([Item.from_row(row) for row in pd.read_parquet(path).to_dict("records")])
    train, test = splits
    if profile.train_subset is not None and profile.train_subset < len(train):
        keep = set(random.Random(config.SEED).sample(range(len(train)), profile.train_subset))
        train = [item for index, item in enumerate(train) if index in keep]
    return train, test


def eval_items(test: list[Item], profile: config.Profile) -> list[Item]:
    """The fixed subset every model is scored on: the first ``profile.eval_size`` test items.

    The test split is already shuffled with config.SEED, so the head is a fair sample.
    """
    if not test:
        raise ValueError("The test split is empty: curate the data first (python -m helpers.curate).")
    return test[: profile.eval_size]


def held_out_items(test: list[Item], profile: config.Profile) -> list[Item]:
    """The test items nobody scores (after the first ``profile.eval_size``): no model trained on them and no
    model is scored on them, so they can calibrate the intervals and fit the ensemble (full: 1,750 books;
    smoke: 10, too few for its figures to mean anything)."""
    return test[profile.eval_size:]


class TestBookLeak(ValueError):
    """Books that are scored were handed to something that fits on held-out books."""


def check_unseen(fitted_on: Sequence[Item], scored: Sequence[Item], what: str) -> None:
    """Stop when any book ``what`` is fitted on is also a scored (test) book."""
    leaked = {item.asin for item in fitted_on} & {item.asin for item in scored}
    if leaked:
        raise TestBookLeak(f"{what} would be fitted on {len(leaked)} test book(s) ({', '.join(sorted(leaked)[:3])}): "
                           "fit it on the held-out books only (helpers.dataset.held_out_items).")
