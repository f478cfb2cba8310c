"""A scale-test replica of the hub dataset, built by replicating the 179 real sample records.

It is NOT new data: every row is a copy of one of the real records shipped in ``data/sample``,
written in the exact schema and layout of ``cogsci13/Amazon-Reviews-2023-Books-Meta`` (16 columns,
``data/full-000NN-of-000MM.parquet`` shards, a README whose ``configs:`` block declares the split
``full``), so ``load_dataset(<folder>, split="full")`` reads it as it reads the hub. Each copy gets
a fresh ``parent_asin``, a copy number in its title (so copies are distinct books) and a hub-style
JSON ``details`` string; every ``EDITION_EVERY``-th copy instead repeats the previous copy's title
and author in another format, a second edition of the same book, so the edition dedup works at
scale. Run: ``python benchmarks/hub_replica.py --rows 4448181 --out /tmp/replica``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from helpers import config
from helpers.items import book_format, parse_details

HUB_ROWS = 4_448_181
HUB_SHARDS = 28
ROW_GROUP_ROWS = 1_000  # the parquet row group of the hub's conversion (datasets' default batch)
EDITION_EVERY = 10  # copy numbers 1, 11, 21, ... are second editions of copy 0, 10, 20, ...
EDITION_SUBTITLE = "Kindle Edition"
NOTICE = ("Scale-test replica: the {sample} real sample records replicated to {rows:,} rows "
          "(fresh ASINs, numbered titles, 1 in {every} copies a second edition); not new data.")

SCHEMA = pa.schema([
    ("main_category", pa.string()),
    ("title", pa.string()),
    ("average_rating", pa.float64()),
    ("rating_number", pa.int64()),
    ("features", pa.list_(pa.string())),
    ("description", pa.list_(pa.string())),
    ("price", pa.string()),
    ("images", pa.list_(pa.struct([(k, pa.string()) for k in ("hi_res", "large", "thumb", "variant")]))),
    ("videos", pa.list_(pa.struct([(k, pa.string()) for k in ("title", "url", "user_id")]))),
    ("store", pa.string()),
    ("categories", pa.list_(pa.string())),
    ("details", pa.string()),
    ("parent_asin", pa.string()),
    ("bought_together", pa.string()),
    ("subtitle", pa.string()),
    ("author", pa.string()),
])
README = """---
configs:
- config_name: default
  data_files:
  - split: full
    path: data/full-*
---
{notice}
"""


def _match(pattern: str, text: str) -> str | None:
    found = re.search(pattern, text, re.IGNORECASE)
    return found.group(1) if found else None


def hub_details(sentence: str) -> str:
    """The sample's English-sentence ``details`` rewritten as the hub's JSON object string."""
    parsed = parse_details(sentence)
    date = _match(r"\b(?:on|in) ((?:January|February|March|April|May|June|July|August|September|October|"
                  r"November|December)(?: \d{1,2},)? \d{4})", sentence)
    table = {
        "Publisher": f"{parsed['publisher']} ({date})" if date and parsed["publisher"] else parsed["publisher"],
        "Language": parsed["language"],
        book_format(sentence).title(): f"{parsed['pages']:.0f} pages" if parsed["pages"] else None,
        "ISBN-10": _match(r"ISBN[- ]?10(?: number)? of (\w+)", sentence),
        "ISBN-13": _match(r"ISBN[- ]?13(?: number)? of ([\d-]+)", sentence),
        "Item Weight": _match(r"([\d.]+ (?:pounds|ounces))", sentence),
        "Dimensions": _match(r"(\d[\d.]* x [\d.]+ x [\d.]+ inches)", sentence),
    }
    return json.dumps({key: value for key, value in table.items() if value})


def hub_author(author: str | None) -> str | None:
    """The hub's form of ``author``: a stringified Python dict (the sample stores JSON)."""
    return str(json.loads(author)) if author else None


def base_table() -> pa.Table:
    """The sample records in the hub's schema, with hub-style ``details`` and ``author``."""
    records = [json.loads(line) for line in config.SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]
    for record in records:
        record["details"] = hub_details(record["details"])
        record["author"] = hub_author(record["author"])
    return pa.Table.from_pylist(records, schema=SCHEMA)


def replicate(base: pa.Table, start: int, stop: int) -> pa.Table:
    """Rows ``start:stop`` of the replica (column-wise copies of ``base``), each with a fresh ASIN and its book."""
    position = np.arange(start, stop, dtype=np.int64)
    copy = position // base.num_rows
    edition = copy % EDITION_EVERY == 1
    book = np.where(edition, copy - 1, copy)  # an edition shares its predecessor's title and author
    table = base.take(pa.array(position % base.num_rows))
    first = int(book.min())
    suffixes = pa.array([f" (copy {n})" for n in range(first, int(book.max()) + 1)]).take(pa.array(book - first))
    asins = pc.binary_join_element_wise("R", pc.utf8_lpad(pc.cast(pa.array(position), pa.string()), 9, "0"), "")
    columns = {
        "title": pc.binary_join_element_wise(table["title"], suffixes, ""),
        "parent_asin": asins,
        "subtitle": pc.if_else(pa.array(edition), pa.scalar(EDITION_SUBTITLE), table["subtitle"]),
    }
    for name, column in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def write_replica(rows: int, out: Path, shards: int | None = None) -> Path:
    """Write a ``rows``-row replica to ``out`` in the hub's layout, one shard at a time; returns ``out``."""
    out = Path(out)
    shards = shards or max(1, math.ceil(rows * HUB_SHARDS / HUB_ROWS))
    base = base_table()
    (out / "data").mkdir(parents=True, exist_ok=True)
    per_shard = math.ceil(rows / shards)
    for index in range(shards):
        table = replicate(base, index * per_shard, min(rows, (index + 1) * per_shard))
        pq.write_table(table, out / "data" / f"full-{index:05d}-of-{shards:05d}.parquet", row_group_size=ROW_GROUP_ROWS)
    notice = NOTICE.format(sample=base.num_rows, rows=rows, every=EDITION_EVERY)
    (out / "README.md").write_text(README.format(notice=notice), encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=HUB_ROWS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shards", type=int, default=None, help=f"default: as the hub ({HUB_SHARDS} for "
                                                                  f"{HUB_ROWS:,} rows)")
    args = parser.parse_args()
    started = time.perf_counter()
    out = write_replica(args.rows, args.out, args.shards)
    size = sum(path.stat().st_size for path in out.rglob("*.parquet"))
    print((out / "README.md").read_text(encoding="utf-8").splitlines()[-1])
    print(f"Wrote {out} ({size / 1e9:.2f} GB of parquet) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
