"""The Colab links: every badge and every set-up cell name one repository, every notebook has a badge, and
scripts/set_repo.py moves them all to another repository at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers import config

sys.path.insert(0, str(config.REPO_ROOT / "scripts"))
import set_repo  # noqa: E402

ROOT = config.REPO_ROOT


def test_badges_and_set_up_cells_name_one_repository():
    found = set_repo.repositories(ROOT)
    assert ROOT / "README.md" in found and all(path in found for path in set_repo.notebooks(ROOT))
    assert len(set().union(*found.values())) == 1, found


def test_every_notebook_has_a_badge():
    badges = " ".join(path.read_text(encoding="utf-8") for path in set_repo.pages(ROOT))
    lessons = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert len(lessons) >= 8
    assert [path.name for path in lessons if f"/blob/main/notebooks/{path.name})" not in badges] == []


@pytest.fixture
def copy(tmp_path):
    shutil.copy(ROOT / "README.md", tmp_path)
    for folder in ("docs", "notebooks"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.png", ".ipynb_checkpoints"))
    return tmp_path


def test_set_repo_moves_every_link_and_nothing_else(copy):
    before = {path: path.read_text(encoding="utf-8") for path in set_repo.pages(copy) + set_repo.notebooks(copy)}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "set_repo.py"), "alice/pricer", "--root",
                             str(copy)], capture_output=True, text=True, check=True)
    assert "now point at alice/pricer" in result.stdout
    assert set().union(*set_repo.repositories(copy).values()) == {"alice/pricer"}
    for path, text in before.items():
        after = path.read_text(encoding="utf-8")
        assert len(after.splitlines()) == len(text.splitlines())  # only the names changed
    setup = json.loads((copy / "notebooks" / "00_setup.ipynb").read_text(encoding="utf-8"))["cells"][2]
    assert '"https://github.com/alice/pricer"' in "".join(setup["source"])
    assert set_repo.set_repo(copy, "alice/pricer") == []  # twice: nothing more to do


def test_set_repo_refuses_what_is_not_owner_slash_name(copy):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "set_repo.py"), "https://github.com/alice",
                             "--root", str(copy)], capture_output=True, text=True)
    assert result.returncode == 2 and "is not OWNER/NAME" in result.stderr
