"""QLoRA set-up: the recipe, one hardware context, runs keyed by their settings, a real resumable run."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import nbformat
import pytest
import torch
import transformers
from peft import LoraConfig
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig

from helpers import assets, config, finetune, models, plan, runs, tracking
from helpers.curate import curate, load_curated
from helpers.hardware import Hardware
from helpers.runs import RunDir, RunMismatch
from training_runs import (RESUME_MAX_STEPS, RESUME_SAVE_STEPS, STARTUP_TIMEOUT_S, kill_after_first_checkpoint,
                           train_command)

T4, A100, CPU = Hardware.card("T4"), Hardware.card("A100"), Hardware.card("cpu")


@pytest.fixture(scope="module")
def smoke() -> config.Profile:
    profile = config.get_profile("smoke")
    if not (profile.curated_dir / "manifest.json").exists():
        curate(profile)
    return profile


@pytest.fixture(scope="module")
def train_items(smoke):
    return load_curated(smoke)[0]


@pytest.fixture(scope="module")
def tiny_4bit(smoke, tmp_path_factory) -> config.Profile:
    """The smoke profile with a tiny random Llama (real Llama 3.1 tokenizer) as its base model, loaded in 4-bit."""
    tokenizer = assets.llama3_tokenizer_offline()
    shape = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    folder = models.save_random_model(shape, tmp_path_factory.mktemp("tiny") / "model", tokenizer)
    return config.get_profile("smoke", base_model=str(folder))


def _recipe(profile: config.Profile, run: RunDir, hardware: Hardware):
    planned = plan.make_plan(profile, hardware)
    return planned, finetune.sft_config(planned.training, run, hardware), finetune.lora_config(planned.training)


# --- one hardware context -----------------------------------------------------------------
@pytest.mark.parametrize("hardware, dtype", [(CPU, torch.float32), (T4, torch.float16), (A100, torch.bfloat16)])
def test_the_hardware_sets_one_precision_for_the_quantisation_the_load_and_the_trainer(hardware, dtype, smoke,
                                                                                       tmp_path, monkeypatch):
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)  # a CPU poses as the GPU
    run = RunDir(tmp_path)
    settings = finetune.sft_config(smoke.training, run, hardware)
    assert hardware.compute_dtype == dtype == models.quantization_config(hardware).bnb_4bit_compute_dtype
    assert (settings.bf16, settings.fp16) == (dtype == torch.bfloat16, dtype == torch.float16)
    loaded = {}
    monkeypatch.setattr(assets, "from_hub", lambda loader, path, **options: loaded.update(options) or (_ for _ in ()).throw(
        RuntimeError("stop after the load call")))
    with pytest.raises(RuntimeError, match="stop after the load call"):
        models.load_base_model(smoke, hardware)
    assert loaded["dtype"] == dtype and loaded["quantization_config"].bnb_4bit_compute_dtype == dtype
    assert loaded["device_map"] == ({"": 0} if hardware.kind == "cuda" else {"": "cpu"})


def test_a_recipe_built_for_other_hardware_is_refused_before_the_model_loads(smoke, tmp_path, monkeypatch):
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    run = RunDir(tmp_path / "run")
    planned = plan.make_plan(smoke, CPU)
    a100_args = finetune.sft_config(planned.training, run, A100)
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=r"bf16=True.*trains in fp32"):
        finetune.train(smoke, CPU, planned, run, args=a100_args)
    with pytest.raises(ValueError, match="bnb_4bit_compute_dtype"):
        finetune.train(smoke, CPU, planned, run, quantization=models.quantization_config(T4))


def test_the_launcher_environment_is_read_once(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    found = Hardware.detect()
    assert found.world_size == 1 and found.is_main and not found.distributed
    assert found.agree({"steps": 7}) == {"steps": 7} and found.gather("x") == ["x"]


# --- the recipe -----------------------------------------------------------------------------
@pytest.mark.parametrize("hardware", [T4, A100], ids=["T4 (7.5): fp16", "A100 (8.0): bf16"])
def test_the_trainer_keeps_the_adapter_in_float32_under_mixed_precision(hardware, tiny_4bit, train_items, tmp_path,
                                                                        monkeypatch):
    """TRL 1.16 casts the LoRA weights of a 4-bit model to bf16, which the fp16 gradient scaler cannot unscale."""
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    model, tokenizer = models.load_base_model(tiny_4bit, CPU)  # the CPU computes; the Trainer is set up for the GPU
    _, args, lora = _recipe(tiny_4bit, RunDir(tmp_path), hardware)
    trainer = finetune.make_trainer(model, tokenizer, train_items[:2], train_items[2:3], RunDir(tmp_path), hardware,
                                    args, lora)
    assert (trainer.args.fp16, trainer.args.bf16) == ((True, False) if hardware is T4 else (False, True))
    trainable = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert all("lora_" in name for name in trainable)


def test_an_eval_pass_leaves_the_lora_gradients_unchanged(tiny_4bit, train_items, tmp_path):
    """bitsandbytes repacks 4-bit weights for CPU inference in eval mode; the backward must not go through them."""
    model, tokenizer = models.load_base_model(tiny_4bit, CPU)
    _, args, lora = _recipe(tiny_4bit, RunDir(tmp_path), CPU)
    trainer = finetune.make_trainer(model, tokenizer, train_items[:8], train_items[8:12], RunDir(tmp_path), CPU,
                                    args, lora)
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


def test_notebook_04_builds_the_recipe_the_script_twin_builds(smoke, tmp_path):
    """The three objects written out in notebook 04's cells equal helpers.finetune's (what `python -m helpers.train` uses)."""
    (path,) = (config.REPO_ROOT / "notebooks").glob("04_*.ipynb")
    cells = {cell.id: cell.source for cell in nbformat.read(path, as_version=4).cells}
    run, hardware = RunDir(tmp_path), CPU
    planned = plan.make_plan(smoke, hardware)
    namespace = {"BitsAndBytesConfig": BitsAndBytesConfig, "LoraConfig": LoraConfig, "SFTConfig": SFTConfig,
                 "config": config, "hardware": hardware, "training": smoke.training, "planned": planned, "run": run,
                 "trackers": tracking.trackers, "sft_dataset": finetune.sft_dataset,
                 "train_items": load_curated(smoke)[0]}
    for cell in ("04-05", "04-07", "04-09"):
        exec(cells[cell], namespace)
    assert namespace["quantization"].to_dict() == models.quantization_config(hardware).to_dict()
    assert namespace["lora"] == finetune.lora_config(planned.training)
    package = finetune.sft_config(planned.training, run, hardware).to_dict()
    notebook = namespace["args"].to_dict()
    assert {key: (notebook[key], package[key]) for key in package if notebook[key] != package[key]} == {}


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
    _, args, lora = _recipe(smoke, RunDir(tmp_path), CPU)
    trainer = finetune.make_trainer(tiny, tokenizer, train_items[:3], train_items[3:4], RunDir(tmp_path), CPU, args,
                                    lora)
    for row, item in zip(trainer.train_dataset, train_items):
        answer = [token for token, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert tokenizer.decode(answer) == item.completion + tokenizer.eos_token


def test_validation_is_carved_from_train(train_items):
    train, validation = plan.split_validation(train_items)
    assert validation and not {item.asin for item in train} & {item.asin for item in validation}
    assert len(train) + len(validation) == len(train_items)


def test_memory_estimate_knows_llama_3_1_8b_offline(smoke):
    training = config.get_profile("full").training
    llama = plan.memory_estimate(config.LLAMA_HUB_ID, training)
    smol = plan.memory_estimate("smollm2", plan.make_plan(smoke, CPU).training)  # max_length measured
    assert abs(llama.parameters - 8.03e9) < 0.01e9
    assert 7 < llama.weights < 8 and llama.total < 14.6  # batch 1 fits a free Colab T4
    assert smol.parameters < 0.2e9 and smol.total < llama.total


# --- runs keyed by what they train --------------------------------------------------------
def test_the_checkpoint_prefix_is_the_trainers():
    assert runs.CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR


def _recorded_run(profile: config.Profile, folder: Path) -> tuple[RunDir, plan.TrainingPlan]:
    """A run folder as a started run leaves it: its settings, and a checkpoint past the planned steps."""
    run, planned = RunDir(folder), plan.make_plan(profile, CPU)
    lora = finetune.lora_config(planned.training)
    training = finetune.training_from(finetune.sft_config(planned.training, run, CPU), lora, planned.training)
    planned = replace(planned, training=training)
    run.record({**planned.settings(), "quantization": finetune.describe_quantization(models.quantization_config(CPU))})
    checkpoint = run.checkpoints / f"{PREFIX_CHECKPOINT_DIR}-{planned.steps}"
    checkpoint.mkdir(parents=True)
    TrainerState(global_step=planned.steps, max_steps=planned.steps).save_to_json(str(checkpoint / runs.TRAINER_STATE))
    return run, planned


def test_a_changed_setting_is_refused_naming_each_field_and_both_ways_out(smoke, tmp_path, monkeypatch):
    run, _ = _recorded_run(smoke, tmp_path / "run")
    changed = replace(smoke, training=replace(smoke.training, learning_rate=5e-4, lora_r=16))
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(RunMismatch) as refused:
        finetune.train(changed, CPU, plan.make_plan(changed, CPU), run)
    message = str(refused.value)
    assert "training.learning_rate: 0.002 in the run, 0.0005 now" in message
    assert "training.lora_r: 8 in the run, 16 now" in message
    assert "another run folder" in message and "resume=False" in message
    assert message.count(" in the run, ") == 2  # nothing else differs


def test_settings_that_only_watch_a_run_may_change_on_a_resume(smoke, tmp_path, monkeypatch):
    run, planned = _recorded_run(smoke, tmp_path / "run")
    watched = replace(smoke, training=replace(smoke.training, save_steps=3, logging_steps=5, report_to="none"))
    shutil.copytree(run.checkpoints / f"{PREFIX_CHECKPOINT_DIR}-{planned.steps}", run.adapter)  # "finished"
    run.card.write_text(json.dumps({"global_step": planned.steps}))
    (run.adapter / "adapter_config.json").write_text("{}")
    result = finetune.train(watched, CPU, plan.make_plan(watched, CPU), run)
    assert result.status == "finished"


def test_a_finished_run_with_other_settings_is_not_reported_finished(smoke, tmp_path):
    """The bug this fixes: a changed learning rate returned the old run as "finished"."""
    run, _ = _recorded_run(smoke, tmp_path / "run")
    changed = replace(smoke, training=replace(smoke.training, learning_rate=5e-4))
    with pytest.raises(RunMismatch, match="learning_rate"):
        finetune.train(changed, CPU, plan.make_plan(changed, CPU), run)


def test_checkpoints_without_recorded_settings_are_not_resumed(smoke, tmp_path):
    run, planned = _recorded_run(smoke, tmp_path / "run")
    run.settings.unlink()  # a folder from an older version of the course
    with pytest.raises(RunMismatch, match="run_config.json: missing"):
        finetune.train(smoke, CPU, planned, run)


def test_starting_afresh_leaves_no_stale_checkpoint(tiny_4bit, tmp_path):
    run, _ = _recorded_run(tiny_4bit, tmp_path / "run")
    stale = run.checkpoints / f"{PREFIX_CHECKPOINT_DIR}-99"
    shutil.copytree(run.last_checkpoint(), stale)
    (run.path / "run_card.json").write_text("{}")
    short = replace(tiny_4bit, training=replace(tiny_4bit.training, max_steps=2, save_steps=1, eval_steps=1))
    result = finetune.train(short, CPU, plan.make_plan(short, CPU), run, resume=False)
    assert result.status == "trained" and result.global_step == 2
    assert sorted(path.name for path in run.checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*")) == [
        f"{PREFIX_CHECKPOINT_DIR}-1", f"{PREFIX_CHECKPOINT_DIR}-2"]
    assert run.recorded()["training"]["max_steps"] == 2 and run.read_card()["global_step"] == 2
    again = finetune.train(short, CPU, plan.make_plan(short, CPU), run)
    assert again.status == "finished"


# --- a real run, killed and resumed ---------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted_run(smoke, tmp_path_factory) -> tuple[Path, str]:
    """A real 4-bit QLoRA run killed (SIGKILL) after its first checkpoint, then started again."""
    run_dir = tmp_path_factory.mktemp("run")
    kill_after_first_checkpoint(train_command(run_dir), run_dir)
    second = subprocess.run(train_command(run_dir), cwd=config.REPO_ROOT, capture_output=True, text=True,
                            timeout=STARTUP_TIMEOUT_S)
    assert second.returncode == 0, second.stderr[-3000:]
    return run_dir, second.stdout


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint(interrupted_run):
    run_dir, stdout = interrupted_run
    card = json.loads((run_dir / "run_card.json").read_text())
    assert card["resumed_from"] and f"Resumed from {run_dir}" in stdout
    assert int(card["resumed_from"].rsplit("-", 1)[1]) < RESUME_MAX_STEPS
    final = TrainerState.load_from_json(str(run_dir / "checkpoints" / f"checkpoint-{RESUME_MAX_STEPS}"
                                            / runs.TRAINER_STATE))
    assert final.global_step == card["global_step"] == RESUME_MAX_STEPS
    logged_steps = [log["step"] for log in final.log_history if "loss" in log]
    assert logged_steps == list(range(1, RESUME_MAX_STEPS + 1)), "steps before the kill were lost or repeated"


@pytest.mark.slow
def test_a_finished_run_is_not_trained_again(interrupted_run):
    run_dir, _ = interrupted_run
    card_before = (run_dir / "run_card.json").read_text()
    adapter_before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    again = subprocess.run(train_command(run_dir), cwd=config.REPO_ROOT, capture_output=True, text=True,
                           timeout=STARTUP_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished (6 steps): nothing trained" in again.stdout
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert checkpoints[-1] == f"checkpoint-{RESUME_MAX_STEPS}" and f"checkpoint-{RESUME_MAX_STEPS + 1}" not in checkpoints
    assert (run_dir / "run_card.json").read_text() == card_before
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_before


@pytest.mark.slow
def test_a_changed_setting_on_the_command_line_stops_the_script(interrupted_run):
    run_dir, _ = interrupted_run
    changed = subprocess.run(train_command(run_dir, "--set", "learning_rate=5e-4"), cwd=config.REPO_ROOT,
                             capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    assert changed.returncode != 0 and "training.learning_rate: 0.002 in the run, 0.0005 now" in changed.stderr


@pytest.mark.slow
def test_a_run_stopped_before_saving_its_adapter_takes_it_from_the_last_checkpoint(interrupted_run, smoke, tmp_path):
    run_dir, _ = interrupted_run
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run_dir / "checkpoints", copy.checkpoints)  # no adapter, no run card
    shutil.copy(run_dir / "run_config.json", copy.settings)
    profile = config.get_profile("smoke", training=replace(smoke.training, max_steps=RESUME_MAX_STEPS,
                                                            save_steps=RESUME_SAVE_STEPS))
    planned = plan.make_plan(profile, CPU)
    result = finetune.train(profile, CPU, planned, copy, args=finetune.sft_config(planned.training, copy, CPU))
    assert result.status == "finished" and result.global_step == RESUME_MAX_STEPS
    assert (copy.adapter / "adapter_model.safetensors").read_bytes() == (
        run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (copy.adapter / "tokenizer.json").exists() and not (copy.adapter / "optimizer.pt").exists()
    assert result.run_card["global_step"] == RESUME_MAX_STEPS and result.run_card["tokens_per_second"] is None


@pytest.mark.slow
def test_a_run_saves_its_adapter_settings_and_run_card(interrupted_run):
    run_dir, _ = interrupted_run
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "tokenizer.json").exists()
    card = json.loads((run_dir / "run_card.json").read_text())
    assert card["hyperparameters"]["optimizer"] == "paged_adamw_32bit"
    assert card["data_sha256"] and card["eval_loss_before"] > 0 and card["eval_loss_after"] > 0
    assert card["tokens_per_second"] > 0 and card["wall_seconds"] > 0
    assert card["gradient_checkpointing"] is True and card["replicas_identical"] is True
    final = TrainerState.load_from_json(str(run_dir / "checkpoints" / f"checkpoint-{RESUME_MAX_STEPS}"
                                            / runs.TRAINER_STATE))
    recorded = json.loads((run_dir / "run_config.json").read_text())
    assert card["planned_steps"] == final.max_steps == recorded["planned_steps"] == RESUME_MAX_STEPS
    assert recorded["data_sha256"] == card["data_sha256"] and recorded["processes"] == 1


@pytest.mark.slow
def test_a_resumed_run_logs_one_tensorboard_curve_in_its_folder(interrupted_run):
    run_dir, _ = interrupted_run
    scalars = tracking.read_scalars(run_dir)
    assert scalars.query("tag == 'train/loss'")["step"].tolist() == list(range(1, RESUME_MAX_STEPS + 1))
    evals = scalars.query("tag == 'eval/loss'")["step"].tolist()  # before training, on resuming, at the end
    assert evals[0] == 0 and evals[-1] == RESUME_MAX_STEPS and evals == sorted(set(evals))
