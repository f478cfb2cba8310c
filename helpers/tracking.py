"""Experiment tracking: every run logs to TensorBoard in its own folder, offline; Weights & Biases on request.

Why TensorBoard (and not trackio) as the default: its event files live in the run folder
(``runs/<profile>/<run>/tensorboard``), so they travel with the run (on Google Drive with ``HOME``)
and a resumed run appends to the same curves; it needs no account and no server to write; Colab
ships it and shows it inline (``%load_ext tensorboard``, ``%tensorboard --logdir runs/<profile>``);
and its file format is stable, read by pandas here and by W&B (``wandb sync --sync-tensorboard``).
trackio is promising but young (0.x, its API still moves) and keeps its data in a cache folder
outside the run.

``TrainingConfig.report_to`` names the trackers: ``"tensorboard"`` (the default),
``"tensorboard,wandb"`` to add W&B (``pip install wandb``, then ``wandb login``, or
``WANDB_MODE=offline``), ``"none"`` to log nothing.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from transformers.integrations import TensorBoardCallback

from helpers.charts import save_figure
from helpers.runs import RunDir

TENSORBOARD = "tensorboard"
WANDB = "wandb"
TRACKERS = (TENSORBOARD, WANDB)
LOSS_TAGS = ("train/loss", "eval/loss")  # the Trainer's names for the training and eval loss
CARD_FIELDS = ("model", "device", "train_items", "global_step", "final_train_loss", "eval_loss_before",
               "eval_loss_after", "tokens_per_second", "wall_seconds")
HYPERPARAMETERS = ("lora_r", "lora_alpha", "lora_dropout", "learning_rate", "batch_size",
                   "gradient_accumulation_steps")


def trackers(report_to: str) -> list[str]:
    """The trackers named in ``report_to`` ("tensorboard", "wandb", comma-separated; "none" or "" for none).

    W&B is checked here, before any training starts: it is an opt-in package.
    """
    names = [name.strip().lower() for name in report_to.split(",") if name.strip().lower() not in ("", "none")]
    unknown = sorted(set(names) - set(TRACKERS))
    if unknown:
        raise ValueError(f"Unknown tracker(s) {unknown} in report_to={report_to!r}: use {TENSORBOARD!r}, {WANDB!r}, "
                         f"both comma-separated, or 'none'.")
    if WANDB in names and importlib.util.find_spec("wandb") is None:
        raise ImportError("report_to asks for Weights & Biases, which is not installed: `pip install wandb`, then "
                          "`wandb login` (or set WANDB_MODE=offline to log without an account); or drop 'wandb' "
                          "from report_to: TensorBoard logs offline without it.")
    return list(dict.fromkeys(names))


def log_dir(run_dir: Path) -> Path:
    """Where a run's TensorBoard event files live (:attr:`helpers.runs.RunDir.tensorboard`)."""
    return RunDir(Path(run_dir)).tensorboard


def tensorboard_callback(run_dir: Path, resumed_step: int | None) -> TensorBoardCallback:
    """The Trainer's TensorBoard logger, writing to ``run_dir/tensorboard``.

    A run resumed from step N keeps the curves up to N and drops what the interrupted run logged after
    it (it is logged again); a run started afresh drops any older curves in the folder.
    """
    purge_step = resumed_step + 1 if resumed_step is not None else 0
    return TensorBoardCallback(SummaryWriter(log_dir=str(log_dir(run_dir)), purge_step=purge_step))


def read_scalars(run_dir: Path) -> pd.DataFrame:
    """Every scalar a run logged to TensorBoard: columns ``tag``, ``step``, ``value`` (empty if none)."""
    folder = log_dir(run_dir)
    if not folder.is_dir():
        return pd.DataFrame(columns=["tag", "step", "value"])
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    rows = [(tag, event.step, event.value) for tag in events.Tags()["scalars"] for event in events.Scalars(tag)]
    return pd.DataFrame(rows, columns=["tag", "step", "value"])


def plot_runs(runs: dict[str, Path], tags: tuple[str, ...] = LOSS_TAGS, path: Path | None = None) -> Figure:
    """The ``tags`` curves of several runs (label -> run folder), one panel per tag, read from TensorBoard."""
    figure = Figure(figsize=(5 * len(tags), 4))
    panels = figure.subplots(1, len(tags), squeeze=False)[0]
    scalars = {label: read_scalars(run_dir) for label, run_dir in runs.items()}
    for axes, tag in zip(panels, tags):
        for label, frame in scalars.items():
            curve = frame[frame["tag"] == tag].sort_values("step")
            axes.plot(curve["step"], curve["value"], marker="o" if tag.startswith("eval") else None, label=label)
        axes.set(xlabel="optimizer step", ylabel=tag, title=tag)
        axes.legend()
    figure.tight_layout()
    return save_figure(figure, path)


def compare_runs(runs: dict[str, Path]) -> pd.DataFrame:
    """The hyperparameters and results of several runs side by side, from their run cards (one column a run),
    numbers to 4 significant digits; ``run_card.json`` keeps every field at full precision."""
    columns = {}
    for label, run_dir in runs.items():
        card = RunDir(Path(run_dir)).read_card()
        columns[label] = {**{name: card["hyperparameters"][name] for name in HYPERPARAMETERS},
                          **{name: card.get(name) for name in CARD_FIELDS}}
    return pd.DataFrame(columns).map(_readable)


def _readable(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # a field this run's card lacks
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
