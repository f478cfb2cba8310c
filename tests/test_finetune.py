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
from training_runs import RESUME_MAX_STEPS, RESUME_SAVE_STEPS, STARTUP_TIMEOUT_S, kill_after_first_checkpoint
from training_runs import train_command as plain_train_command
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig

from helpers import assets, config, finetune, models, plan, recipe, runs, tracking
from helpers.curate import curate
from helpers.dataset import has_curated, load_curated
from helpers.hardware import Hardware
from helpers.runs import RunDir, RunMismatch

T4, A100, CPU = Hardware.card("T4"), Hardware.card("A100"), Hardware.card("cpu")
MAX_LENGTH = 224  # smoke measures its own (None in the profile): --set must parse it as the field's int


def train_command(run_dir: Path, *extra: str) -> list[str]:
    return plain_train_command(run_dir, "--set", f"max_length={MAX_LENGTH}", *extra)


@pytest.fixture(scope="module")
def smoke() -> config.Profile:
    profile = config.get_profile("smoke")
    if not has_curated(profile):
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
    planned = plan.make_plan(profile, hardware, run=run)
    return planned, recipe.sft_config(planned.training, run, hardware, planned.max_steps), recipe.lora_config(
        planned.training)


# --- one hardware context -----------------------------------------------------------------
@pytest.mark.parametrize("hardware, dtype", [(CPU, torch.float32), (T4, torch.float16), (A100, torch.bfloat16)])
def test_the_hardware_sets_one_precision_for_the_quantisation_the_load_and_the_trainer(hardware, dtype, smoke,
                                                                                       tmp_path, monkeypatch):
    # a CPU poses as the GPU
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    run = RunDir(tmp_path)
    settings = recipe.sft_config(smoke.training, run, hardware)
    assert hardware.compute_dtype == dtype == models.quantization_config(hardware).bnb_4bit_compute_dtype
    assert (settings.bf16, settings.fp16) == (dtype == torch.bfloat16, dtype == torch.float16)
    loaded = {}

    def stop_at_the_load(loader, path, **options):
        loaded.update(options)
        raise RuntimeError("stop after the load call")

    monkeypatch.setattr(assets, "from_hub", stop_at_the_load)
    with pytest.raises(RuntimeError, match="stop after the load call"):
        models.load_base_model(smoke, hardware)
    assert loaded["dtype"] == dtype and loaded["quantization_config"].bnb_4bit_compute_dtype == dtype
    assert loaded["device_map"] == ({"": 0} if hardware.kind == "cuda" else {"": "cpu"})


def test_a_recipe_built_for_other_hardware_is_refused_before_the_model_loads(smoke, tmp_path, monkeypatch):
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    run = RunDir(tmp_path / "run")
    planned = plan.make_plan(smoke, CPU, run=run)
    a100_args = recipe.sft_config(planned.training, run, A100, planned.max_steps)
    monkeypatch.setattr(finetune, "load_base_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=r"args\.bf16 is True, the plan's is False"):
        finetune.train(smoke, CPU, planned, args=a100_args)
    with pytest.raises(ValueError, match="quantization.bnb_4bit_compute_dtype is 'float16'"):
        finetune.train(smoke, CPU, planned, quantization=models.quantization_config(T4))


def test_a_value_changed_only_in_a_recipe_cell_is_refused_naming_it(smoke, tmp_path, monkeypatch):
    """What a cell shows is what trains: a learning rate edited in the SFTConfig alone is not the run's key."""
    planned, args, lora = _recipe(smoke, RunDir(tmp_path / "run"), CPU)
    monkeypatch.setattr(finetune, "load_base_model", lambda *a, **k: pytest.fail("the model loaded"))
    edited = replace(args, learning_rate=5e-4)
    with pytest.raises(ValueError, match=r"args\.learning_rate is 0\.0005, the plan's is 0\.002") as refused:
        finetune.train(smoke, CPU, planned, lora=lora, args=edited)
    assert "replace(profile.training" in str(refused.value)
    with pytest.raises(ValueError, match=r"lora\.r is 4, the plan's is 8"):
        finetune.train(smoke, CPU, planned, lora=replace(lora, r=4), args=args)


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
    """The three objects written out in notebook 04's cells equal helpers.recipe's (what `helpers.train` uses)."""
    run, hardware = RunDir(tmp_path), CPU
    planned = plan.make_plan(smoke, hardware, run=run)
    namespace = notebook_recipe(planned, hardware)
    quantization, lora, args = recipe.planned_recipe(planned, hardware)
    assert namespace["quantization"].to_dict() == quantization.to_dict()
    assert namespace["lora"] == lora
    package, notebook = args.to_dict(), namespace["args"].to_dict()
    assert {key: (notebook[key], package[key]) for key in package if notebook[key] != package[key]} == {}
    assert namespace["args"].max_steps == planned.steps == 12  # the steps that train, not -1


def notebook_recipe(planned: plan.TrainingPlan, hardware: Hardware) -> dict:
    """Notebook 04's three recipe cells, run on ``planned``: their namespace (quantization, lora, args)."""
    (path,) = (config.REPO_ROOT / "notebooks").glob("04_*.ipynb")
    cells = {cell.id: cell.source for cell in nbformat.read(path, as_version=4).cells}
    namespace = {"BitsAndBytesConfig": BitsAndBytesConfig, "LoraConfig": LoraConfig, "SFTConfig": SFTConfig,
                 "config": config, "hardware": hardware, "planned": planned, "run": planned.run,
                 "trackers": tracking.trackers, "sft_dataset": recipe.sft_dataset}
    for cell in ("04-05", "04-07", "04-09"):
        exec(cells[cell], namespace)
    return namespace


class HeldArgs:
    """Records the SFTConfig each SFTTrainer is built with (monkeypatched over finetune.SFTTrainer)."""

    def __init__(self, monkeypatch) -> None:
        self.held = []
        real = finetune.SFTTrainer

        def spy(*args, **kwargs):
            trainer = real(*args, **kwargs)
            self.held.append(trainer.args)
            return trainer

        monkeypatch.setattr(finetune, "SFTTrainer", spy)


def _differing(held: SFTConfig, built: SFTConfig) -> dict:
    held, built = held.to_dict(), built.to_dict()
    return {key: (held.get(key), built[key]) for key in built if held.get(key) != built[key]}


def test_the_trainer_holds_the_sft_config_the_notebook_cell_built_fresh_and_resumed(tiny_4bit, tmp_path,
                                                                                    monkeypatch):
    short = replace(tiny_4bit, training=replace(tiny_4bit.training, max_steps=3, save_steps=1, eval_steps=3))
    run, held = RunDir(tmp_path / "run"), HeldArgs(monkeypatch)
    fresh = plan.make_plan(short, CPU, run=run)
    cells = notebook_recipe(fresh, CPU)
    result = finetune.train(short, CPU, fresh, cells["quantization"], cells["lora"], cells["args"])
    assert result.status == "trained" and held.held[-1] is cells["args"]
    assert _differing(held.held[-1], cells["args"]) == {} and held.held[-1].max_steps == 3

    # a run stopped after step 2, whose record holds another batch split (same effective batch)
    shutil.rmtree(run.checkpoints / f"{PREFIX_CHECKPOINT_DIR}-3")
    shutil.rmtree(run.adapter)
    recorded = run.recorded()
    recorded["training"].update(batch_size=2, gradient_accumulation_steps=2)
    run.record(recorded)
    resumed = plan.make_plan(short, CPU, run=run)
    assert (resumed.training.batch_size, resumed.training.gradient_accumulation_steps, resumed.done_steps) == (2, 2, 2)
    assert "resumes from checkpoint-2 (step 2 of 3) with its recorded batch split" in str(resumed)
    cells = notebook_recipe(resumed, CPU)
    assert (cells["args"].per_device_train_batch_size, cells["args"].gradient_accumulation_steps) == (2, 2)
    result = finetune.train(short, CPU, resumed, cells["quantization"], cells["lora"], cells["args"])
    assert result.status == "resumed" and result.global_step == 3
    assert _differing(held.held[-1], cells["args"]) == {}


def test_a_plan_made_before_the_folder_changed_is_refused(tiny_4bit, tmp_path):
    short = replace(tiny_4bit, training=replace(tiny_4bit.training, max_steps=1, save_steps=1, eval_steps=1))
    run = RunDir(tmp_path / "run")
    planned = plan.make_plan(short, CPU, run=run)
    assert finetune.train(short, CPU, planned).status == "trained"
    with pytest.raises(finetune.StalePlan, match="changed after this plan was made"):
        finetune.train(short, CPU, planned)  # a re-run train cell: the folder now holds the finished run
    assert finetune.train(short, CPU, plan.make_plan(short, CPU, run=run)).status == "finished"


def test_the_adapter_starts_from_the_same_weights_every_run(tiny_4bit, train_items, tmp_path):
    """The adapter's random init comes from args.seed, not from whatever torch's generator holds."""
    _, args, lora = _recipe(tiny_4bit, RunDir(tmp_path), CPU)

    def initial_adapter() -> dict[str, torch.Tensor]:
        torch.manual_seed(torch.seed())  # another state of the global generator each time
        model, tokenizer = models.load_base_model(tiny_4bit, CPU)
        trainer = finetune.make_trainer(model, tokenizer, train_items[:2], train_items[2:3], RunDir(tmp_path), CPU,
                                        args, lora, report_to="none")
        return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}

    first, second = initial_adapter(), initial_adapter()
    assert first.keys() == second.keys() and any("lora_A" in name for name in first)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_the_answer_is_never_in_the_prompt(train_items):
    dataset = recipe.sft_dataset(train_items)
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
    run.record(planned.settings())
    checkpoint = run.checkpoints / f"{PREFIX_CHECKPOINT_DIR}-{planned.steps}"
    checkpoint.mkdir(parents=True)
    TrainerState(global_step=planned.steps, max_steps=planned.steps).save_to_json(str(checkpoint / runs.TRAINER_STATE))
    return run, planned


def test_a_changed_setting_is_refused_naming_each_field_and_both_ways_out(smoke, tmp_path, monkeypatch):
    run, _ = _recorded_run(smoke, tmp_path / "run")
    changed = replace(smoke, training=replace(smoke.training, learning_rate=5e-4, lora_r=16))
    monkeypatch.setattr(finetune, "load_base_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(RunMismatch) as refused:  # when the plan is made, before any recipe or model
        plan.make_plan(changed, CPU, run=run)
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
    result = finetune.train(watched, CPU, plan.make_plan(watched, CPU, run=run))
    assert result.status == "finished"


def test_a_finished_run_with_other_settings_is_not_reported_finished(smoke, tmp_path):
    """The bug this fixes: a changed learning rate returned the old run as "finished"."""
    run, _ = _recorded_run(smoke, tmp_path / "run")
    changed = replace(smoke, training=replace(smoke.training, learning_rate=5e-4))
    with pytest.raises(RunMismatch, match="learning_rate"):
        plan.make_plan(changed, CPU, run=run)


def test_checkpoints_without_recorded_settings_are_not_resumed(smoke, tmp_path):
    run, planned = _recorded_run(smoke, tmp_path / "run")
    run.settings.unlink()  # a folder from an older version of the course
    with pytest.raises(RunMismatch, match="run_config.json: missing"):
        plan.make_plan(smoke, CPU, run=run)


def test_starting_afresh_leaves_no_stale_checkpoint(tiny_4bit, tmp_path):
    run, _ = _recorded_run(tiny_4bit, tmp_path / "run")
    stale = run.checkpoints / f"{PREFIX_CHECKPOINT_DIR}-99"
    shutil.copytree(run.last_checkpoint(), stale)
    run.write_card({})
    short = replace(tiny_4bit, training=replace(tiny_4bit.training, max_steps=2, save_steps=1, eval_steps=1))
    result = finetune.train(short, CPU, plan.make_plan(short, CPU, run=run, resume=False))
    assert result.status == "trained" and result.global_step == 2
    assert sorted(path.name for path in run.checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*")) == [
        f"{PREFIX_CHECKPOINT_DIR}-1", f"{PREFIX_CHECKPOINT_DIR}-2"]
    assert run.recorded()["training"]["max_steps"] == 2 and run.read_card()["global_step"] == 2
    again = finetune.train(short, CPU, plan.make_plan(short, CPU, run=run))
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
    card = RunDir(run_dir).read_card()
    assert card["resumed_from"] and f"Resumed from {run_dir}" in stdout
    assert int(card["resumed_from"].rsplit("-", 1)[1]) < RESUME_MAX_STEPS
    final = TrainerState.load_from_json(str(RunDir(run_dir).checkpoints / f"checkpoint-{RESUME_MAX_STEPS}"
                                            / runs.TRAINER_STATE))
    assert final.global_step == card["global_step"] == RESUME_MAX_STEPS
    logged_steps = [log["step"] for log in final.log_history if "loss" in log]
    assert logged_steps == list(range(1, RESUME_MAX_STEPS + 1)), "steps before the kill were lost or repeated"


@pytest.mark.slow
def test_a_finished_run_is_not_trained_again(interrupted_run):
    run_dir, _ = interrupted_run
    card_before = RunDir(run_dir).card.read_text(encoding="utf-8")
    adapter_before = (RunDir(run_dir).adapter / "adapter_model.safetensors").read_bytes()
    again = subprocess.run(train_command(run_dir), cwd=config.REPO_ROOT, capture_output=True, text=True,
                           timeout=STARTUP_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished (6 steps): nothing trained" in again.stdout
    checkpoints = sorted(path.name for path in RunDir(run_dir).checkpoints.iterdir())
    assert checkpoints[-1] == f"checkpoint-{RESUME_MAX_STEPS}"
    assert f"checkpoint-{RESUME_MAX_STEPS + 1}" not in checkpoints
    assert RunDir(run_dir).card.read_text(encoding="utf-8") == card_before
    assert (RunDir(run_dir).adapter / "adapter_model.safetensors").read_bytes() == adapter_before


@pytest.mark.slow
def test_a_changed_setting_on_the_command_line_stops_the_script(interrupted_run):
    run_dir, _ = interrupted_run
    changed = subprocess.run(train_command(run_dir, "--set", "learning_rate=5e-4"), cwd=config.REPO_ROOT,
                             capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    assert changed.returncode == 2 and "training.learning_rate: 0.002 in the run, 0.0005 now" in changed.stderr
    assert "Traceback" not in changed.stderr and "--no-resume" in changed.stderr


@pytest.mark.slow
def test_a_run_stopped_before_saving_its_adapter_takes_it_from_the_last_checkpoint(interrupted_run, smoke, tmp_path):
    run_dir, _ = interrupted_run
    copy = RunDir(tmp_path / "run")
    shutil.copytree(RunDir(run_dir).checkpoints, copy.checkpoints)  # no adapter, no run card
    shutil.copy(RunDir(run_dir).settings, copy.settings)
    profile = config.get_profile("smoke", training=replace(smoke.training, max_steps=RESUME_MAX_STEPS,
                                                            save_steps=RESUME_SAVE_STEPS, max_length=MAX_LENGTH))
    planned = plan.make_plan(profile, CPU, run=copy)
    args = recipe.sft_config(planned.training, copy, CPU, planned.max_steps)
    result = finetune.train(profile, CPU, planned, args=args)
    assert result.status == "finished" and result.global_step == RESUME_MAX_STEPS
    assert (copy.adapter / "adapter_model.safetensors").read_bytes() == (
        RunDir(run_dir).adapter / "adapter_model.safetensors").read_bytes()
    assert (copy.adapter / "tokenizer.json").exists() and not (copy.adapter / "optimizer.pt").exists()
    assert result.run_card["global_step"] == RESUME_MAX_STEPS and result.run_card["tokens_per_second"] is None


@pytest.mark.slow
def test_a_run_saves_its_adapter_settings_and_run_card(interrupted_run):
    run_dir, _ = interrupted_run
    adapter = RunDir(run_dir).adapter
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "tokenizer.json").exists()
    card = RunDir(run_dir).read_card()
    assert card["hyperparameters"]["optimizer"] == "paged_adamw_32bit"
    assert card["data_sha256"] and card["eval_loss_before"] > 0 and card["eval_loss_after"] > 0
    assert card["hyperparameters"]["max_length"] == MAX_LENGTH and card["machine"]
    assert card["tokens_per_second"] > 0 and card["wall_seconds"] > 0
    assert card["gradient_checkpointing"] is True and card["replicas_identical"] is True
    final = TrainerState.load_from_json(str(RunDir(run_dir).checkpoints / f"checkpoint-{RESUME_MAX_STEPS}"
                                            / runs.TRAINER_STATE))
    recorded = RunDir(run_dir).recorded()
    assert card["planned_steps"] == final.max_steps == recorded["planned_steps"] == RESUME_MAX_STEPS
    assert recorded["data_sha256"] == card["data_sha256"] and recorded["processes"] == 1


@pytest.mark.slow
def test_a_resumed_run_logs_one_tensorboard_curve_in_its_folder(interrupted_run):
    run_dir, _ = interrupted_run
    scalars = tracking.read_scalars(run_dir)
    assert scalars.query("tag == 'train/loss'")["step"].tolist() == list(range(1, RESUME_MAX_STEPS + 1))
    evals = scalars.query("tag == 'eval/loss'")["step"].tolist()  # before training, on resuming, at the end
    assert evals[0] == 0 and evals[-1] == RESUME_MAX_STEPS and evals == sorted(set(evals))


@pytest.mark.slow
def test_two_fresh_smoke_trainings_give_the_same_adapter_bit_for_bit(smoke, tmp_path):
    short = replace(smoke, training=replace(smoke.training, max_steps=3, save_steps=3, eval_steps=3))
    results = [finetune.train(short, CPU, plan.make_plan(short, CPU, run=RunDir(tmp_path / name)))
               for name in ("first", "second")]
    adapters = [(result.adapter_dir / "adapter_model.safetensors").read_bytes() for result in results]
    assert adapters[0] == adapters[1]
    assert results[0].losses() == results[1].losses() and len(results[0].losses()["eval"]) == 2


def test_the_card_has_no_after_loss_when_no_evaluation_followed_the_last_step(smoke):
    planned = plan.make_plan(smoke, CPU)
    stopped = TrainerState(global_step=4, log_history=[{"step": 0, "eval_loss": 3.125}, {"step": 4, "loss": 2.9}])
    card = finetune._run_card(planned, {}, stopped, CPU)
    assert (card["eval_loss_before"], card["eval_loss_after"]) == (3.125, None)
    evaluated = TrainerState(global_step=4, log_history=[*stopped.log_history, {"step": 4, "eval_loss": 2.5}])
    assert finetune._run_card(planned, {}, evaluated, CPU)["eval_loss_after"] == 2.5
