"""The script twin's command line: refusals print their fix and exit with status 2, --set parses by field type."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import config, train
from helpers.runs import RunMismatch

COMMAND = [sys.executable, "-m", "helpers.train"]


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    assert stopped.value.code == train.REFUSED
    return capsys.readouterr().err


@pytest.mark.parametrize("assignment, value", [("max_length=200", 200), ("max_length=none", None),
                                               ("learning_rate=5e-4", 5e-4), ("lora_r=16", 16),
                                               ("push_to_hub=false", False), ("time_budget_minutes=1.5", 1.5),
                                               ("target_modules=q_proj, v_proj", ("q_proj", "v_proj"))])
def test_set_parses_each_value_as_its_fields_declared_type(assignment, value):
    parsed = train.overrides(train.parse_args(["--set", assignment]))[assignment.split("=")[0]]
    assert parsed == value and type(parsed) is type(value)  # max_length=200 is the int 200, not 200.0


@pytest.mark.parametrize("assignment, fix", [("lora_rank=16", "no field 'lora_rank'"),
                                             ("lora_r=sixteen", "lora_r takes int, not 'sixteen'"),
                                             ("max_length=200.5", "max_length takes int or none"),
                                             ("lora_r", "write FIELD=VALUE")])
def test_a_bad_set_is_refused_with_its_fix(assignment, fix, capsys):
    assert fix in _refused(["--set", assignment, "--plan-only"], capsys)


def test_a_run_with_other_settings_and_a_gated_model_are_refused_without_a_traceback(capsys, monkeypatch):
    def refuse(message: str):
        def raising(*args, **kwargs):
            raise message
        return raising

    monkeypatch.setattr(train, "make_plan", refuse(RunMismatch("runs/smoke/qlora holds a run with other settings")))
    assert "Refused: runs/smoke/qlora holds a run with other settings" in _refused([], capsys)
    monkeypatch.setattr(train, "make_plan", refuse(PermissionError("Llama is gated: accept its license")))
    assert "accept its license" in _refused([], capsys)


@pytest.mark.slow
@pytest.mark.parametrize("argv, environment, fix", [
    (["--set", "lora_rank=16"], {}, "no field 'lora_rank'"),
    ([], {config.PROFILE_ENV: "huge"}, "Unknown profile 'huge'"),
    (["--plan-only"], {config.HOME_ENV: "EMPTY"}, "No curated data in"),
])
def test_the_real_command_refuses_with_status_2_and_no_traceback(argv, environment, fix, tmp_path):
    environment = {name: str(tmp_path) if value == "EMPTY" else value for name, value in environment.items()}
    done = subprocess.run([*COMMAND, *argv], cwd=config.REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **environment})
    assert done.returncode == 2 and fix in done.stderr and "Traceback" not in done.stderr
