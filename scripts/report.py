"""Write every generated table of README.md and docs/ between its markers, from what the commands recorded:

    python scripts/report.py            # or: make report (after make smoke, and make bench for the benchmarks)

A table lives between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``; under it, the command, date, commit
and machine that made its figures. A table whose source is missing keeps what the page holds, and says so here.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat
import pandas as pd

from helpers import config, conformal, provenance, saved_forms, tracking
from helpers.leaderboard import Leaderboard

MARKER = re.compile(r"(<!-- report:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)", re.S)
BENCHMARKS = ("bench-curation", "bench-predict", "sweep-smoke", "gpu-check")


def markdown_table(frame: pd.DataFrame, index: str | None = None) -> str:
    """A small DataFrame of strings as a Markdown table (its index as the first column when ``index`` names it)."""
    if index is not None:
        frame = frame.rename_axis(index).reset_index()
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)])


def with_source(table: str, recorded: dict[str, str] | None, source: str) -> str:
    return f"{table}\n\n<sub>From {source}. {provenance.line(recorded)}</sub>\n"


class Report:
    """The tables of one state folder (``results/``, ``runs/``) for one profile."""

    def __init__(self, home: Path, profile: str = "smoke") -> None:
        self.home, self.profile = home, profile
        self.results = home / "results" / profile
        self.runs = home / "runs" / profile
        self.stamp = provenance.read_stamp(self.results)

    def tables(self) -> dict[str, Callable[[], str | None]]:
        """Each marker's table, made when asked; None when its source is missing."""
        return {"smoke-leaderboard": self.leaderboard, "smoke-notebook-times": self.notebook_times,
                "smoke-runs": self.training_runs, "saved-forms": self.saved_forms, "plan": self.plan,
                "smoke-calibration": self.calibration,
                **{f"smoke-{name}": (lambda name=name: self.csv_table(name)) for name in ("ensemble", "segments",
                                                                                          "human")},
                **{name: (lambda name=name: self.benchmark(name)) for name in BENCHMARKS}}

    def leaderboard(self) -> str | None:
        path = self.results / "leaderboard.csv"
        if not path.exists():
            return None
        return with_source(Leaderboard(path).markdown(), self.stamp, f"`results/{self.profile}/leaderboard.csv`")

    def notebook_times(self) -> str | None:
        """Each executed notebook's time, its first cell's start to its last cell's end (nbclient records both)."""
        rows = {}
        for path in sorted((self.results / "notebooks").glob("[0-9][0-9]_*.ipynb")):
            times = [cell.metadata["execution"] for cell in nbformat.read(path, as_version=4).cells
                     if "execution" in cell.get("metadata", {})]
            if times:
                start = min(datetime.datetime.fromisoformat(t["iopub.execute_input"]) for t in times)
                end = max(datetime.datetime.fromisoformat(t["shell.execute_reply"]) for t in times)
                rows[path.stem] = (end - start).total_seconds()
        if not rows:
            return None
        frame = pd.DataFrame({"seconds": [f"{seconds:,.0f}" for seconds in rows.values()]}, index=list(rows))
        total = sum(rows.values())
        table = markdown_table(frame, "notebook") + f"\n| all {len(rows)} | {total:,.0f} ({total / 60:.1f} min) |"
        return with_source(table, self.stamp, f"the executed notebooks in `results/{self.profile}/notebooks/` "
                           "(cell timestamps; the kernels' start-up not counted)")

    def training_runs(self) -> str | None:
        runs = {path.parent.name: path.parent for path in sorted(self.runs.glob("*/run_card.json"))}
        if not runs:
            return None
        return with_source(markdown_table(tracking.compare_runs(runs), "run"), self.stamp,
                           f"the run cards `runs/{self.profile}/*/run_card.json`")

    def saved_forms(self) -> str | None:
        path = self.results / "leaderboard.csv"
        suffix = f" [{saved_forms.FORMS[1]}]"
        keys = pd.read_csv(path)["key"].astype(str) if path.exists() else pd.Series(dtype=str)
        adapters = [key.removesuffix(suffix) for key in keys if key.endswith(suffix)]
        if not adapters:
            return None
        table = saved_forms.saved_forms(Leaderboard(path), adapters[-1])
        return with_source(saved_forms.markdown(table), self.stamp, f"`results/{self.profile}/leaderboard.csv`")

    def calibration(self) -> str | None:
        path = self.results / "calibration.csv"
        if not path.exists():
            return None
        return with_source(conformal.table_markdown(pd.read_csv(path)), self.stamp,
                           f"`results/{self.profile}/calibration.csv` (notebook 05)")

    def csv_table(self, name: str) -> str | None:
        """A table notebook 05 saved as it shows it (``results/<profile>/<name>.csv``)."""
        path = self.results / f"{name}.csv"
        if not path.exists():
            return None
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        return with_source(markdown_table(frame), self.stamp, f"`results/{self.profile}/{name}.csv` (notebook 05)")

    def plan(self) -> str | None:
        script = config.REPO_ROOT / "scripts" / "plan_table.py"
        table = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                               encoding="utf-8", cwd=config.REPO_ROOT).stdout.strip()
        return with_source(table, provenance.stamp("python scripts/plan_table.py"), "the plan (computed, "
                           "not run: each row says whether its speed figure is measured, published or estimated)")

    def benchmark(self, name: str) -> str | None:
        base = self.home / "results" / "benchmarks" / name
        if not base.with_suffix(".txt").exists():
            return None
        output = base.with_suffix(".txt").read_text(encoding="utf-8").rstrip()
        table = []  # an output that ends in a Markdown table: that table is its result (the log above is not)
        for line in reversed(output.splitlines()):
            if not line.startswith("|"):
                break
            table.insert(0, line)
        body = "\n".join(table) if table else f"```text\n{output}\n```"
        return with_source(body, provenance.read_stamp(base.with_suffix(".json")), f"`results/benchmarks/{name}.txt`")


def fill(page: str, report: Report) -> tuple[str, list[str], list[str]]:
    """``page`` with each marker's table written in; the names filled, and those kept for want of a source."""
    filled, kept = [], []
    makers = report.tables()

    def write(match: re.Match) -> str:
        name = match.group("name")
        table = makers[name]() if name in makers else None
        if table is None:
            kept.append(name)
            return match.group(0)
        filled.append(name)
        return match.group(1) + table + match.group(4)

    return MARKER.sub(write, page), filled, kept


def pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=config.HOME, help="the state folder (default: this checkout's)")
    parser.add_argument("--root", type=Path, default=config.REPO_ROOT, help="where README.md and docs/ are")
    parser.add_argument("--profile", default="smoke")
    args = parser.parse_args(argv)
    report = Report(args.home, args.profile)
    for path in pages(args.root):
        text = path.read_text(encoding="utf-8")
        new, filled, kept = fill(text, report)
        if filled or kept:
            print(f"{path.relative_to(args.root)}: written {', '.join(filled) or 'none'}"
                  + (f"; kept (no source yet) {', '.join(kept)}" if kept else ""))
        if new != text:
            path.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    main()
