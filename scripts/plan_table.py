"""The README's plan table: every profile on the devices it suits, with the kind of each speed figure.

    python scripts/plan_table.py

Each row is :func:`helpers.plan.make_plan` for a GPU the course plans for (``Hardware.card``), before
curation (lite's subset, full's estimated size) with the mean Llama 3.1 tokens of the curated sample's
training prompts. With a time budget the run stops inside it: the "books in the budget" column is
what the speed figure says fits (calibration on the real GPU fixes the number).
"""

from __future__ import annotations

from helpers import assets, config
from helpers.hardware import Hardware
from helpers.plan import LLAMA_3_1_70B_SHAPE, make_plan, mean_tokens, memory_estimate, planned_books, training_items


def main() -> None:
    smoke = config.get_profile("smoke")
    sample = training_items(smoke)[0]
    tokens = mean_tokens(assets.llama3_tokenizer_offline(), sample)
    digit_tokens = mean_tokens(assets.load_tokenizer("smollm2"), sample)  # SmolLM2's tokenizer: the 1.7B model's too
    rows = [make_plan(smoke, Hardware.card("cpu"))]
    for name, per_book in (("lite", tokens), ("lite-open", digit_tokens), ("full", tokens)):
        profile = config.get_profile(name)
        rows += [make_plan(profile, Hardware.card(key), planned_books(profile), per_book)
                 for key in ("T4", "L4", "A100", "H100")]
    print("| profile | model | books | device | batch | steps (epoch) | GPU memory (GiB, est.) | minutes for the "
          "epoch | time budget | books in the budget | speed figure |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        memory = f"{row.memory.total:.1f}" if row.memory else "-"
        budget = f"{row.time_budget:g} min" if row.time_budget else "-"
        within = f"~{min(row.books, row.budgeted_steps * row.effective_batch):,}" if row.budgeted_steps else "all"
        print(f"| {row.profile} | {row.model} | {row.books:,} | {row.device} | {row.training.batch_size} x "
              f"{row.training.gradient_accumulation_steps} | {row.steps:,} | {memory} | {row.minutes:,.0f} | {budget} "
              f"| {within} | {row.speed.kind}: {row.speed.tokens_per_second:,.0f} tokens/s |")
    print(f"\nBooks: smoke from its curated sample; lite its subset; full {config.FULL_TRAIN_ITEMS_ESTIMATE:,} "
          f"(estimated) less validation. Tokens per book, on the curated sample's prompts: {tokens:.0f} with "
          f"Llama 3.1's tokenizer, {digit_tokens:.0f} with SmolLM2's (lite-open). "
          "Speed figures: config.THROUGHPUTS (published, with their sources) or scaled from them (estimated); "
          "a run card or the GPU check on the same GPU kind replaces them (measured here).")

    print("\nFSDP + QLoRA, GPU memory per GPU (GiB, estimated) for Llama-3.1-70B at the full profile's settings, "
          "per-device batch 1:")
    print("| GPUs | weights | adapter + optimizer | activations | overhead | total |")
    print("|---|---|---|---|---|---|")
    training = config.get_profile("full").training
    for processes in (1, 2, 4, 8):
        memory = memory_estimate(LLAMA_3_1_70B_SHAPE, training).sharded(processes)
        print(f"| {processes} | {memory.weights:.1f} | {memory.adapter_and_optimizer:.2f} | {memory.activations:.2f} "
              f"| {memory.overhead:.1f} | {memory.total:.1f} |")


if __name__ == "__main__":
    main()
