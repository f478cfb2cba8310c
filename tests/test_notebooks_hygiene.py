"""Notebook hygiene: numbered in order, outputs stripped, python3 kernel, a tagged parameters cell."""

import re

import nbformat
import pytest

from helpers import config

NOTEBOOKS = sorted((config.REPO_ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_are_numbered_in_order_from_00():
    numbers = [int(re.match(r"(\d\d)_[a-z0-9_]+\.ipynb$", path.name).group(1)) for path in NOTEBOOKS]
    assert numbers == list(range(len(NOTEBOOKS))) and len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_clean_and_parameterised(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "outputs not stripped"
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and re.search(r"^PROFILE = ", tagged[0].source, re.M)
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith(f"# {path.name[:2]}")
    assert "google.colab" in notebook.cells[1].source, "the second cell sets up Colab"
