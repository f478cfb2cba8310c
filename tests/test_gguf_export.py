"""GGUF export: the merged smoke model written as f16 and q8_0 GGUF is read back by an independent reader
(transformers' GGUF loader) with the same tokens and, within stated tolerances, the same price distributions;
its Modelfile renders the training prompt; other architectures stop naming the fix; llama.cpp itself, where
installed, runs the file."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
import torch
from conftest import SHORT_BOOKS, distance
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from helpers import assets, config, evaluate, export, gguf_export, models, saved_forms
from helpers.hardware import Hardware
from helpers.leaderboard import Leaderboard
from helpers.predict import DistributionPredictor
from helpers.runs import RunDir

# The largest total variation distance over the books between the price distributions of the merged model
# and of its GGUF read back, both run in float32, so that only the stored weights differ. Measured here with
# the random adapter: f16 4e-6 (the merged bf16 weights fit float16 exactly, but for a few below its normal
# range), q8_0 0.044 (8-bit weights, one scale per block of 32); the adapter's own effect (with vs without it): 0.62.
F16_TOLERANCE = 1e-3
Q8_0_TOLERANCE = 0.1
ADAPTER_EFFECT = 0.3
CPU = Hardware.card("cpu")


@pytest.fixture(scope="module")
def smoke():
    return config.get_profile("smoke")


@pytest.fixture(scope="module")
def read_back(exported) -> dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]]:
    """Each GGUF as transformers' own GGUF loader reads it, in float32 on the CPU."""
    return {kind: gguf_export.load_gguf(exported[kind], CPU, torch.float32) for kind in gguf_export.GGUF_TYPES}


@pytest.fixture(scope="module")
def prompts(short_books) -> list[str]:
    return [item.test_prompt for item in short_books]


def distribution(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> np.ndarray:
    return DistributionPredictor(model, tokenizer, batch_size=SHORT_BOOKS).distribution(prompts)


def fields(path) -> dict[str, object]:
    """The GGUF file's key-value metadata, arrays as lists."""
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


@pytest.mark.slow
def test_the_cli_writes_f16_and_q8_0_gguf_as_llama_cpp_does(exported):
    merged = AutoModelForCausalLM.from_pretrained(exported["merged"])
    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, merged.config.num_hidden_layers)
    expected = {names.get_name(name, try_suffixes=(".weight",)) for name in merged.state_dict()} - {"output.weight"}
    sizes = {}
    for kind, (matrix_type, _) in gguf_export.GGUF_TYPES.items():
        path = exported[kind] / gguf_export.GGUF_NAME
        tensors = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(path).tensors}
        assert set(tensors) == expected  # the tied output matrix is the embedding's, as llama.cpp reads it
        assert {tensors[name] for name in tensors if name.endswith("_norm.weight")} == {gguf.GGMLQuantizationType.F32}
        assert {tensors[name] for name in tensors if not name.endswith("_norm.weight")} == {matrix_type}
        meta = fields(path)
        assert meta["general.architecture"] == "llama" and meta["general.license"] == "apache-2.0"
        assert meta["general.name"] == "SmolLM2-135M-Instruct Book Pricer"
        assert "12 steps on 48 books" in meta["general.description"] and config.QUESTION in meta["general.description"]
        assert meta["general.base_model.0.name"] == config.SMOLLM2_HUB_ID
        assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
        merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
        assert len(meta["tokenizer.ggml.merges"]) == len(merges)
        assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
                meta["tokenizer.ggml.padding_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                             tokenizer.pad_token_id)
        assert meta["tokenizer.ggml.add_bos_token"] is False  # SmolLM2's prompts start without bos, as in training
        assert {"Modelfile", "LICENSE.txt", "NOTICE"} <= {file.name for file in exported[kind].iterdir()}
        sizes[kind] = path.stat().st_size
    assert sizes["q8_0"] < 0.6 * sizes["f16"]


@pytest.mark.slow
def test_the_gguf_reads_back_with_the_same_tokens_and_price_distributions(smoke, exported, read_back, prompts,
                                                                          sample_items):
    merged = AutoModelForCausalLM.from_pretrained(exported["merged"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    expected = distribution(merged, tokenizer, prompts)
    base, _ = models.load_base_model(smoke, CPU, quantized=False, dtype=torch.float32, device="cpu")
    effect = distance(expected, distribution(base, tokenizer, prompts))
    every_prompt = [item.test_prompt for item in sample_items]
    for kind, tolerance in (("f16", F16_TOLERANCE), ("q8_0", Q8_0_TOLERANCE)):
        model, read_tokenizer = read_back[kind]
        assert read_tokenizer(every_prompt)["input_ids"] == tokenizer(every_prompt)["input_ids"]
        assert (read_tokenizer.bos_token, read_tokenizer.eos_token, read_tokenizer.pad_token) == (
            tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
        chat = read_tokenizer.apply_chat_template([{"role": "user", "content": sample_items[0].text}], tokenize=False)
        assert chat == sample_items[0].test_prompt  # llama.cpp's chat mode sends the training prompt too
        difference = distance(distribution(model, read_tokenizer, prompts), expected)
        print(f"{kind} GGUF vs merged, float32: {difference:.3g} (tolerance {tolerance}); adapter effect {effect:.3f}")
        assert difference < tolerance
    assert effect > ADAPTER_EFFECT > max(F16_TOLERANCE, Q8_0_TOLERANCE)  # the check can fail


@pytest.mark.slow
def test_the_modelfile_template_is_the_training_prompt(exported, sample_items):
    text = (exported["q8_0"] / gguf_export.MODELFILE_NAME).read_text(encoding="utf-8")
    instructions = re.findall(r"^([A-Z]+) ", text, re.M)
    assert instructions[:2] == ["FROM", "TEMPLATE"] and "FROM ./model.gguf\n" in text
    (template,) = re.findall(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S)
    for item in sample_items[:10]:
        assert template.replace("{{ .Prompt }}", item.text) == item.test_prompt  # as Ollama fills it in
    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    assert re.findall(r"^PARAMETER (\w+) (.+)$", text, re.M) == [
        ("temperature", "0"), ("num_predict", "8"), ("stop", f'"{tokenizer.eos_token}"')]
    assert "ollama create book-pricer -f Modelfile" in text and "Apache License" in text


def test_the_q_and_k_permutation_is_the_one_transformers_reads_back():
    weights = np.arange(2 * 64 * 12, dtype=np.float32).reshape(2 * 64, 12)  # two heads of 64 rows
    permuted = gguf_export.permute(weights, heads=2)
    assert not np.array_equal(permuted, weights)
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(permuted, 2, 2), weights)
    # within a head, row 2i and 2i+1 (llama.cpp's rotated pair) are HF's rows i and i + 32
    assert np.array_equal(permuted[[0, 1, 2, 3]], weights[[0, 32, 1, 33]])


def test_llama_3_rope_scaling_is_written_as_the_factors_transformers_applies():
    llama = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters={  # Llama 3.1's
        "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](llama)
    plain = 1.0 / 500_000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    factors = gguf_export.rope_factors(llama)
    assert factors.shape == (64,) and factors.min() == 1.0 and factors.max() == 8.0
    np.testing.assert_allclose(factors, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert gguf_export.rope_factors(LlamaConfig()) is None  # no scaling, no rope_freqs tensor


@pytest.mark.parametrize("settings", [
    Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64, architectures=["Qwen2ForCausalLM"]),
    MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=64, architectures=["MistralForCausalLM"]),
], ids=["qwen2", "mistral"])
def test_another_architecture_stops_naming_what_is_supported_and_llama_cpp(settings, tmp_path):
    run = RunDir(tmp_path)
    AutoModelForCausalLM.from_config(settings).save_pretrained(run.merged)
    with pytest.raises(ValueError, match=rf"holds a {settings.architectures[0]} model.*LlamaForCausalLM "
                                         r"\(Llama 3\.x, SmolLM2\) only.*llama\.cpp.*convert_hf_to_gguf\.py"):
        gguf_export.convert(config.get_profile("smoke"), run.merged, "q8_0")
    assert not run.gguf("q8_0").exists()


def test_the_saved_forms_table_compares_each_form_with_the_4_bit_model_on_the_same_books(tmp_path):
    board = Leaderboard(tmp_path / "leaderboard.csv")
    truths = np.array([10.0, 20.0, 30.0, 40.0])
    reference, adapter = "Fine-tuned (QLoRA r=8), SmolLM2-135M-Instruct", "runs/smoke/qlora/adapter"
    keys = saved_forms.form_keys(adapter)
    for name, form, errors in [("Constant (train mean)", None, [9, 9, 9, 9]), (f"{reference}, GGUF q8_0", "GGUF q8_0",
                               [3, 4, 3, 6]), (reference, "4-bit + adapter", [2, 4, 2, 4]),
                               (f"{reference}, merged bfloat16", "merged 16-bit", [1, 3, 2, 2])]:
        evaluation = evaluate.Evaluation(name, truths, truths + np.array(errors, dtype=float), failures=[])
        board.record(evaluation, **({"key": keys[form], "form": form, "size_mb": 1.0} if form else
                                    {"train_items": 60}))
    table = saved_forms.saved_forms(board, adapter)
    assert table["form"].tolist() == ["4-bit + adapter", "merged 16-bit", "GGUF q8_0"]  # the baseline left out
    assert table["diff"].tolist() == pytest.approx([0.0, -1.0, 1.0])
    assert (table["diff_ci_low"] <= table["diff"]).all() and (table["diff"] <= table["diff_ci_high"]).all()
    lines = saved_forms.markdown(table).splitlines()
    assert "| reference |" in lines[2] and "| -1.00 (" in lines[3] and lines[0].count("|") == lines[3].count("|")


@pytest.fixture(scope="module")
def llama_3(tmp_path_factory):
    """A merged folder shaped like a Llama 3.1 export: a random 1-layer Llama with Llama 3.1's rope scaling and
    untied output, saved with the offline Llama 3.1 tokenizer; and its q8_0 GGUF folder."""
    folder = RunDir(tmp_path_factory.mktemp("llama")).merged
    settings = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128_256, tie_word_embeddings=False,
                           architectures=["LlamaForCausalLM"], rope_parameters={
                               "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    AutoModelForCausalLM.from_config(settings).save_pretrained(folder)
    assets.llama3_tokenizer_offline().save_pretrained(folder)
    return folder, gguf_export.convert(config.get_profile("full"), folder, "q8_0")


@pytest.mark.slow
def test_a_llama_3_export_names_its_pre_tokenizer_bos_rope_factors_and_license(llama_3):
    folder, exported = llama_3
    tokenizer = AutoTokenizer.from_pretrained(folder)
    path = exported / gguf_export.GGUF_NAME
    meta = fields(path)
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and meta["tokenizer.ggml.add_bos_token"] is True
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(config.LLAMA_PAD_TOKEN))
    assert meta["general.license"] == "llama3.1" and meta["general.name"].startswith("Llama")  # as its license asks
    types = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]))
    assert types["<|eot_id|>"] == gguf.TokenType.CONTROL and types["Price"] == gguf.TokenType.NORMAL
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    assert {"output.weight", "rope_freqs.weight"} <= set(tensors)  # the untied output, Llama 3's rope scaling
    assert tensors["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.slow
def test_a_llama_3_gguf_tokenizes_as_the_llama_3_tokenizer(llama_3, sample_items):
    folder, exported = llama_3
    prompts = [item.test_prompt for item in sample_items]
    read_back = AutoTokenizer.from_pretrained(exported, gguf_file=gguf_export.GGUF_NAME)
    assert read_back(prompts)["input_ids"] == AutoTokenizer.from_pretrained(folder)(prompts)["input_ids"]


def test_gguf_goes_with_a_merge_not_with_adapter_only(capsys):
    with pytest.raises(SystemExit):
        export.parse_args(["--adapter-only", "--push-to-hub", "someone/book-pricer", "--gguf", "q8_0"])
    assert "--gguf converts the merged model" in capsys.readouterr().err
    assert export.parse_args(["--gguf", "f16", "q8_0"]).gguf == ["f16", "q8_0"]


@pytest.mark.slow
def test_llama_cpp_reads_a_llama_3_gguf_s_prompts_as_the_llama_3_tokenizer(llama_3, sample_items):
    """The full profile's tokenizer in llama.cpp ("llama-bpe"): every sample prompt, the same ids; every price one
    token, so llama.cpp reads the distribution from the prompt's last logits."""
    pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: make llama-cpp (make test installs it)")
    from helpers import llamacpp

    folder, exported = llama_3
    engine = llamacpp.Engine(exported / gguf_export.GGUF_NAME)
    prompts = [item.test_prompt for item in sample_items]
    expected = AutoTokenizer.from_pretrained(folder)(prompts)["input_ids"]
    assert [engine.tokenize(prompt) for prompt in prompts] == expected
    assert llamacpp.GGUFPredictor(engine).path == "single-token"
    engine.close()
