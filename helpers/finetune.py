"""QLoRA fine-tuning: a 4-bit base model, a LoRA adapter, TRL's ``SFTTrainer``, resumable runs.

The recipe, three objects (notebook 04 writes each one out, argument by argument; the numbers live
in :class:`helpers.config.TrainingConfig`, the batch split in the plan):

* :func:`helpers.models.quantization_config`: the base model's linear layers in 4-bit NF4 with
  double quantisation, computed in bf16 (fp16 on older GPUs, float32 on CPU);
* :func:`lora_config`: small LoRA matrices on the attention projections, trained in float32 (the
  master weights of mixed precision: fp16's gradient scaler needs them, and bf16 would round away
  Adam's small updates);
* :func:`sft_config`: the loss on the completion ("21.00" + end of sequence) only, paged AdamW, a
  cosine schedule with a short warm-up, checkpoints every ``save_steps``.

:func:`train` owns what a learner should not write by hand: the run's key (``run_config.json``,
see :mod:`helpers.runs`), resuming from the newest complete checkpoint, not training a finished run
again, the time budget (:mod:`helpers.budget`), one writer among several processes, and the TRL and
bitsandbytes workarounds below.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import bitsandbytes as bnb
import torch
from datasets import Dataset
from matplotlib.figure import Figure
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_callback import TrainerState
from trl import SFTConfig, SFTTrainer

from helpers import config, tracking
from helpers.budget import Calibration, EvaluateAtTheEnd, TimeBudget
from helpers.evaluate import save_figure
from helpers.hardware import Hardware
from helpers.items import Item
from helpers.models import load_base_model, model_label, quantization_config
from helpers.plan import TrainingPlan, optimizer_steps, training_items
from helpers.runs import TRAINER_FILES, TRAINER_STATE, RunDir, RunMismatch, differences, mismatch_message
from helpers.storage import write_file_atomically, write_folder_atomically


# --- the recipe ----------------------------------------------------------------------------
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


def sft_config(training: config.TrainingConfig, run: RunDir, hardware: Hardware) -> SFTConfig:
    """Trainer settings from a planned :class:`TrainingConfig` (its batch split fitted); precision follows the hardware.

    TensorBoard is not in the Trainer's ``report_to``: :func:`make_trainer` adds its logger itself, so
    that the curves live in the run folder (see :mod:`helpers.tracking`).
    """
    hosted = [name for name in tracking.trackers(training.report_to) if name != tracking.TENSORBOARD]
    return SFTConfig(
        output_dir=str(run.checkpoints),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        activation_checkpointing=True,
        optim=training.optimizer,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler_type,
        warmup_steps=training.warmup_ratio,
        max_length=training.max_length,
        completion_only_loss=True,
        **hardware.amp_flags,
        use_cpu=hardware.kind == "cpu",
        ddp_find_unused_parameters=False,
        eval_strategy="steps",
        eval_steps=training.eval_steps,
        eval_on_start=True,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=config.SAVE_TOTAL_LIMIT,
        logging_steps=training.logging_steps,
        include_num_input_tokens_seen="non_padding",
        report_to=hosted or "none",
        run_name=run.name,
        push_to_hub=training.push_to_hub,
        dataloader_pin_memory=hardware.kind == "cuda",
        seed=config.SEED,
    )


def training_from(args: SFTConfig, lora: LoraConfig, training: config.TrainingConfig) -> config.TrainingConfig:
    """The :class:`TrainingConfig` that the recipe objects hold (what a run is keyed by), so that a setting
    changed in notebook 04's cells keys the run as one changed in the profile does."""
    return replace(
        training, lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules=tuple(sorted(lora.target_modules)) if not isinstance(lora.target_modules, str)
        else (lora.target_modules,),
        learning_rate=args.learning_rate, lr_scheduler_type=str(getattr(args.lr_scheduler_type, "value",
                                                                        args.lr_scheduler_type)),
        warmup_ratio=args.warmup_steps, epochs=args.num_train_epochs, max_steps=args.max_steps,
        batch_size=args.per_device_train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_length=args.max_length, optimizer=str(getattr(args.optim, "value", args.optim)),
        save_steps=int(args.save_steps), eval_steps=int(args.eval_steps), logging_steps=int(args.logging_steps),
    )


def describe_quantization(quantization: BitsAndBytesConfig) -> dict:
    """The quantisation settings that change what a run trains, for its key."""
    return {"quant_type": quantization.bnb_4bit_quant_type, "double_quant": quantization.bnb_4bit_use_double_quant,
            "compute_dtype": str(quantization.bnb_4bit_compute_dtype).removeprefix("torch.")}


def check_recipe(args: SFTConfig, quantization: BitsAndBytesConfig, run: RunDir, hardware: Hardware) -> None:
    """Stop when the recipe objects disagree with the run folder or the hardware (before the model loads)."""
    problems = []
    if Path(args.output_dir).resolve() != run.checkpoints.resolve():
        problems.append(f"output_dir is {args.output_dir}, but the run's checkpoints live in {run.checkpoints}")
    if (args.bf16, args.fp16) != (hardware.amp_flags["bf16"], hardware.amp_flags["fp16"]):
        problems.append(f"bf16={args.bf16}, fp16={args.fp16}, but {hardware.name} trains in {hardware.precision} "
                        f"({hardware.amp_flags})")
    if quantization.bnb_4bit_compute_dtype != hardware.compute_dtype:
        problems.append(f"bnb_4bit_compute_dtype is {quantization.bnb_4bit_compute_dtype}, but {hardware.name} "
                        f"computes in {hardware.compute_dtype}")
    if problems:
        raise ValueError("The recipe does not fit this run:\n  " + "\n  ".join(problems)
                         + "\nBuild it from the same run folder and hardware (notebook 04's cells, or sft_config).")


def sft_dataset(items: list[Item]) -> Dataset:
    """A prompt/completion dataset: the prompt ends at "Price is $", the completion is "21.00".

    TRL appends the end-of-sequence token to each completion and, with
    ``completion_only_loss``, masks the prompt out of the loss.
    """
    return Dataset.from_dict({
        "prompt": [item.test_prompt for item in items],
        "completion": [item.completion for item in items],
    })


# --- workarounds (each with its upstream cause) --------------------------------------------
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


def make_trainer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train_items: list[Item],
                 eval_items: list[Item], run: RunDir, hardware: Hardware, args: SFTConfig, lora: LoraConfig,
                 report_to: str = "tensorboard", resumed_step: int | None = None,
                 callbacks: list | None = None) -> SFTTrainer:
    """An ``SFTTrainer`` for a 4-bit ``model`` with a fresh float32 LoRA adapter.

    With TensorBoard in ``report_to`` the main process logs to ``run/tensorboard`` (``resumed_step``: the
    step of the checkpoint the run resumes from, if any).
    """
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora)
    logs = tracking.TENSORBOARD in tracking.trackers(report_to) and hardware.is_main
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(train_items),
        eval_dataset=sft_dataset(eval_items),
        processing_class=tokenizer,
        callbacks=[EvaluateAtTheEnd(), *(callbacks or []),
                   *([tracking.tensorboard_callback(run.path, resumed_step)] if logs else [])],
    )
    keep_adapter_in_float32(trainer.model)
    keep_4bit_weights_differentiable(trainer.model)
    return trainer


# --- runs ----------------------------------------------------------------------------------
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


def _replica_digest(model: PreTrainedModel) -> str:
    """SHA-256 of the trainable weights: equal on every process when data parallelism keeps them in step."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _run_card(the_plan: TrainingPlan, settings: dict, state: TrainerState, validation_items: int,
              resumed_from: Path | None, **measured: object) -> dict:
    eval_losses = [log["eval_loss"] for log in state.log_history if "eval_loss" in log]
    train_losses = [log["loss"] for log in state.log_history if "loss" in log]
    return {
        "profile": the_plan.profile,
        "base_model": the_plan.base_model,
        "model": the_plan.model,
        "device": the_plan.device,
        "processes": the_plan.processes,
        "hyperparameters": asdict(the_plan.training),
        "data_sha256": the_plan.data_sha256,
        "train_items": the_plan.books,
        "validation_items": validation_items,
        "global_step": state.global_step,
        "planned_steps": the_plan.steps,
        "planned_minutes": round(the_plan.minutes, 1) if the_plan.minutes is not None else None,
        "time_budget": settings.get("calibration"),
        "books_seen": state.global_step * the_plan.effective_batch,
        "resumed_from": resumed_from.name if resumed_from else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "eval_loss_before": eval_losses[0] if eval_losses else None,
        "eval_loss_after": eval_losses[-1] if eval_losses else None,
        **measured,
    }


def _finished(the_plan: TrainingPlan, settings: dict, run: RunDir, checkpoint: Path, state: TrainerState,
              validation_items: int, hardware: Hardware) -> TrainingResult:
    """The result of a run whose last checkpoint is its final step: nothing is trained again.

    If the run stopped after that checkpoint but before saving its adapter, the adapter (and its
    tokenizer) are taken from the checkpoint, and a run card is written without speed figures.
    """
    if hardware.is_main and (not (run.adapter / "adapter_config.json").exists() or not run.card.exists()):
        write_folder_atomically(run.adapter, lambda folder: shutil.copytree(
            checkpoint, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*TRAINER_FILES)))
        card = _run_card(the_plan, settings, state, validation_items, checkpoint, wall_seconds=None,
                         tokens_per_second=None, peak_gpu_memory_gib=None, trainable_parameters=None)
        write_file_atomically(run.card, lambda path: path.write_text(json.dumps(card, indent=2)))
    hardware.barrier()
    return TrainingResult(run.path, run.adapter, "finished", None, state.global_step, state.log_history,
                          run.read_card())


def _with_record(the_plan: TrainingPlan, recorded: dict) -> TrainingPlan:
    """The plan with the recorded batch split and steps: a resumed run keeps them, on another GPU too."""
    split = {name: recorded["training"][name] for name in ("batch_size", "gradient_accumulation_steps")}
    return replace(the_plan, training=replace(the_plan.training, **split), steps=recorded["planned_steps"])


def _gpu_memory() -> dict[str, float | None]:
    """Peak memory allocated and reserved by torch since the last reset (GiB; None without CUDA)."""
    if not torch.cuda.is_available():
        return {"peak_gpu_memory_gib": None, "peak_gpu_reserved_gib": None}
    return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def train(profile: config.Profile, hardware: Hardware, the_plan: TrainingPlan, run: RunDir | None = None,
          resume: bool = True, quantization: BitsAndBytesConfig | None = None, lora: LoraConfig | None = None,
          args: SFTConfig | None = None) -> TrainingResult:
    """Fine-tune the profile's base model on its curated train items; save the adapter and the run card.

    ``the_plan``: :func:`helpers.plan.make_plan` for this profile and ``hardware`` (printed before).
    ``quantization``, ``lora``, ``args``: the recipe's three objects (default: built from the plan by
    :func:`helpers.models.quantization_config`, :func:`lora_config` and :func:`sft_config`). The run in
    ``run`` (default ``runs/<profile>/qlora``) is keyed by what it trains: with ``resume`` (the default)
    an interrupted run with the same settings continues from its newest complete checkpoint, a finished
    one is not trained again, and one with other settings stops with :class:`helpers.runs.RunMismatch`
    naming them. ``resume=False`` starts afresh, deleting the folder's earlier checkpoints first. With
    ``time_budget_minutes`` the run times its first steps and stops inside the budget.
    """
    started = time.perf_counter()
    run = run or RunDir.default(profile)
    quantization = quantization or quantization_config(hardware)
    lora = lora or lora_config(the_plan.training)
    args = copy.deepcopy(args or sft_config(the_plan.training, run, hardware))
    check_recipe(args, quantization, run, hardware)
    training = training_from(args, lora, the_plan.training)
    tracking.trackers(training.report_to)  # an unknown tracker or a missing wandb stops before the model loads
    the_plan = replace(the_plan, training=training, steps=optimizer_steps(the_plan.books, training, hardware.world_size))
    wanted = {**the_plan.settings(), "quantization": describe_quantization(quantization)}

    recorded = hardware.agree(run.recorded() if resume else None)  # one reading: the main process's
    if recorded is not None:
        if diffs := differences(recorded, wanted):
            raise RunMismatch(mismatch_message(run, diffs))
        the_plan, settings = _with_record(the_plan, recorded), recorded
    else:
        if resume and hardware.agree(run.last_checkpoint() is not None):
            raise RunMismatch(mismatch_message(run, ["run_config.json: missing (a run from an older version of the "
                                                     "course), so its settings cannot be checked"]))
        settings = wanted
        if hardware.is_main:
            run.reset()
            run.record(settings)
        hardware.barrier()
    train_items, validation_items = training_items(profile)
    steps = settings.get("budgeted_steps", the_plan.steps)
    checkpoint = run.last_checkpoint()
    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE)) if checkpoint else None
    if state is not None and state.global_step >= steps:
        return _finished(the_plan, settings, run, checkpoint, state, len(validation_items), hardware)

    args.per_device_train_batch_size = args.per_device_eval_batch_size = the_plan.training.batch_size
    args.gradient_accumulation_steps = the_plan.training.gradient_accumulation_steps
    args.max_steps = steps
    callbacks = []
    if training.time_budget_minutes and "budgeted_steps" not in settings:
        def decided(calibration: Calibration) -> None:
            settings.update(budgeted_steps=calibration.chosen_steps, calibration=asdict(calibration))
            if hardware.is_main:
                run.record(settings)
                print(calibration.line(the_plan.effective_batch), flush=True)

        callbacks.append(TimeBudget(training.time_budget_minutes, started, hardware, decided))

    model, tokenizer = load_base_model(profile, hardware, quantization=quantization)
    trainer = make_trainer(model, tokenizer, train_items, validation_items, run, hardware, args, lora,
                           training.report_to, state.global_step if state else None, callbacks)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    tokens = trainer.state.num_input_tokens_seen - (state.num_input_tokens_seen if state else 0)
    replicas = hardware.gather(_replica_digest(trainer.model))
    if hardware.is_main:  # one writer
        def save(folder: Path) -> None:
            trainer.model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        write_folder_atomically(run.adapter, save)
    measured = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "tokens_per_second": round(tokens / output.metrics["train_runtime"], 1),
        **_gpu_memory(),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "replicas_identical": len(set(replicas)) == 1,
        "gradient_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", False)),
    }
    card = _run_card(the_plan, settings, trainer.state, len(validation_items), checkpoint, **measured)
    result = TrainingResult(run.path, run.adapter, "resumed" if checkpoint else "trained",
                            str(checkpoint) if checkpoint else None, trainer.state.global_step,
                            trainer.state.log_history, card)
    del trainer, model  # notebook 04 loads models next: give the GPU memory back
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        card["gpu_memory_after_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    if hardware.is_main:
        write_file_atomically(run.card, lambda path: path.write_text(json.dumps(card, indent=2)))
    hardware.barrier()
    return result
