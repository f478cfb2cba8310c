"""Workshop mode: notebook 05 scores an adapter given as a folder or a hub id (``load_finetuned``)."""

import huggingface_hub
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import config, models
from helpers.hardware import Hardware

TINY_BASE = "tiny-org/Tiny-Llama"  # the base model id the tiny adapter records
TOKENS = torch.tensor([[1, 5, 9, 14, 3]])
CPU = Hardware.card("cpu")


def tiny_base() -> LlamaForCausalLM:
    """The same tiny random Llama every call (a stand-in for the profile's base model)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.name_or_path = TINY_BASE  # what from_pretrained sets, and the adapter records
    return model


@pytest.fixture
def profile(monkeypatch, tmp_path):
    """A profile on the tiny base model, its state under tmp_path, with no real model to load."""
    monkeypatch.setattr(config, "HOME", tmp_path)
    monkeypatch.setattr(models, "load_base_model", lambda profile, *args, **options: (tiny_base(), "its tokenizer"))
    return config.get_profile("smoke", base_model=TINY_BASE)


@pytest.fixture
def adapter(tmp_path):
    """A trained-looking LoRA adapter folder (non-zero B matrices) and the logits it gives."""
    torch.manual_seed(1)
    model = get_peft_model(tiny_base(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path / "teacher-adapter"
    model.save_pretrained(folder)
    with torch.inference_mode():
        return folder, model(TOKENS).logits


def test_an_adapter_folder_is_loaded_on_the_base_model(profile, adapter):
    folder, logits = adapter
    model, tokenizer = models.load_finetuned(profile, str(folder), CPU)
    assert isinstance(model, PeftModel) and not model.training and tokenizer == "its tokenizer"
    with torch.inference_mode():
        assert torch.allclose(model(TOKENS).logits, logits, atol=1e-6)
        with model.disable_adapter():
            assert not torch.allclose(model(TOKENS).logits, logits, atol=1e-3)  # the adapter changes the answer


def test_no_run_yet_names_notebook_04_and_the_adapter_parameter(profile):
    with pytest.raises(FileNotFoundError, match="notebook 04.*ADAPTER"):
        models.load_finetuned(profile, None, CPU)


def test_a_folder_without_an_adapter_names_the_fix(profile, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json.*set ADAPTER"):
        models.load_finetuned(profile, tmp_path / "runs" / "elsewhere", CPU)


def test_an_adapter_for_another_base_model_names_the_profile_to_pick(profile, adapter):
    with pytest.raises(ValueError, match="trained on tiny-org/Tiny-Llama.*set PROFILE"):
        models.load_finetuned(config.get_profile("smoke", base_model="meta-llama/Llama-3.2-3B"), str(adapter[0]), CPU)


def test_an_unknown_hub_id_names_the_fix(profile, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: the same error, at once
    with pytest.raises(FileNotFoundError, match="neither a folder here nor a LoRA adapter on the Hugging Face hub"):
        models.load_finetuned(profile, "nobody-here/no-such-adapter", CPU)
