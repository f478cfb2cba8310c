"""`make report` (scripts/report.py): the tables of README.md and docs/ regenerated from a small recorded state
folder (tests/data/report: a smoke leaderboard with its saved forms, two run cards, a benchmark's output, their
provenance), between their markers, with where each came from under it."""

from __future__ import annotations

import datetime
import json
import shutil
import sys

import nbformat
import pandas as pd
import pytest

from helpers import config, conformal, ensemble, human, provenance

sys.path.insert(0, str(config.REPO_ROOT / "scripts"))
import report  # noqa: E402

RECORDED = config.REPO_ROOT / "tests" / "data" / "report"
NAMES = ("smoke-leaderboard", "smoke-notebook-times", "smoke-runs", "saved-forms", "bench-curation",
         "smoke-calibration", "smoke-ensemble", "smoke-segments", "smoke-human")


def _page(*names: str) -> str:
    return "".join(f"## {name}\n<!-- report:{name} -->\nold {name}\n<!-- /report:{name} -->\n\n" for name in names)


def _executed_notebook(path, seconds: float) -> None:
    """An executed notebook of two cells as nbclient leaves it: each cell's start and end in its metadata."""
    start = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)
    cells = []
    for index, (begin, end) in enumerate(((0, 1), (1, seconds))):
        cell = nbformat.v4.new_code_cell("x", id=f"c{index}")
        cell.metadata["execution"] = {
            "iopub.execute_input": (start + datetime.timedelta(seconds=begin)).isoformat(),
            "shell.execute_reply": (start + datetime.timedelta(seconds=end)).isoformat()}
        cells.append(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)


@pytest.fixture
def home(tmp_path):
    shutil.copytree(RECORDED, tmp_path, dirs_exist_ok=True)
    _executed_notebook(tmp_path / "results" / "smoke" / "notebooks" / "00_setup.ipynb", 8)
    _executed_notebook(tmp_path / "results" / "smoke" / "notebooks" / "04_qlora_fine_tuning.ipynb", 200)
    return tmp_path


def test_every_table_is_written_between_its_markers_with_its_source(home):
    page, filled, kept = report.fill(_page(*NAMES, "not-a-table"), report.Report(home))
    assert filled == list(NAMES) and kept == ["not-a-table"] and "old not-a-table" in page
    sections = {name: page.split(f"<!-- report:{name} -->")[1].split(f"<!-- /report:{name} -->")[0] for name in NAMES}
    for name, body in sections.items():
        assert f"old {name}" not in body and "<sub>From " in body, name
    board = pd.read_csv(home / "results" / "smoke" / "leaderboard.csv")
    assert all(f"| {name} |" in sections["smoke-leaderboard"] for name in board["name"].drop_duplicates())
    stamp = provenance.read_stamp(home / "results" / "smoke")
    assert stamp["commit"] in sections["smoke-leaderboard"] and stamp["machine"] in sections["smoke-leaderboard"]
    assert "| 00_setup | 8 |" in sections["smoke-notebook-times"]
    assert "| all 2 | 208 (3.5 min) |" in sections["smoke-notebook-times"]
    runs = sorted(path.parent.name for path in (home / "runs" / "smoke").glob("*/run_card.json"))
    assert len(runs) == 2 and "| run | " + " | ".join(runs) + " |" in sections["smoke-runs"]
    cards = [json.loads((home / "runs" / "smoke" / run / "run_card.json").read_text(encoding="utf-8")) for run in runs]
    assert "| lora_r | " + " | ".join(str(card["hyperparameters"]["lora_r"]) for card in cards) + " |" in \
        sections["smoke-runs"]
    rows = [line for line in sections["saved-forms"].splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in rows] == [
        "| 4-bit + adapter", "| merged 16-bit", "| GGUF f16", "| GGUF q8_0"]
    recorded = (home / "results" / "benchmarks" / "bench-curation.txt").read_text(encoding="utf-8")
    assert recorded.strip() in sections["bench-curation"]
    assert all(f"| {level:.0%} |" in sections["smoke-calibration"] for level in conformal.LEVELS)
    assert all(f"| {member} |" in sections["smoke-ensemble"] for member in ensemble.MEMBERS)
    segment_rows = [line for line in sections["smoke-segments"].splitlines() if line.startswith("| format |")]
    books = pd.read_csv(home / "results" / "smoke" / "leaderboard-predictions.csv")
    assert sum(int(line.split(" | ")[2]) for line in segment_rows) == len(books)  # the formats add up
    assert f"| {human.RECORDED_NAME} |" in sections["smoke-human"]


def test_a_table_without_its_source_stays_as_the_page_has_it(tmp_path):
    page, filled, kept = report.fill(_page(*NAMES), report.Report(tmp_path))
    assert filled == [] and kept == list(NAMES) and page == _page(*NAMES)


def test_running_it_twice_changes_nothing_more(home):
    once, _, _ = report.fill(_page(*NAMES), report.Report(home))
    assert report.fill(once, report.Report(home))[0] == once


def test_the_pages_hold_the_markers_the_report_writes():
    pages = {path.name: path.read_text(encoding="utf-8") for path in report.pages(config.REPO_ROOT)}
    found = {match.group("name") for text in pages.values() for match in report.MARKER.finditer(text)}
    assert {"smoke-leaderboard", "smoke-notebook-times"} <= {match.group("name") for match in
                                                             report.MARKER.finditer(pages["README.md"])}
    assert found <= set(report.Report(config.HOME).tables()), found - set(report.Report(config.HOME).tables())


def test_a_recorded_command_keeps_its_output_and_its_stamp(tmp_path):
    base = tmp_path / "benchmarks" / "echo"
    assert provenance.record(base, [sys.executable, "-c", "print('42 items/s')"]) == 0
    assert base.with_suffix(".txt").read_text(encoding="utf-8") == "42 items/s\n"
    stamp = json.loads(base.with_suffix(".json").read_text(encoding="utf-8"))
    assert set(stamp) == {"command", "date", "commit", "machine"} and "print(" in stamp["command"]
    assert provenance.record(tmp_path / "failed", [sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert not (tmp_path / "failed.txt").exists()  # a failed run keeps nothing


def test_a_benchmark_that_ends_in_a_table_shows_the_table_not_its_log(home):
    recorded = home / "results" / "benchmarks" / "sweep-smoke.txt"
    log = "{'loss': '3.319', 'grad_norm': '2.036'}\n"
    table = "| learning rate | MAE ($) |\n|---|---|\n| 2e-3 | 10.36 |\n"
    recorded.write_text(log + table, encoding="utf-8")
    page, filled, _ = report.fill(_page("sweep-smoke"), report.Report(home))
    assert filled == ["sweep-smoke"] and "| 2e-3 | 10.36 |" in page and "grad_norm" not in page and "```" not in page
