"""The full profile's real path at Llama-3.1-8B's widths: memory, training through ``train()``, prediction.

A randomly initialised Llama with the 8B model's exact widths and vocabulary (128,256) but ONE
decoder layer, saved with the offline Llama 3.1 tokenizer to a local folder, is the profile's
base model: the same loader, quantisation, trainer and predictor as the real 8B model.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import assets, config, finetune, models, plan, recipe
from helpers.dataset import load_curated
from helpers.hardware import Hardware
from helpers.models import load_finetuned
from helpers.predict import DistributionPredictor
from helpers.runs import RunDir

LAYERS = 1
TRAIN_BOOKS = 12  # a seeded subset: 11 to train on, 1 for the eval loss


@pytest.fixture(scope="module")
def llama_8b_widths(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("llama-3.1-8b-shape") / "model"
    return str(models.save_random_model(plan.LLAMA_3_1_8B_SHAPE, folder, assets.llama3_tokenizer_offline(),
                                        layers=LAYERS))


@pytest.fixture(scope="module")
def full_profile(llama_8b_widths, as_full_data):
    """The FULL profile's settings on that model, curated data from the shipped sample, in a temporary folder."""
    full = config.get_profile("full")
    return config.get_profile("full", base_model=llama_8b_widths, train_subset=TRAIN_BOOKS, eval_size=4,
                              training=replace(full.training, max_steps=2, batch_size=2, gradient_accumulation_steps=1))


@pytest.mark.slow
def test_the_memory_estimate_matches_a_real_4bit_model_within_10_percent(full_profile):
    training = full_profile.training
    model, _ = models.load_base_model(full_profile, Hardware.card("cpu"))
    model = get_peft_model(prepare_model_for_kbit_training(model), recipe.lora_config(training))
    finetune.keep_adapter_in_float32(model)
    measured = model.get_memory_footprint() / plan.GIB
    shape = replace(plan.LLAMA_3_1_8B_SHAPE, num_hidden_layers=LAYERS)
    estimate = plan.memory_estimate(shape, training)
    expected = estimate.weights + plan.lora_parameter_count(shape, training) * 4 / plan.GIB
    assert measured == pytest.approx(expected, rel=0.10)
    assert measured > 3.9  # the float32 embeddings and head alone: 2 x 128,256 x 4,096 x 4 bytes


def test_the_data_path_masks_the_prompt_and_pads_with_the_finetune_pad(full_profile, tmp_path):
    tokenizer = models.base_tokenizer(full_profile)  # read from the local folder, as from the hub
    assert tokenizer.pad_token == config.LLAMA_PAD_TOKEN and tokenizer.pad_token_id == 128004
    assert tokenizer.eos_token == "<|end_of_text|>"
    items = plan.training_items(full_profile)[0][:2]
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    cpu, run = Hardware.card("cpu"), RunDir(tmp_path)
    training = plan.make_plan(full_profile, cpu).training
    trainer = finetune.make_trainer(tiny, tokenizer, items, items[:1], run, cpu, recipe.sft_config(training, run, cpu),
                                    recipe.lora_config(training))
    for row, item in zip(trainer.train_dataset, items):
        labels = [label for label in row["labels"] if label != -100]
        assert tokenizer.decode(labels) == f"{item.dollars}.00<|end_of_text|>"
        assert row["labels"][: -len(labels)] == [-100] * (len(row["labels"]) - len(labels))  # the prompt is masked
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()


@pytest.mark.slow
def test_full_settings_train_through_train_and_predict_in_one_pass(full_profile, tmp_path):
    cpu = Hardware.card("cpu")
    result = finetune.train(full_profile, cpu, plan.make_plan(full_profile, cpu, run=RunDir(tmp_path / "run")))
    card = result.run_card
    assert result.status == "trained" and card["global_step"] == 2
    settings = card["hyperparameters"]
    assert (settings["lora_r"], settings["lora_alpha"], settings["lora_dropout"]) == (32, 64, 0.1)
    assert set(settings["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert (settings["optimizer"], settings["lr_scheduler_type"], settings["max_length"]) == (
        "paged_adamw_32bit", "cosine", 200)
    assert card["trainable_parameters"] == plan.lora_parameter_count(
        replace(plan.LLAMA_3_1_8B_SHAPE, num_hidden_layers=LAYERS), full_profile.training)
    assert card["eval_loss_before"] > 0 and card["tokens_per_second"] > 0

    model, tokenizer = load_finetuned(full_profile, result.adapter_dir, cpu)
    books = load_curated(full_profile)[1][:4]
    predictions = DistributionPredictor(model, tokenizer, batch_size=2).predict(books)
    assert ((1 <= predictions.argmax) & (predictions.argmax <= 999)).all()
    assert ((1 <= predictions.mean) & (predictions.mean <= 999)).all()
