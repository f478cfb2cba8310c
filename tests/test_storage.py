"""Crash-safe folder writes: an interruption at any point leaves the old folder or the new one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import config
from helpers.storage import atomic_folder, recover_folder, write_folder_atomically


def write(target: Path, text: str) -> Path:
    return write_folder_atomically(target, lambda tmp: (tmp / "a.txt").write_text(text))


def test_an_interrupted_save_leaves_the_old_folder(tmp_path):
    target = write(tmp_path / "out", "old")

    def crash(tmp):
        (tmp / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(target, crash)
    assert (target / "a.txt").read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("error", [OSError("the disk went away"), KeyboardInterrupt()])
def test_an_interruption_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch, error):
    target = write(tmp_path / "out", "old")
    rename, calls = Path.rename, []

    def second_rename_fails(self, destination):
        calls.append(self)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in
            raise error
        return rename(self, destination)

    monkeypatch.setattr(Path, "rename", second_rename_fails)
    with pytest.raises(type(error)):
        write(target, "new")
    assert (target / "a.txt").read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from helpers.storage import write_folder_atomically

target = Path(sys.argv[1])
write_folder_atomically(target, lambda tmp: (tmp / "a.txt").write_text("old"))
rename, calls = Path.rename, []

def killed_at_the_second_rename(self, destination):
    calls.append(self)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(self, destination)

Path.rename = killed_at_the_second_rename
write_folder_atomically(target, lambda tmp: (tmp / "a.txt").write_text("new"))
"""


@pytest.fixture
def killed_mid_swap(tmp_path) -> Path:
    """A target whose second write was SIGKILLed between its two renames: the old folder sits aside."""
    target = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(target)], cwd=config.REPO_ROOT,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not target.exists()
    return target


def test_the_next_write_after_a_kill_keeps_the_old_folder_even_if_it_fails(killed_mid_swap):
    def crash(tmp):
        raise RuntimeError("save failed")

    with pytest.raises(RuntimeError):
        write_folder_atomically(killed_mid_swap, crash)
    assert (killed_mid_swap / "a.txt").read_text() == "old"
    assert len(list(killed_mid_swap.parent.iterdir())) == 2  # out, and the killed writer's temporary folder


def test_recover_folder_puts_a_killed_swap_back(killed_mid_swap):
    assert recover_folder(killed_mid_swap)
    assert (killed_mid_swap / "a.txt").read_text() == "old"
    assert len(list(killed_mid_swap.parent.iterdir())) == 2  # out, and the killed writer's temporary folder
    assert recover_folder(killed_mid_swap)  # nothing left to do
    assert not recover_folder(killed_mid_swap.parent / "never-written")


def test_a_writer_that_swaps_in_between_our_renames_is_overwritten_whole(tmp_path, monkeypatch):
    target = write(tmp_path / "out", "first")
    rename, calls = Path.rename, []

    def another_writer_in_the_window(self, destination):
        calls.append(self)
        if len(calls) == 2:  # ours is aside: another writer runs its whole write now
            monkeypatch.setattr(Path, "rename", rename)
            write(target, "other")
        return rename(self, destination)

    monkeypatch.setattr(Path, "rename", another_writer_in_the_window)
    write(target, "ours")
    assert (target / "a.txt").read_text() == "ours"  # the last swap wins
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_atomic_folder_swaps_in_on_a_clean_exit_only(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "new"
    with pytest.raises(ValueError), atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise ValueError("stop")
    assert (target / "a.txt").read_text() == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
