"""A run folder: where a training run keeps its checkpoints, adapter, card and the settings it trains with.

    runs/<profile>/qlora/
        run_config.json   what the run trains: profile, base model, data SHA-256, every TrainingConfig
                          field, the batch split, the processes, the planned (or time-budgeted) steps
        checkpoints/      the Trainer's checkpoint-N folders (the newest two are kept)
        adapter/          the final LoRA adapter and its tokenizer
        run_card.json     results: losses, speed, memory
        tensorboard/      the curves
        merged/           the adapter merged into a 16-bit base model (helpers.export), with a copy of the card
        gguf-<type>/      the merged model as one GGUF file, with an Ollama Modelfile (helpers.gguf_export)

A run is identified by what it trains, as curation's stage parts are keyed by their source, rules
and tokenizer: ``run_config.json`` is written before the first step, and a resume or a "finished"
verdict needs the same settings. A changed one stops with :class:`RunMismatch`, naming each field.

This module is the one place that names the files and folders inside a run folder. Only the standard
library is used here, so prediction, the demo and the export find a run's adapter without importing the
training stack.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers import config
from helpers.storage import write_file_atomically

CARD_FILE = "run_card.json"  # a run's results; a merged export carries a copy
SETTINGS_FILE = "run_config.json"
TENSORBOARD_FOLDER = "tensorboard"
MERGED_FOLDER = "merged"
GGUF_PREFIX = "gguf-"  # gguf-f16/, gguf-q8_0/
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last: a checkpoint without it is incomplete
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR (a test keeps them equal)
# What a checkpoint holds besides the adapter and its tokenizer (left out when the adapter is taken from it).
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", TRAINER_STATE, "training_args.bin")
# TrainingConfig fields that change how a run is watched or saved, not what it learns: they may differ on a resume.
# The batch split is kept from the record; the effective batch (an IDENTITY field) counts.
OPERATIONAL = ("save_steps", "eval_steps", "logging_steps", "report_to", "push_to_hub",
               "batch_size", "gradient_accumulation_steps")
# Top-level run settings that must match (the TrainingConfig fields are compared one by one, OPERATIONAL aside).
IDENTITY = ("profile", "base_model", "data_sha256", "train_books", "processes", "effective_batch",
            "time_budget_minutes")


class RunMismatch(ValueError):
    """The run folder holds a run with other settings than the ones asked for."""


@dataclass(frozen=True)
class RunDir:
    """The files of one run."""

    path: Path

    @classmethod
    def default(cls, profile: config.Profile) -> RunDir:
        """The profile's own run: ``runs/<profile>/qlora``."""
        return cls(profile.runs_dir / "qlora")

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def card(self) -> Path:
        return self.path / CARD_FILE

    @property
    def settings(self) -> Path:
        return self.path / SETTINGS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_FOLDER

    @property
    def merged(self) -> Path:
        """The merged 16-bit model (:func:`helpers.export.save_merged`)."""
        return self.path / MERGED_FOLDER

    def gguf(self, gguf_type: str) -> Path:
        """The GGUF form of the merged model in ``gguf_type`` ("f16", "q8_0")."""
        return self.path / f"{GGUF_PREFIX}{gguf_type}"

    @property
    def name(self) -> str:
        return self.path.name

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (one whose save was cut short has no trainer state), or None."""
        complete = [folder for folder in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}-*")
                    if (folder / TRAINER_STATE).exists()]
        return max(complete, key=lambda folder: int(folder.name.rsplit("-", 1)[1])) if complete else None

    def recorded(self) -> dict | None:
        """The settings this run trains with, or None before its first start."""
        return json.loads(self.settings.read_text(encoding="utf-8")) if self.settings.exists() else None

    def record(self, settings: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.settings, settings)

    def reset(self) -> None:
        """Start afresh: remove the checkpoints, adapter, card, settings and curves of an earlier run."""
        for folder in (self.checkpoints, self.adapter, self.tensorboard):
            shutil.rmtree(folder, ignore_errors=True)
        for file in (self.card, self.settings):
            file.unlink(missing_ok=True)

    def read_card(self) -> dict:
        return json.loads(self.card.read_text(encoding="utf-8"))

    def write_card(self, card: dict) -> Path:
        """Write the run card, atomically."""
        return _write_json(self.card, card)


def _write_json(path: Path, value: dict) -> Path:
    return write_file_atomically(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2), encoding="utf-8"))


def card_in(folder: Path) -> dict:
    """The run card ``folder`` holds (a run folder, or a merged export's copy), or {} when it holds none."""
    path = Path(folder) / CARD_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def write_card_in(folder: Path, card: dict) -> Path:
    """Write ``card`` as the run card of ``folder`` (a merged export carries its run's)."""
    return _write_json(Path(folder) / CARD_FILE, card)


def run_cards(home: Path) -> Iterator[Path]:
    """The run card of every run under the state folder ``home`` (``runs/<profile>/<run>/run_card.json``), sorted."""
    yield from sorted((Path(home) / "runs").glob(f"*/*/{CARD_FILE}"))


def differences(recorded: dict, wanted: dict) -> list[str]:
    """``"field: recorded -> wanted"`` for each setting that changes what a run trains."""
    def identity(settings: dict) -> dict:
        training = {f"training.{name}": value for name, value in settings["training"].items()
                    if name not in OPERATIONAL}
        return {**{name: value for name, value in settings.items() if name in IDENTITY}, **training}

    old, new = (identity(json.loads(json.dumps(settings))) for settings in (recorded, wanted))  # as the file holds them
    return [f"{name}: {old.get(name)!r} in the run, {new.get(name)!r} now"
            for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]



def mismatch_message(run: RunDir, diffs: list[str]) -> str:
    return (f"{run.path} holds a run with other settings:\n  " + "\n  ".join(diffs)
            + "\nEither train into another run folder (run=RunDir(...), --output-dir), keeping this one, or start "
              "afresh here (resume=False, --no-resume), which deletes its checkpoints and adapter.")
