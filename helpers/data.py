"""Raw Amazon Reviews 2023 Books records: load them (hub parquet or local JSONL) and parse prices.

Both sources go through the same parser, so the sample in ``data/sample`` exercises exactly
the code that reads the 4.45M hub rows.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from datasets import Dataset, load_dataset

from helpers import config

_PRICE_JUNK = re.compile(r"[$,\s]|USD|US")


def parse_price(value: object) -> tuple[float | None, str | None]:
    """``(price, None)`` for a usable price, else ``(None, reason)``; never raises.

    Accepts the hub's strings ("8.23", "None"), "$12.99", "1,299.00" and plain numbers.
    Missing, unparsable, non-finite and out-of-range values come back with the reason why.
    """
    if value is None or isinstance(value, bool):
        return None, "no price"
    if isinstance(value, (int, float)):
        price = float(value)
    else:
        text = str(value).strip()
        if text.lower() in {"", "none", "null", "nan", "n/a"}:
            return None, "no price"
        try:
            price = float(_PRICE_JUNK.sub("", text))
        except ValueError:
            return None, "unparsable price"
    if not math.isfinite(price):
        return None, "no price"
    if price < config.MIN_PRICE:
        return None, "price below range"
    if price > config.MAX_PRICE:
        return None, "price above range"
    return price, None


def load_raw(source: str) -> Dataset:
    """The raw records of ``source``: ``"hub"`` (the 4.45M-row parquet dataset) or a JSONL path.

    Only the columns the course reads are kept, so both sources share one schema.
    """
    if source == "hub":
        try:
            raw = load_dataset(config.HUB_DATASET, split=config.HUB_SPLIT)
        except Exception as error:  # network, auth, disk: all end here with the same advice
            raise RuntimeError(f"Could not load {config.HUB_DATASET!r} from the Hugging Face hub "
                               f"({error}). It needs internet; offline, use the smoke profile.") from error
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"No raw data at {path}: the smoke sample ships in "
                                    f"{config.SAMPLE_PATH.relative_to(config.REPO_ROOT)}.")
        raw = load_dataset("json", data_files=str(path), split="train")
    missing = [column for column in ("title", "price") if column not in raw.column_names]
    if missing:
        raise ValueError(f"{source} lacks the columns {missing}: is it Amazon Reviews 2023 item metadata?")
    return raw.select_columns([c for c in config.RAW_COLUMNS if c in raw.column_names])
