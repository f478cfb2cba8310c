"""Run the model anywhere: the merged fine-tune as one GGUF file for llama.cpp and Ollama.

    python -m helpers.export --gguf f16|q8_0 [--profile P] [--adapter A] [--output-dir D]

merges the adapter (:func:`helpers.export.save_merged`, into ``merged/`` or ``D``) and converts that folder
(:func:`convert`) into ``gguf-<type>/`` beside it: ``model.gguf``, an Ollama ``Modelfile``, the license
texts and NOTICE. Supported: ``LlamaForCausalLM`` checkpoints, that is Llama 3.x and SmolLM2, the models
this course trains; any other architecture stops with a message naming llama.cpp's own converter.

The file is written as llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel``) writes a Llama:

* tensors named by gguf's own name map (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``);
  the q and k projections permuted back from Hugging Face's rotary layout (each head's rotated pairs
  are its two halves) to llama.cpp's (adjacent pairs), as transformers' GGUF loader undoes on reading;
* ``f16``: every matrix in float16; ``q8_0``: every matrix in blocks of 32 weights sharing one scale,
  8 bits each (about half the size); 1-D tensors and norms stay float32, as llama.cpp needs;
* Llama 3's rope scaling as the ``rope_freqs`` tensor llama.cpp reads (transformers' GGUF loader ignores
  it, so a Llama 3.x file read back by transformers runs without that scaling; SmolLM2 has none);
* the tokenizer: its byte-level BPE tokens, merges and token types, the bos/eos/pad/unk ids, whether a
  prompt starts with bos, and the pre-tokenizer named from the tokenizer's own output as llama.cpp
  names it ("llama-bpe" for Llama 3, "smollm" for SmolLM2);
* the course's prompt as the chat template (the last message is the book), and the model's name,
  license and a description with the run card's key facts.

:mod:`helpers.saved_forms` scores each saved form by the course's harness.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from helpers import config, licensing, models, predict
from helpers.hardware import Hardware
from helpers.runs import RunDir, card_in
from helpers.storage import write_folder_atomically

GGUF_NAME = "model.gguf"
MODELFILE_NAME = "Modelfile"
GGUF_TYPES = {"f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
              "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "Llama 3.x, SmolLM2"}
SUPPORTED_ROPE = ("default", "llama3")
LLAMA_CPP = "https://github.com/ggml-org/llama.cpp"
# llama.cpp names a BPE pre-tokenizer by the sha256 of the token ids its tokenizer gives this text
# (convert_hf_to_gguf.py, get_vocab_base_pre): the same text and hashes, for the tokenizers of the course.
PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
}
NUM_PREDICT = predict.MAX_NEW_TOKENS + 2  # "999.00" digit by digit, then the end of text
MODELFILE = '''# {name}: the Book Pricer fine-tune as a {kind} GGUF, for Ollama (https://ollama.com).
#
#   ollama create book-pricer -f Modelfile
#   ollama run book-pricer "$(cat book.txt)"   # book.txt: title, author, category, pages, blurb, a line each
#
# The model was trained on raw text, not chat turns. TEMPLATE wraps what you type in the training prompt
# exactly: the question, a blank line, the book, a blank line, "{answer_prefix}". The model answers the
# price ("21.00") and then its end-of-text token, which stops it; temperature 0 takes its likeliest answer.
# Type the book as the course's curation writes it (a curated item's `text`; notebook 06 and
# `python -m helpers.demo` show the prompt they build from a typed book).
FROM ./{gguf_name}
TEMPLATE """{template}"""
PARAMETER temperature 0
PARAMETER num_predict {num_predict}
PARAMETER stop "{stop}"
LICENSE """{license}"""
'''


# --- what the file says about the model --------------------------------------------------
def prompt_template(book: str) -> str:
    """The course's prompt (:attr:`helpers.items.Item.test_prompt`) around ``book``, a template's slot."""
    return f"{config.QUESTION}\n\n{book}\n\n{config.ANSWER_PREFIX}"


CHAT_TEMPLATE = prompt_template("{{ messages[-1]['content'] }}")  # Jinja: the last message is the book
OLLAMA_TEMPLATE = prompt_template("{{ .Prompt }}")  # Go template: what `ollama run` is given


def check_supported(model_config: object, folder: Path) -> None:
    """Stop, naming what is supported and what to do, unless ``model_config`` (a transformers config) is a
    Llama this module can write: ``LlamaForCausalLM``, no biases, rope "default" or "llama3"."""
    architectures = getattr(model_config, "architectures", None) or [type(model_config).__name__]
    supported = ", ".join(f"{name} ({models})" for name, models in SUPPORTED_ARCHITECTURES.items())
    fix = (f"convert it with llama.cpp's own converter instead ({LLAMA_CPP}: `python convert_hf_to_gguf.py "
           f"{folder} --outtype q8_0`), which writes Qwen, Mistral, Gemma and many more, and write its Ollama "
           "Modelfile with gguf_export.modelfile")
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{folder} holds a {architectures[0]} model: the course's GGUF export writes {supported} "
                         f"only. To export it, {fix}.")
    rope = (getattr(model_config, "rope_parameters", None) or {}).get("rope_type", "default")
    biases = getattr(model_config, "attention_bias", False) or getattr(model_config, "mlp_bias", False)
    if rope not in SUPPORTED_ROPE or biases:
        raise ValueError(f"{folder} holds a {architectures[0]} with rope {rope!r}{' and biases' if biases else ''}: "
                         f"the course's GGUF export writes rope {' or '.join(map(repr, SUPPORTED_ROPE))} without "
                         f"biases (Llama 3.x, SmolLM2). To export it, {fix}.")


def pre_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, recognised as llama.cpp recognises it (the hash of
    the ids it gives :data:`PRE_TOKENIZER_TEXT`); an unknown one names the fix."""
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise ValueError(f"This tokenizer ({type(tokenizer).__name__}, vocabulary {len(tokenizer):,}) is not one the "
                         f"course's GGUF export knows (Llama 3's, SmolLM2's; hash {digest[:12]}): convert the model "
                         f"with llama.cpp's convert_hf_to_gguf.py ({LLAMA_CPP}), which knows many more.")
    return PRE_TOKENIZERS[digest]


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts every prompt with its bos token (Llama 3's does, SmolLM2's does not)."""
    ids = tokenizer("x")["input_ids"]
    return tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def _vocabulary(tokenizer: PreTrainedTokenizerBase, size: int) -> tuple[list[str], list[int]]:
    """Every token 0..size-1 as the file spells it, and its type: control (special), user-defined (an added
    token that is not special), normal; an id the tokenizer lacks is an unused ``[PAD<id>]``."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        types.append(gguf.TokenType.NORMAL if index not in added else
                     gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
    return tokens, types


def _merges(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The BPE merges, "a b" each, in their order of priority."""
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def description(base_model: str, card: dict, gguf_type: str) -> str:
    """One paragraph for ``general.description``: what the model does and the run card's key facts."""
    made = card.get("export", {})
    parts = [f"Book Pricer: a fine-tune of {base_model} that prices a book from its Amazon metadata."]
    if "global_step" in card:
        rank = card.get("hyperparameters", {}).get("lora_r")
        losses = (card.get("eval_loss_before"), card.get("eval_loss_after"))
        parts.append(f"QLoRA{f' r={rank}' if rank else ''}, {card['global_step']} steps on "
                     f"{card.get('train_items', '?')} books (profile {card.get('profile', '?')})"
                     + (f", eval loss {losses[0]:.3g} -> {losses[1]:.3g}." if None not in losses else "."))
    if made:
        parts.append(f"Adapter {made.get('adapter')} merged in {made.get('dtype')} on {made.get('date')}.")
    parts.append(f"Weights: {gguf_type}. Prompt (raw text, no chat turns): {prompt_template('<the book>')!r}; "
                 "the answer: the whole-dollar price (\"21.00\").")
    return " ".join(parts)


# --- the tensors ---------------------------------------------------------------------------
def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """A q or k projection (rows: ``heads`` heads of ``head_dim`` outputs) from Hugging Face's rotary layout,
    where each head rotates the pairs (i, i + head_dim/2), to llama.cpp's, where it rotates (2i, 2i + 1):
    llama.cpp's ``LlamaModel.permute``; transformers' GGUF loader applies the inverse."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def rope_factors(model_config: object) -> np.ndarray | None:
    """Llama 3's rope scaling as the per-frequency factors llama.cpp reads (``rope_freqs``); None without it."""
    rope = getattr(model_config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "llama3":
        return None
    dim = model_config.head_dim
    frequencies = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelengths = 2 * math.pi / frequencies
    context, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    smooth = (context / wavelengths - low) / (high - low)
    blended = 1 / ((1 - smooth) / rope["factor"] + smooth)
    factors = np.where(wavelengths < context / high, 1.0,
                       np.where(wavelengths > context / low, rope["factor"], blended))
    return factors.astype(np.float32)


def tensor_type(name: str, shape: Sequence[int], gguf_type: str) -> GGMLQuantizationType:
    """The type a tensor is stored in: float32 for 1-D tensors and norms (as llama.cpp needs), else the file's
    type; a q8_0 matrix whose rows do not split into blocks of 32 falls back to float16, as in llama.cpp."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return GGMLQuantizationType.F32
    kind = GGUF_TYPES[gguf_type][0]
    block, _ = gguf.GGML_QUANT_SIZES[kind]
    return kind if shape[-1] % block == 0 else GGMLQuantizationType.F16


def gguf_tensors(model: PreTrainedModel) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """``(GGUF name, shape, loader)`` for every tensor of a Llama, in file order; a loader gives the float32 array
    as the file stores it (q and k permuted). A tied output matrix is left out (llama.cpp reuses the embedding)."""
    settings = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, settings.num_hidden_layers)
    if (factors := rope_factors(settings)) is not None:
        yield f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight", factors.shape, lambda: factors
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and settings.tie_word_embeddings:
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"{name} has no GGUF name in a Llama: this is not a plain Llama checkpoint; convert it "
                             f"with llama.cpp's convert_hf_to_gguf.py ({LLAMA_CPP}).")
        heads = (settings.num_attention_heads if ".q_proj." in name else
                 settings.num_key_value_heads if ".k_proj." in name else None)

        def load(tensor: torch.Tensor = tensor, heads: int | None = heads) -> np.ndarray:
            array = tensor.detach().to("cpu", torch.float32).numpy()
            return permute(array, heads) if heads else array

        yield new_name, tuple(tensor.shape), load


# --- writing -------------------------------------------------------------------------------
def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, gguf_type: str,
               name: str, license: str, base_model: str, card: dict) -> Path:
    """Write ``model`` (a Llama) and ``tokenizer`` to the GGUF file ``path`` in ``gguf_type`` ("f16", "q8_0").

    The tensors are converted one at a time as they are written, so the memory needed beyond the model is
    one tensor's. ``name``, ``license`` (a hub license tag, or ""), ``base_model`` (its hub id) and ``card``
    (a run card, for the description) are the file's metadata.
    """
    settings = model.config
    check_supported(settings, Path(model.name_or_path or path.parent))
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"Unknown GGUF type {gguf_type!r}: choose one of {sorted(GGUF_TYPES)}.")
    pre = pre_tokenizer(tokenizer)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_description(description(base_model, card, gguf_type))
    if license:
        writer.add_license(license)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, base_model)
    writer.add_file_type(GGUF_TYPES[gguf_type][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    rope = settings.rope_parameters or {}
    writer.add_context_length(settings.max_position_embeddings)
    writer.add_embedding_length(settings.hidden_size)
    writer.add_block_count(settings.num_hidden_layers)
    writer.add_feed_forward_length(settings.intermediate_size)
    writer.add_head_count(settings.num_attention_heads)
    writer.add_head_count_kv(settings.num_key_value_heads)
    writer.add_rope_freq_base(rope.get("rope_theta", 10_000.0))
    writer.add_rope_dimension_count(settings.head_dim)
    writer.add_key_length(settings.head_dim)  # as llama.cpp's converter writes them (and llama.cpp and Ollama read)
    writer.add_value_length(settings.head_dim)
    writer.add_layer_norm_rms_eps(settings.rms_norm_eps)
    writer.add_vocab_size(settings.vocab_size)

    tokens, types = _vocabulary(tokenizer, settings.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id,
                          writer.add_eos_token_id), (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(_adds_bos(tokenizer))
    writer.add_add_eos_token(False)  # the model writes its end itself
    writer.add_chat_template(CHAT_TEMPLATE)

    loaders = []
    for tensor_name, shape, load in gguf_tensors(model):
        kind = tensor_type(tensor_name, shape, gguf_type)
        byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
        writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
        loaders.append((load, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for load, kind in loaders:
        writer.write_tensor_data(gguf.quants.quantize(load(), kind))
    writer.close()
    return path


def modelfile(name: str, gguf_type: str, stop: str, license_text: str) -> str:
    """An Ollama Modelfile for ``model.gguf`` beside it: the course's prompt as its TEMPLATE (the learner
    types the book), greedy answers, ``stop`` (the model's end-of-text token) and the license."""
    if '"""' in license_text:
        raise ValueError('The license text holds """, which would end the Modelfile\'s LICENSE block early.')
    return MODELFILE.format(name=name, kind=gguf_type, answer_prefix=config.ANSWER_PREFIX, gguf_name=GGUF_NAME,
                            template=OLLAMA_TEMPLATE, num_predict=NUM_PREDICT, stop=stop, license=license_text)


def default_gguf_dir(merged: Path, gguf_type: str) -> Path:
    """``gguf-<type>/`` beside the merged model's folder (:meth:`helpers.runs.RunDir.gguf`)."""
    return RunDir(Path(merged).parent).gguf(gguf_type)


def convert(profile: config.Profile, merged: Path, gguf_type: str, output_dir: Path | None = None) -> Path:
    """Convert a merged model's folder (:func:`helpers.export.save_merged`) into a folder holding ``model.gguf``
    in ``gguf_type``, its Ollama ``Modelfile``, and the merged folder's license texts and NOTICE; returns the
    folder (default: :func:`default_gguf_dir`). An architecture other than a Llama stops before any loading."""
    merged = Path(merged)
    check_supported(AutoConfig.from_pretrained(merged), merged)
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"Unknown GGUF type {gguf_type!r}: choose one of {sorted(GGUF_TYPES)}.")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype="auto", device_map={"": "cpu"})
    tokenizer = AutoTokenizer.from_pretrained(merged)
    card, licenses, license_text = card_in(merged), licensing.carried(merged), licensing.license_text(merged)
    name = f"{models.model_label(profile)} Book Pricer"

    def save(folder: Path) -> None:
        write_gguf(model, tokenizer, folder / GGUF_NAME, gguf_type, name, licensing.license_tag(profile),
                   licensing.base_id(profile), card)
        text = modelfile(name, gguf_type, tokenizer.eos_token, license_text)
        (folder / MODELFILE_NAME).write_text(text, encoding="utf-8")
        for path in licenses:
            shutil.copyfile(path, folder / path.name)

    return write_folder_atomically(Path(output_dir or default_gguf_dir(merged, gguf_type)), save)


def load_gguf(folder: Path, hardware: Hardware,
              dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer in ``folder/model.gguf`` as transformers' GGUF loader reads them, an independent
    reader: weights dequantised to ``dtype``, on ``hardware``'s device."""
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=dtype,
                                                 device_map=hardware.device_map)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
