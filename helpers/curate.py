"""Curation: raw records -> priced, scrubbed, token-counted, balanced train/test items on disk.

Run it as a script (``python -m helpers.curate``, profile from ``$BOOK_PRICER_PROFILE``) or
call :func:`curate` from notebook 01. The funnel records how many records each rule drops.

Balancing rule: raw book prices pile up on a few values ($9.99, $14.99, ...). We group the
items by whole-dollar price and keep at most ``profile.max_per_dollar`` of each (a seeded
sample), which flattens those peaks without inventing items for the rare expensive prices.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
from transformers import PreTrainedTokenizerFast

from helpers import assets, config
from helpers.data import load_raw, parse_price
from helpers.items import Item, describe, prices
from helpers.storage import sha256_of, write_folder_atomically

ITEM_COLUMNS = [f.name for f in fields(Item)]
KEPT = ""  # the skip reason of a record that survives
UNPRICED = describe({})  # the (empty) description of a record dropped for its price


def describe_batch(batch: dict[str, list]) -> dict[str, list]:
    """Parse the price and build the scrubbed content of each priced raw record in a batch."""
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out: dict[str, list] = {"price": [], "skip_reason": []}
    for record in records:
        price, reason = parse_price(record.get("price"))
        out["price"].append(price if price is not None else float("nan"))
        out["skip_reason"].append(reason or KEPT)
        described = UNPRICED if reason else describe(record)  # no text work for a dropped record
        for key, value in described.items():
            out.setdefault(key, []).append(value)
    return out


def count_and_cut_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerFast) -> dict[str, list]:
    """Count the tokens of each content in one batched call, and cut kept texts to MAX_TOKENS.

    Tokenising costs time per character, and only the first MAX_TOKENS tokens matter, so we
    tokenise the first MAX_CHARS characters. Where that prefix yields fewer than
    SURE_TOKENS tokens (a token-dense text), the full text is tokenised again: counts up to
    MAX_TOKENS and the cut texts are exactly those of the full texts.
    """
    contents = batch["content"]
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: no offsets or masks to build
    encode = lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    encoded = encode([content[: config.MAX_CHARS] for content in contents])
    unsure = [i for i, ids in enumerate(encoded)
              if len(ids) < config.SURE_TOKENS and len(contents[i]) > config.MAX_CHARS]
    for i, ids in zip(unsure, encode([contents[i] for i in unsure]) if unsure else []):
        encoded[i] = ids
    cut = [ids[: config.MAX_TOKENS] for ids in encoded]
    reasons = [reason or (KEPT if len(ids) > config.MIN_TOKENS else "too few tokens")
               for reason, ids in zip(batch["skip_reason"], encoded)]
    kept = [i for i, reason in enumerate(reasons) if reason == KEPT]
    texts = [""] * len(cut)  # only kept items need their text (saves memory on 4.45M rows)
    for i, text in zip(kept, backend.decode_batch([cut[i] for i in kept])):
        texts[i] = text
    return {
        "content_tokens": [len(ids) for ids in encoded],
        "token_count": [len(ids) for ids in cut],
        "text": texts,
        "skip_reason": reasons,
    }


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


SKIP_REASONS = ("no price", "unparsable price", "price below range", "price above range", "too few tokens")


def _funnel(records: pd.DataFrame, deduplicated: int, balanced: int, train: int, test: int) -> list[dict]:
    """Items left after each rule, and how many that rule dropped."""
    reasons = Counter(records["skip_reason"])
    rows = [{"stage": "raw records", "items": len(records), "dropped": 0}]
    steps = [(f"drop: {reason}", rows[0]["items"] - sum(reasons[r] for r in SKIP_REASONS[: i + 1]))
             for i, reason in enumerate(SKIP_REASONS)]
    steps += [("drop: duplicate ASIN", deduplicated), ("balance prices", balanced)]
    for stage, items in steps:
        rows.append({"stage": stage, "items": items, "dropped": rows[-1]["items"] - items})
    return rows + [{"stage": "train split", "items": train, "dropped": 0},
                   {"stage": "test split", "items": test, "dropped": 0}]


def curate(profile: config.Profile, tokenizer: PreTrainedTokenizerFast | None = None) -> Curation:
    """Run every curation step for ``profile`` and save the result (see :func:`save`)."""
    started = time.perf_counter()
    tokenizer = tokenizer or assets.load_tokenizer(profile.tokenizer_source)
    raw = load_raw(profile.data_source)
    common = {"batched": True, "batch_size": profile.batch_size, "num_proc": profile.num_proc,
              "load_from_cache_file": False}
    described = raw.map(describe_batch, remove_columns=raw.column_names, desc="Scrub + parse", **common)
    counted = described.map(count_and_cut_batch, fn_kwargs={"tokenizer": tokenizer},
                            remove_columns=["content"], desc="Count tokens", **common)
    records = counted.select_columns(["price", "content_tokens", "skip_reason"]).to_pandas()
    kept = (counted.filter(lambda reasons: [reason == KEPT for reason in reasons], input_columns="skip_reason",
                           desc="Keep", **common)
            .to_pandas().drop_duplicates("asin"))
    balanced = balance(kept, profile.max_per_dollar)
    train, test = split(balanced, profile.test_size)
    manifest = {
        "profile": profile.name,
        "source": profile.data_source if profile.data_source == "hub" else Path(profile.data_source).name,
        "hub_dataset": config.HUB_DATASET if profile.data_source == "hub" else None,
        "tokenizer": profile.tokenizer_source,
        "seed": config.SEED,
        "rules": {"min_price": config.MIN_PRICE, "max_price": config.MAX_PRICE,
                  "min_tokens_exclusive": config.MIN_TOKENS, "max_tokens": config.MAX_TOKENS,
                  "max_per_dollar": profile.max_per_dollar, "test_size": profile.test_size},
        "funnel": _funnel(records, len(kept), len(balanced), len(train), len(test)),
        "seconds": round(time.perf_counter() - started, 1),
    }
    to_items = lambda frame: [Item.from_row(row) for row in frame[ITEM_COLUMNS].to_dict("records")]
    curation = Curation(to_items(train), to_items(test), records, manifest)
    save(curation, profile.curated_dir)
    return curation


def save(curation: Curation, folder: Path) -> Path:
    """Write train/test parquet files and ``manifest.json`` (with their SHA-256) as one folder swap."""
    def write(tmp: Path) -> None:
        for name, items in (("train", curation.train), ("test", curation.test)):
            pd.DataFrame([item.to_row() for item in items], columns=ITEM_COLUMNS).to_parquet(
                tmp / f"{name}.parquet", index=False)
        curation.manifest["sha256"] = {f"{name}.parquet": sha256_of(tmp / f"{name}.parquet")
                                       for name in ("train", "test")}
        (tmp / "manifest.json").write_text(json.dumps(curation.manifest, indent=2))

    return write_folder_atomically(folder, write)


def load_manifest(profile: config.Profile) -> dict:
    """The manifest of the saved curation of ``profile``, with the fix if there is none."""
    path = profile.curated_dir / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"No curated data in {profile.curated_dir}: run notebook 01 or "
                                f"`python -m helpers.curate --profile {profile.name}` first.")
    return json.loads(path.read_text())


def load_curated(profile: config.Profile) -> tuple[list[Item], list[Item]]:
    """The saved (train, test) items of ``profile``, checked against their manifest.

    A profile with ``train_subset`` (lite) gets a seeded subset of the train items, in their saved order.
    """
    manifest = load_manifest(profile)
    splits = []
    for name in ("train", "test"):
        path = profile.curated_dir / f"{name}.parquet"
        if sha256_of(path) != manifest["sha256"][path.name]:
            raise ValueError(f"{path} does not match its manifest: curate again.")
        splits.append([Item.from_row(row) for row in pd.read_parquet(path).to_dict("records")])
    train, test = splits
    if profile.train_subset is not None and profile.train_subset < len(train):
        keep = set(random.Random(config.SEED).sample(range(len(train)), profile.train_subset))
        train = [item for index, item in enumerate(train) if index in keep]
    return train, test


def plot_distributions(curation: Curation):
    """Prices and token counts of every priced raw record (before) and of the curated items (after)."""
    import matplotlib.pyplot as plt

    priced = curation.records[curation.records["price"].notna()]
    items = curation.train + curation.test
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    panels = [
        (axes[0, 0], priced["price"], "Price of every priced record", "price ($)"),
        (axes[0, 1], prices(items), "Price of the curated items", "price ($)"),
        (axes[1, 0], priced["content_tokens"], f"Tokens per record (first {config.MAX_CHARS:,} chars)", "tokens"),
        (axes[1, 1], [i.token_count for i in items], "Tokens per curated item", "tokens"),
    ]
    for axis, values, title, label in panels:
        axis.hist(values, bins=40, color="steelblue", edgecolor="white")
        axis.set(title=f"{title} (n={len(values):,})", xlabel=label, ylabel="items")
    axes[1, 0].axvline(config.MIN_TOKENS, color="crimson", linestyle="--", label=f"keep > {config.MIN_TOKENS}")
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
    print(f"Saved to {profile.curated_dir} in {curation.manifest['seconds']} s")


if __name__ == "__main__":
    main()
