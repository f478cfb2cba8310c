"""Sizing before training: the batch a GPU holds, the split across processes, the plan of every profile."""

from __future__ import annotations

import pytest

from helpers import assets, config, plan
from helpers.curate import curate
from helpers.dataset import has_curated, load_curated
from helpers.hardware import Hardware


@pytest.fixture(scope="module")
def llama_tokens_per_item() -> float:
    """Mean Llama 3.1 tokens of a curated training example (the full and lite prompts are curated the same way)."""
    profile = config.get_profile("smoke")
    if not has_curated(profile):
        curate(profile)
    return plan.mean_tokens(assets.llama3_tokenizer_offline(), load_curated(profile)[0])


@pytest.mark.parametrize("card, batch", [("T4", 8), ("A100", 16), ("H100", 16)], ids=["16 GB", "40 GB", "80 GB"])
def test_the_batch_fills_the_gpu_and_keeps_the_effective_batch(card, batch):
    training, memory = config.get_profile("full").training, Hardware.card(card).memory_gib
    fitted = plan.fit_batch(config.LLAMA_HUB_ID, training, memory)
    assert fitted.batch_size == batch
    effective = training.batch_size * training.gradient_accumulation_steps
    assert fitted.batch_size * fitted.gradient_accumulation_steps == effective
    assert plan.memory_estimate(config.LLAMA_HUB_ID, fitted).total <= plan.MEMORY_HEADROOM * memory


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_several_processes_share_the_effective_batch(processes):
    training = config.get_profile("full").training  # 1 x 16
    fitted = plan.fit_batch(config.LLAMA_HUB_ID, training, Hardware.card("T4").memory_gib, processes)
    assert fitted.batch_size * fitted.gradient_accumulation_steps * processes == 16
    assert fitted.batch_size == min(8, 16 // processes)  # a T4 holds 8


def test_a_gpu_too_small_for_any_batch_still_gets_batch_one():
    fitted = plan.fit_batch(config.LLAMA_HUB_ID, config.get_profile("full").training, 4.0)
    assert (fitted.batch_size, fitted.gradient_accumulation_steps) == (1, 16)


def test_optimizer_steps_count_as_the_trainer_counts():
    training = config.get_profile("full").training  # 1 x 16, one epoch
    assert plan.optimizer_steps(160, training) == 10
    assert plan.optimizer_steps(161, training) == 11  # a last, shorter accumulation still steps
    halves = plan.fit_batch(config.LLAMA_HUB_ID, training, None, processes=2)  # 1 x 8 on each of 2 processes
    assert plan.optimizer_steps(160, halves, processes=2) == 10  # the same steps: each process reads half
    assert plan.optimizer_steps(10, config.get_profile("smoke").training) == 12  # max_steps wins


def test_the_plan_counts_the_processes():
    smoke = config.get_profile("smoke")
    one = plan.make_plan(smoke, Hardware.card("cpu"), books=80, tokens_per_book=200)
    two = plan.make_plan(smoke, Hardware.card("cpu", processes=2), books=80, tokens_per_book=200)
    assert one.effective_batch == two.effective_batch == 4 and two.training.batch_size == 2
    assert "2 x 1 x 2 processes" in str(two) and two.settings()["processes"] == 2


@pytest.mark.parametrize("name", sorted(config.PROFILES))
def test_each_profile_fits_its_budget_on_its_target_device(name, llama_tokens_per_item, monkeypatch, tmp_path):
    """With the course's own speed figures: this checkout's run cards (a busy machine's, say) are not read."""
    measured = plan.measured_throughputs
    monkeypatch.setattr(plan, "measured_throughputs", lambda hardware=None, home=None: measured(hardware, tmp_path))
    profile = config.get_profile(name)
    hardware = Hardware.card(profile.target_device)
    if name == "smoke":
        the_plan = plan.make_plan(profile, hardware)
    else:
        the_plan = plan.make_plan(profile, hardware, plan.planned_books(profile), llama_tokens_per_item)
    assert the_plan.speed is not None and the_plan.minutes > 0
    assert the_plan.fits_budget, str(the_plan)
    assert "WARNING" not in str(the_plan) and f"{the_plan.steps:,} optimizer steps" in str(the_plan)
    if hardware.kind == "cuda":
        assert the_plan.memory.total <= hardware.memory_gib


def test_the_plan_warns_when_a_run_without_a_budget_meets_a_slow_gpu(llama_tokens_per_item):
    full = config.get_profile("full")
    unbudgeted = config.get_profile("full", training=config.TrainingConfig(time_budget_minutes=None))
    the_plan = plan.make_plan(unbudgeted, Hardware.card("T4"), plan.planned_books(full), llama_tokens_per_item)
    assert the_plan.fits_budget is False and "WARNING" in str(the_plan) and "published" in str(the_plan)
    budgeted = plan.make_plan(full, Hardware.card("T4"), plan.planned_books(full), llama_tokens_per_item)
    assert "WARNING" not in str(budgeted) and budgeted.budgeted_steps < budgeted.steps


def test_throughputs_say_where_they_come_from():
    assert plan.gpu_key("Tesla T4") == "T4" and plan.gpu_key("NVIDIA A100-SXM4-40GB") == "A100"
    assert plan.gpu_key("NVIDIA H100 80GB HBM3") == "H100" and plan.gpu_key("NVIDIA H200") == "H200"
    assert plan.gpu_key("Mystery GPU") is None and plan.gpu_key("CPU") == "cpu"
    assert plan.throughput(None, config.LLAMA_HUB_ID) is None
    published = plan.throughput("A100", config.LLAMA_HUB_ID)
    assert published.kind == "published"
    # another GPU: the nearest measured one, scaled by the smaller of its compute and bandwidth ratios
    h100 = plan.throughput("H100", config.LLAMA_HUB_ID)
    assert h100.kind == "estimated" and h100.tokens_per_second == pytest.approx(
        published.tokens_per_second * min(989 / 312, 3_350 / 1_555))
    # a model measured on the same GPU kind is never overruled by a scaled figure
    assert plan.throughput("T4", config.LLAMA_3B_HUB_ID).kind == "published"
    # a model without a figure on that GPU: the same GPU's figure for another model, by parameters
    a100_3b = plan.throughput("A100", config.LLAMA_3B_HUB_ID)
    assert a100_3b.kind == "estimated" and a100_3b.tokens_per_second == pytest.approx(
        published.tokens_per_second * 8.03 / 3.21)
