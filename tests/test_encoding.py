"""Every text file the course reads or writes names its encoding (UTF-8), never the locale's default: a Llama
license (non-ASCII), a run card or a manifest reads the same on Windows or under a C locale as on Colab.

Two checks: the package's file I/O run under ``python -X warn_default_encoding`` with an EncodingWarning
raised by the package's own modules an error (a call in it that leaves the encoding out raises there; a
library's own defaults are not the course's to fix), and a scan of the source for the calls that do.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from helpers import config

SOURCES = ("helpers", "benchmarks", "scripts")
TEXT_CALLS = ("read_text", "write_text")
SUBPROCESS_CALLS = ("run", "Popen", "check_output", "check_call", "call")

# Reads and writes of curated data, its manifest, run settings and cards, the leaderboard, licenses and an
# export's files, in a temporary state folder (argv[1]); no model is loaded.
FILE_IO = r"""
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("error", category=EncodingWarning, module=r"helpers\.")  # before any helpers import

import pandas as pd
import torch

from helpers import config, curate, dataset, environment, export, licensing, tracking
from helpers.evaluate import Evaluation
from helpers.items import Item
from helpers.leaderboard import Leaderboard
from helpers.runs import RunDir, card_in, run_cards

home = Path(sys.argv[1])
config.HOME, config.DATA_DIR = home, home / "data"
profile = config.get_profile("smoke")

def book(index):
    return Item(asin=f"B{index:09d}", title=f"Café {index}", price=10.0 + index, text="Naïve — a café's tale ☕",
                token_count=20, category="Cookbooks", format="paperback", pages=100.0, weight_oz=8.0, year=2001.0,
                rating_number=3.0, average_rating=4.5, description_chars=40)

books = [book(index) for index in range(4)]
curate.save(curate.Curation(books[:2], books[2:], pd.DataFrame(), {"source": "café.jsonl", "seed": config.SEED}),
            profile.curated_dir)
assert dataset.load_manifest(profile)["source"] == "café.jsonl" and dataset.has_curated(profile)
train, test = dataset.load_curated(profile)
assert [item.text for item in test] == [item.text for item in books[2:]]

run = RunDir.default(profile)
run.record({"profile": "smoke", "note": "résumé"})
assert run.recorded()["note"] == "résumé"
hyperparameters = {name: 1 for name in tracking.HYPERPARAMETERS}
run.write_card({"hyperparameters": hyperparameters, "model": "SmolLM2 — 135M", "eval_loss_after": 0.5})
assert run.read_card()["model"] == "SmolLM2 — 135M" and list(run_cards(home)) == [run.card]
assert tracking.compare_runs({"r": run.path}).loc["model", "r"] == "SmolLM2 — 135M"

board = Leaderboard(profile.results_dir / "leaderboard.csv")
truths = pd.Series([10.0, 20.0]).to_numpy()
board.record(Evaluation("Modèle naïf", truths, truths + 1, failures=[]), train_items=2)
assert "Modèle naïf" in board.markdown()

full = config.get_profile("full")
licenses = licensing.license_files(full)
run.adapter.mkdir(parents=True)
run.merged.mkdir()
card = export.export_card(full, str(run.adapter), torch.bfloat16)
export.write_provenance(run.merged, full, str(run.adapter), torch.bfloat16, card, licenses)
assert card_in(run.merged)["model"] == "SmolLM2 — 135M" and "©" in licensing.license_text(run.merged)
assert environment.pinned_requirements()
print("file I/O ok")
"""


def test_the_package_reads_and_writes_text_as_utf_8(tmp_path):
    run = subprocess.run([sys.executable, "-X", "warn_default_encoding", "-W", "ignore::EncodingWarning", "-c", FILE_IO,
                          str(tmp_path)], cwd=config.REPO_ROOT, capture_output=True, text=True, encoding="utf-8")
    assert run.returncode == 0 and "file I/O ok" in run.stdout, run.stderr[-4000:]


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((keyword.value for keyword in call.keywords if keyword.arg == name), None)


def _is_binary(call: ast.Call, mode_position: int) -> bool:
    """Whether an ``open`` call's mode (a constant) opens the file in bytes."""
    mode = _keyword(call, "mode") or (call.args[mode_position] if len(call.args) > mode_position else None)
    return isinstance(mode, ast.Constant) and "b" in str(mode.value)


def _is_text_mode(call: ast.Call) -> bool:
    """Whether a subprocess call decodes its output (``text=True`` or ``universal_newlines=True``)."""
    return any(isinstance(value, ast.Constant) and value.value for value in
               (_keyword(call, "text"), _keyword(call, "universal_newlines")) if value is not None)


def missing_encodings(source: str) -> list[int]:
    """The lines of ``source`` with a text read or write that does not name its encoding: ``read_text``,
    ``write_text``, a text-mode ``open``, a subprocess call in text mode."""
    lines = []
    for call in ast.walk(ast.parse(source)):
        if not isinstance(call, ast.Call) or _keyword(call, "encoding") is not None:
            continue
        function = call.func
        name = function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)
        owner = getattr(function.value, "id", None) if isinstance(function, ast.Attribute) else None
        if (name in TEXT_CALLS
                or name == "open" and isinstance(function, ast.Name) and not _is_binary(call, 1)
                or name == "open" and isinstance(function, ast.Attribute) and owner not in ("os", "gzip")
                and not _is_binary(call, 0)
                or name in SUBPROCESS_CALLS and owner == "subprocess" and _is_text_mode(call)):
            lines.append(call.lineno)
    return sorted(lines)


def test_no_text_read_or_write_in_the_code_leaves_out_its_encoding():
    files = sorted(path for folder in SOURCES for path in (config.REPO_ROOT / folder).glob("*.py"))
    problems = [f"{path.relative_to(config.REPO_ROOT)}:{line}" for path in files
                for line in missing_encodings(path.read_text(encoding="utf-8"))]
    assert not problems, "a text read or write without encoding=\"utf-8\":\n" + "\n".join(problems)


@pytest.mark.parametrize("code, found", [
    ("Path('a').read_text()", [1]), ("p.write_text(t)", [1]), ("open(p)", [1]), ("open(p, 'w')", [1]),
    ("subprocess.run(c, text=True)", [1]), ("p.open('a')", [1]),
    ("p.read_text(encoding='utf-8')", []), ("open(p, 'rb')", []), ("open(p, mode='wb')", []),
    ("subprocess.run(c, capture_output=True)", []), ("p.read_bytes()", []), ("os.open(p, flags)", []),
])
def test_the_scan_finds_each_kind_of_call(code, found):
    assert missing_encodings(code) == found
