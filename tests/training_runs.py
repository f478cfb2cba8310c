"""Real training runs in subprocesses, for the tests: the script twin's command line, and a run killed mid-way."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from helpers import config, runs

RESUME_MAX_STEPS, RESUME_SAVE_STEPS = 6, 2
STARTUP_TIMEOUT_S = 600


def train_command(run_dir: Path, *extra: str, processes: int = 1) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    return [*launcher, "-m", "helpers.train", "--profile", "smoke", "--max-steps", str(RESUME_MAX_STEPS),
            "--save-steps", str(RESUME_SAVE_STEPS), "--output-dir", str(run_dir), *extra]


def kill_after_first_checkpoint(command: list[str], run_dir: Path) -> None:
    first_checkpoint = runs.RunDir(run_dir).checkpoints / f"checkpoint-{RESUME_SAVE_STEPS}" / runs.TRAINER_STATE
    first = subprocess.Popen(command, cwd=config.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not first_checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    # the launcher and every process it started: torchrun's workers may run in sessions of their own, where the
    # launcher's process group does not reach them, and a surviving worker would go on writing checkpoints
    family = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
    os.killpg(first.pid, signal.SIGKILL)
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(family, timeout=60)
    first.wait()
    assert first_checkpoint.exists(), "the first run never wrote a checkpoint"
    assert not runs.RunDir(run_dir).adapter.exists(), "the first run finished before it was killed"
