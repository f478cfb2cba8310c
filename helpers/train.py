"""QLoRA fine-tuning from the command line: the script twin of notebook 04.

    python -m helpers.train --profile smoke [--base-model ID_OR_FOLDER] [--max-steps N] [--save-steps N] [--time-budget MINUTES]
                            [--set FIELD=VALUE ...] [--output-dir D] [--no-resume] [--plan-only]
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
import dataclasses
import json
from dataclasses import replace
from pathlib import Path

from helpers import config, export, finetune
from helpers.hardware import Hardware
from helpers.plan import make_plan
from helpers.runs import RunDir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default=None,
                        help=f"default: ${config.PROFILE_ENV} or smoke")
    parser.add_argument("--base-model", default=None,
                        help=f"another base model: a hub id or a local folder (default: ${config.BASE_MODEL_ENV} or the profile's)")
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


def overrides(args: argparse.Namespace, training: config.TrainingConfig) -> dict[str, object]:
    """The TrainingConfig fields the command line changes, each parsed as the type of its default."""
    budget = None if args.time_budget == 0 else args.time_budget
    chosen = {"max_steps": args.max_steps, "save_steps": args.save_steps, "report_to": args.report_to}
    changed = {name: value for name, value in chosen.items() if value is not None}
    if args.time_budget is not None:
        changed["time_budget_minutes"] = budget
    known = {field.name for field in dataclasses.fields(training)}
    for assignment in args.set:
        name, _, text = assignment.partition("=")
        if name not in known:
            raise SystemExit(f"--set {assignment}: no TrainingConfig field {name!r}; fields: {sorted(known)}")
        default = getattr(training, name)
        if isinstance(default, bool):
            changed[name] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, tuple):
            changed[name] = tuple(part.strip() for part in text.split(","))
        elif default is None or isinstance(default, float):
            changed[name] = None if text.lower() == "none" else float(text)
        else:
            changed[name] = type(default)(text)
    return changed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    profile = config.get_profile(args.profile, args.base_model)
    profile = replace(profile, training=replace(profile.training, **overrides(args, profile.training)))
    hardware = Hardware.detect()
    if args.push_to_hub:
        export.check_push(profile, args.push_to_hub)  # before training, not after it
    planned = make_plan(profile, hardware)
    if hardware.is_main:
        print(planned, flush=True)
    if args.plan_only:
        return
    run = RunDir(args.output_dir) if args.output_dir else RunDir.default(profile)
    result = finetune.train(profile, hardware, planned, run, resume=not args.no_resume)
    if not hardware.is_main:
        return
    card = result.run_card
    print(result.message())
    if result.status != "finished":
        print(f"Trained {card['global_step']} steps in {card['wall_seconds']} s "
              f"({card['tokens_per_second']} tokens/s); eval loss {card['eval_loss_before']:.3f} -> "
              f"{card['eval_loss_after']:.3f}")
    if args.push_to_hub:
        print(f"Pushed the adapter: {export.push_to_hub(result.adapter_dir, args.push_to_hub, export.ADAPTER_MESSAGE)}")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
