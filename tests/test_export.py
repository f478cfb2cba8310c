"""Export: the adapter merged into a 16-bit copy of the base model prices books as the adapter does, and is
saved with its tokenizer, run card and license; pushes fail early, naming the fix."""

from __future__ import annotations

from types import SimpleNamespace

import huggingface_hub
import numpy as np
import psutil
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from helpers import config, export, licensing, models
from helpers.hardware import Hardware
from helpers.predict import DistributionPredictor
from helpers.runs import RunDir, card_in

BOOKS = 3  # the shortest books of the sample: the digit tree costs a few passes per book on a CPU
# Distances between two models' price distributions: the largest total variation over the books (the most
# probability that any set of prices gains or loses). Measured on these books with this adapter:
ADAPTER_EFFECT = 0.3  # with vs without the adapter: 0.62 (the trained smoke adapter: 0.48)
FLOAT32_TOLERANCE = 1e-4  # merged vs attached, both float32 (only the order of the sums differs): 5e-6
# merged vs attached, both bf16 (W + BA rounded to bf16 once, vs Wx and BAx rounded apart): 0.064 (trained: 0.050),
# as far as bf16 itself is from float32 (0.04-0.06); the 4-bit base is 0.23 from float32 with the trained adapter.
BF16_TOLERANCE = 0.15
CPU = Hardware.card("cpu")


@pytest.fixture(scope="module")
def prompts(sample_items) -> list[str]:
    return [item.test_prompt for item in sorted(sample_items, key=lambda item: len(item.text))[:BOOKS]]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, save_adapter):
    """The smoke profile, its state in a temporary folder holding a trained-looking run: a LoRA adapter whose
    B matrices are not zero (a fresh adapter changes nothing) and a run card beside it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "HOME", tmp_path_factory.mktemp("home"))
        profile = config.get_profile("smoke")
        save_adapter(profile, RunDir.default(profile).adapter)
        RunDir.default(profile).write_card({"profile": "smoke", "global_step": 12})
        yield profile


def distribution(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> np.ndarray:
    return DistributionPredictor(model, tokenizer, batch_size=BOOKS).distribution(prompts)


def distance(first: np.ndarray, second: np.ndarray) -> float:
    """The largest total variation distance between the books' price distributions (one row a book) of two models."""
    return float(0.5 * np.abs(first - second).sum(axis=1).max())


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No hub token anywhere: not in the environment, not in a login file."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.mark.slow
def test_the_merged_model_prices_books_as_the_attached_adapter_does(smoke, prompts):
    attached, tokenizer = models.load_finetuned(smoke, None, CPU, quantized=False, dtype=torch.float32, device="cpu")
    with_adapter = distribution(attached, tokenizer, prompts)
    with attached.disable_adapter():
        without = distribution(attached, tokenizer, prompts)
    merged, _ = export.merged_model(smoke, None, CPU, dtype=torch.float32)
    assert not isinstance(merged, PeftModel) and merged.dtype == torch.float32
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    difference = distance(distribution(merged, tokenizer, prompts), with_adapter)
    print(f"float32, merged vs attached: {difference:.2g}; the adapter's effect: {distance(with_adapter, without):.3f}")
    assert difference < FLOAT32_TOLERANCE
    assert distance(with_adapter, without) > ADAPTER_EFFECT  # the adapter matters: the test is not vacuous


@pytest.mark.slow
def test_the_cli_saves_a_bf16_model_with_tokenizer_run_card_and_license(smoke, prompts, tmp_path):
    folder = RunDir(tmp_path).merged
    export.main(["--profile", "smoke", "--output-dir", str(folder)])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and tokenizer.pad_token_id == model.config.pad_token_id
    card = card_in(folder)
    assert card["global_step"] == 12 and card["export"]["dtype"] == "bfloat16"
    assert card["export"]["adapter"] == str(RunDir.default(smoke).adapter)
    assert "Apache License" in (folder / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Apache" in (folder / licensing.NOTICE_FILE).read_text(encoding="utf-8")
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert "license: apache-2.0" in readme and config.QUESTION in readme and "Built with Llama" not in readme

    attached, tokenizer = models.load_finetuned(smoke, None, CPU, quantized=False, dtype=torch.bfloat16, device="cpu")
    difference = distance(distribution(model, tokenizer, prompts), distribution(attached, tokenizer, prompts))
    print(f"bf16, merged vs attached: {difference:.3f}")
    assert difference < BF16_TOLERANCE
    assert export.default_output_dir(smoke, models.adapter_source(smoke)) == RunDir.default(smoke).merged


def test_a_llama_export_carries_its_license_notice_and_name():
    full = config.get_profile("full")
    files = licensing.license_files(full)
    assert files == {"LICENSE.txt": config.REPO_ROOT / "licenses" / "llama3_1_LICENSE.txt",
                     "USE_POLICY.md": config.REPO_ROOT / "licenses" / "llama3_1_USE_POLICY.md"}
    assert licensing.notice(full) in files["LICENSE.txt"].read_text(encoding="utf-8")  # the attribution it prescribes
    card = export.model_card(full, "me/adapter", torch.bfloat16, list(files))
    assert "license: llama3.1" in card and "Built with Llama" in card and "# Llama-3.1-8B Book Pricer" in card


def test_llama_3_2_takes_its_license_from_its_hub_repo(monkeypatch, tmp_path):
    monkeypatch.setattr(licensing, "hf_hub_download", lambda repo, filename, **options: str(tmp_path / filename))
    lite = config.get_profile("lite")
    assert licensing.license_files(lite) == {name: tmp_path / name for name in ("LICENSE.txt", "USE_POLICY.md")}
    assert licensing.notice(lite).startswith("Llama 3.2 is licensed under the Llama 3.2 Community License")


def test_too_little_ram_stops_before_loading_and_names_the_fix(monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=11.5 * export.GIB))  # a free Colab
    with pytest.raises(MemoryError, match=r"about 16 GiB .* 11\.5 GiB available.*High-RAM.*--adapter-only"):
        export.merged_model(config.get_profile("full"), None, CPU)
    export.check_memory(config.get_profile("lite"), torch.bfloat16)  # Llama-3.2-3B fits


def test_a_push_without_a_token_names_hf_token(no_token, tmp_path):
    with pytest.raises(PermissionError, match="HF_TOKEN"):
        export.push_to_hub(tmp_path, "someone/Llama-book-pricer", export.MERGED_MESSAGE)
    with pytest.raises(PermissionError, match="HF_TOKEN"):  # before the merge (full's would not fit here)
        export.main(["--profile", "full", "--push-to-hub", "someone/Llama-book-pricer"])


def test_a_llama_fine_tune_is_pushed_under_a_name_that_begins_with_llama(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(ValueError, match="push to someone/Llama-book-pricer instead"):
        export.main(["--profile", "full", "--adapter-only", "--push-to-hub", "someone/book-pricer"])


def test_adapter_only_pushes_the_adapter_folder_to_a_private_repo(smoke, monkeypatch):
    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(export, "HfApi", lambda token: SimpleNamespace(
        create_repo=lambda *args, **options: calls.append(("create", args, options)),
        upload_folder=lambda **options: calls.append(("upload", options)) or "https://hub/commit"))
    export.main(["--profile", "smoke", "--adapter-only", "--push-to-hub", "someone/book-pricer"])
    assert calls == [("create", ("someone/book-pricer",), {"private": True, "exist_ok": True}),
                     ("upload", {"repo_id": "someone/book-pricer", "commit_message": export.ADAPTER_MESSAGE,
                                 "folder_path": str(RunDir.default(smoke).adapter)})]
