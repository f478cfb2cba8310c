"""Curation: raw records -> priced, scrubbed, token-counted, balanced train/test items on disk.

Run it as a script (``python -m helpers.curate``, profile from ``$BOOK_PRICER_PROFILE``) or
call :func:`curate` from notebook 01. The funnel records how many records each rule drops.

Balancing rule: raw book prices pile up on a few values ($9.99, $14.99, ...). We group the
items by whole-dollar price and keep at most ``profile.max_per_dollar`` of each (a seeded
sample), which flattens those peaks without inventing items for the rare expensive prices.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from helpers import assets, config
from helpers.data import MALFORMED, Source, open_source, parse_price_column
from helpers.dataset import SPLITS, manifest_path, split_file
from helpers.items import Item, describe_book, prices
from helpers.storage import sha256_of, write_file_atomically, write_folder_atomically
from helpers.tokens import KEPT, count_and_cut_batch

log = logging.getLogger(__name__)
ITEM_COLUMNS = [f.name for f in fields(Item)]
RECORD_COLUMNS = ["price", "content_tokens", "skip_reason"]  # one row per raw record, for the funnel and plots
BOOK = "book"  # the edition-dedup key of a kept item (see items.book_key)
PART_SCHEMA = pa.schema([
    ("price", pa.float64()), ("content_tokens", pa.int32()), ("skip_reason", pa.dictionary(pa.int8(), pa.string())),
    ("asin", pa.string()), ("title", pa.string()), ("text", pa.string()), ("token_count", pa.int16()),
    ("category", pa.string()), ("format", pa.string()), ("pages", pa.float64()), ("weight_oz", pa.float64()),
    ("year", pa.float64()), ("rating_number", pa.float64()), ("average_rating", pa.float64()),
    ("description_chars", pa.int64()), (BOOK, pa.string()),
])  # a stage part: every record's funnel columns, and the item columns of kept records (null elsewhere)


def curate_batch(table: pa.Table, tokenizer: PreTrainedTokenizerFast) -> pa.Table:
    """One Arrow batch of raw records -> its stage rows (see ``PART_SCHEMA``).

    Prices are parsed on the whole column first; only priced records are turned into Python
    objects, described and tokenised.
    """
    price, reasons = parse_price_column(table["price"])
    if MALFORMED in table.column_names:
        malformed = table[MALFORMED].is_valid().to_numpy(zero_copy_only=False)
        reasons = [MALFORMED if bad else reason for bad, reason in zip(malformed, reasons)]
    priced = [i for i, reason in enumerate(reasons) if reason is None]
    books = [describe_book(record) for record in table.take(priced).to_pylist()] if priced else []
    counted = count_and_cut_batch({"content": [d["content"] for d, _ in books], "skip_reason": [KEPT] * len(books)},
                                  tokenizer)
    rows = len(reasons)
    skip = [reason or KEPT for reason in reasons]
    tokens = np.zeros(rows, dtype=np.int32)
    tokens[priced] = counted["content_tokens"]
    kept = [(i, index) for i, (index, reason) in enumerate(zip(priced, counted["skip_reason"])) if reason == KEPT]
    for i, index in enumerate(priced):
        skip[index] = counted["skip_reason"][i]
    columns: dict[str, list] = {name: [None] * rows for name in PART_SCHEMA.names[3:]}
    for i, index in kept:
        described, book = books[i]
        for name in ("asin", "title", "category", "format", "pages", "weight_oz", "year", "rating_number",
                     "average_rating", "description_chars"):
            columns[name][index] = described[name]
        columns["text"][index], columns["token_count"][index] = counted["text"][i], counted["token_count"][i]
        columns[BOOK][index] = book
    return pa.Table.from_pydict({"price": price, "content_tokens": tokens, "skip_reason": skip, **columns},
                                schema=PART_SCHEMA)


def item_from_record(record: dict[str, object], tokenizer: PreTrainedTokenizerFast,
                     price: float = math.nan) -> tuple[Item, str]:
    """The :class:`Item` curation makes of one raw record, and its skip reason (``""`` where curation keeps it).

    The same scrubbing and cut to MAX_TOKENS as :func:`curate_batch`; a text too short to keep is
    still made into an Item (the demo prices whatever a learner types), its text whole.
    """
    described, _ = describe_book(record)
    content = described.pop("content")
    counted = count_and_cut_batch({"content": [content], "skip_reason": [KEPT]}, tokenizer)
    reason = counted["skip_reason"][0]
    text = counted["text"][0] if reason == KEPT else content  # under MAX_TOKENS: the cut is the whole text
    return Item(**described, price=price, text=text, token_count=counted["token_count"][0]), reason


def curate_shard(source: Source, index: int, part: Path, batch_size: int,
                 tokenizer: PreTrainedTokenizerFast, progress: bool = False) -> Path:
    """Curate shard ``index`` of ``source`` into the parquet file ``part``, atomically.

    The file appears whole under its final name or not at all, so a crash never leaves a part
    that a re-run would take as finished. The numbers of malformed lines go into its metadata.
    """
    def write(tmp: Path) -> None:
        malformed: list[int] = []
        with pq.ParquetWriter(tmp, PART_SCHEMA, compression="zstd") as writer:
            batches = source.read_shard(index, batch_size)
            for table in tqdm(batches, desc=f"Shard {index}", unit="batch", leave=False,
                              disable=not progress or config.progress_bars_off()):
                if MALFORMED in table.column_names:
                    malformed += [line for line in table[MALFORMED].to_pylist() if line]
                writer.write_table(curate_batch(table, tokenizer))
            writer.add_key_value_metadata({MALFORMED: json.dumps(malformed)})

    return write_file_atomically(part, write)


_worker_tokenizer: PreTrainedTokenizerFast | None = None


def _start_worker(tokenizer: PreTrainedTokenizerFast) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already: no extra threads
    _worker_tokenizer = tokenizer


def _curate_shard_in_worker(source: Source, index: int, part: Path, batch_size: int) -> Path:
    return curate_shard(source, index, part, batch_size, _worker_tokenizer)


def stage_dir(profile: config.Profile, source: Source, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Where the parts of this exact job live: keyed by source, rules and tokenizer.

    A re-run with the same key reuses finished parts; any other key's parts are stale.
    """
    rules = [config.MIN_PRICE, config.MAX_PRICE, config.MIN_TOKENS, config.MAX_TOKENS, config.MAX_CHARS,
             config.SURE_TOKENS, config.MIN_WORD_CHARS_WITH_DIGIT]
    tokenizer_hash = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    key = json.dumps([source.fingerprint, source.num_shards, source.columns, rules, tokenizer_hash])
    return profile.curated_dir / ".stage" / hashlib.sha256(key.encode()).hexdigest()[:16]


def run_stage(profile: config.Profile, source: Source, tokenizer: PreTrainedTokenizerFast) -> list[Path]:
    """Curate every shard of ``source`` into a part (several processes), skipping finished parts."""
    stage = stage_dir(profile, source, tokenizer)
    for other in stage.parent.glob("*"):
        if other != stage:
            shutil.rmtree(other, ignore_errors=True)  # stale: another source, rule or tokenizer
    stage.mkdir(parents=True, exist_ok=True)
    for leftover in stage.glob(".part-*"):
        leftover.unlink()  # a crashed write (the final names are only ever whole files)
    parts = [stage / f"part-{index:05d}-of-{source.num_shards:05d}.parquet" for index in range(source.num_shards)]
    todo = [index for index, part in enumerate(parts) if not part.exists()]
    bar = tqdm(total=len(parts), initial=len(parts) - len(todo), desc="Curate shards", unit="shard",
               disable=config.progress_bars_off())
    if min(profile.num_proc, len(todo)) > 1:
        context = get_context("spawn")
        with ProcessPoolExecutor(min(profile.num_proc, len(todo)), mp_context=context, initializer=_start_worker,
                                 initargs=(tokenizer,)) as pool:
            for done in as_completed([pool.submit(_curate_shard_in_worker, source, index, parts[index],
                                                  profile.batch_size) for index in todo]):
                done.result()
                bar.update()
    else:
        for index in todo:
            curate_shard(source, index, parts[index], profile.batch_size, tokenizer, progress=True)
            bar.update()
    bar.close()
    return parts


def read_records(parts: list[Path]) -> pd.DataFrame:
    """One row per raw record (price, content_tokens, skip_reason), in source order."""
    tables = [pq.read_table(part, columns=RECORD_COLUMNS) for part in parts]
    return pa.concat_tables(tables).to_pandas()


def read_kept(parts: list[Path]) -> pd.DataFrame:
    """The small columns of kept records (asin, price, book) with their ``part`` and ``row``."""
    frames = []
    for number, part in enumerate(parts):
        table = pq.read_table(part, columns=["skip_reason", "asin", "price", BOOK])
        rows = np.flatnonzero(table["asin"].is_valid().to_numpy(zero_copy_only=False))
        frame = table.select(["asin", "price", BOOK]).take(rows).to_pandas()
        frames.append(frame.assign(part=np.int32(number), row=rows.astype(np.int64)))
    return pd.concat(frames, ignore_index=True)


def read_items(parts: list[Path], chosen: pd.DataFrame) -> pd.DataFrame:
    """The item columns of the ``chosen`` rows (``part``, ``row``), indexed like ``chosen``."""
    frames = []
    for number, rows in chosen.groupby("part")["row"]:
        table = pq.read_table(parts[number], columns=ITEM_COLUMNS).take(rows.to_numpy())
        frames.append(table.to_pandas().set_index(rows.index))
    return pd.concat(frames).loc[chosen.index]


def dedup_editions(frame: pd.DataFrame, seed: int = config.SEED) -> pd.DataFrame:
    """One item per book (``book`` key): a seeded, order-independent choice among its editions."""
    draw = pd.util.hash_pandas_object(frame["asin"], index=False, hash_key=f"{seed:016d}")
    single = frame[BOOK] == ""  # no title: nothing to match editions on
    ordered = frame.assign(draw=draw.to_numpy()).sort_values(["draw", "asin"], kind="stable")
    chosen = ordered[single.loc[ordered.index] | ~ordered.duplicated(BOOK)]
    return frame.loc[frame.index.isin(chosen.index)]


def balance(frame: pd.DataFrame, max_per_dollar: int, seed: int = config.SEED) -> pd.DataFrame:
    """Keep at most ``max_per_dollar`` items per whole-dollar price (seeded, order-independent)."""
    frame = frame.sort_values("asin", kind="stable")
    dollars = (frame["price"] + 0.5).astype(int)
    return (frame.groupby(dollars, group_keys=False)
            .apply(lambda group: group.sample(min(len(group), max_per_dollar), random_state=seed))
            .sort_values("asin", kind="stable"))


def split(frame: pd.DataFrame, test_size: int, seed: int = config.SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Shuffle by ``seed`` (after sorting by ASIN, so input order never matters); test first."""
    if len(frame) < 2 * test_size:
        raise ValueError(f"Only {len(frame)} curated items: too few for a test set of {test_size}. "
                         "Lower the profile's test_size or curate more data.")
    order = list(frame.sort_values("asin", kind="stable").index)
    random.Random(seed).shuffle(order)
    return frame.loc[order[test_size:]], frame.loc[order[:test_size]]


@dataclass
class Curation:
    """What curation produced: items, the per-record table (for plots) and the manifest."""

    train: list[Item]
    test: list[Item]
    records: pd.DataFrame  # one row per raw record: price, content_tokens, skip_reason
    manifest: dict

    @property
    def funnel(self) -> pd.DataFrame:
        return pd.DataFrame(self.manifest["funnel"])


SKIP_REASONS = (MALFORMED, "no price", "unparsable price", "price below range", "price above range",
                "too few tokens")


def _funnel(records: pd.DataFrame, unique: int, books: int, balanced: int, train: int, test: int) -> list[dict]:
    """Items left after each rule, and how many that rule dropped."""
    reasons = records["skip_reason"].value_counts()
    rows = [{"stage": "raw records", "items": len(records), "dropped": 0}]
    steps = [(f"drop: {reason}", rows[0]["items"] - sum(int(reasons.get(r, 0)) for r in SKIP_REASONS[: i + 1]))
             for i, reason in enumerate(SKIP_REASONS)]
    steps += [("drop: duplicate ASIN", unique), ("drop: other edition of a book", books), ("balance prices", balanced)]
    for stage, items in steps:
        rows.append({"stage": stage, "items": items, "dropped": rows[-1]["items"] - items})
    return rows + [{"stage": f"split: {train:,} train + {test:,} test", "items": train + test, "dropped": 0}]


def curate(profile: config.Profile, tokenizer: PreTrainedTokenizerFast | None = None) -> Curation:
    """Run every curation step for ``profile`` and save the result (see :func:`save`).

    Shards are curated into parts under ``<curated_dir>/.stage`` (a re-run after a crash
    reuses the finished ones); only the small columns of kept records are then read to
    dedup, balance and split, and the text of the chosen items last. Saving removes the stage.
    """
    started = time.perf_counter()
    tokenizer = tokenizer or assets.load_tokenizer(profile.tokenizer_source)
    source = open_source(profile.data_source)
    parts = run_stage(profile, source, tokenizer)
    shards_done = time.perf_counter()
    records = read_records(parts)
    kept = read_kept(parts)
    unique = kept.drop_duplicates("asin")
    books = dedup_editions(unique)
    balanced = balance(books, profile.max_per_dollar)
    train, test = split(balanced, profile.test_size)
    malformed = [line for part in parts for line in json.loads(pq.read_metadata(part).metadata[MALFORMED.encode()])]
    for line in malformed[: config.LOGGED_BAD_LINES]:
        log.warning("%s:%d: malformed line skipped (not a JSON object; a cut download leaves one)", source.location,
                    line)
    manifest = {
        "profile": profile.name,
        "source": source.location if source.kind == "hub" else Path(source.location).name,
        "hub_dataset": source.location if source.kind == "hub" else None,
        "tokenizer": profile.tokenizer_source,
        "seed": config.SEED,
        "rules": {"min_price": config.MIN_PRICE, "max_price": config.MAX_PRICE,
                  "min_tokens_exclusive": config.MIN_TOKENS, "max_tokens": config.MAX_TOKENS,
                  "max_per_dollar": profile.max_per_dollar, "test_size": profile.test_size},
        "funnel": _funnel(records, len(unique), len(books), len(balanced), len(train), len(test)),
        "malformed_lines": [f"{Path(source.location).name}:{line}" for line in malformed[: config.LOGGED_BAD_LINES]],
    }

    def to_items(frame: pd.DataFrame) -> list[Item]:
        return [Item.from_row(row) for row in read_items(parts, frame).to_dict("records")]

    curation = Curation(to_items(train), to_items(test), records, manifest)
    manifest["seconds"] = {"shards": round(shards_done - started, 1),
                           "dedup, balance, split": round(time.perf_counter() - shards_done, 1)}
    save(curation, profile.curated_dir)
    return curation


def save(curation: Curation, folder: Path) -> Path:
    """Write train/test parquet files and the manifest (with their SHA-256) as one folder swap (read back by
    :mod:`helpers.dataset`)."""
    def write(tmp: Path) -> None:
        for name, items in zip(SPLITS, (curation.train, curation.test)):
            pd.DataFrame([item.to_row() for item in items], columns=ITEM_COLUMNS).to_parquet(
                tmp / split_file(name), index=False)
        curation.manifest["sha256"] = {split_file(name): sha256_of(tmp / split_file(name)) for name in SPLITS}
        manifest_path(tmp).write_text(json.dumps(curation.manifest, indent=2), encoding="utf-8")

    return write_folder_atomically(folder, write)


def timing(manifest: dict) -> str:
    """How long a curation took, for people: "3.6 s (curating the shards 3.6 s; dedup, balance and split 0.0 s)"."""
    seconds = manifest["seconds"]
    return (f"{sum(seconds.values()):.1f} s (curating the shards {seconds['shards']:.1f} s; "
            f"dedup, balance and split {seconds['dedup, balance, split']:.1f} s)")


def plot_distributions(curation: Curation):
    """Prices and token counts of every priced raw record (before), prices and text lengths of the curated items
    (after).

    A record's token count is that of its first MAX_CHARS characters (of its whole text where those hold fewer than
    SURE_TOKENS tokens, see :func:`helpers.tokens.count_and_cut_batch`); counts over twice MAX_TOKENS are drawn at
    twice MAX_TOKENS, so that the few long texts counted whole do not squeeze the rest into a bar or two.
    """
    import matplotlib.pyplot as plt

    priced = curation.records[curation.records["price"].notna()]
    items = curation.train + curation.test
    cap = 2 * config.MAX_TOKENS
    at_cut = sum(item.token_count == config.MAX_TOKENS for item in items)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    panels = [
        (axes[0, 0], priced["price"], f"Price of every priced record (n={len(priced):,})", "price ($)"),
        (axes[0, 1], prices(items), f"Price of the curated items (n={len(items):,})", "price ($)"),
        (axes[1, 0], priced["content_tokens"].clip(upper=cap), f"Tokens counted per priced record (n={len(priced):,})",
         f"tokens (more than {cap} drawn at {cap})"),
        (axes[1, 1], [len(item.text) for item in items],
         f"Characters per curated text (n={len(items):,}; {at_cut:,} cut at {config.MAX_TOKENS} tokens)",
         f"characters in {config.MIN_TOKENS + 1}-{config.MAX_TOKENS} tokens"),
    ]
    for axis, values, title, label in panels:
        axis.hist(values, bins=40, color="steelblue", edgecolor="white")
        axis.set(title=title, xlabel=label, ylabel="items")
    axes[1, 0].axvline(config.MIN_TOKENS, color="crimson", linestyle="--", label=f"keep > {config.MIN_TOKENS}")
    axes[1, 0].axvline(config.MAX_TOKENS, color="dimgray", linestyle=":", label=f"cut to {config.MAX_TOKENS}")
    axes[1, 0].legend()
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default=None,
                        help=f"default: ${config.PROFILE_ENV} or smoke")
    profile = config.get_profile(parser.parse_args().profile)
    curation = curate(profile)
    print(curation.funnel.to_string(index=False))
    print(f"Saved to {profile.curated_dir} in {timing(curation.manifest)}")


if __name__ == "__main__":
    main()
