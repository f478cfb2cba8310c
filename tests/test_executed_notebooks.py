"""The notebooks as a learner reads them: the executed copies `make smoke` writes to results/<profile>/notebooks
hold no progress bar, no warning the course has not explained (helpers/noise.py silences the explained ones), no
raw object repr in place of a result, no table wider than the limit in helpers/config.py, and no dump (a dict, list
or object printed on one line wider than its line limit). Long lines of prose, prompts included, are fine: Jupyter
wraps them.

`make smoke` runs this file after executing the notebooks; the unit tests below check the checker itself.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import nbformat
import pytest

from helpers import config

EXECUTED = sorted((config.HOME / "results").glob("*/notebooks/*.ipynb"))
PROGRESS = re.compile(r"\d+%\|")  # tqdm's "42%|████"
WIDGET = "application/vnd.jupyter.widget-view+json"
WARNING = re.compile(r"\b\w*Warning\b|^WARNING\b|^W\d{4} ", re.M)
DUMP = re.compile(r"^\s*[\[{(]['\"\d]|\b\w+\(\w+=")  # "{'loss': ...", "[...]", "LoraConfig(r=8, ..."
RAW_REPR = re.compile(r"^<[\w.]+ object at 0x[0-9a-f]+>$|^<IPython\.core\.display\.\w+ object>$"
                      r"|^<Figure size [\d.]+x[\d.]+ with \d+ Axes>$")  # a figure not drawn (no inline backend)


class _Columns(HTMLParser):
    """The number of cells in each row of an HTML table."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "tr":
            self.rows.append(0)
        elif tag in ("td", "th") and self.rows:
            self.rows[-1] += 1


def table_columns(html: str) -> int:
    """The widest row of the HTML tables in ``html``, not counting the index column pandas adds."""
    parser = _Columns()
    parser.feed(html)
    return max(parser.rows, default=1) - 1


def problems(notebook: nbformat.NotebookNode) -> list[str]:
    """What a learner should not meet in an executed notebook, one line per finding (cell id first)."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            text = output.get("text", "") if output.get("output_type") == "stream" else data.get("text/plain", "")
            html = data.get("text/html", "")
            where = f"cell {cell.id}"
            if WIDGET in data or PROGRESS.search(text) or "<progress" in html:
                found.append(f"{where}: a progress bar")
            if output.get("output_type") == "stream" and output.get("name") == "stderr" and WARNING.search(text):
                found.append(f"{where}: a warning: {WARNING.search(text).group(0)} ({text.strip()[:120]})")
            if len(data) == 1 and RAW_REPR.match(text.strip()):
                found.append(f"{where}: a raw repr: {text.strip()[:80]}")
            if html and "<table" in html and table_columns(html) > config.TABLE_COLUMNS:
                found.append(f"{where}: a table of {table_columns(html)} columns (limit {config.TABLE_COLUMNS})")
            dumps = [line for line in text.splitlines() if len(line) > config.LINE_WIDTH and DUMP.search(line)]
            if dumps and not html:  # a DataFrame's text twin is not shown where its HTML is
                found.append(f"{where}: a dump of {len(dumps[0])} characters on one line (limit {config.LINE_WIDTH})")
    return found


@pytest.mark.skipif(not EXECUTED, reason="no executed notebooks: run `make smoke` first")
@pytest.mark.parametrize("path", EXECUTED, ids=lambda path: f"{path.parent.parent.name}/{path.name}")
def test_an_executed_notebook_is_made_for_people(path):
    assert problems(nbformat.read(path, as_version=4)) == []


def _executed(*outputs: dict) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell("x", id="x-01")
    cell.outputs = [nbformat.from_dict(output) for output in outputs]
    return nbformat.v4.new_notebook(cells=[cell])


def _table(columns: int) -> str:
    header = "".join(f"<th>c{index}</th>" for index in range(columns))
    return f"<table><thead><tr><th></th>{header}</tr></thead><tbody><tr><th>0</th>{'<td>1</td>' * columns}</tr></table>"


@pytest.mark.parametrize("output, finding", [
    ({"output_type": "stream", "name": "stderr", "text": "Map:  40%|████      | 2/5 [00:01<00:02]"}, "progress bar"),
    ({"output_type": "display_data", "metadata": {}, "data": {WIDGET: {}, "text/plain": "HBox()"}}, "progress bar"),
    ({"output_type": "stream", "name": "stderr", "text": "x.py:3: FutureWarning: `old` is deprecated"}, "a warning"),
    ({"output_type": "execute_result", "execution_count": 1, "metadata": {},
      "data": {"text/plain": "<helpers.hardware.Hardware object at 0x7f00aa>"}}, "raw repr"),
    ({"output_type": "execute_result", "execution_count": 1, "metadata": {},
      "data": {"text/plain": "<Figure size 800x350 with 1 Axes>"}}, "raw repr"),
    ({"output_type": "execute_result", "execution_count": 1, "metadata": {},
      "data": {"text/html": _table(19), "text/plain": "a wide frame"}}, "19 columns"),
    ({"output_type": "stream", "name": "stdout", "text": "{'loss': 0.123456789012345, " * 8}, "a dump of"),
    ({"output_type": "stream", "name": "stdout", "text": "LoraConfig(r=8, " + "x=1, " * 30}, "a dump of"),
])
def test_the_check_finds_what_a_learner_should_not_meet(output, finding):
    (found,) = problems(_executed(output))
    assert finding in found and found.startswith("cell x-01")


def test_the_check_passes_a_narrow_table_a_figure_and_printed_lines():
    clean = _executed(
        {"output_type": "execute_result", "execution_count": 1, "metadata": {},
         "data": {"text/html": _table(config.TABLE_COLUMNS), "text/plain": "x" * 300}},
        {"output_type": "display_data", "metadata": {},
         "data": {"image/png": "iVBOR", "text/plain": "<Figure size 800x350 with 1 Axes>"}},
        {"output_type": "stream", "name": "stdout", "text": "MAE $10.28 (95% CI $8.10-12.90)\n"},
        {"output_type": "stream", "name": "stdout", "text": "A blurb of a book, " * 40 + "\n"},  # prose wraps
    )
    assert problems(clean) == []
