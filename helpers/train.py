"""QLoRA fine-tuning from the command line: the script twin of notebook 04.

    python -m helpers.train --profile smoke [--base-model ID_OR_FOLDER] [--max-steps N] [--save-steps N]
                            [--time-budget MINUTES] [--set FIELD=VALUE ...] [--output-dir D] [--no-resume] [--plan-only]
                            [--push-to-hub USER/REPO] [--report-to tensorboard,wandb]

The profile defaults to ``$BOOK_PRICER_PROFILE``, else ``smoke``; ``--set`` changes any field of its
``TrainingConfig`` (``--set lora_r=16 --set learning_rate=5e-4``). The plan (books, steps, checkpoints,
memory, minutes on this device) is printed first. A run that is stopped (Ctrl-C, a lost Colab session)
picks up from its newest checkpoint when started again with the same settings; a finished run is not
trained again; other settings in the same run folder stop with the fields that differ. The losses go to
TensorBoard in the run folder (``tensorboard --logdir runs/<profile>``).

Data parallel, one process per GPU (or several on a CPU, with gloo), the effective batch kept::

    torchrun --nproc_per_node 2 -m helpers.train --profile full
    accelerate launch --num_processes 2 -m helpers.train --profile full

Each process reads its share of the books and holds the same adapter; the first one prints and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import replace
from pathlib import Path

from helpers import config, export, finetune
from helpers.hardware import Hardware
from helpers.plan import make_plan
from helpers.runs import RunDir, RunMismatch

# What stops a run before it trains, each with its fix in the message: printed without a traceback, status 2.
REFUSALS = (RunMismatch, finetune.StalePlan, FileNotFoundError, PermissionError, config.UnknownProfile)
REFUSED = 2


class BadSetting(ValueError):
    """A ``--set`` that names no TrainingConfig field, or a value its field's type cannot take."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default=None,
                        help=f"default: ${config.PROFILE_ENV} or smoke")
    parser.add_argument("--base-model", default=None,
                        help=f"another base model: a hub id or a local folder (default: ${config.BASE_MODEL_ENV} "
                             "or the profile's)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--save-steps", type=int, default=None, help="checkpoint every this many steps")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="time the first steps, then stop inside this many minutes (0: no budget)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any TrainingConfig field, e.g. --set lora_r=16 (repeatable)")
    parser.add_argument("--output-dir", type=Path, default=None, help="run folder (default: runs/<profile>/qlora)")
    parser.add_argument("--no-resume", action="store_true", help="start afresh, deleting this folder's checkpoints")
    parser.add_argument("--report-to", default=None,
                        help="trackers: tensorboard (default), wandb, both comma-separated, or none")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="after training, upload the adapter to this hub model repo (needs HF_TOKEN)")
    return parser.parse_args(argv)


def parse_value(name: str, text: str) -> object:
    """``text`` as the declared type of TrainingConfig field ``name`` (``int | None`` takes "none" or an int)."""
    hints = typing.get_type_hints(config.TrainingConfig)
    if name not in hints:
        raise BadSetting(f"--set {name}={text}: TrainingConfig has no field {name!r}; its fields: "
                         f"{', '.join(sorted(hints))}")
    kind = hints[name]
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if type(None) in options and text.strip().lower() == "none":
        return None
    kind = next(option for option in options if option is not type(None))
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if typing.get_origin(kind) is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return kind(text)
    except ValueError:
        raise BadSetting(f"--set {name}={text}: {name} takes {getattr(kind, '__name__', kind)}"
                         f"{' or none' if type(None) in options else ''}, not {text!r}") from None


def overrides(args: argparse.Namespace) -> dict[str, object]:
    """The TrainingConfig fields the command line changes, each parsed as its field's declared type."""
    chosen = {"max_steps": args.max_steps, "save_steps": args.save_steps, "report_to": args.report_to}
    changed = {name: value for name, value in chosen.items() if value is not None}
    if args.time_budget is not None:
        changed["time_budget_minutes"] = args.time_budget or None  # 0: no budget
    for assignment in args.set:
        name, equals, text = assignment.partition("=")
        if not equals:
            raise BadSetting(f"--set {assignment}: write FIELD=VALUE, e.g. --set lora_r=16")
        changed[name.strip()] = parse_value(name.strip(), text.strip())
    return changed


def run(args: argparse.Namespace) -> None:
    """The script: profile, hardware, plan (settled against the run folder), train, report."""
    profile = config.get_profile(args.profile, args.base_model)
    profile = replace(profile, training=replace(profile.training, **overrides(args)))
    hardware = Hardware.detect()
    if args.push_to_hub:
        export.check_push(profile, args.push_to_hub)  # before training, not after it
    folder = RunDir(args.output_dir) if args.output_dir else RunDir.default(profile)
    planned = make_plan(profile, hardware, run=folder, resume=not args.no_resume)
    if hardware.is_main:
        print(planned, flush=True)
    if args.plan_only:
        return
    result = finetune.train(profile, hardware, planned)
    if not hardware.is_main:
        return
    card = result.run_card
    print(result.message())
    if result.status != "finished":
        after = card["eval_loss_after"]
        evaluated = (f"eval loss {card['eval_loss_before']:.3f} before training, {after:.3f} after" if after is not None
                     else f"eval loss {card['eval_loss_before']:.3f} before training; none measured after it")
        print(f"Trained {card['global_step']} steps in {card['wall_seconds']} s ({card['tokens_per_second']} "
              f"tokens/s); {evaluated}")
    if args.push_to_hub:
        print(f"Pushed the adapter: {export.push_to_hub(result.adapter_dir, args.push_to_hub, export.ADAPTER_MESSAGE)}")
    print(json.dumps(card, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Run the script; a refusal (other settings in the run folder, a bad --set, no curated data, a gated model
    without a token) prints its message and exits with status 2, without a traceback."""
    args = parse_args(argv)
    try:
        run(args)
    except (BadSetting, *REFUSALS) as refusal:
        print(f"Refused: {refusal}", file=sys.stderr)
        raise SystemExit(REFUSED) from None


if __name__ == "__main__":
    main()
