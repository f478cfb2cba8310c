"""Notebook hygiene: numbered in order, outputs stripped, python3 kernel, stable cell ids, and one layout:
the title, the tagged parameters cell (papermill injects after it), then the same set-up cell everywhere."""

import re

import nbformat
import pytest

from helpers import config

NOTEBOOKS = sorted((config.REPO_ROOT / "notebooks").glob("*.ipynb"))
WORKSHOP = {"05": "load_finetuned(profile, ADAPTER or None, hardware)",  # take an ADAPTER
            "06": "Pricer(profile, ADAPTER or None, hardware)",
            "07": "save_merged(profile, ADAPTER or None, hardware, EXPORT_DIR or None)"}
EXTRA_PARAMETERS = {"04": ["PUSH_TO_HUB", "REPORT_TO", "TIME_BUDGET"], "05": ["ADAPTER"],
                    "06": ["ADAPTER", "SHARE"], "07": ["ADAPTER", "EXPORT_DIR"]}


def test_notebooks_are_numbered_in_order_from_00():
    numbers = [int(re.match(r"(\d\d)_[a-z0-9_]+\.ipynb$", path.name).group(1)) for path in NOTEBOOKS]
    assert numbers == list(range(len(NOTEBOOKS))) and len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_clean_with_stable_ids(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert (notebook.nbformat, notebook.nbformat_minor) == (4, 5)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "outputs not stripped"
    ids = [cell.id for cell in notebook.cells]
    assert len(set(ids)) == len(ids)
    assert [cell.id for cell in notebook.cells[:3]] == [f"{path.name[:2]}-0{index}" for index in range(3)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_opens_with_title_parameters_and_set_up(path):
    title, parameters, set_up = nbformat.read(path, as_version=4).cells[:3]
    assert title.cell_type == "markdown" and title.source.startswith(f"# {path.name[:2]} ")
    assert parameters.metadata.get("tags") == ["parameters"]
    names = re.findall(r"^([A-Z_]+) = ", parameters.source, re.M)
    assert names == ["PROFILE", "HOME", "BASE_MODEL"] + EXTRA_PARAMETERS.get(path.name[:2], [])
    assert "google.colab" in set_up.source and "colab_setup(HOME)" in set_up.source
    assert "config.set_home(HOME)" in set_up.source and "BOOK_PRICER_REPO" in set_up.source


def test_only_the_first_parameters_cell_is_tagged_and_every_set_up_cell_is_the_same():
    notebooks = [nbformat.read(path, as_version=4) for path in NOTEBOOKS]
    assert all(sum("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells) == 1
               for notebook in notebooks)
    assert len({notebook.cells[2].source for notebook in notebooks}) == 1, "the set-up cells differ"


def test_the_workshop_notebooks_pass_the_adapter_on():
    for number, call in WORKSHOP.items():
        (path,) = (config.REPO_ROOT / "notebooks").glob(f"{number}_*.ipynb")
        code = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells[3:])
        assert call in code


def test_the_training_notebook_pushes_its_adapter_only_when_asked():
    (path,) = (config.REPO_ROOT / "notebooks").glob("04_*.ipynb")
    notebook = nbformat.read(path, as_version=4)
    assert re.search(r'^PUSH_TO_HUB = ""', notebook.cells[1].source, re.M)
    (push,) = [cell.source for cell in notebook.cells if cell.source.startswith("if PUSH_TO_HUB:")]
    function = re.search(r"(\w+)\(result\.adapter_dir, PUSH_TO_HUB", push).group(1)
    imports = "\n".join(cell.source for cell in notebook.cells if cell.source.startswith("%matplotlib"))
    assert re.search(rf"^from helpers\.\w+ import .*\b{function}\b", imports, re.M), f"{function} is not imported"


# --- the exercises and their solutions ------------------------------------------------------------------------------
SOLUTIONS = sorted((config.REPO_ROOT / "notebooks" / "solutions").glob("*.ipynb"))
# what a solution notebook must not call: it computes and shows, and leaves the lesson's results as they were
WRITERS = ("curate(", ".record(", "save_charts", "save_fitted", "fit_and_save", "save_figure",
           "results_dir", "to_parquet", "savefig", "write_", "save_merged", "push_to_hub")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_each_lesson_ends_with_exercises_that_have_solutions(path):
    last = nbformat.read(path, as_version=4).cells[-1]
    assert last.cell_type == "markdown" and last.source.startswith("## Exercises")
    assert f"notebooks/solutions/{path.name[:2]}_solutions.ipynb" in last.source
    assert len(re.findall(r"^\d\. \*\*", last.source, re.M)) in (2, 3), "2 or 3 numbered, bold-titled exercises"
    assert (config.REPO_ROOT / "notebooks" / "solutions" / f"{path.name[:2]}_solutions.ipynb").exists()


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda path: path.name)
def test_a_solution_notebook_opens_like_its_lesson_and_only_computes(path):
    number = path.name[:2]
    (lesson,) = (config.REPO_ROOT / "notebooks").glob(f"{number}_*.ipynb")
    notebook, lesson = nbformat.read(path, as_version=4), nbformat.read(lesson, as_version=4)
    nbformat.validate(notebook)
    assert (notebook.nbformat, notebook.nbformat_minor) == (4, 5)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    ids = [cell.id for cell in notebook.cells]
    assert len(set(ids)) == len(ids) and ids[:3] == [f"{number}s-00", f"{number}s-01", f"{number}s-02"]
    assert all(not cell.outputs and cell.execution_count is None for cell in notebook.cells if cell.cell_type == "code")
    title, parameters, set_up = notebook.cells[:3]
    assert title.cell_type == "markdown" and title.source.startswith(f"# {number} Solutions: ")
    assert parameters.metadata.get("tags") == ["parameters"] and parameters.source == lesson.cells[1].source
    assert set_up.source == lesson.cells[2].source
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert [writer for writer in WRITERS if writer in code] == []
