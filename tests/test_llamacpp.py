"""llama.cpp runs the saved GGUF files: its tokenizer reads the prompts as the model's own, its price distribution
equals the transformers reader's within stated tolerances (the adapter's effect far larger), its quantiser's
q4_K_M is a leaderboard row, and llama.cpp's reference converter writes the tensors and vocabulary the course's
writer writes. ``make test`` installs llama.cpp (``make llama-cpp``); without it these tests are skipped."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import gguf
import numpy as np
import pytest
import torch
from conftest import SHORT_BOOKS, distance
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import config, gguf_export, models, saved_forms
from helpers.hardware import Hardware
from helpers.leaderboard import leaderboard
from helpers.predict import DistributionPredictor, GeneratePredictor

pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: make llama-cpp (make test installs it)")
from helpers import llamacpp  # noqa: E402

# The largest total variation distance over the books between llama.cpp's price distributions and the
# transformers reader's on the merged model in float32, measured here: f16 1.1e-3, q8_0 0.058; the adapter's own
# effect: 0.62. llama.cpp computes an f16 matrix product with its activations rounded to f16, and a q8_0 one with
# them rounded to 8 bits, so its distance is larger than transformers' own reading of the files (test_gguf_export).
F16_TOLERANCE = 0.01
Q8_0_TOLERANCE = 0.1
ADAPTER_EFFECT = 0.3
CPU = Hardware.card("cpu")


@pytest.fixture(scope="module")
def engines(exported, tmp_path_factory) -> dict[str, llamacpp.Engine]:
    """Each GGUF file in llama.cpp: the course's f16 and q8_0, and llama.cpp's own q4_K_M of the f16."""
    folders = {kind: exported[kind] for kind in gguf_export.GGUF_TYPES}
    folders["q4_K_M"] = llamacpp.quantize(exported["f16"], "q4_K_M", tmp_path_factory.mktemp("q4") / "gguf-q4_K_M")
    return {kind: llamacpp.Engine(folder / gguf_export.GGUF_NAME) for kind, folder in folders.items()}


@pytest.fixture(scope="module")
def merged(exported):
    """The merged model (float32) and its tokenizer: the transformers reader's side."""
    return (AutoModelForCausalLM.from_pretrained(exported["merged"], dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(exported["merged"]))


@pytest.mark.slow
def test_llama_cpp_reads_the_prompts_as_the_model_s_tokenizer_but_for_a_book_that_starts_with_a_digit(
        engines, merged, sample_items):
    """llama.cpp's "smollm" pre-tokenizer splits off digits before its whitespace rule, so the blank line before a
    book whose text starts with a digit ("50 Ways to ...") is one token "\n\n" there, two "\n" in SmolLM2's own
    tokenizer (and in training). Every other prompt of the sample reads the same."""
    _, tokenizer = merged
    newline, blank_line = tokenizer.convert_tokens_to_ids(["Ċ", "ĊĊ"])
    question = len(tokenizer(f"{config.QUESTION}")["input_ids"])  # the blank line follows the question's tokens
    starts_with_digit = 0
    for item in sample_items:
        expected = tokenizer(item.test_prompt)["input_ids"]
        if item.text[0].isdigit():
            assert expected[question:question + 2] == [newline, newline]
            expected[question:question + 2] = [blank_line]
            starts_with_digit += 1
        for engine in engines.values():
            assert engine.tokenize(item.test_prompt) == expected
    assert 0 < starts_with_digit < len(sample_items) / 20  # 3 of the sample's 161 books


@pytest.mark.slow
def test_the_distribution_through_llama_cpp_equals_the_transformers_reader_s(engines, merged, short_books, exported):
    model, tokenizer = merged
    prompts = [item.test_prompt for item in short_books]
    expected = DistributionPredictor(model, tokenizer, batch_size=SHORT_BOOKS).distribution(prompts)
    base, _ = models.load_base_model(config.get_profile("smoke"), CPU, quantized=False, dtype=torch.float32,
                                     device="cpu")
    effect = distance(expected, DistributionPredictor(base, tokenizer, batch_size=SHORT_BOOKS).distribution(prompts))
    for kind, tolerance in (("f16", F16_TOLERANCE), ("q8_0", Q8_0_TOLERANCE)):
        predictor = llamacpp.GGUFPredictor(engines[kind])
        assert predictor.path == "digit tree"  # SmolLM2 writes prices digit by digit
        difference = distance(predictor.distribution(prompts), expected)
        print(f"llama.cpp {kind} vs transformers, merged float32: {difference:.3g} (tolerance {tolerance}); "
              f"adapter effect {effect:.3f}")
        assert difference < tolerance
    assert effect > ADAPTER_EFFECT > max(F16_TOLERANCE, Q8_0_TOLERANCE)  # the check can fail


@pytest.mark.slow
def test_the_digit_tree_on_llama_cpp_s_cache_equals_reading_each_branch_from_scratch(engines, short_books):
    """The branches share the prompt's cells in one decode; decoding a price's digits after the prompt alone gives
    the same next-token distribution (within f16 rounding: the products are tiled differently), and another
    first digit a far different one (so the check can fail)."""
    engine = engines["f16"]
    predictor = llamacpp.GGUFPredictor(engine)
    first, digits = predictor.digits.first, predictor.digits.digits
    prompt = engine.tokenize(short_books[0].test_prompt)
    tree = engine.logits(prompt, predictor.branches, range(llamacpp.SEQUENCES))

    def alone(path: list[int]) -> np.ndarray:
        return engine.logits([*prompt, *path[:-1]], [(path[-1], 1, (0,))])[1]

    def log_softmax(logits: np.ndarray) -> np.ndarray:
        return logits - np.logaddexp.reduce(logits)

    # rows: 0 the prompt's last token, 1..9 the first digits d1, then 10 + 10 (d1 - 1) + d2 the second digits
    for row, path in ((1, [first[0]]), (4, [first[3]]), (10, [first[0], digits[0]]), (57, [first[4], digits[7]]),
                      (99, [first[8], digits[9]])):
        assert np.abs(log_softmax(tree[row]) - log_softmax(alone(path))).max() < 0.05, row
        other = [first[(first.index(path[0]) + 1) % 9], *path[1:]]
        assert np.abs(log_softmax(tree[row]) - log_softmax(alone(other))).max() > 1, row


@pytest.mark.slow
def test_greedy_answers_through_llama_cpp_are_the_transformers_model_s(engines, merged, short_books):
    model, tokenizer = merged
    expected = GeneratePredictor(model, tokenizer, batch_size=SHORT_BOOKS)(short_books)
    assert llamacpp.GGUFGeneratePredictor(engines["f16"])(short_books) == expected


@pytest.mark.slow
def test_llama_cpp_s_q4_k_m_is_smaller_and_names_its_type(engines, exported):
    sizes = {kind: engine.path.stat().st_size for kind, engine in engines.items()}
    assert sizes["q4_K_M"] < 0.75 * sizes["q8_0"] < 0.75 * sizes["f16"]
    assert llamacpp.describe(engines["q4_K_M"]) == "SmolLM2-135M-Instruct Book Pricer, GGUF q4_K_M, llama.cpp"
    modelfile = (engines["q4_K_M"].path.parent / gguf_export.MODELFILE_NAME).read_text(encoding="utf-8")
    assert "as a q4_K_M GGUF" in modelfile and "FROM ./model.gguf" in modelfile
    names = {kind: {path.name for path in folder.iterdir()} for kind, folder in
             (("f16", exported["f16"]), ("q4_K_M", engines["q4_K_M"].path.parent))}
    assert names["q4_K_M"] == names["f16"]  # the license files and NOTICE too


@pytest.mark.slow
def test_every_gguf_form_run_by_llama_cpp_is_a_leaderboard_row_against_the_4_bit_model(exported, short_books, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setattr(config, "HOME", tmp_path)
    profile = config.get_profile("smoke")
    ggufs = {kind: exported[kind] for kind in gguf_export.GGUF_TYPES}
    table = saved_forms.score_saved_forms(profile, str(exported["adapter"]), CPU, merged=exported["merged"],
                                          ggufs=ggufs, items=short_books)
    assert table["form"].tolist() == list(saved_forms.FORMS)
    rows = table.set_index("form")
    assert (rows.loc[["GGUF f16", "GGUF q8_0", "GGUF q4_K_M"], "compute"] == "llama.cpp").all()
    assert (rows["books_per_s"] > 0).all()
    assert rows.loc["GGUF q4_K_M", "size_mb"] < rows.loc["GGUF q8_0", "size_mb"] < rows.loc["GGUF f16", "size_mb"]
    q4 = rows.loc["GGUF q4_K_M"]
    assert q4["diff_ci_low"] <= q4["diff"] <= q4["diff_ci_high"] and q4["n"] == SHORT_BOOKS
    assert "| GGUF q4_K_M |" in saved_forms.markdown(table) and "| llama.cpp |" in saved_forms.markdown(table)
    assert len(leaderboard(profile).table()) == len(saved_forms.FORMS)


@pytest.mark.slow
def test_llama_cpp_s_reference_converter_writes_the_same_tensors_and_vocabulary(exported, tmp_path):
    """llama.cpp's own convert_hf_to_gguf.py (in llama-cpp-python's source, which pip keeps from the build) on
    the merged folder: the same tensors, byte for byte, and the same tokens, merges and token types; only
    the metadata differs (the course's prompt, description and license)."""
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(tmp_path),
           next(line for line in llamacpp.REQUIREMENTS.read_text(encoding="utf-8").splitlines()
                if line.startswith("llama-cpp-python=="))]
    subprocess.run(pip, check=True, timeout=600)
    (archive,) = tmp_path.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(archive) as source:
        wanted = [member for member in source.getmembers() if "/vendor/llama.cpp/" in member.name and (
            member.name.endswith("/convert_hf_to_gguf.py") or "/gguf-py/" in member.name
            or "/conversion/" in member.name)]  # the converter, its model classes, and its own gguf package
        source.extractall(tmp_path, members=wanted, filter="data")
    (converter,) = tmp_path.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py")
    reference = tmp_path / "reference.gguf"
    converted = subprocess.run([sys.executable, str(converter), str(exported["merged"]), "--outtype", "f16",
                                "--outfile", str(reference)], timeout=600, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")})
    assert converted.returncode == 0, converted.stderr[-3000:]  # it needs sentencepiece (requirements-gguf.txt)
    ours, theirs = (gguf.GGUFReader(path) for path in (exported["f16"] / gguf_export.GGUF_NAME, reference))
    tensors = {tensor.name: tensor for tensor in theirs.tensors}  # in another order: layer by layer, by name
    assert {tensor.name for tensor in ours.tensors} == set(tensors) and len(tensors) == 272
    for mine in ours.tensors:
        assert mine.tensor_type == tensors[mine.name].tensor_type, mine.name
        assert np.array_equal(mine.data, tensors[mine.name].data), mine.name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre",
                "llama.attention.key_length", "llama.attention.value_length", "llama.rope.freq_base"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    # only what no runner reads differs: the course's description and end-of-text setting; the reference's
    # size label, tags and the base model's organisation and address
    assert set(ours.fields) - set(theirs.fields) == {"general.description", "tokenizer.ggml.add_eos_token"}
    assert set(theirs.fields) - set(ours.fields) == {"general.size_label", "general.tags",
                                                     "general.base_model.0.organization",
                                                     "general.base_model.0.repo_url"}
