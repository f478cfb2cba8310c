"""Loading the models: the base model (4-bit or not) and a fine-tuned one (the base with its LoRA adapter).

Training, prediction, the demo and the export all load through here, on the device and in the
precision a :class:`helpers.hardware.Hardware` says, and nothing here imports the training stack
(TRL, datasets). :func:`save_random_model` makes a model of a real shape with random weights: it
costs the memory and time of the trained one, so GPU figures can be measured without the hub.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from helpers import assets, config
from helpers.hardware import Hardware
from helpers.runs import RunDir
from helpers.storage import write_folder_atomically

SMOLLM2_LABEL = "SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name


def model_label(profile: config.Profile) -> str:
    """A short readable name of the base model: "SmolLM2-135M-Instruct", "Llama-3.1-8B" (or its folder's name)."""
    return SMOLLM2_LABEL if profile.base_model == "smollm2" else Path(profile.base_model).name


def base_tokenizer(profile: config.Profile) -> PreTrainedTokenizerBase:
    """The base model's own tokenizer: SmolLM2's in smoke, the hub model's (Llama 3.1) in full."""
    return assets.load_tokenizer(profile.base_model)


def quantization_config(hardware: Hardware) -> BitsAndBytesConfig:
    """4-bit NF4 weights with double quantisation (the QLoRA paper's settings), computed in the device's dtype.

    Notebook 04 writes this object out argument by argument; prediction and the demo load with it.
    """
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=hardware.compute_dtype)


def load_base_model(profile: config.Profile, hardware: Hardware, quantized: bool = True,
                    quantization: BitsAndBytesConfig | None = None, dtype: torch.dtype | None = None,
                    device: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The profile's base model (4-bit unless ``quantized=False``) and its tokenizer.

    ``hardware`` (detected once by the caller) sets the compute dtype and the device; ``quantization``: a
    ``BitsAndBytesConfig`` of your own (default :func:`quantization_config`); ``dtype``: of the weights
    not stored in 4 bits; ``device``: "cpu" or "cuda:0" instead of the hardware's own. A gated hub
    model without an accepted license or token raises ``PermissionError`` naming the fix.
    """
    tokenizer = base_tokenizer(profile)
    if quantized:
        quantization = quantization or quantization_config(hardware)
    model = assets.from_hub(
        AutoModelForCausalLM.from_pretrained, assets.model_path(profile.base_model),
        quantization_config=quantization if quantized else None,
        device_map={"": device} if device else hardware.device_map, dtype=dtype or hardware.compute_dtype,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --- a fine-tuned model: the base with its adapter -----------------------------------------
def adapter_source(profile: config.Profile, adapter: str | Path | None = None) -> str:
    """``adapter`` (a folder or a hub id) as given, else this profile's own run's (``runs/<profile>/qlora/adapter``)."""
    return str(adapter or RunDir.default(profile).adapter)


def adapter_config(adapter: str, profile: config.Profile, default: bool) -> PeftConfig:
    """The adapter's configuration, read before the base model loads; a missing one names the fix."""
    folder = Path(adapter).expanduser()
    if folder.is_dir() or not _HUB_ID.match(adapter):
        if not (folder / "adapter_config.json").exists():
            fix = (f"run notebook 04 or `python -m helpers.train --profile {profile.name}` first, or set "
                   "ADAPTER to a trained adapter" if default else "set ADAPTER to a trained adapter")
            raise FileNotFoundError(f"No LoRA adapter in {folder} (no adapter_config.json): {fix}: its folder "
                                    "(a run's `qlora/adapter`) or its hub id (owner/name).")
        return PeftConfig.from_pretrained(str(folder))
    try:
        return PeftConfig.from_pretrained(adapter, **assets.hub_options())
    except ValueError as error:
        raise FileNotFoundError(
            f"{adapter!r} is neither a folder here nor a LoRA adapter on the Hugging Face hub "
            f"({error.__cause__ or error}). Check the hub id (owner/name) or the folder; a private hub repo "
            "needs HF_TOKEN (Colab: Secrets)."
        ) from error


def finetuned_name(model: PeftModel, profile: config.Profile, adapter: str | Path | None = None) -> str:
    """The leaderboard name of a fine-tuned model: its LoRA rank, the adapter if given, and the base model."""
    source = f", {adapter}" if adapter else ""
    return f"Fine-tuned (QLoRA r={model.peft_config['default'].r}{source}), {model_label(profile)}"


def load_finetuned(profile: config.Profile, adapter: str | Path | None, hardware: Hardware,
                   quantized: bool = True, dtype: torch.dtype | None = None,
                   device: str | None = None) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base model (4-bit unless ``quantized=False``) with a trained LoRA adapter attached, ready for inference.

    ``adapter``: a folder holding ``adapter_config.json``, or the hub id of an adapter repo (say, the one a
    workshop's teacher trained and shared); None: this profile's run (``runs/<profile>/qlora/adapter``).
    The adapter must have been trained on this profile's base model. ``hardware``, ``dtype`` and ``device``:
    as in :func:`load_base_model`.
    """
    source = adapter_source(profile, adapter)
    trained_on = adapter_config(source, profile, default=not adapter).base_model_name_or_path
    expected = assets.model_path(profile.base_model)
    if trained_on and Path(trained_on).name.lower() != Path(expected).name.lower():
        raise ValueError(f"The adapter {source} was trained on {trained_on}, but profile {profile.name!r} loads "
                         f"{expected}: set PROFILE to the profile the adapter was trained with.")
    # the tokenizer saved with the adapter is this one
    base, tokenizer = load_base_model(profile, hardware, quantized=quantized, dtype=dtype, device=device)
    model = PeftModel.from_pretrained(base, source, **assets.hub_options())
    model.eval()
    return model, tokenizer


# --- a model with real shapes and random weights (memory and speed without the hub) --------
def save_random_model(shape: PretrainedConfig, folder: Path, tokenizer: PreTrainedTokenizerBase,
                      layers: int | None = None) -> Path:
    """Save a randomly initialised model of ``shape`` (optionally only ``layers`` deep) with ``tokenizer``.

    Random weights cost the same memory and time as trained ones, so such a folder, used as a
    profile's ``base_model``, measures a real model's training without downloading it.
    """
    settings = shape.to_dict()
    settings.update(num_hidden_layers=layers or shape.num_hidden_layers, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(config.SEED)
    model = AutoModelForCausalLM.from_config(type(shape)(**settings), dtype=torch.bfloat16)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_folder_atomically(folder, save)
    return Path(folder)
