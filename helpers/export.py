"""Keep the fine-tuned model: the LoRA adapter merged into a 16-bit copy of the base model, saved and shared.

    python -m helpers.export [--profile P] [--adapter FOLDER_OR_HUB_ID] [--output-dir D]
                             [--dtype bfloat16|float16|float32] [--gguf f16|q8_0 ...]
                             [--push-to-hub USER/REPO] [--adapter-only]

The profile defaults to ``$BOOK_PRICER_PROFILE``, else ``smoke``; the adapter to this profile's run
(``runs/<profile>/qlora/adapter``). The base model is loaded NOT quantised (a merge into 4-bit weights
would round them back to 4 bits), in bf16 by default (the dtype Llama is released in), on the CPU, and
``merge_and_unload`` folds the adapter into its weights: a plain transformers model, no PEFT or
bitsandbytes needed. It is saved with its tokenizer, the run card and the base model's license, by
default in ``merged/`` beside ``adapter/``. A 16-bit Llama-3.1-8B needs about 16 GB of RAM (more than
a free Colab has): with less, the export stops before loading it.

``--gguf f16`` (or ``q8_0``, or both) also converts the merged folder into ``gguf-<type>/`` beside it: one GGUF
file for llama.cpp and Ollama, with an Ollama Modelfile (:mod:`helpers.gguf_export`; Llama 3.x and SmolLM2).

``--push-to-hub REPO`` uploads the merged folder, or with ``--adapter-only`` the adapter folder alone
(megabytes, no merge: it loads on the 4-bit base model anywhere), to a private hub model repo. It needs
a token with write access (``HF_TOKEN``, Colab's Secrets or ``hf auth login``), checked before anything runs.
"""

from __future__ import annotations

import argparse
import shutil
from datetime import UTC, datetime
from pathlib import Path

import psutil
import torch
from huggingface_hub import HfApi, get_token
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from helpers import assets, config, gguf_export, licensing, models
from helpers.hardware import Hardware
from helpers.runs import RunDir, card_in, write_card_in
from helpers.storage import write_folder_atomically

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GIB = 2**30
MEMORY_MARGIN_GIB = 1.0  # Python, torch and the tokenizer, beside the weights
ADAPTER_MESSAGE = "QLoRA adapter from the Book Pricer course"
MERGED_MESSAGE = "Book Pricer fine-tune: the QLoRA adapter merged into the base model"
MODEL_CARD = """---
license: {license}
base_model: {base}
tags: [book-pricer, lora, merged]
---
# {name} Book Pricer

{built_with}A fine-tune of `{base}` that prices books, made in the Book Pricer course: a LoRA adapter
(`{adapter}`) merged into the base model's weights, saved in {dtype}. After this prompt it writes the
book's price to the nearest dollar ("21.00"):

```text
{question}

<the book: title, format, author, pages, description...>

{answer_prefix}
```

{notice} See NOTICE{files}.
"""


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as people write it ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


# --- merging -----------------------------------------------------------------------------
def check_memory(profile: config.Profile, dtype: torch.dtype) -> None:
    """Stop before loading when this machine's available RAM cannot hold the base model in ``dtype``.

    Only base models of known size (``config.MODEL_BILLIONS``) are checked.
    """
    billions = config.MODEL_BILLIONS.get(profile.base_model)
    if billions is None:
        return
    needed = billions * 1e9 * dtype.itemsize / GIB + MEMORY_MARGIN_GIB
    available = psutil.virtual_memory().available / GIB
    if needed > available:
        raise MemoryError(
            f"Merging into {models.model_label(profile)} in {dtype_name(dtype)} needs about {needed:.0f} GiB of RAM, "
            f"but this machine has {available:.1f} GiB available. Use a high-RAM runtime (Colab: Runtime > Change "
            "runtime type > High-RAM) or a larger machine, or share the adapter alone (megabytes; it loads on the "
            "4-bit base model anywhere): `python -m helpers.export --adapter-only --push-to-hub REPO`.")


def merged_model(profile: config.Profile, adapter: str | Path | None, hardware: Hardware,
                 dtype: torch.dtype = torch.bfloat16,
                 device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model, NOT quantised, in ``dtype`` on ``device``, with the adapter merged in; and its tokenizer.

    ``adapter`` and ``hardware``: as in :func:`helpers.models.load_finetuned`, whose checks name the fix. The CPU
    is the default (a 16-bit Llama-3.1-8B is 16 GB, more than a T4 holds); there the RAM is checked first.
    """
    if device == "cpu":
        check_memory(profile, dtype)
    model, tokenizer = models.load_finetuned(profile, adapter, hardware, quantized=False, dtype=dtype, device=device)
    return model.merge_and_unload(progressbar=not config.progress_bars_off()), tokenizer


# --- saving ------------------------------------------------------------------------------
def default_output_dir(profile: config.Profile, source: str) -> Path:
    """``merged/`` beside a local adapter folder (a run's ``adapter/``); ``runs/<profile>/<owner>--<name>/merged``
    for a hub adapter."""
    folder = Path(source).expanduser()
    run = RunDir(folder.parent) if folder.is_dir() else RunDir(profile.runs_dir / source.replace("/", "--"))
    return run.merged


def export_card(profile: config.Profile, source: str, dtype: torch.dtype) -> dict:
    """The run card beside a local adapter folder (if any), plus an ``export`` entry: what was merged, how, when."""
    folder = Path(source).expanduser()
    card = card_in(folder.parent) if folder.is_dir() else {}
    return {**card, "export": {"adapter": source, "base_model": profile.base_model, "dtype": dtype_name(dtype),
                               "date": datetime.now(UTC).isoformat(timespec="seconds")}}


def model_card(profile: config.Profile, source: str, dtype: torch.dtype, files: list[str]) -> str:
    """The README.md of an export: what it is, the prompt it answers, its license ("Built with Llama" for Llama)."""
    built_with = "**Built with Llama**\n\n" if licensing.llama_version(profile) else ""
    return MODEL_CARD.format(
        license=licensing.license_tag(profile) or "other", base=licensing.base_id(profile),
        name=models.model_label(profile), built_with=built_with,
        adapter=source, dtype=dtype_name(dtype), question=config.QUESTION, answer_prefix=config.ANSWER_PREFIX,
        notice=licensing.notice(profile), files="".join(f", {name}" for name in files))


def write_provenance(folder: Path, profile: config.Profile, source: str, dtype: torch.dtype, card: dict,
                     licenses: dict[str, Path]) -> None:
    """Write beside a merged model where it comes from and its terms: the run card, the license texts
    (``licenses``: :func:`helpers.licensing.license_files`), NOTICE and a README model card."""
    write_card_in(folder, card)
    for name, text in licenses.items():
        shutil.copyfile(text, folder / name)
    (folder / licensing.NOTICE_FILE).write_text(licensing.notice(profile) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(model_card(profile, source, dtype, list(licenses)), encoding="utf-8")


def save_merged(profile: config.Profile, adapter: str | Path | None, hardware: Hardware, output_dir: Path | None = None,
                dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Path:
    """Merge the adapter (:func:`merged_model`) and save the model atomically with its tokenizer and
    :func:`write_provenance`'s files (the run card: :func:`export_card`); returns the folder (default:
    :func:`default_output_dir`)."""
    source = models.adapter_source(profile, adapter)
    model, tokenizer = merged_model(profile, adapter, hardware, dtype, device)
    folder = Path(output_dir or default_output_dir(profile, source))
    card, licenses = export_card(profile, source, dtype), licensing.license_files(profile)
    print(f"Saving the merged model ({dtype_name(dtype)}) to {folder} ...", flush=True)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_provenance(tmp, profile, source, dtype, card, licenses)

    return write_folder_atomically(folder, save)


# --- sharing -----------------------------------------------------------------------------
def hub_write_token() -> str:
    """The token an upload uses (``HF_TOKEN``, Colab's Secrets or ``hf auth login``); none names the fix."""
    token = assets.hub_token() or get_token()
    if not token:
        raise PermissionError("Pushing to the Hugging Face hub needs a token with write access: set HF_TOKEN "
                              "(Colab: add it under Secrets), or run `hf auth login`.")
    return token


def check_push(profile: config.Profile, repo_id: str) -> None:
    """Fail before any work when a push to ``repo_id`` cannot or may not happen: no token, or a Llama
    fine-tune whose name does not begin with "Llama" (the Llama license asks for it)."""
    hub_write_token()
    name = repo_id.rsplit("/", 1)[-1]
    if licensing.llama_version(profile) and not name.lower().startswith("llama"):
        raise ValueError(f"The Llama license asks that a model fine-tuned from Llama has a name beginning with "
                         f"\"Llama\": push to {repo_id.removesuffix(name)}Llama-{name} instead.")


def push_to_hub(folder: Path, repo_id: str, message: str) -> str:
    """Upload ``folder`` (an adapter, or a merged model) to the hub model repo ``repo_id`` with the commit
    ``message``; the repo is created private if new. Returns the commit's URL."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder here: push a trained adapter's folder or a merged model's.")
    api = HfApi(token=hub_write_token())
    try:
        api.create_repo(repo_id, private=True, exist_ok=True)
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message))
    except Exception as error:  # no network, no write access, a bad repo id: all end here with the fix
        raise PermissionError(f"Could not push {folder} to {repo_id!r} ({error}). Set HF_TOKEN to a token "
                              "with write access (Colab: Secrets), and check the internet connection.") from error


# --- the command line --------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default=None,
                        help=f"default: ${config.PROFILE_ENV} or smoke")
    parser.add_argument("--adapter", default=None,
                        help="a trained adapter's folder or hub id (default: runs/<profile>/qlora/adapter)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the merged model goes (default: merged/ beside the adapter folder)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                        help="the merged weights' dtype (default: bfloat16)")
    parser.add_argument("--gguf", nargs="+", choices=["f16", "q8_0"], default=[], metavar="TYPE",
                        help="also write the merged model as GGUF (f16, q8_0 or both), with an Ollama Modelfile, "
                             "in gguf-<type>/ beside the merged folder")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="upload the merged model (or the adapter) to this private hub model repo (needs HF_TOKEN)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="with --push-to-hub: skip the merge and upload the adapter folder alone")
    args = parser.parse_args(argv)
    if args.adapter_only and not args.push_to_hub:
        parser.error("--adapter-only goes with --push-to-hub REPO: it skips the merge and uploads the adapter")
    if args.adapter_only and args.gguf:
        parser.error("--gguf converts the merged model: it does not go with --adapter-only, which skips the merge")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    profile = config.get_profile(args.profile)
    if args.push_to_hub:
        check_push(profile, args.push_to_hub)  # in a second, not after the merge
    if args.adapter_only:
        source = models.adapter_source(profile, args.adapter)
        models.adapter_config(source, profile, default=not args.adapter)  # no trained adapter names the fix
        print(f"Pushed the adapter: {push_to_hub(Path(source), args.push_to_hub, ADAPTER_MESSAGE)}")
        return
    folder = save_merged(profile, args.adapter, Hardware.detect(), args.output_dir, DTYPES[args.dtype])
    print(f"Saved the merged model to {folder}")
    for gguf_type in args.gguf:
        print(f"Saved the {gguf_type} GGUF and its Modelfile to {gguf_export.convert(profile, folder, gguf_type)}")
    if args.push_to_hub:
        print(f"Pushed the merged model: {push_to_hub(folder, args.push_to_hub, MERGED_MESSAGE)}")


if __name__ == "__main__":
    main()
