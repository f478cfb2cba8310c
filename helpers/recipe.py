"""The QLoRA recipe: the adapter (``LoraConfig``), the trainer settings (``SFTConfig``) and the data they read.

Notebook 04 writes each object out, argument by argument; the numbers come from a settled
:class:`helpers.plan.TrainingPlan` (the profile's :class:`helpers.config.TrainingConfig`, the batch
split fitted to the device, the steps, and on a resume the run's recorded split and steps). The
quantisation, the third object, is :func:`helpers.models.quantization_config`. :func:`check_recipe`
stops a recipe that is not the plan's before the model loads: what the cells show is what trains.
"""

from __future__ import annotations

from datasets import Dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig
from trl import SFTConfig

from helpers import config, tracking
from helpers.hardware import Hardware
from helpers.items import Item
from helpers.models import quantization_config
from helpers.plan import TrainingPlan
from helpers.runs import RunDir


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


def sft_config(training: config.TrainingConfig, run: RunDir, hardware: Hardware,
               max_steps: int | None = None) -> SFTConfig:
    """Trainer settings from a planned :class:`TrainingConfig` (its batch split fitted) and the plan's
    ``max_steps`` (default ``training.max_steps``); precision follows the hardware.

    TensorBoard is not in the Trainer's ``report_to``: :func:`helpers.finetune.make_trainer` adds its
    logger itself, so that the curves live in the run folder (see :mod:`helpers.tracking`).
    """
    hosted = [name for name in tracking.trackers(training.report_to) if name != tracking.TENSORBOARD]
    return SFTConfig(
        output_dir=str(run.checkpoints),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps if max_steps is None else max_steps,
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


def planned_recipe(planned: TrainingPlan, hardware: Hardware) -> tuple[BitsAndBytesConfig, LoraConfig, SFTConfig]:
    """The three recipe objects of a settled plan, as notebook 04's cells build them."""
    return (quantization_config(hardware), lora_config(planned.training),
            sft_config(planned.training, planned.run, hardware, planned.max_steps))


def _changed(built: dict, planned: dict, prefix: str) -> list[str]:
    return [f"{prefix}.{name} is {built.get(name)!r}, the plan's is {planned[name]!r}"
            for name in planned if built.get(name) != planned[name]]


def check_recipe(planned: TrainingPlan, hardware: Hardware, quantization: BitsAndBytesConfig, lora: LoraConfig,
                 args: SFTConfig) -> None:
    """Stop (before the model loads) when a recipe object is not the one the plan makes on this hardware.

    The run is keyed by the plan's settings, so a value changed in a recipe cell alone would train
    something its run folder does not know: change it in the settings the plan is made from instead.
    """
    expected_quantization, expected_lora, expected_args = planned_recipe(planned, hardware)
    problems = _changed(quantization.to_dict(), expected_quantization.to_dict(), "quantization")
    problems += _changed(lora.to_dict(), expected_lora.to_dict(), "lora")
    problems += _changed(args.to_dict(), expected_args.to_dict(), "args")
    if problems:
        raise ValueError(
            f"The recipe is not the plan's for {hardware.name} ({hardware.precision}):\n  " + "\n  ".join(problems)
            + "\nChange a setting where the plan reads it (the profile's training settings: "
              "replace(profile.training, ...), or --set FIELD=VALUE), make the plan again, then build the recipe "
              "from it (notebook 04's cells, or helpers.recipe.planned_recipe).")


def sft_dataset(items: list[Item] | tuple[Item, ...]) -> Dataset:
    """A prompt/completion dataset: the prompt ends at "Price is $", the completion is "21.00".

    TRL appends the end-of-sequence token to each completion and, with
    ``completion_only_loss``, masks the prompt out of the loss.
    """
    return Dataset.from_dict({
        "prompt": [item.test_prompt for item in items],
        "completion": [item.completion for item in items],
    })
