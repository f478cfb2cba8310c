"""Raw Amazon Reviews 2023 Books records: where they come from, how they are read, and their prices.

A data source is the hub dataset's id, a local copy of it (a folder in the hub's layout, or
parquet files), or a JSONL file of raw records (the shipped sample). Hub ids and parquet go
through one ``load_dataset(..., streaming=True, columns=RAW_COLUMNS)`` call, so nothing but the
columns the course reads is ever converted and no Arrow cache is written. A source is read in
shards (its files), each as a stream of Arrow batches, so curation can spread shards over
processes and resume shard by shard.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import IterableDataset, load_dataset

from helpers import config

_PRICE_JUNK = re.compile(r"[$,\s]|USD|US")
MALFORMED = "malformed line"  # the skip reason (and column of line numbers) of a JSONL line that is not a JSON object
_REQUIRED = ("title", "price")


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


def parse_price_column(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[str | None]]:
    """:func:`parse_price` for a whole column: ``(prices with NaN, reasons)``.

    Each distinct value is parsed once (a column of 4.45M prices holds a few thousand), so the
    cost per record is an array lookup.
    """
    encoded = pc.dictionary_encode(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
    parsed = [parse_price(value) for value in encoded.dictionary.to_pylist()] + [parse_price(None)]
    codes = encoded.indices.fill_null(len(parsed) - 1).to_numpy()
    values = np.array([price if price is not None else math.nan for price, _ in parsed], dtype=float)
    reasons = [reason for _, reason in parsed]
    return values[codes], [reasons[code] for code in codes]


@dataclass(frozen=True)
class Source:
    """A data source resolved: how to read it, in how many shards, and a fingerprint of its content."""

    location: str  # hub id, folder, parquet file/glob, or JSONL file
    kind: str  # "hub", "parquet" or "jsonl"
    num_shards: int  # contiguous runs of parquet row groups (at most CURATION_PARTS), or 1 for JSONL
    fingerprint: str  # changes whenever the data does (used to key resumable work)
    columns: tuple[str, ...] = field(default=config.RAW_COLUMNS)

    def read_shard(self, index: int, batch_size: int) -> Iterator[pa.Table]:
        """Shard ``index`` as Arrow tables of at most ``batch_size`` rows (raw columns only).

        A JSONL shard also yields rows for malformed lines: all columns null and the line
        number in ``MALFORMED``, so they are counted like any other dropped record.
        """
        if self.kind == "jsonl":
            yield from _read_jsonl(Path(self.location), self.columns, batch_size)
            return
        stream = _stream(self).shard(self.num_shards, index, contiguous=True).with_format("arrow")
        for table in stream.iter(batch_size=batch_size):
            yield table.select(list(self.columns))

    def head(self, count: int = 5) -> list[dict]:
        """The first ``count`` raw records, as dicts (to look at, not to curate)."""
        records = []
        for table in self.read_shard(0, count):
            records += [{c: r[c] for c in self.columns} for r in table.to_pylist() if not r.get(MALFORMED)]
            if len(records) >= count:
                break
        return records[:count]


@functools.lru_cache(maxsize=4)
def _stream(source: Source) -> IterableDataset:
    """The source's columns, one shard per parquet row group (cached: each process resolves the files once)."""
    return _load(source.location, source.kind, list(source.columns)).reshard()


def _load(location: str, kind: str, columns: list[str] | None) -> IterableDataset:
    """The streaming dataset of a hub id, folder or parquet files: one ``load_dataset`` call for all three."""
    if kind == "parquet" and not Path(location).is_dir():
        return load_dataset("parquet", data_files=location, split="train", streaming=True, columns=columns)
    return load_dataset(location, split=config.HUB_SPLIT, streaming=True, columns=columns)


def open_source(location: str) -> Source:
    """Resolve ``location`` (hub id, folder, parquet file/glob, or JSONL file) and check its schema.

    Errors name the file or folder and say what to do.
    """
    path = Path(location).expanduser()
    if path.suffix in (".jsonl", ".json"):
        return _open_jsonl(path)
    if path.is_dir() or path.suffix == ".parquet" or glob.has_magic(location):
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else map(Path, glob.glob(str(path))))
                       if p.is_file() and not any(part.startswith(".") for part in p.parts[-2:]))
        if not any(p.suffix == ".parquet" for p in files):
            raise FileNotFoundError(f"No parquet files at {location}: point data_source (or ${config.DATA_ENV}) at a "
                                    f"folder in the hub's layout (data/full-*.parquet) or at parquet files.")
        stamp = "\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        kind, fingerprint = "parquet", hashlib.sha256(stamp.encode()).hexdigest()[:16]
        location = str(path) if path.exists() else location
    elif path.exists():
        raise ValueError(f"{location} is neither a folder, parquet nor JSONL: point data_source at the hub id "
                         f"{config.HUB_DATASET!r}, a local copy of it, or a JSONL file of raw records.")
    else:
        kind, fingerprint = "hub", location
    try:
        features = _load(location, kind, None).features or {}
    except Exception as error:  # network, auth, a missing split: all end here with the same advice
        raise RuntimeError(f"Could not read {location!r} ({type(error).__name__}: {error}). A hub id needs internet "
                           f"(or a local copy: set ${config.DATA_ENV} to its folder); a folder needs the hub's layout "
                           f"(data/full-*.parquet).") from error
    missing = [column for column in _REQUIRED if column not in features]
    if missing:
        raise ValueError(f"{location} lacks the columns {missing}: is it Amazon Reviews 2023 item metadata? Point "
                         f"data_source at the hub id {config.HUB_DATASET!r} or a copy of it.")
    columns = tuple(column for column in config.RAW_COLUMNS if column in features)
    source = Source(location, kind, 1, fingerprint, columns)
    return Source(location, kind, min(_stream(source).num_shards, config.CURATION_PARTS), fingerprint, columns)


def _open_jsonl(path: Path) -> Source:
    if not path.exists():
        raise FileNotFoundError(f"No raw data at {path}: the smoke sample ships in "
                                f"{config.SAMPLE_PATH.relative_to(config.REPO_ROOT)}.")
    with open(path, encoding="utf-8") as lines:
        first = next((record for record in map(_json_object, lines) if record is not None), None)
    if first is None:
        raise ValueError(f"{path} holds no JSON records (empty, or not one JSON object a line): download it again, "
                         f"or point data_source at another file.")
    missing = [column for column in _REQUIRED if column not in first]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}: is it Amazon Reviews 2023 item metadata? Point "
                         f"data_source at the hub id {config.HUB_DATASET!r} or a file of its records.")
    stat = path.stat()
    return Source(str(path), "jsonl", 1, f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")


def _json_object(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _price_text(value: object) -> str | None:
    """A JSONL price as the hub's string, parsed exactly as the original (see :func:`parse_price`)."""
    if value is None or isinstance(value, bool):
        return None
    return value if isinstance(value, str) else repr(value)


def _read_jsonl(path: Path, columns: tuple[str, ...], batch_size: int) -> Iterator[pa.Table]:
    """Batches of a JSONL file; a malformed line becomes an all-null row holding its line number in ``malformed``."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = _json_object(line)
            rows.append({MALFORMED: number} if record is None else
                        {**{c: record.get(c) for c in columns}, "price": _price_text(record.get("price")),
                         "line": number})
            if len(rows) == batch_size:
                yield _jsonl_table(path, rows, columns)
                rows = []
    if rows:
        yield _jsonl_table(path, rows, columns)


def _jsonl_table(path: Path, rows: list[dict], columns: tuple[str, ...]) -> pa.Table:
    try:
        table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        lines = [row.get("line") or row[MALFORMED] for row in (rows[0], rows[-1])]
        raise ValueError(f"{path}, lines {lines[0]}-{lines[1]}: a column changes type ({error}). Fix or drop the odd "
                         f"records, or point data_source at the hub id {config.HUB_DATASET!r}.") from error
    return table.append_column(MALFORMED, pa.array([row.get(MALFORMED) for row in rows], pa.int64()))
