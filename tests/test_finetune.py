"""QLoRA set-up: the recipe's settings, a leak-free prompt/completion dataset, a real resumable run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.trainer_callback import TrainerState

from helpers import assets, config, finetune, plan, tracking
from helpers.curate import curate, load_curated

RESUME_MAX_STEPS, RESUME_SAVE_STEPS = 6, 2
STARTUP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def smoke() -> config.Profile:
    profile = config.get_profile("smoke")
    if not (profile.curated_dir / "manifest.json").exists():
        curate(profile)
    return profile


@pytest.fixture(scope="module")
def train_items(smoke):
    return load_curated(smoke)[0]


T4, A100, CPU = (plan.TABLE_DEVICES[key] for key in ("T4", "A100", "cpu"))


@pytest.fixture(scope="module")
def tiny_4bit(smoke, tmp_path_factory) -> config.Profile:
    """The smoke profile with a tiny random Llama (real Llama 3.1 tokenizer) as its base model, loaded in 4-bit."""
    tokenizer = assets.llama3_tokenizer_offline()
    shape = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    folder = finetune.save_random_model(shape, tmp_path_factory.mktemp("tiny") / "model", tokenizer)
    return config.get_profile("smoke", base_model=str(folder))


def test_quantization_is_nf4_with_double_quantisation():
    settings = finetune.quantization_config()
    assert settings.load_in_4bit and settings.bnb_4bit_quant_type == "nf4" and settings.bnb_4bit_use_double_quant
    assert settings.bnb_4bit_compute_dtype == finetune.compute_dtype()
    if not torch.cuda.is_available():
        assert finetune.compute_dtype() == torch.float32


@pytest.mark.parametrize("device, dtype", [(CPU, torch.float32), (T4, torch.float16), (A100, torch.bfloat16)])
def test_compute_dtype_follows_the_device(device, dtype):
    assert finetune.compute_dtype(device) == dtype == finetune.quantization_config(device).bnb_4bit_compute_dtype


@pytest.mark.parametrize("device", [T4, A100], ids=["T4 (7.5): fp16", "A100 (8.0): bf16"])
def test_the_trainer_keeps_the_adapter_in_float32_under_mixed_precision(device, tiny_4bit, train_items, tmp_path,
                                                                        monkeypatch):
    """TRL 1.16 casts the LoRA weights of a 4-bit model to bf16, which the fp16 gradient scaler cannot unscale."""
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)  # a CPU poses as the GPU
    model, tokenizer = finetune.load_base_model(tiny_4bit)
    trainer = finetune.make_trainer(tiny_4bit, model, tokenizer, train_items[:2], train_items[2:3], tmp_path, device)
    assert (trainer.args.fp16, trainer.args.bf16) == ((True, False) if device is T4 else (False, True))
    trainable = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert all("lora_" in name for name in trainable)


def test_an_eval_pass_leaves_the_lora_gradients_unchanged(tiny_4bit, train_items, tmp_path):
    """bitsandbytes repacks 4-bit weights for CPU inference in eval mode; the backward must not go through them."""
    model, tokenizer = finetune.load_base_model(tiny_4bit)
    trainer = finetune.make_trainer(tiny_4bit, model, tokenizer, train_items[:8], train_items[8:12], tmp_path, CPU)
    torch.manual_seed(config.SEED)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without a gradient
            parameter.data.normal_(0, 0.02)
    batch = next(iter(trainer.get_train_dataloader()))

    def gradients() -> dict[str, torch.Tensor]:
        trainer.model.train()
        trainer.model.zero_grad()
        trainer.model(**{key: batch[key] for key in ("input_ids", "attention_mask", "labels")}).loss.backward()
        return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}

    before = gradients()
    trainer.evaluate()
    after = gradients()
    assert before.keys() == after.keys() and len(before) == 16  # A and B of q, k, v, o in 2 layers
    for name in before:
        assert torch.allclose(before[name], after[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("name", sorted(config.PROFILES))
def test_trainer_settings_follow_the_recipe(name, tmp_path):
    profile = config.get_profile(name)
    settings = finetune.sft_config(profile, tmp_path)
    training = profile.training
    assert settings.optim == "paged_adamw_32bit"
    assert settings.lr_scheduler_type == "cosine"
    assert settings.warmup_steps == training.warmup_ratio == 0.03
    assert settings.completion_only_loss is True
    assert settings.max_length == training.max_length and settings.seed == config.SEED
    assert settings.eval_strategy == "steps" and settings.save_steps == training.save_steps
    assert not settings.bf16 and not settings.fp16 or torch.cuda.is_available()
    lora = finetune.lora_config(training)
    assert (lora.r, lora.lora_alpha, lora.task_type) == (training.lora_r, training.lora_alpha, "CAUSAL_LM")
    assert set(lora.target_modules) == set(training.target_modules)


def test_the_answer_is_never_in_the_prompt(train_items):
    dataset = finetune.sft_dataset(train_items)
    for row, item in zip(dataset, train_items):
        assert row["prompt"].endswith(config.ANSWER_PREFIX)
        assert row["completion"] == f"{item.dollars}.00"
        assert row["prompt"] + row["completion"] == item.prompt


def test_trainer_masks_the_prompt_and_ends_the_completion(smoke, train_items, tmp_path):
    """Through TRL's own preprocessing: only "NN.00" + end-of-sequence carries a loss."""
    tokenizer = assets.load_tokenizer(smoke.base_model)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    trainer = finetune.make_trainer(smoke, tiny, tokenizer, train_items[:3], train_items[3:4], tmp_path)
    for row, item in zip(trainer.train_dataset, train_items):
        answer = [token for token, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert tokenizer.decode(answer) == item.completion + tokenizer.eos_token


def test_validation_is_carved_from_train(train_items):
    train, validation = finetune.split_validation(train_items)
    assert validation and not {item.asin for item in train} & {item.asin for item in validation}
    assert len(train) + len(validation) == len(train_items)


def test_memory_estimate_knows_llama_3_1_8b_offline():
    training = config.get_profile("full").training
    llama = plan.memory_estimate(config.LLAMA_HUB_ID, training)
    smol = plan.memory_estimate("smollm2", config.get_profile("smoke").training)
    assert abs(llama.parameters - 8.03e9) < 0.01e9
    assert 7 < llama.weights < 8 and llama.total < 14.6  # batch 1 fits a free Colab T4
    assert smol.parameters < 0.2e9 and smol.total < llama.total


def _train_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "helpers.train", "--profile", "smoke", "--max-steps", str(RESUME_MAX_STEPS),
            "--save-steps", str(RESUME_SAVE_STEPS), "--output-dir", str(run_dir)]


@pytest.fixture(scope="module")
def interrupted_run(smoke, tmp_path_factory) -> tuple[Path, str]:
    """A real 4-bit QLoRA run killed (SIGKILL) after its first checkpoint, then started again."""
    run_dir = tmp_path_factory.mktemp("run")
    first_checkpoint = run_dir / "checkpoints" / f"checkpoint-{RESUME_SAVE_STEPS}" / finetune.TRAINER_STATE
    first = subprocess.Popen(_train_command(run_dir), cwd=config.REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not first_checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first_checkpoint.exists(), "the first run never wrote a checkpoint"
    assert not (run_dir / "adapter").exists(), "the first run finished before it was killed"
    second = subprocess.run(_train_command(run_dir), cwd=config.REPO_ROOT, capture_output=True, text=True,
                            timeout=STARTUP_TIMEOUT_S)
    assert second.returncode == 0, second.stderr[-3000:]
    return run_dir, second.stdout


def test_a_killed_run_resumes_from_its_checkpoint(interrupted_run):
    run_dir, stdout = interrupted_run
    card = json.loads((run_dir / "run_card.json").read_text())
    assert card["resumed_from"] and f"Resumed from {run_dir}" in stdout
    assert int(card["resumed_from"].rsplit("-", 1)[1]) < RESUME_MAX_STEPS
    final = TrainerState.load_from_json(str(run_dir / "checkpoints" / f"checkpoint-{RESUME_MAX_STEPS}"
                                            / finetune.TRAINER_STATE))
    assert final.global_step == card["global_step"] == RESUME_MAX_STEPS
    logged_steps = [log["step"] for log in final.log_history if "loss" in log]
    assert logged_steps == list(range(1, RESUME_MAX_STEPS + 1)), "steps before the kill were lost or repeated"


def test_a_finished_run_is_not_trained_again(interrupted_run):
    run_dir, _ = interrupted_run
    card_before = (run_dir / "run_card.json").read_text()
    adapter_before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    again = subprocess.run(_train_command(run_dir), cwd=config.REPO_ROOT, capture_output=True, text=True,
                           timeout=STARTUP_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished (6 steps): nothing trained" in again.stdout
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert checkpoints[-1] == f"checkpoint-{RESUME_MAX_STEPS}" and f"checkpoint-{RESUME_MAX_STEPS + 1}" not in checkpoints
    assert (run_dir / "run_card.json").read_text() == card_before
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_before


def test_a_run_stopped_before_saving_its_adapter_takes_it_from_the_last_checkpoint(interrupted_run, smoke, tmp_path):
    run_dir, _ = interrupted_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")  # no adapter, no run card
    result = finetune.train(config.get_profile("smoke", training=replace(
        smoke.training, max_steps=RESUME_MAX_STEPS, save_steps=RESUME_SAVE_STEPS)), run_dir=copy)
    assert result.status == "finished" and result.global_step == RESUME_MAX_STEPS
    assert (copy / "adapter" / "adapter_model.safetensors").read_bytes() == (
        run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (copy / "adapter" / "tokenizer.json").exists() and not (copy / "adapter" / "optimizer.pt").exists()
    assert result.run_card["global_step"] == RESUME_MAX_STEPS and result.run_card["tokens_per_second"] is None


def test_a_run_saves_its_adapter_and_run_card(interrupted_run):
    run_dir, _ = interrupted_run
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "tokenizer.json").exists()
    card = json.loads((run_dir / "run_card.json").read_text())
    assert card["hyperparameters"]["optimizer"] == "paged_adamw_32bit"
    assert card["data_sha256"] and card["eval_loss_before"] > 0 and card["eval_loss_after"] > 0
    assert card["tokens_per_second"] > 0 and card["wall_seconds"] > 0
    final = TrainerState.load_from_json(str(run_dir / "checkpoints" / f"checkpoint-{RESUME_MAX_STEPS}"
                                            / finetune.TRAINER_STATE))
    assert card["planned_steps"] == final.max_steps == RESUME_MAX_STEPS


def test_a_resumed_run_logs_one_tensorboard_curve_in_its_folder(interrupted_run):
    run_dir, _ = interrupted_run
    scalars = tracking.read_scalars(run_dir)
    assert scalars.query("tag == 'train/loss'")["step"].tolist() == list(range(1, RESUME_MAX_STEPS + 1))
    evals = scalars.query("tag == 'eval/loss'")["step"].tolist()  # before training, on resuming, at the end
    assert evals[0] == 0 and evals[-1] == RESUME_MAX_STEPS and evals == sorted(set(evals))
