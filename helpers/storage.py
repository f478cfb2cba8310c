"""Crash-safe writes: a file or folder appears whole, under its final name, or not at all.

A folder is written beside its target, then swapped in with two renames (the old folder aside into a
hidden ``.name-old-<hex>`` folder, the new one in). An exception between them puts the old folder back;
a kill between them leaves it aside, and the next write of that target (or :func:`recover_folder`)
puts it back. This relies on POSIX ``rename``. Writers of one target at the same time race: the last
swap wins (a writer whose target moved under it tries again), and none leaves a mix or loses the target.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

_OLD = "-old-"  # .name-old-<32 hex digits>/name holds the old folder during a swap
_RACED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY}  # another writer moved the target meanwhile
_SWAP_ATTEMPTS = 3


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(handle)
    os.chmod(tmp, 0o644)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _set_aside(target: Path) -> list[Path]:
    """The ``.name-old-<hex>`` folders beside ``target``, oldest first."""
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}{_OLD}[0-9a-f]{{32}}")
    found: dict[Path, int] = {}
    for path in target.parent.iterdir():
        if pattern.fullmatch(path.name):
            with suppress(FileNotFoundError):  # another process recovered it meanwhile
                found[path] = path.stat().st_mtime_ns
    return sorted(found, key=found.get)


def recover_folder(target: Path) -> bool:
    """Put back the old folder a killed swap left aside, when ``target`` is missing; drop the leftovers
    once ``target`` exists. Return whether ``target`` exists."""
    target = Path(target)
    aside = _set_aside(target)
    if not target.exists():
        for holder in reversed(aside):  # the newest copy wins
            with suppress(OSError):  # another process got there first: it restored this copy, or wrote target
                (holder / target.name).rename(target)
            if target.exists():
                break
    if target.exists():
        for holder in aside:
            shutil.rmtree(holder, ignore_errors=True)
    return target.exists()


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, setting an existing ``target`` aside first and back on any failure.

    When another writer swaps its folder in between our two renames, we set that one aside and try again.
    """
    for attempt in range(1, _SWAP_ATTEMPTS + 1):
        holder: Path | None = None
        try:
            if target.exists():
                holder = target.with_name(f".{target.name}{_OLD}{uuid.uuid4().hex}")
                holder.mkdir()
                target.rename(holder / target.name)
            tmp.rename(target)
            return
        except BaseException as error:
            if holder is not None and not target.exists() and (holder / target.name).is_dir():
                (holder / target.name).rename(target)
            raced = isinstance(error, OSError) and error.errno in _RACED and tmp.is_dir()
            if not raced or attempt == _SWAP_ATTEMPTS:
                raise
        finally:
            if holder is not None and (target.exists() or not (holder / target.name).exists()):
                shutil.rmtree(holder, ignore_errors=True)  # never while it holds the only copy


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """``with atomic_folder(target) as tmp:`` fill ``tmp``; on a clean exit it replaces ``target``.

    An exception in the block leaves ``target`` as it was and deletes ``tmp``; the only trace of a kill
    is a hidden ``.name-*`` folder beside ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    tmp.chmod(0o755)
    try:
        yield tmp
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_folder_atomically(target: Path, save: Callable[[Path], None]) -> Path:
    """Call ``save(tmp_folder)``, then swap the folder in for ``target`` (see :func:`atomic_folder`)."""
    with atomic_folder(target) as tmp:
        save(tmp)
    return Path(target)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
