"""Sizing before training: the batch a GPU holds, the plan of every profile against its budget."""

from __future__ import annotations

import statistics

import pytest

from helpers import assets, config, finetune, plan
from helpers.curate import curate, load_curated
from helpers.environment import Device

# The device each profile is sized for; memory as torch reports it for these cards.
DEVICES = {
    "cpu": Device("cpu", "CPU", None, None),
    "T4": Device("cuda", "Tesla T4", (7, 5), 14.6),
    "A100": Device("cuda", "NVIDIA A100-SXM4-40GB", (8, 0), 39.4),
}
# The full profile's balanced train split, estimated from the sample's price distribution (issue 10: 95-124k).
FULL_TRAIN_ITEMS = 124_000


@pytest.fixture(scope="module")
def llama_tokens_per_item() -> float:
    """Mean Llama 3.1 tokens of a curated training example (the full and lite prompts are curated the same way)."""
    profile = config.get_profile("smoke")
    if not (profile.curated_dir / "manifest.json").exists():
        curate(profile)
    tokenizer = assets.llama3_tokenizer_offline()
    return statistics.fmean(len(tokenizer(item.prompt)["input_ids"]) + 1 for item in load_curated(profile)[0])


@pytest.mark.parametrize("memory_gib, batch", [(14.6, 8), (39.4, 16), (79.1, 16)], ids=["16 GB", "40 GB", "80 GB"])
def test_the_batch_fills_the_gpu_and_keeps_the_effective_batch(memory_gib, batch):
    training = config.get_profile("full").training
    fitted = plan.fit_batch(config.LLAMA_HUB_ID, training, memory_gib)
    assert fitted.batch_size == batch
    assert fitted.batch_size * fitted.gradient_accumulation_steps == training.batch_size * training.gradient_accumulation_steps
    assert plan.memory_estimate(config.LLAMA_HUB_ID, fitted).total <= plan.MEMORY_HEADROOM * memory_gib


def test_a_gpu_too_small_for_any_batch_still_gets_batch_one():
    fitted = plan.fit_batch(config.LLAMA_HUB_ID, config.get_profile("full").training, 4.0)
    assert (fitted.batch_size, fitted.gradient_accumulation_steps) == (1, 16)


def test_optimizer_steps_count_as_the_trainer_counts():
    training = config.get_profile("full").training  # 1 x 16, one epoch
    assert plan.optimizer_steps(160, training) == 10
    assert plan.optimizer_steps(161, training) == 11  # a last, shorter accumulation still steps
    assert plan.optimizer_steps(10, config.get_profile("smoke").training) == 12  # max_steps wins


def _items(profile: config.Profile) -> int:
    if profile.name == "smoke":
        return len(finetune.training_items(profile)[0])
    curated = FULL_TRAIN_ITEMS if profile.train_subset is None else profile.train_subset
    return curated - min(config.MAX_VALIDATION_ITEMS, round(curated * config.VALIDATION_FRACTION))


@pytest.mark.parametrize("name", sorted(config.PROFILES))
def test_each_profile_fits_its_budget_on_its_target_device(name, llama_tokens_per_item):
    profile = config.get_profile(name)
    device = DEVICES[profile.target_device]
    if name == "smoke":
        the_plan = finetune.training_plan(profile, device)
    else:
        the_plan = plan.plan(profile, _items(profile), llama_tokens_per_item, device)
    assert the_plan.speed is not None and the_plan.minutes > 0
    assert the_plan.fits_budget, str(the_plan)
    assert "WARNING" not in str(the_plan) and f"{the_plan.steps:,} optimizer steps" in str(the_plan)
    if device.kind == "cuda":
        assert the_plan.memory.total <= device.memory_gib


def test_the_plan_warns_when_the_full_profile_meets_a_t4(llama_tokens_per_item):
    the_plan = plan.plan(config.get_profile("full"), FULL_TRAIN_ITEMS, llama_tokens_per_item, DEVICES["T4"])
    assert the_plan.fits_budget is False and "WARNING" in str(the_plan) and "estimated" in str(the_plan)


def test_throughputs_say_where_they_come_from():
    assert plan.gpu_key(DEVICES["T4"]) == "T4" and plan.gpu_key(DEVICES["A100"]) == "A100"
    assert plan.gpu_key(Device("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 79.1)) == "H100"
    assert plan.gpu_key(Device("cuda", "Mystery GPU", (9, 0), 10.0)) is None
    assert plan.throughput(None, config.LLAMA_HUB_ID) is None
    published = plan.throughput("A100", config.LLAMA_HUB_ID)
    estimated = plan.throughput("T4", config.LLAMA_HUB_ID)
    assert published.kind == "published" and estimated.kind == "estimated"
    assert estimated.tokens_per_second == pytest.approx(published.tokens_per_second * 65 / 312)
    smaller = plan.throughput("T4", config.LLAMA_3B_HUB_ID)
    assert smaller.tokens_per_second == pytest.approx(estimated.tokens_per_second * 8.03 / 3.21)
