"""QLoRA training speed and memory at Llama-3.1-8B's real shape, without the hub.

A randomly initialised Llama with the 8B model's exact shape (32 layers, vocabulary 128,256)
costs the same memory and time as the trained one. This builds it once (``--model-dir``,
reused when it exists), loads it in 4-bit NF4 through the course's own loader and trains a
few dozen steps with the FULL profile's settings at several per-device batch sizes, the
effective batch kept by gradient accumulation. For each it prints the peak GPU memory next to
``memory_estimate``, training tokens/s and seconds per 1,000 training books.

    python benchmarks/bench_qlora_gpu.py                  # on a CUDA GPU: 32 layers, batch 1, 4, 16
    python benchmarks/bench_qlora_gpu.py --layers 1       # a quick look

On a machine without CUDA it says so and runs a 1-layer, two-step version on the CPU in a
minute or two: a check that the benchmark runs (CI does this), not a GPU figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig

from helpers import assets, config, finetune, plan
from helpers.curate import curate, load_curated
from helpers.environment import detect_device


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="folder of the random-weight model: built there if missing, else reused")
    parser.add_argument("--layers", type=int, default=32 if cuda else 1, help="decoder layers (8B: 32)")
    parser.add_argument("--batches", default="1,4,16" if cuda else "1,2", help="per-device batch sizes")
    parser.add_argument("--effective-batch", type=int, default=16 if cuda else 2)
    parser.add_argument("--steps", type=int, default=30 if cuda else 2, help="optimizer steps per batch size")
    return parser.parse_args()


def measure(profile: config.Profile, items: list, work_dir: Path) -> dict[str, float]:
    """Train ``profile`` (batch, accumulation, steps in its TrainingConfig) once; speed and peak memory."""
    model, tokenizer = finetune.load_base_model(profile)
    trainer = finetune.make_trainer(profile, model, tokenizer, items, items[:1], work_dir)
    trainer.args.eval_strategy, trainer.args.eval_on_start, trainer.args.save_strategy = "no", False, "no"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    runtime = trainer.train().metrics["train_runtime"]
    training = profile.training
    books = training.max_steps * training.batch_size * training.gradient_accumulation_steps
    return {
        "peak_gib": torch.cuda.max_memory_allocated() / plan.GIB if torch.cuda.is_available() else float("nan"),
        "tokens_per_s": trainer.state.num_input_tokens_seen / runtime,
        "seconds_per_1000": 1000 * runtime / books,
    }


def main() -> None:
    args = parse_args()
    device = detect_device()
    if device.kind != "cuda":
        print(f"No CUDA GPU here ({device.name}): running the {args.layers}-layer CPU mode, a check that the "
              "benchmark runs. Its speed and memory are not GPU figures.")
    smoke = config.get_profile("smoke")
    if not (smoke.curated_dir / "manifest.json").exists():
        curate(smoke)
    items = load_curated(smoke)[0]  # real curated prompts (~180 Llama 3.1 tokens each), reused as needed
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model_dir or Path(scratch) / "llama-3.1-8b-shape"
        if not (folder / "config.json").exists():
            started = time.perf_counter()
            finetune.save_random_model(plan.LLAMA_3_1_8B_SHAPE, folder, assets.llama3_tokenizer_offline(),
                                       layers=args.layers)
            print(f"Built a random-weight Llama at the 8B shape in {time.perf_counter() - started:.0f} s: {folder}")
        shape = AutoConfig.from_pretrained(folder)
        full = config.get_profile("full", base_model=str(folder))
        print(f"Device: {device.name}; model: Llama-3.1-8B shape, {shape.num_hidden_layers} layer(s), random weights; "
              f"full profile settings (r {full.training.lora_r}, max_length {full.training.max_length}), "
              f"{args.steps} steps per row, effective batch {args.effective_batch}\n")
        print("| per-device batch x accumulation | peak GPU memory (GiB) | estimate (GiB) | tokens/s "
              "| s per 1,000 books |")
        print("|---|---|---|---|---|")
        for batch in (int(value) for value in args.batches.split(",")):
            training = replace(full.training, batch_size=batch, gradient_accumulation_steps=args.effective_batch // batch,
                               max_steps=args.steps)
            result = measure(replace(full, training=training), items, Path(scratch) / f"run-{batch}")
            estimate = plan.memory_estimate(shape, training).total
            print(f"| {batch} x {training.gradient_accumulation_steps} | {result['peak_gib']:.2f} | {estimate:.2f} "
                  f"| {result['tokens_per_s']:,.0f} | {result['seconds_per_1000']:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
