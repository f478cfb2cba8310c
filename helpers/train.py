"""QLoRA fine-tuning from the command line: the script twin of notebook 04.

    python -m helpers.train --profile smoke [--max-steps N] [--save-steps N] [--output-dir D] [--no-resume]
                            [--plan-only] [--push-to-hub USER/REPO] [--report-to tensorboard,wandb]

The profile defaults to ``$BOOK_PRICER_PROFILE``, else ``smoke``. The plan (books, steps,
checkpoints, memory, minutes on this device) is printed first. A run that is stopped (Ctrl-C,
a lost Colab session) picks up from its newest checkpoint when started again; a finished run
is not trained again. The losses go to TensorBoard in the run folder (``tensorboard --logdir runs/<profile>``);
``--report-to tensorboard,wandb`` adds Weights & Biases.

Several GPUs, data parallel (one model copy per GPU, each on its own device)::

    accelerate launch -m helpers.train --profile full

``accelerate`` sets ``LOCAL_RANK`` for each process and :func:`helpers.finetune.device_map`
places each copy on ``{"": LOCAL_RANK}``; the Trainer splits the batches and averages gradients.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from helpers import config, export, finetune


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default=None,
                        help=f"default: ${config.PROFILE_ENV} or smoke")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--save-steps", type=int, default=None, help="checkpoint every this many steps")
    parser.add_argument("--output-dir", type=Path, default=None, help="run folder (default: runs/<profile>/qlora)")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if checkpoints exist")
    parser.add_argument("--report-to", default=None,
                        help="trackers: tensorboard (default), wandb, both comma-separated, or none")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="after training, upload the adapter to this hub model repo (needs HF_TOKEN)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    profile = config.get_profile(args.profile)
    settings = {"max_steps": args.max_steps, "save_steps": args.save_steps, "report_to": args.report_to}
    overrides = {name: value for name, value in settings.items() if value is not None}
    profile = replace(profile, training=replace(profile.training, **overrides))
    if args.push_to_hub:
        export.check_push(profile, args.push_to_hub)  # before training, not after it
    planned = finetune.training_plan(profile)
    print(planned, flush=True)
    if args.plan_only:
        return
    result = finetune.train(profile, run_dir=args.output_dir, resume=not args.no_resume, planned=planned)
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
