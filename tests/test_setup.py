"""Honest set-up: the pins install on the Pythons the course names (3.11, and Colab's 3.12), not below.

pip resolves the requirements for another Python without installing anything (``--dry-run`` with
``--python-version``, wheels only). It needs the package registry; the test skips only when pip
cannot reach it, and fails on any other error.
"""

import subprocess
import sys
import tomllib
from importlib import metadata

import pytest

from helpers import config, environment

COLAB_PYTHON = "3.12"
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Name or service not known", "Network is unreachable", "ProxyError", "ConnectTimeout",
               "Read timed out", "Could not fetch URL")
OLDEST = "{}.{}".format(*environment.MIN_PYTHON)
TOO_OLD = f"{environment.MIN_PYTHON[0]}.{environment.MIN_PYTHON[1] - 1}"


def requirements(name: str) -> list[str]:
    """The requirement lines of ``name``, without comments and the course's own ``-e .``."""
    lines = [line.split("#")[0].strip() for line in (config.REPO_ROOT / name).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-e")]


def resolve(python: str, name: str, *options: str) -> subprocess.Popen:
    """Start pip's dry run of the requirements file ``name`` for ``python``, as if into an empty environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--only-binary=:all:",
         "--python-version", python, "--retries", "2", "--timeout", "30", *options, *requirements(name)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


@pytest.fixture(scope="module")
def resolved() -> dict[str, tuple[int, str]]:
    """``{python: (pip's exit status, its errors)}``, all resolved at once (pip mostly waits on the registry)."""
    runs = {python: resolve(python, "requirements.txt") for python in (OLDEST, COLAB_PYTHON, TOO_OLD)}
    runs["smoke"] = resolve(COLAB_PYTHON, "requirements-smoke.txt", "--no-deps")
    results = {}
    for python, run in runs.items():
        _, errors = run.communicate(timeout=600)
        if run.returncode and any(marker in errors for marker in UNREACHABLE):
            pytest.skip(f"the package registry is out of reach: {errors.strip().splitlines()[-1]}")
        results[python] = run.returncode, errors
    return results


@pytest.mark.slow
@pytest.mark.parametrize("python", [OLDEST, COLAB_PYTHON])
def test_the_pins_resolve_for_the_supported_pythons(resolved, python):
    status, errors = resolved[python]
    assert status == 0, errors[-3000:]


@pytest.mark.slow
def test_the_smoke_model_package_resolves_for_colab(resolved):
    status, errors = resolved["smoke"]
    assert status == 0, errors[-3000:]


@pytest.mark.slow
def test_the_pins_do_not_install_below_the_oldest_python_named(resolved):
    """requires-python is not looser than the pins: one Python older, pip refuses them for its version."""
    status, errors = resolved[TOO_OLD]
    assert status != 0 and "Requires-Python" in errors, errors[-3000:]


def test_pyproject_and_readme_name_the_python_the_pins_need():
    project = tomllib.loads((config.REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == f">={OLDEST}"
    readme = (config.REPO_ROOT / "README.md").read_text()
    assert f"Python {OLDEST}+" in readme and f"Python {TOO_OLD}+" not in readme


def test_make_colab_installs_every_pin_but_torch_and_holds_torch_where_it_is(tmp_path):
    """`make colab` with a stand-in Python that records pip's calls: Colab's own torch must stay."""
    for name in ("Makefile", "requirements.txt", "requirements-smoke.txt"):
        (tmp_path / name).write_text((config.REPO_ROOT / name).read_text())
    python = tmp_path / "python"
    python.write_text(  # a stand-in python: records pip calls, runs anything else
        f'#!/bin/sh\nif [ "$1" = "-m" ]; then echo "$@" >> pip-calls; else exec {sys.executable} "$@"; fi\n')
    python.chmod(0o755)
    subprocess.run(["make", "colab", f"PYTHON={python}"], cwd=tmp_path, check=True, capture_output=True)
    installed = (tmp_path / ".colab-requirements.txt").read_text().splitlines()
    assert not [line for line in installed if line.startswith("torch==")] and \
        f"transformers=={environment.pinned_requirements()['transformers']}" in installed
    assert (tmp_path / ".colab-constraints.txt").read_text().strip() == f"torch=={metadata.version('torch')}"
    calls = (tmp_path / "pip-calls").read_text().splitlines()
    assert calls[0].endswith("-r .colab-requirements.txt -c .colab-constraints.txt")
    assert "--no-deps -r requirements-smoke.txt" in calls[1]
