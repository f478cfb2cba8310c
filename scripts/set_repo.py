"""Point the course at the GitHub repository that hosts this copy: every Colab badge (README.md, docs/) and every
notebook's set-up cell (the repository it clones on Colab).

    python scripts/set_repo.py OWNER/NAME      # or: make set-repo REPO=OWNER/NAME

Files are edited as text, so nothing else in them changes; running it twice with the same name changes nothing.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLUG = r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+"
BADGE = re.compile(rf"(https://colab\.research\.google\.com/github/)({SLUG})(/blob/)")
CLONE = re.compile(rf'(BOOK_PRICER_REPO\\?", \\?"https://github\.com/)({SLUG})(\\?")')


def pages(root: Path) -> list[Path]:
    """The Markdown pages that may hold badges."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def notebooks(root: Path) -> list[Path]:
    """Every notebook with a set-up cell: the lessons and their solutions."""
    return sorted((root / "notebooks").glob("**/*.ipynb"))


def repositories(root: Path) -> dict[Path, set[str]]:
    """The repositories each page's badges and each notebook's set-up cell name."""
    found = {path: {match.group(2) for match in BADGE.finditer(path.read_text(encoding="utf-8"))}
             for path in pages(root)}
    found |= {path: {match.group(2) for match in CLONE.finditer(path.read_text(encoding="utf-8"))}
              for path in notebooks(root)}
    return {path: names for path, names in found.items() if names}


def set_repo(root: Path, slug: str) -> list[Path]:
    """Rewrite every badge and set-up cell under ``root`` to ``slug``; the files changed."""
    if not re.fullmatch(SLUG, slug):
        raise ValueError(f"{slug!r} is not OWNER/NAME")
    changed = []
    for path, pattern in [(path, BADGE) for path in pages(root)] + [(path, CLONE) for path in notebooks(root)]:
        text = path.read_text(encoding="utf-8")
        new = pattern.sub(lambda match: match.group(1) + slug + match.group(3), text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", help="OWNER/NAME of the GitHub repository that hosts this copy")
    parser.add_argument("--root", type=Path, default=ROOT, help="the course's folder (default: this checkout)")
    args = parser.parse_args()
    try:
        changed = set_repo(args.root, args.repo)
    except ValueError as error:
        parser.exit(2, f"set_repo.py: {error}\n")
    print(f"{len(changed)} file(s) now point at {args.repo}" if changed
          else f"Everything already points at {args.repo}")


if __name__ == "__main__":
    main()
