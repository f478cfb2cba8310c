"""Smoke fine-tuning settings side by side: eval loss and test MAE of short QLoRA runs on CPU.

Each setting trains SmolLM2-135M from scratch on the curated smoke books (real 4-bit QLoRA,
the smoke profile's other settings), then scores the adapter on the 25 test books with the
course's harness. With 25 books the MAE moves by dollars between runs: read the eval loss first.

    python benchmarks/sweep_smoke.py 2e-3:12 1e-3:12 2e-3:20      # learning_rate:max_steps ...
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from helpers import config, finetune
from helpers.curate import curate
from helpers.dataset import eval_items, has_curated, load_curated
from helpers.evaluate import evaluate
from helpers.hardware import Hardware
from helpers.models import load_finetuned
from helpers.plan import make_plan
from helpers.predict import llm_predictor
from helpers.runs import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="learning_rate:max_steps, e.g. 2e-3:12")
    args = parser.parse_args()
    smoke = config.get_profile("smoke")
    if not has_curated(smoke):
        curate(smoke)
    items = eval_items(load_curated(smoke)[1], smoke)
    rows, hardware = [], Hardware.detect()
    for setting in args.settings:
        rate, steps = setting.split(":")
        training = replace(smoke.training, learning_rate=float(rate), max_steps=int(steps),
                           save_steps=int(steps), eval_steps=max(1, int(steps) // 2))
        profile = replace(smoke, training=training)
        with tempfile.TemporaryDirectory() as run_dir:
            result = finetune.train(profile, hardware, make_plan(profile, hardware, run=RunDir(Path(run_dir)),
                                                                 resume=False))
            model, tokenizer = load_finetuned(profile, result.adapter_dir, hardware)
            evaluation = evaluate(setting, llm_predictor(model, tokenizer, profile), items, batched=True)
        card = result.run_card
        rows.append(f"| {rate} | {steps} | {card['eval_loss_before']:.2f} -> {card['eval_loss_after']:.2f} "
                    f"| {evaluation.metrics['mae']:.2f} | {len(set(evaluation.predictions.round()))} "
                    f"| {card['wall_seconds']:.0f} |")
    print("| learning rate | steps | eval loss | MAE ($) | distinct prices | training s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
