"""Token counting for curation: how many Llama 3.1 tokens a text has, and the text cut to MAX_TOKENS.

Where the tokenizer is exactly Meta's Llama 3 BPE (the offline one, or the hub's), tiktoken on
Meta's own ``tokenizer.model`` gives the same ids faster on one core; any other tokenizer goes
through its Rust backend in one batched call.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from helpers import assets, config

KEPT = ""  # the skip reason of a record that survives


@functools.lru_cache(maxsize=4)
def encoder(tokenizer: PreTrainedTokenizerFast) -> Callable[[list[str]], list[list[int]]]:
    """Texts -> token ids without special tokens: tiktoken where the tokenizer is Meta's Llama 3
    BPE (identical ids, faster on one core), else the Rust tokenizer's batch call."""
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: no offsets or masks to build
    llama3 = llama3_tiktoken(backend)
    if llama3 is not None:
        return lambda texts: [llama3.encode_ordinary(text) for text in texts]
    return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def llama3_tiktoken(backend: Tokenizer) -> tiktoken.Encoding | None:
    """Meta's ``tokenizer.model`` as a tiktoken encoding, if ``backend`` is exactly that BPE (same
    pieces and ids, same split pattern, no normaliser); else None."""
    spec = json.loads(backend.to_str())
    splits = (spec.get("pre_tokenizer") or {}).get("pretokenizers") or [{}]
    if (spec.get("normalizer") is not None or spec["model"].get("type") != "BPE"
            or not spec["model"].get("ignore_merges")
            or splits[0].get("pattern", {}).get("Regex") != assets.LLAMA3_PATTERN):
        return None
    try:
        ranks = load_tiktoken_bpe(str(assets.package_file("llama_models", "llama3/tokenizer.model")))
    except FileNotFoundError:
        return None
    chars, vocab = bytes_to_unicode(), spec["model"]["vocab"]
    if len(vocab) != len(ranks) or any(vocab.get("".join(chars[b] for b in piece)) != rank
                                        for piece, rank in ranks.items()):
        return None
    return tiktoken.Encoding("llama3", pat_str=assets.LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


def count_and_cut_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerFast) -> dict[str, list]:
    """Count the tokens of each content in one batched call, and cut kept texts to MAX_TOKENS.

    Tokenising costs time per character, and only the first MAX_TOKENS tokens matter, so we
    tokenise the first MAX_CHARS characters. Where that prefix yields fewer than
    SURE_TOKENS tokens (a token-dense text), the full text is tokenised again: counts up to
    MAX_TOKENS and the cut texts are exactly those of the full texts.
    """
    contents = batch["content"]
    encode = encoder(tokenizer)
    encoded = encode([content[: config.MAX_CHARS] for content in contents])
    unsure = [i for i, ids in enumerate(encoded)
              if len(ids) < config.SURE_TOKENS and len(contents[i]) > config.MAX_CHARS]
    for i, ids in zip(unsure, encode([contents[i] for i in unsure]) if unsure else []):
        encoded[i] = ids
    cut = [ids[: config.MAX_TOKENS] for ids in encoded]
    reasons = [reason or (KEPT if len(ids) > config.MIN_TOKENS else "too few tokens")
               for reason, ids in zip(batch["skip_reason"], encoded)]
    kept = [i for i, reason in enumerate(reasons) if reason == KEPT]
    texts = [""] * len(cut)  # only kept items need their text (saves memory on 4.45M rows)
    for i, text in zip(kept, tokenizer.backend_tokenizer.decode_batch([cut[i] for i in kept])):
        texts[i] = text
    return {
        "content_tokens": [len(ids) for ids in encoded],
        "token_count": [len(ids) for ids in cut],
        "text": texts,
        "skip_reason": reasons,
    }
