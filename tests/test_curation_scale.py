"""Curation at scale, on small stand-ins: a hub-layout replica through the full profile's code,
resume after a kill, one edition per book, and clear answers for bad files."""

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import config, tokens
from helpers import curate as curate_module
from helpers.assets import llama3_tokenizer_offline
from helpers.curate import BOOK, curate, dedup_editions
from helpers.data import open_source
from helpers.tokens import count_and_cut_batch

REPLICA_ROWS = 3_000  # 2 files of 1,500 rows, row groups of 1,000: 4 parts
TEST_SIZE = 100  # the full profile's sizes but a test set that 3,000 rows can fill


def _load_hub_replica():
    spec = importlib.util.spec_from_file_location("hub_replica", config.REPO_ROOT / "benchmarks" / "hub_replica.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hub_replica = _load_hub_replica()


@pytest.fixture(scope="module")
def tokenizer():
    return llama3_tokenizer_offline()


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    return hub_replica.write_replica(REPLICA_ROWS, tmp_path_factory.mktemp("replica"), shards=2)


def full_profile(replica: Path, **overrides) -> config.Profile:
    return config.get_profile("full", data_source=str(replica), test_size=TEST_SIZE, **overrides)


@pytest.fixture(scope="module")
def replica_curation(replica, tokenizer, tmp_path_factory):
    """The replica curated by the full profile (one process) into a temporary data folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "DATA_DIR", tmp_path_factory.mktemp("data"))
        profile = full_profile(replica, num_proc=1)
        yield profile, curate(profile, tokenizer)


def test_tiktoken_counts_and_cuts_like_the_rust_tokenizer(tokenizer, sample_items, monkeypatch):
    assert tokens.llama3_tiktoken(tokenizer.backend_tokenizer) is not None  # the fast path is taken
    texts = [item.text for item in sample_items] + ["Price is $123", "café ☕ 1234567 ", " book" * 400, "x\n\n\ty"]
    batch = {"content": texts, "skip_reason": [""] * len(texts)}
    fast = count_and_cut_batch(batch, tokenizer)
    backend = tokenizer.backend_tokenizer
    monkeypatch.setattr(tokens, "encoder", lambda _: lambda texts: [
        e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)])
    assert fast == count_and_cut_batch(batch, tokenizer)  # counts, cuts and decisions


def test_replica_has_the_hub_schema_and_layout(replica):
    files = sorted((replica / "data").glob("*.parquet"))
    assert [f.name for f in files] == ["full-00000-of-00002.parquet", "full-00001-of-00002.parquet"]
    assert pq.read_schema(files[0]).remove_metadata() == hub_replica.SCHEMA and len(hub_replica.SCHEMA) == 16
    assert "split: full" in (replica / "README.md").read_text()
    first = pq.read_table(files[0]).slice(0, 200).to_pylist()
    assert len({row["parent_asin"] for row in first}) == 200
    assert all(json.loads(row["details"]) is not None for row in first)  # hub-style JSON details


def test_full_profile_reads_only_the_course_columns_of_a_local_copy(replica):
    source = open_source(str(replica))
    assert source.kind == "parquet" and source.columns == config.RAW_COLUMNS and source.num_shards == 4
    tables = [table for index in range(source.num_shards) for table in source.read_shard(index, 600)]
    assert sum(table.num_rows for table in tables) == REPLICA_ROWS
    assert all(table.column_names == list(config.RAW_COLUMNS) for table in tables)


def test_full_profile_curates_a_hub_layout_replica(replica_curation):
    profile, curation = replica_curation
    funnel = curation.funnel.set_index("stage")
    assert funnel.loc["raw records", "items"] == REPLICA_ROWS
    assert funnel.loc["drop: other edition of a book", "dropped"] > 0  # the replica's second editions
    assert funnel["dropped"].sum() == REPLICA_ROWS - len(curation.train) - len(curation.test)
    assert len(curation.test) == TEST_SIZE
    assert {i.title for i in curation.train}.isdisjoint(i.title for i in curation.test)  # editions share titles
    assert curation.manifest["source"] == Path(profile.data_source).name and curation.manifest["hub_dataset"] is None
    assert not (profile.curated_dir / ".stage").exists()  # the parts go when the curated folder is saved


def test_edition_dedup_keeps_one_seeded_edition_per_book():
    frame = pd.DataFrame({"asin": ["B1", "B2", "B3", "B4", "B5", "B6"],
                          BOOK: ["dune|frank herbert", "dune|frank herbert", "dune|frank herbert", "emma|jane austen",
                                 "", ""]})  # no title: never merged
    kept = dedup_editions(frame)
    assert len(kept) == 4 and kept[BOOK].tolist().count("dune|frank herbert") == 1
    assert set(kept["asin"]) >= {"B4", "B5", "B6"}
    assert dedup_editions(frame.iloc[::-1])["asin"].tolist()[::-1] == kept["asin"].tolist()  # order-independent
    chosen = {dedup_editions(frame, seed=seed)["asin"].iloc[0] for seed in range(20)}
    assert chosen == {"B1", "B2", "B3"}  # the seed decides which edition stays


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_two_editions_of_a_book_never_straddle_the_split(tokenizer, tmp_path, monkeypatch):
    lines = config.SAMPLE_PATH.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    editions = [{**r, "parent_asin": f"E{i:09d}", "subtitle": "Kindle Edition"} for i, r in enumerate(records)]
    source = _write_jsonl(tmp_path / "editions.jsonl", lines + [json.dumps(r) for r in editions])
    monkeypatch.setattr(config, "DATA_DIR", tmp_path)
    curation = curate(config.get_profile("smoke", data_source=str(source)), tokenizer)

    def books(items: list) -> set:
        return {(i.title, next((line for line in i.text.splitlines() if line.startswith("Author:")), ""))
                for i in items}

    assert books(curation.train).isdisjoint(books(curation.test))
    asins = [i.asin for i in curation.train + curation.test]
    originals = {r["parent_asin"]: f"E{i:09d}" for i, r in enumerate(records)}
    assert not [a for a in asins if originals.get(a) in asins]  # never both editions of one book
    assert curation.funnel.set_index("stage").loc["drop: other edition of a book", "dropped"] >= 100


def test_a_malformed_line_is_skipped_counted_and_named(tokenizer, tmp_path, monkeypatch, caplog):
    lines = config.SAMPLE_PATH.read_text(encoding="utf-8").splitlines()
    truncated = '{"main_category": "Books", "title": "Trunc'
    source = _write_jsonl(tmp_path / "cut.jsonl", lines[:2] + [truncated] + lines[2:])
    monkeypatch.setattr(config, "DATA_DIR", tmp_path / "clean")
    clean = curate(config.get_profile("smoke"), tokenizer)
    monkeypatch.setattr(config, "DATA_DIR", tmp_path / "cut")
    with caplog.at_level(logging.WARNING):
        cut = curate(config.get_profile("smoke", data_source=str(source)), tokenizer)
    funnel = cut.funnel.set_index("stage")
    assert funnel.loc["raw records", "items"] == 180 and funnel.loc["drop: malformed line", "dropped"] == 1
    assert cut.manifest["malformed_lines"] == ["cut.jsonl:3"] and f"{source}:3" in caplog.text
    assert cut.manifest["sha256"] == clean.manifest["sha256"]  # the other 179 records curate as before


@pytest.mark.parametrize("content, message", [
    ("", "holds no JSON records"), ("\n\n", "holds no JSON records"), ("not json\n", "holds no JSON records"),
    ('{"asin": "B1", "rating": 5}\n', r"lacks the columns \['title', 'price'\]"),
])
def test_an_empty_or_schemaless_jsonl_names_the_file_and_the_fix(tmp_path, content, message):
    path = tmp_path / "books.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        open_source(str(path))
    said = str(error.value)
    assert str(path) in said and ("download it again" in said or "data_source" in said)


def test_a_column_that_changes_type_names_the_file_and_lines(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [json.dumps({"title": "A", "price": "5", "rating_number": 3}),
                                                   json.dumps({"title": "B", "price": "6", "rating_number": "many"})])
    with pytest.raises(ValueError, match=rf"{path}, lines 1-2: a column changes type"):
        list(open_source(str(path)).read_shard(0, batch_size=10))


def test_a_folder_without_usable_parquet_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="No parquet files at .*BOOK_PRICER_DATA"):
        open_source(str(tmp_path))
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"asin": ["B1"]}), tmp_path / "data" / "full-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=rf"{tmp_path} lacks the columns \['title', 'price'\]"):
        open_source(str(tmp_path))


RUN_FULL = """
import sys
from pathlib import Path
from helpers import config, curate
config.DATA_DIR = Path(sys.argv[1])
curate.curate(config.get_profile("full", data_source=sys.argv[2], test_size=int(sys.argv[3]), num_proc=2))
"""


@pytest.mark.slow
def test_a_killed_curation_resumes_from_its_finished_parts(replica, replica_curation, tokenizer, tmp_path,
                                                           monkeypatch):
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(config.REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.Popen([sys.executable, "-c", RUN_FULL, str(data), str(replica), str(TEST_SIZE)],
                           cwd=config.REPO_ROOT, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage = data / "curated" / "full" / ".stage"
    deadline = time.monotonic() + 300
    while not list(stage.rglob("part-*")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)  # the parent and its two workers, mid-stage
    run.wait()
    finished = sorted(stage.rglob("part-*"))
    assert 0 < len(finished) < 4, "the kill should land between the first and the last part"
    for part in finished:
        pq.read_table(part)  # a file under a final name is always whole

    computed = []
    real = curate_module.curate_shard

    def spy(source, index, *args, **kwargs):
        computed.append(index)
        return real(source, index, *args, **kwargs)

    monkeypatch.setattr(curate_module, "curate_shard", spy)
    monkeypatch.setattr(config, "DATA_DIR", data)
    resumed = curate(full_profile(replica, num_proc=1), tokenizer)
    done = {int(part.name.split("-")[1]) for part in finished}
    assert sorted(computed) == sorted(set(range(4)) - done)  # finished parts were reused, not redone
    assert resumed.manifest["sha256"] == replica_curation[1].manifest["sha256"]  # same output as one clean run
