"""QLoRA fine-tuning: a 4-bit base model, a LoRA adapter, TRL's ``SFTTrainer``, resumable runs.

:func:`train` goes one way down: the settled plan (settings, hardware, books, the run folder and what it
holds, see :func:`helpers.plan.make_plan`), the recipe checked against it (:mod:`helpers.recipe`), the run
folder written (``run_config.json``, see :mod:`helpers.runs`), the models, the trainer, then one writer
saves the adapter and the run card. It also owns what a learner should not write by hand: resuming from
the newest complete checkpoint, not training a finished run again, the time budget
(:mod:`helpers.budget`), one writer among several processes, and the TRL and bitsandbytes workarounds below.
"""

from __future__ import annotations

import gc
import hashlib
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import bitsandbytes as bnb
import torch
from matplotlib.figure import Figure
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase, set_seed
from transformers.trainer_callback import ProgressCallback, TrainerState
from transformers.utils.notebook import NotebookProgressCallback
from trl import SFTConfig, SFTTrainer

from helpers import config, tracking
from helpers.budget import Calibration, EvaluateAtTheEnd, TimeBudget
from helpers.charts import save_figure
from helpers.hardware import Hardware
from helpers.items import Item
from helpers.models import load_base_model
from helpers.plan import TrainingPlan, folder_state
from helpers.recipe import check_recipe, planned_recipe, sft_dataset
from helpers.runs import TRAINER_FILES, TRAINER_STATE, RunDir
from helpers.storage import write_folder_atomically


class StalePlan(ValueError):
    """The run folder changed after the plan was made (a run trained into it since, say)."""


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


def make_trainer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train_items: Sequence[Item],
                 eval_items: Sequence[Item], run: RunDir, hardware: Hardware, args: SFTConfig, lora: LoraConfig,
                 report_to: str = "tensorboard", resumed_step: int | None = None,
                 callbacks: list | None = None) -> SFTTrainer:
    """An ``SFTTrainer`` for a 4-bit ``model`` with a fresh float32 LoRA adapter, its initial weights drawn
    from ``args.seed`` (the same adapter in every run with the same settings).

    With TensorBoard in ``report_to`` the main process logs to ``run/tensorboard`` (``resumed_step``: the
    step of the checkpoint the run resumes from, if any).
    """
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    set_seed(args.seed)  # before the adapter's random init: the Trainer seeds only later, in its __init__
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
    if config.progress_bars_off():  # TQDM_DISABLE=1 turns the Trainer's bar off too; the loss chart follows training
        for bar in (NotebookProgressCallback, ProgressCallback):
            trainer.remove_callback(bar)
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


def _save_adapter(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """The adapter's weights and config, with the tokenizer it was trained with."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _run_card(the_plan: TrainingPlan, settings: dict, state: TrainerState, hardware: Hardware,
              **measured: object) -> dict:
    """The run's results; an eval loss "after" only when an evaluation ran after the last step trained."""
    evaluations = [(log["step"], log["eval_loss"]) for log in state.log_history if "eval_loss" in log]
    train_losses = [log["loss"] for log in state.log_history if "loss" in log]
    after = [loss for step, loss in evaluations if step == state.global_step and step > 0]
    return {
        "profile": the_plan.profile,
        "base_model": the_plan.base_model,
        "model": the_plan.model,
        "device": the_plan.device,
        "machine": hardware.machine,
        "processes": the_plan.processes,
        "hyperparameters": asdict(the_plan.training),
        "data_sha256": the_plan.data_sha256,
        "train_items": the_plan.books,
        "validation_items": len(the_plan.validation_items),
        "global_step": state.global_step,
        "planned_steps": the_plan.steps,
        "planned_minutes": round(the_plan.minutes, 1) if the_plan.minutes is not None else None,
        "time_budget": settings.get("calibration"),
        "books_seen": state.global_step * the_plan.effective_batch,
        "resumed_from": the_plan.checkpoint.name if the_plan.checkpoint else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "eval_loss_before": next((loss for step, loss in evaluations if step == 0), None),
        "eval_loss_after": after[-1] if after else None,
        **measured,
    }


def _finished(the_plan: TrainingPlan, hardware: Hardware) -> TrainingResult:
    """The result of a run whose last checkpoint is its final step: nothing is trained again.

    If the run stopped after that checkpoint but before saving its adapter, the adapter (and its
    tokenizer) are taken from the checkpoint, and a run card is written without speed figures.
    """
    run, checkpoint = the_plan.run, the_plan.checkpoint
    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE))
    if hardware.is_main and (not (run.adapter / "adapter_config.json").exists() or not run.card.exists()):
        write_folder_atomically(run.adapter, lambda folder: shutil.copytree(
            checkpoint, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*TRAINER_FILES)))
        card = _run_card(the_plan, the_plan.recorded, state, hardware, wall_seconds=None, tokens_per_second=None,
                         peak_gpu_memory_gib=None, trainable_parameters=None)
        run.write_card(card)
    hardware.barrier()
    return TrainingResult(run.path, run.adapter, "finished", None, state.global_step, state.log_history,
                          run.read_card())


def _gpu_memory() -> dict[str, float | None]:
    """Peak memory allocated and reserved by torch since the last reset (GiB; None without CUDA)."""
    if not torch.cuda.is_available():
        return {"peak_gpu_memory_gib": None, "peak_gpu_reserved_gib": None}
    return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def check_fresh(the_plan: TrainingPlan, hardware: Hardware) -> RunDir:
    """The plan's run folder, if it still holds what it held when the plan was made."""
    if the_plan.run is None:
        raise ValueError("This plan has no run folder: make it with make_plan(profile, hardware, run=RunDir(...)).")
    now = folder_state(the_plan.run, hardware)
    if now != the_plan.seen:
        checkpoint = f"checkpoint {now[1]}" if now[1] else "no checkpoint"
        raise StalePlan(f"{the_plan.run.path} changed after this plan was made (it now holds {checkpoint}): make "
                        "the plan again, then the recipe from it (notebook 04: run the cells from 'The plan' on), "
                        "and train.")
    return the_plan.run


def train(profile: config.Profile, hardware: Hardware, the_plan: TrainingPlan,
          quantization: BitsAndBytesConfig | None = None, lora: LoraConfig | None = None,
          args: SFTConfig | None = None) -> TrainingResult:
    """Fine-tune the profile's base model on the plan's books; save the adapter and the run card.

    ``the_plan``: :func:`helpers.plan.make_plan` for this profile and ``hardware``, with its run folder
    (``run=``): it says whether the run is new, continues from a checkpoint (its recorded batch split and
    steps) or has finished (nothing trains). ``quantization``, ``lora``, ``args``: the recipe's three objects
    (default: :func:`helpers.recipe.planned_recipe`); they must be the plan's (:func:`helpers.recipe.check_recipe`).
    A new run first clears the folder's earlier checkpoints, adapter and card. With ``time_budget_minutes``
    the run times its first steps and stops inside the budget.
    """
    started = time.perf_counter()
    planned = planned_recipe(the_plan, hardware)
    quantization, lora, args = quantization or planned[0], lora or planned[1], args or planned[2]
    check_recipe(the_plan, hardware, quantization, lora, args)
    run = check_fresh(the_plan, hardware)
    if the_plan.finished:
        return _finished(the_plan, hardware)
    settings = the_plan.recorded or the_plan.settings()
    if the_plan.recorded is None:  # a new run: its key is written before the first step
        if hardware.is_main:
            run.reset()
            run.record(settings)
        hardware.barrier()
    callbacks = []
    if the_plan.time_budget and "budgeted_steps" not in settings:
        def decided(calibration: Calibration) -> None:
            settings.update(budgeted_steps=calibration.chosen_steps, calibration=asdict(calibration))
            if hardware.is_main:
                run.record(settings)
                print(calibration.line(the_plan.effective_batch), flush=True)

        callbacks.append(TimeBudget(the_plan.time_budget, started, hardware, decided))

    model, tokenizer = load_base_model(profile, hardware, quantization=quantization)
    trainer = make_trainer(model, tokenizer, the_plan.train_items, the_plan.validation_items, run, hardware, args,
                           lora, the_plan.training.report_to, the_plan.done_steps or None, callbacks)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    checkpoint = the_plan.checkpoint
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    # the plan read the checkpoint's count: the Trainer's rotation may have deleted that checkpoint by now
    tokens = trainer.state.num_input_tokens_seen - the_plan.done_tokens
    replicas = hardware.gather(_replica_digest(trainer.model))
    if hardware.is_main:  # one writer
        write_folder_atomically(run.adapter, partial(_save_adapter, trainer.model, tokenizer))
    measured = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "tokens_per_second": round(tokens / output.metrics["train_runtime"], 1),
        **_gpu_memory(),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "replicas_identical": len(set(replicas)) == 1,
        "gradient_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", False)),
    }
    card = _run_card(the_plan, settings, trainer.state, hardware, **measured)
    result = TrainingResult(run.path, run.adapter, "resumed" if checkpoint else "trained",
                            str(checkpoint) if checkpoint else None, trainer.state.global_step,
                            trainer.state.log_history, card)
    del trainer, model  # notebook 04 loads models next: give the GPU memory back
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        card["gpu_memory_after_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    if hardware.is_main:
        run.write_card(card)
    hardware.barrier()
    return result
