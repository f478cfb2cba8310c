"""QLoRA fine-tuning: a 4-bit base model, a LoRA adapter, TRL's ``SFTTrainer``, resumable runs.

The recipe (every number lives in :class:`helpers.config.TrainingConfig`):

* the base model's linear layers are stored in 4-bit NF4 with double quantisation and
  computed in bf16 (fp16 on older GPUs, float32 on CPU);
* only small LoRA matrices on the attention projections are trained, kept in float32 (the
  master weights of mixed precision: fp16's gradient scaler needs them, and bf16 would round
  away Adam's small updates);
* the loss is taken on the completion ("21.00" + end of sequence) only, never on the prompt;
* a paged AdamW optimiser, a cosine schedule with a short warm-up;
* checkpoints every ``save_steps``: :func:`train` picks up from the newest complete one, and a
  finished run is not trained again.

A run folder holds ``checkpoints/``, the final ``adapter/`` (adapter + tokenizer) and
``run_card.json`` (hyperparameters, data hash, losses, speed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import bitsandbytes as bnb
import torch
from datasets import Dataset
from matplotlib.figure import Figure
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from helpers import assets, config, plan, tracking
from helpers.curate import load_curated, load_manifest
from helpers.environment import Device, detect_device
from helpers.evaluate import save_figure
from helpers.items import Item
from helpers.storage import write_file_atomically, write_folder_atomically

TRAINER_STATE = "trainer_state.json"
SMOLLM2_LABEL = "SmolLM2-135M-Instruct"
# What a checkpoint holds besides the adapter and its tokenizer (left out when the adapter is taken from it).
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", TRAINER_STATE, "training_args.bin")
PLAN_SAMPLE = 200  # training prompts tokenised to measure the mean example length for the plan


# --- the model ---------------------------------------------------------------------------
def compute_dtype(device: Device | None = None) -> torch.dtype:
    """bf16 on GPUs that have it (compute capability >= 8), fp16 on older GPUs (a T4), float32 on CPU."""
    device = device or detect_device()
    if device.kind != "cuda":
        return torch.float32
    return torch.bfloat16 if device.bf16 else torch.float16


def quantization_config(device: Device | None = None) -> BitsAndBytesConfig:
    """4-bit NF4 weights with double quantisation (the QLoRA paper's settings)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(device),
    )


def device_map() -> dict[str, int | str]:
    """The whole model on this process's device: its GPU under ``accelerate launch``, else GPU 0 or CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def model_label(profile: config.Profile) -> str:
    """A short readable name of the base model: "SmolLM2-135M-Instruct", "Llama-3.1-8B" (or its folder's name)."""
    return SMOLLM2_LABEL if profile.base_model == "smollm2" else Path(profile.base_model).name


def base_tokenizer(profile: config.Profile) -> PreTrainedTokenizerBase:
    """The base model's own tokenizer: SmolLM2's in smoke, the hub model's (Llama 3.1) in full."""
    return assets.load_tokenizer(profile.base_model)


def load_base_model(profile: config.Profile, quantized: bool = True, dtype: torch.dtype | None = None,
                    device: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The profile's base model (4-bit unless ``quantized=False``) and its tokenizer.

    ``dtype``: of the weights not stored in 4 bits (default :func:`compute_dtype`); ``device``: where the
    model goes, "cpu" or "cuda:0" (default :func:`device_map`). A gated hub model without an accepted
    license or token raises ``PermissionError`` naming the fix.
    """
    tokenizer = base_tokenizer(profile)
    model = assets.from_hub(
        AutoModelForCausalLM.from_pretrained, assets.model_path(profile.base_model),
        quantization_config=quantization_config() if quantized else None,
        device_map={"": device} if device else device_map(), dtype=dtype or compute_dtype(),
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --- the training set-up -----------------------------------------------------------------
def lora_config(training: config.TrainingConfig) -> LoraConfig:
    """The LoRA adapter: rank, scaling, dropout and the layers it is attached to."""
    return LoraConfig(
        r=training.lora_r,
        lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout,
        target_modules=list(training.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(profile: config.Profile, output_dir: Path, device: Device | None = None,
               run_name: str | None = None) -> SFTConfig:
    """Trainer settings from the profile's :class:`TrainingConfig`; precision follows the device.

    TensorBoard is not in the Trainer's ``report_to``: :func:`make_trainer` adds its logger itself, so
    that the curves live in the run folder (see :mod:`helpers.tracking`).
    """
    training = profile.training
    dtype = compute_dtype(device)
    hosted = [name for name in tracking.trackers(training.report_to) if name != tracking.TENSORBOARD]
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        activation_checkpointing=True,  # recompute activations in the backward pass: less memory
        optim=training.optimizer,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler_type,
        warmup_steps=training.warmup_ratio,  # a float below 1 is a ratio of the total steps
        max_length=training.max_length,
        completion_only_loss=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        eval_strategy="steps",
        eval_steps=training.eval_steps,
        eval_on_start=True,  # the eval loss before any training
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=config.SAVE_TOTAL_LIMIT,
        logging_steps=training.logging_steps,
        include_num_input_tokens_seen="non_padding",
        report_to=hosted or "none",
        run_name=run_name,
        push_to_hub=training.push_to_hub,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned memory only helps copies to a GPU
        seed=config.SEED,
    )


def split_validation(train_items: list[Item]) -> tuple[list[Item], list[Item]]:
    """(train, validation): a seeded slice of the curated train items, so the test set stays unseen."""
    shuffled = random.Random(config.SEED).sample(train_items, len(train_items))
    size = min(config.MAX_VALIDATION_ITEMS, max(1, round(len(train_items) * config.VALIDATION_FRACTION)))
    return shuffled[size:], shuffled[:size]


def sft_dataset(items: list[Item]) -> Dataset:
    """A prompt/completion dataset: the prompt ends at "Price is $", the completion is "21.00".

    TRL appends the end-of-sequence token to each completion and, with
    ``completion_only_loss``, masks the prompt out of the loss.
    """
    return Dataset.from_dict({
        "prompt": [item.test_prompt for item in items],
        "completion": [item.completion for item in items],
    })


def keep_adapter_in_float32(model: PreTrainedModel) -> None:
    """Trainable (LoRA) weights back to float32, as PEFT creates them.

    TRL 1.16 casts the trainable weights of a quantised model to bf16. Under fp16 mixed
    precision (a T4) the gradient scaler then fails at the first optimizer step
    (``_amp_foreach_non_finite_check_and_unscale_cuda`` has no BFloat16 kernel; huggingface/trl#4901),
    and in bf16 AdamW's small updates are rounded away. Autocast still computes in 16 bits.
    """
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def keep_4bit_weights_differentiable(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference in a model that trains.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight the first time it
    runs in eval mode without gradients (the trainer's eval pass) and from then on multiplies with
    ``gemv_4bit``, which has no backward: every later gradient through the frozen layers is wrong.
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def make_trainer(profile: config.Profile, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 train_items: list[Item], eval_items: list[Item], run_dir: Path,
                 device: Device | None = None, resumed_step: int | None = None) -> SFTTrainer:
    """An ``SFTTrainer`` for a 4-bit ``model`` with a fresh float32 LoRA adapter, precision from ``device``.

    Checkpoints go to ``run_dir/checkpoints``; with TensorBoard in ``report_to``, the curves go to
    ``run_dir/tensorboard`` (``resumed_step``: the step of the checkpoint the run resumes from, if any).
    """
    run_dir = Path(run_dir)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, lora_config(profile.training))
    logs = tracking.TENSORBOARD in tracking.trackers(profile.training.report_to)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(profile, checkpoints_dir(run_dir), device, run_name=run_dir.name),
        train_dataset=sft_dataset(train_items),
        eval_dataset=sft_dataset(eval_items),
        processing_class=tokenizer,
        callbacks=[tracking.tensorboard_callback(run_dir, resumed_step)] if logs else None,
    )
    keep_adapter_in_float32(trainer.model)
    keep_4bit_weights_differentiable(trainer.model)
    return trainer


# --- runs --------------------------------------------------------------------------------
def default_run_dir(profile: config.Profile) -> Path:
    return profile.runs_dir / "qlora"


def adapter_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "adapter"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint, like ``get_last_checkpoint``, but skipping one whose save was cut short.

    The Trainer writes ``trainer_state.json`` last, so a folder without it is incomplete.
    """
    complete = [checkpoint for checkpoint in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if (checkpoint / TRAINER_STATE).exists()]
    return str(max(complete, key=lambda checkpoint: int(checkpoint.name.rsplit("-", 1)[1]))) if complete else None


@dataclass
class TrainingResult:
    """What :func:`train` did (``status``: "trained", "resumed" or "finished"), the adapter and the losses."""

    run_dir: Path
    adapter_dir: Path
    status: str
    resumed_from: str | None
    global_step: int
    log_history: list[dict]
    run_card: dict

    def message(self) -> str:
        """One line for the learner: what this call did."""
        if self.status == "finished":
            return (f"This run had already finished ({self.global_step} steps): nothing trained; its adapter is "
                    f"{self.adapter_dir}. To train again, use another output folder or resume=False (--no-resume).")
        start = f"Resumed from {self.resumed_from}" if self.resumed_from else "Trained from scratch"
        return f"{start}: {self.global_step} steps; adapter saved to {self.adapter_dir}"

    def losses(self) -> dict[str, list[tuple[int, float]]]:
        """``{"train": [(step, loss)...], "eval": [(step, eval_loss)...]}`` for the loss-curve plot."""
        return {
            "train": [(log["step"], log["loss"]) for log in self.log_history if "loss" in log],
            "eval": [(log["step"], log["eval_loss"]) for log in self.log_history if "eval_loss" in log],
        }

    def plot_losses(self, path: Path | None = None) -> Figure:
        """Train and eval loss (completion tokens only) against the optimizer step (saved to ``path`` if given)."""
        figure = Figure(figsize=(7, 4))
        axes = figure.subplots()
        for name, points in self.losses().items():
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, marker="o" if name == "eval" else None, label=f"{name} loss")
        axes.set(xlabel="optimizer step", ylabel="cross-entropy on the answer tokens",
                 title=f"QLoRA fine-tuning of {self.run_card['model']} (profile {self.run_card['profile']})")
        axes.legend()
        figure.tight_layout()
        return save_figure(figure, path)


def training_items(profile: config.Profile) -> tuple[list[Item], list[Item]]:
    """(train, validation) items of ``profile``'s curated data."""
    return split_validation(load_curated(profile)[0])


def mean_tokens(tokenizer: PreTrainedTokenizerBase, items: list[Item]) -> float:
    """Mean tokens of a training example (begin, prompt, answer, end), over the first PLAN_SAMPLE items."""
    sample = [item.prompt for item in items[:PLAN_SAMPLE]]
    return statistics.fmean(len(ids) + 1 for ids in tokenizer(sample)["input_ids"])


def training_plan(profile: config.Profile, device: Device | None = None,
                  train_items: list[Item] | None = None) -> plan.TrainingPlan:
    """The plan of :func:`train` for ``profile`` on ``device`` (default: this machine's) and its train items."""
    train_items = training_items(profile)[0] if train_items is None else train_items
    tokens = mean_tokens(base_tokenizer(profile), train_items)
    return plan.plan(profile, len(train_items), tokens, device or detect_device())


def _run_card(profile: config.Profile, the_plan: plan.TrainingPlan, state: TrainerState, validation_items: int,
              resumed_from: str | None, **measured: object) -> dict:
    eval_losses = [log["eval_loss"] for log in state.log_history if "eval_loss" in log]
    train_losses = [log["loss"] for log in state.log_history if "loss" in log]
    return {
        "profile": profile.name,
        "base_model": profile.base_model,
        "model": model_label(profile),
        "device": the_plan.device,
        "hyperparameters": asdict(the_plan.training),
        "data_sha256": load_manifest(profile)["sha256"],
        "train_items": the_plan.items,
        "validation_items": validation_items,
        "global_step": state.global_step,
        "planned_steps": the_plan.steps,
        "planned_minutes": round(the_plan.minutes, 1) if the_plan.minutes is not None else None,
        "resumed_from": Path(resumed_from).name if resumed_from else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "eval_loss_before": eval_losses[0] if eval_losses else None,
        "eval_loss_after": eval_losses[-1] if eval_losses else None,
        **measured,
    }


def _finished(profile: config.Profile, the_plan: plan.TrainingPlan, run_dir: Path, checkpoint: str,
              state: TrainerState, validation_items: int) -> TrainingResult:
    """The result of a run whose last checkpoint is its final step: nothing is trained again.

    If the run stopped after that checkpoint but before saving its adapter, the adapter (and its
    tokenizer) are taken from the checkpoint, and a run card is written without speed figures.
    """
    card_path = run_dir / "run_card.json"
    if not (adapter_dir(run_dir) / "adapter_config.json").exists() or not card_path.exists():
        write_folder_atomically(adapter_dir(run_dir), lambda folder: shutil.copytree(
            checkpoint, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*TRAINER_FILES)))
        card = _run_card(profile, the_plan, state, validation_items, checkpoint, wall_seconds=None,
                         tokens_per_second=None, peak_gpu_memory_gib=None, trainable_parameters=None)
        write_file_atomically(card_path, lambda path: path.write_text(json.dumps(card, indent=2)))
    card = json.loads(card_path.read_text())
    return TrainingResult(run_dir, adapter_dir(run_dir), "finished", None, state.global_step, state.log_history, card)


def train(profile: config.Profile, run_dir: Path | None = None, resume: bool = True,
          device: Device | None = None, planned: plan.TrainingPlan | None = None) -> TrainingResult:
    """Fine-tune the profile's base model on its curated train items; save adapter and run card.

    On a GPU the per-device batch is fitted to its memory (the effective batch is kept, see
    :func:`helpers.plan.fit_batch`). With ``resume`` (the default) an interrupted run continues
    from its newest complete checkpoint in ``run_dir/checkpoints``, and a run that already
    reached its last step is not trained again. ``planned``: the :func:`training_plan` already
    made for this profile and device (else it is made here). The Trainer shows its own progress bar.
    """
    device = device or detect_device()
    run_dir = Path(run_dir or default_run_dir(profile))
    train_items, validation_items = training_items(profile)
    the_plan = planned or training_plan(profile, device, train_items)
    profile = replace(profile, training=the_plan.training)
    resumed_from = last_complete_checkpoint(checkpoints_dir(run_dir)) if resume else None
    state = TrainerState.load_from_json(str(Path(resumed_from) / TRAINER_STATE)) if resumed_from else None
    if state is not None and state.global_step >= the_plan.steps:
        return _finished(profile, the_plan, run_dir, resumed_from, state, len(validation_items))

    tracking.trackers(profile.training.report_to)  # an unknown tracker or a missing wandb stops before the model loads
    model, tokenizer = load_base_model(profile)
    trainer = make_trainer(profile, model, tokenizer, train_items, validation_items, run_dir, device,
                           resumed_step=state.global_step if state else None)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resumed_from)
    wall_seconds = time.perf_counter() - started

    tokens_before = state.num_input_tokens_seen if state else 0
    card = _run_card(
        profile, the_plan, trainer.state, len(validation_items), resumed_from,
        wall_seconds=round(wall_seconds, 1),
        tokens_per_second=round((trainer.state.num_input_tokens_seen - tokens_before)
                                / output.metrics["train_runtime"], 1),
        peak_gpu_memory_gib=(round(torch.cuda.max_memory_allocated() / 2**30, 2)
                             if torch.cuda.is_available() else None),
        trainable_parameters=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    )
    if trainer.is_world_process_zero():  # one writer when `accelerate launch` runs several processes
        write_folder_atomically(adapter_dir(run_dir), lambda folder: (
            trainer.model.save_pretrained(folder), tokenizer.save_pretrained(folder)))
        write_file_atomically(run_dir / "run_card.json", lambda path: path.write_text(json.dumps(card, indent=2)))
    return TrainingResult(run_dir, adapter_dir(run_dir), "resumed" if resumed_from else "trained", resumed_from,
                          trainer.state.global_step, trainer.state.log_history, card)


# --- a model with real shapes and random weights (memory and speed without the hub) --------
def save_random_model(shape: PretrainedConfig, folder: Path, tokenizer: PreTrainedTokenizerBase,
                      layers: int | None = None) -> Path:
    """Save a randomly initialised Llama of ``shape`` (optionally only ``layers`` deep) with ``tokenizer``.

    Random weights cost the same memory and time as trained ones, so such a folder, used as a
    profile's ``base_model``, measures a real model's training without downloading it.
    """
    settings = shape.to_dict()
    settings.update(num_hidden_layers=layers or shape.num_hidden_layers, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(config.SEED)
    model = AutoModelForCausalLM.from_config(type(shape)(**settings), dtype=torch.bfloat16)
    write_folder_atomically(folder, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return Path(folder)
