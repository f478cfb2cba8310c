"""Library drift: every keyword the helpers pass to the training config classes must exist.

A newer TRL, PEFT, transformers or bitsandbytes that renames a keyword (``max_seq_length`` ->
``max_length``, ``tokenizer`` -> ``processing_class``) breaks a workshop; this catches it in CI.
The check reads the helpers' source, so it needs no model and never skips.
"""

import ast
import inspect

import pytest
from peft import LoraConfig
from transformers import BitsAndBytesConfig, TrainingArguments
from trl import SFTConfig, SFTTrainer

from helpers import config

CHECKED = {cls.__name__: cls for cls in (SFTConfig, LoraConfig, BitsAndBytesConfig, TrainingArguments, SFTTrainer)}
MUST_BE_CALLED = {"SFTConfig", "LoraConfig", "BitsAndBytesConfig", "SFTTrainer"}


def accepted_keywords(cls: type) -> set[str]:
    """Named parameters of ``cls``'s constructor (a catch-all ``**kwargs`` accepts nothing here)."""
    parameters = inspect.signature(cls).parameters.values()
    return {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def keyword_calls(source: str) -> list[tuple[str, str, int]]:
    """``(class name, keyword, line)`` for every keyword passed to a checked class in ``source``."""
    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in CHECKED:
                calls += [(name, kw.arg, node.lineno) for kw in node.keywords if kw.arg is not None]
    return calls


def unknown_keywords(source: str) -> list[str]:
    return [f"line {line}: {name}({keyword}=...) is not a parameter of the installed {name}"
            for name, keyword, line in keyword_calls(source)
            if keyword not in accepted_keywords(CHECKED[name])]


def helper_sources() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted((config.REPO_ROOT / "helpers").glob("*.py"))}


def test_every_keyword_passed_to_a_config_class_exists_in_the_pinned_libraries():
    problems = [f"helpers/{name} {problem}" for name, source in helper_sources().items()
                for problem in unknown_keywords(source)]
    assert not problems, "\n".join(problems)


def test_the_check_sees_every_config_class_the_course_uses():
    called = {name for source in helper_sources().values() for name, _, _ in keyword_calls(source)}
    assert MUST_BE_CALLED <= called, f"not found in helpers/: {MUST_BE_CALLED - called}"


@pytest.mark.parametrize("wrong", [
    "LoraConfig(rank=8)",
    "SFTConfig(output_dir='x', max_seq_length=200)",
    "BitsAndBytesConfig(load_in_4bits=True)",
    "trl.SFTTrainer(model=m, tokenizer=t)",
])
def test_the_check_fails_on_a_renamed_keyword(wrong):
    assert len(unknown_keywords(wrong)) == 1


def test_the_check_passes_current_names():
    assert unknown_keywords("SFTConfig(output_dir='x', max_length=200, completion_only_loss=True)\n"
                            "SFTTrainer(model=m, processing_class=t)") == []
