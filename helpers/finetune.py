"""QLoRA fine-tuning: a 4-bit base model, a LoRA adapter, TRL's ``SFTTrainer``, resumable runs.

The recipe (every number lives in :class:`helpers.config.TrainingConfig`):

* the base model's linear layers are stored in 4-bit NF4 with double quantisation and
  computed in bf16 (fp16 on older GPUs, float32 on CPU);
* only small LoRA matrices on the attention projections are trained;
* the loss is taken on the completion ("21.00" + end of sequence) only, never on the prompt;
* a paged AdamW optimiser, a cosine schedule with a short warm-up;
* checkpoints every ``save_steps``: :func:`train` picks up from the newest complete one.

A run folder holds ``checkpoints/``, the final ``adapter/`` (adapter + tokenizer) and
``run_card.json`` (hyperparameters, data hash, losses, speed).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from matplotlib.figure import Figure
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig,
                          PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase)
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from helpers import assets, config
from helpers.curate import load_curated, load_manifest
from helpers.items import Item
from helpers.storage import write_file_atomically, write_folder_atomically

TRAINER_STATE = "trainer_state.json"
SMOLLM2_LABEL = "SmolLM2-135M-Instruct"

# Llama-3.1-8B's published shape (its config.json), so that memory can be estimated offline.
LLAMA_3_1_8B_SHAPE = LlamaConfig(
    vocab_size=128_256, hidden_size=4_096, intermediate_size=14_336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
)


# --- the model ---------------------------------------------------------------------------
def compute_dtype() -> torch.dtype:
    """bf16 on GPUs that have it (compute capability >= 8), fp16 on older GPUs, float32 on CPU."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16


def quantization_config() -> BitsAndBytesConfig:
    """4-bit NF4 weights with double quantisation (the QLoRA paper's settings)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(),
    )


def device_map() -> dict[str, int | str]:
    """The whole model on this process's device: its GPU under ``accelerate launch``, else GPU 0 or CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def model_label(profile: config.Profile) -> str:
    """A short readable name of the base model: "SmolLM2-135M-Instruct", "Llama-3.1-8B"."""
    return SMOLLM2_LABEL if profile.base_model == "smollm2" else profile.base_model.rsplit("/", 1)[-1]


def base_tokenizer(profile: config.Profile) -> PreTrainedTokenizerBase:
    """The base model's own tokenizer: SmolLM2's in smoke, the hub model's (Llama 3.1) in full."""
    return assets.load_tokenizer(profile.base_model)


def load_base_model(profile: config.Profile, quantized: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The profile's base model (4-bit unless ``quantized=False``) and its tokenizer.

    A gated hub model without an accepted license or token raises ``PermissionError`` naming the fix.
    """
    tokenizer = base_tokenizer(profile)
    model = assets.from_hub(
        AutoModelForCausalLM.from_pretrained, assets.model_path(profile.base_model),
        quantization_config=quantization_config() if quantized else None,
        device_map=device_map(), dtype=compute_dtype(),
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


def sft_config(profile: config.Profile, output_dir: Path) -> SFTConfig:
    """Trainer settings from the profile's :class:`TrainingConfig`; precision follows the device."""
    training = profile.training
    dtype = compute_dtype()
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
        report_to=training.report_to,
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


def make_trainer(profile: config.Profile, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 train_items: list[Item], eval_items: list[Item], output_dir: Path) -> SFTTrainer:
    """An ``SFTTrainer`` for a 4-bit ``model`` with a fresh LoRA adapter."""
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, lora_config(profile.training))
    return SFTTrainer(
        model=model,
        args=sft_config(profile, output_dir),
        train_dataset=sft_dataset(train_items),
        eval_dataset=sft_dataset(eval_items),
        processing_class=tokenizer,
    )


# --- runs --------------------------------------------------------------------------------
def default_run_dir(profile: config.Profile) -> Path:
    return profile.runs_dir / "qlora"


def adapter_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "adapter"


def last_complete_checkpoint(checkpoints_dir: Path) -> str | None:
    """The newest checkpoint, like ``get_last_checkpoint``, but skipping one whose save was cut short.

    The Trainer writes ``trainer_state.json`` last, so a folder without it is incomplete.
    """
    complete = [folder for folder in Path(checkpoints_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if (folder / TRAINER_STATE).exists()]
    return str(max(complete, key=lambda folder: int(folder.name.rsplit("-", 1)[1]))) if complete else None


@dataclass
class TrainingResult:
    """What :func:`train` did: where the adapter is, whether it resumed, and the logged losses."""

    run_dir: Path
    adapter_dir: Path
    resumed_from: str | None
    global_step: int
    log_history: list[dict]
    run_card: dict

    def losses(self) -> dict[str, list[tuple[int, float]]]:
        """``{"train": [(step, loss)...], "eval": [(step, eval_loss)...]}`` for the loss-curve plot."""
        return {
            "train": [(log["step"], log["loss"]) for log in self.log_history if "loss" in log],
            "eval": [(log["step"], log["eval_loss"]) for log in self.log_history if "eval_loss" in log],
        }

    def plot_losses(self) -> Figure:
        """Train and eval loss (completion tokens only) against the optimizer step."""
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
        return figure


def train(profile: config.Profile, run_dir: Path | None = None, resume: bool = True) -> TrainingResult:
    """Fine-tune the profile's base model on its curated train items; save adapter and run card.

    With ``resume`` (the default) an interrupted run continues from its newest complete
    checkpoint in ``run_dir/checkpoints``. The Trainer shows its own progress bar.
    """
    run_dir = Path(run_dir or default_run_dir(profile))
    checkpoints_dir = run_dir / "checkpoints"
    train_items, validation_items = split_validation(load_curated(profile)[0])
    model, tokenizer = load_base_model(profile)
    trainer = make_trainer(profile, model, tokenizer, train_items, validation_items, checkpoints_dir)
    resumed_from = last_complete_checkpoint(checkpoints_dir) if resume else None
    tokens_before = (TrainerState.load_from_json(str(Path(resumed_from) / TRAINER_STATE)).num_input_tokens_seen
                     if resumed_from else 0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resumed_from)
    wall_seconds = time.perf_counter() - started

    history = trainer.state.log_history
    eval_losses = [log["eval_loss"] for log in history if "eval_loss" in log]
    train_losses = [log["loss"] for log in history if "loss" in log]
    card = {
        "profile": profile.name,
        "base_model": profile.base_model,
        "model": model_label(profile),
        "hyperparameters": asdict(profile.training),
        "data_sha256": load_manifest(profile)["sha256"],
        "train_items": len(train_items),
        "validation_items": len(validation_items),
        "global_step": trainer.state.global_step,
        "resumed_from": Path(resumed_from).name if resumed_from else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "eval_loss_before": eval_losses[0] if eval_losses else None,
        "eval_loss_after": eval_losses[-1] if eval_losses else None,
        "wall_seconds": round(wall_seconds, 1),
        "tokens_per_second": round((trainer.state.num_input_tokens_seen - tokens_before)
                                   / output.metrics["train_runtime"], 1),
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                if torch.cuda.is_available() else None),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    if trainer.is_world_process_zero():  # one writer when `accelerate launch` runs several processes
        write_folder_atomically(adapter_dir(run_dir), lambda folder: (
            trainer.model.save_pretrained(folder), tokenizer.save_pretrained(folder)))
        write_file_atomically(run_dir / "run_card.json", lambda path: path.write_text(json.dumps(card, indent=2)))
    return TrainingResult(run_dir, adapter_dir(run_dir), resumed_from, trainer.state.global_step, history, card)


# --- memory ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """A rough GPU memory budget for QLoRA training, in GiB."""

    parameters: float  # the model's parameter count (not GiB)
    weights: float
    adapter_and_optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.adapter_and_optimizer + self.activations + self.overhead


def model_shape(model: str | PretrainedConfig) -> PretrainedConfig:
    """A model's configuration without downloading weights (Llama-3.1-8B's is built in)."""
    if isinstance(model, PretrainedConfig):
        return model
    if model == config.LLAMA_HUB_ID:
        return LLAMA_3_1_8B_SHAPE
    return assets.from_hub(AutoConfig.from_pretrained, assets.model_path(model))


def parameter_count(shape: PretrainedConfig) -> dict[str, int]:
    """Parameters of a Llama-style decoder: ``linear`` (quantised to 4-bit) and ``embeddings`` (kept 16-bit)."""
    hidden, layers = shape.hidden_size, shape.num_hidden_layers
    head_dim = getattr(shape, "head_dim", None) or hidden // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    attention = 2 * hidden * hidden + 2 * hidden * kv  # q, o and k, v projections
    mlp = 3 * hidden * shape.intermediate_size  # gate, up, down
    embeddings = shape.vocab_size * hidden * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * layers + 1) * hidden
    return {"linear": layers * (attention + mlp), "embeddings": embeddings + norms}


def lora_parameter_count(shape: PretrainedConfig, training: config.TrainingConfig) -> int:
    """LoRA adds ``r * (in + out)`` parameters to each targeted projection of each layer."""
    hidden = shape.hidden_size
    head_dim = getattr(shape, "head_dim", None) or hidden // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    sizes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
             "gate_proj": (hidden, shape.intermediate_size), "up_proj": (hidden, shape.intermediate_size),
             "down_proj": (shape.intermediate_size, hidden)}
    per_layer = sum(training.lora_r * sum(sizes[name]) for name in training.target_modules)
    return shape.num_hidden_layers * per_layer


def memory_estimate(model: str | PretrainedConfig, training: config.TrainingConfig,
                    overhead_gib: float = 1.0) -> MemoryEstimate:
    """Rough GPU memory to QLoRA-train ``model`` (a model id, ``"smollm2"`` or a config) with ``training``.

    * weights: linear layers in NF4 at 4 bits plus ~0.127 bits of double-quantised scales
      per parameter; embeddings and the output head stay 16-bit;
    * adapter: LoRA weights, gradients and AdamW's two moments, all float32 (16 bytes each);
    * activations with gradient checkpointing: one 16-bit hidden state per layer per token, one
      layer's full activations (~34 hidden-sized values per token) recomputed at a time, and the
      float32 logits over the whole vocabulary;
    * overhead: CUDA context and allocator slack (``overhead_gib``).

    Expect the truth within ~30%: kernels, fragmentation and sequence lengths vary.
    """
    shape = model_shape(model)
    counts = parameter_count(shape)
    tokens = training.batch_size * training.max_length
    weights = counts["linear"] * (4 + 0.127) / 8 + counts["embeddings"] * 2
    adapter = lora_parameter_count(shape, training) * 16
    activations = tokens * (shape.num_hidden_layers * shape.hidden_size * 2
                            + 34 * shape.hidden_size * 2 + shape.vocab_size * 4)
    gib = 2**30
    return MemoryEstimate(parameters=sum(counts.values()), weights=weights / gib,
                          adapter_and_optimizer=adapter / gib, activations=activations / gib,
                          overhead=overhead_gib)

