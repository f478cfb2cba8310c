"""The GGUF file run by llama.cpp itself, the engine under Ollama and LM Studio: the whole price distribution
read from its logits, greedy answers, and llama.cpp's own quantiser.

llama.cpp comes as ``llama-cpp-python`` (pinned in ``requirements-gguf.txt``), which PyPI serves as source:
``make llama-cpp`` (and ``make gguf``) builds it here once (cmake and a C++ compiler; about 5 minutes on 2 cores;
pip keeps the wheel).
``make smoke`` does not need it: without it, :mod:`helpers.saved_forms` reads the GGUF files by transformers.

:class:`Engine` is one GGUF file in llama.cpp, read through its C API: the engine's own tokenizer, and one
``llama_decode`` that returns the logits after a prompt and after tokens that branch from it. Each branch token
sits in its own *sequences* of llama.cpp's KV cache, which share the prompt's cells: a token sees only the
cells of its sequences, so one decode reads the prompt once and every branch beside it. :class:`GGUFPredictor`
reads P(price = n), n = 1..999, by :mod:`helpers.predict`'s two paths: one-token prices (Llama 3) from the
prompt's last logits; digit prices (SmolLM2) by the digit tree, its 9 first digits and 90 second digits as
branches, the same arithmetic (:func:`helpers.predict.digit_tree_scores`) on llama.cpp's logits.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from helpers import config, gguf_export, licensing
from helpers.items import Item
from helpers.predict import (
    MAX_NEW_TOKENS,
    TREE_BRANCHES,
    GeneratedPrices,
    PriceDistributions,
    digit_token_ids,
    digit_tree_scores,
    number_token_ids,
    parse_price,
)
from helpers.pricing import POINT, Reading
from helpers.storage import write_folder_atomically

REQUIREMENTS = config.REPO_ROOT / "requirements-gguf.txt"  # llama-cpp-python, pinned
INSTALL = ("make llama-cpp (it builds llama-cpp-python from source with cmake and a C++ compiler, about 5 minutes on 2 "
           "cores, once; make gguf and make test run it too)")
# Made by llama.cpp's quantiser from the f16 file: "K-quants", 4.5-6 bits a weight in blocks of 256 with
# 6-bit block scales; "M" keeps the attention values and half the feed-forward down projections in 6 bits.
QUANTISED = {"q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
CONTEXT = 1024  # tokens: the longest prompt (about 200) and the digit tree's 99 branches, with room to spare
SEQUENCES = 90  # the digit tree's leaves: one sequence per (first digit, second digit)


def installed() -> bool:
    """Whether llama-cpp-python can be imported here."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


_ERROR, _CONTINUED = 4, 5  # ggml.h's GGML_LOG_LEVEL_ERROR, and a message continued
_log_state = {"level": 0, "callback": None}


def _errors_only(level: int, text: bytes, _: object) -> None:
    """llama.cpp's log, errors only: it prints every metadata key and tensor as it loads a file (hundreds of
    lines), and llama-cpp-python's own filter reads ggml's log levels one step off (it shows INFO as WARNING)."""
    if level != _CONTINUED:
        _log_state["level"] = level
    if _log_state["level"] >= _ERROR:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


def _library() -> Any:
    """The ``llama_cpp`` module (llama.cpp's C API), logging errors only; if absent, the fix."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ModuleNotFoundError(f"llama.cpp (llama-cpp-python) is not installed: {INSTALL}.") from error
    if _log_state["callback"] is None:
        _log_state["callback"] = llama_cpp.llama_log_callback(_errors_only)  # kept: llama.cpp holds a pointer to it
        llama_cpp.llama_log_set(_log_state["callback"], ctypes.c_void_p(0))
    return llama_cpp


def threads() -> int:
    """The CPU cores this process may use: llama.cpp's threads."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Engine:
    """One GGUF file loaded in llama.cpp, with a context for one prompt and its branches at a time."""

    def __init__(self, path: Path, n_threads: int | None = None, context: int = CONTEXT) -> None:
        self.path, self.context = Path(path), context
        if not self.path.is_file():
            raise FileNotFoundError(f"No GGUF file at {self.path}: write one first (python -m helpers.export --gguf "
                                    "f16 q8_0, or notebook 07).")
        lib = self.lib = _library()
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise ValueError(f"llama.cpp could not load {self.path}: not a GGUF file it reads.")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.vocab_size = lib.llama_vocab_n_tokens(self.vocab)
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = context  # one decode, one step through the model
        params.n_seq_max = SEQUENCES
        params.kv_unified = True  # one cache whose cells sequences share: the prompt is read once for all branches
        params.n_threads = params.n_threads_batch = n_threads or threads()
        self.threads = params.n_threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a {context}-token context for {self.path}.")
        self.batch = lib.llama_batch_init(context, 0, SEQUENCES)

    def close(self) -> None:
        """Free llama.cpp's context and model (also when the engine is garbage-collected)."""
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except TypeError:  # at interpreter exit llama_cpp's functions may be gone already, and the OS frees the rest
            pass

    # --- the engine's tokenizer --------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """``text``'s token ids by llama.cpp's tokenizer (a prompt starts with bos if the file says so)."""
        data = text.encode("utf-8")
        tokens = (ctypes.c_int32 * (len(data) + 2))()
        count = self.lib.llama_tokenize(self.vocab, data, len(data), tokens, len(tokens), add_special, False)
        return list(tokens[:count])

    def piece(self, token: int) -> str:
        """One token's text."""
        buffer = ctypes.create_string_buffer(64)
        size = self.lib.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:size].decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends generation (the end-of-text token)."""
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    # --- one decode ----------------------------------------------------------------------------
    def logits(self, prompt: Sequence[int], branches: Sequence[tuple[int, int, Sequence[int]]] = (),
               sequences: Sequence[int] = (0,)) -> np.ndarray:
        """``(1 + len(branches), vocabulary)`` logits from ONE decode on an empty cache: after the prompt's last
        token, then after each branch token. A branch is ``(token, depth, its sequences)``: it sits ``depth``
        positions after the prompt's last token and sees the prompt, itself, and the branch tokens that share
        its first sequence (its parents); the prompt is in ``sequences`` (every sequence a branch uses)."""
        if len(prompt) + len(branches) > self.context:
            raise ValueError(f"{len(prompt)} prompt tokens and {len(branches)} branches do not fit the engine's "
                             f"{self.context}-token context.")
        rows = [(token, position, sequences, position == len(prompt) - 1) for position, token in enumerate(prompt)]
        rows += [(token, len(prompt) - 1 + depth, seen, True) for token, depth, seen in branches]
        return self._decode(rows, clear=True)

    def _decode(self, rows: list[tuple[int, int, Sequence[int], bool]], clear: bool) -> np.ndarray:
        """Decode ``rows`` (token, position, sequences, whether its logits are wanted) as one batch, after
        emptying the cache if ``clear``; the wanted logits, in order."""
        lib, batch = self.lib, self.batch
        if clear:
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        for index, (token, position, sequences, wanted) in enumerate(rows):
            batch.token[index], batch.pos[index], batch.logits[index] = token, position, wanted
            batch.n_seq_id[index] = len(sequences)
            for slot, sequence in enumerate(sequences):
                batch.seq_id[index][slot] = sequence
        batch.n_tokens = len(rows)
        if (status := lib.llama_decode(self.ctx, batch)) != 0:
            raise RuntimeError(f"llama_decode returned {status} for {self.path.name}.")
        return np.stack([np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, index), shape=(self.vocab_size,))
                         for index, row in enumerate(rows) if row[3]])

    def generate(self, prompt: Sequence[int], max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        """Greedy generation after ``prompt`` (what Ollama serves at temperature 0): the text of up to
        ``max_new_tokens`` tokens, up to the end-of-text token. Each new token is one decode on the cache."""
        if len(prompt) + max_new_tokens > self.context:
            raise ValueError(f"{len(prompt)} prompt tokens do not fit the engine's {self.context}-token context.")
        tokens: list[int] = []
        logits = self.logits(prompt)[0]
        for position in range(len(prompt), len(prompt) + max_new_tokens):
            token = int(logits.argmax())
            if self.is_end(token):
                break
            tokens.append(token)
            logits = self._decode([(token, position, (0,), True)], clear=False)[0]
        return "".join(self.piece(token) for token in tokens)


class Vocabulary:
    """llama.cpp's tokenizer with the calls :func:`helpers.predict.number_token_ids` and
    :func:`helpers.predict.digit_token_ids` make of a transformers tokenizer: the price tokens are found in the
    engine's own vocabulary."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special_tokens)

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        return {"input_ids": [self.encode(text, add_special_tokens) for text in texts]}

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return ["".join(self.engine.piece(token) for token in tokens) for tokens in ids]

    def tokenize(self, text: str) -> list[str]:
        return [self.engine.piece(token) for token in self.encode(text, False)]

    def __len__(self) -> int:
        return self.engine.vocab_size


class GGUFPredictor:
    """P(price = n), n in 1..999, per book, from a GGUF file run by llama.cpp: the paths and readings of
    :class:`helpers.predict.DistributionPredictor`, one decode per book. A :class:`helpers.pricing.Predictor`."""

    def __init__(self, engine: Engine, reading: Reading = "median") -> None:
        self.engine, self.reading = engine, reading
        vocabulary = Vocabulary(engine)
        self.number_ids = number_token_ids(vocabulary)
        self.digits = None if self.number_ids is not None else digit_token_ids(vocabulary)
        if self.number_ids is None and self.digits is None:
            raise ValueError(f"{engine.path.name}'s tokenizer writes a price neither as one token nor digit by digit: "
                             "use GGUFGeneratePredictor (greedy generation).")
        if self.digits is not None:
            first, digits = self.digits.first, self.digits.digits
            # the 9 first digits, sequences 10i..10i+9 each (their children's); then the 90 second digits, one each
            self.branches = [(token, 1, range(10 * index, 10 * index + 10)) for index, token in enumerate(first)]
            self.branches += [(digits[second], 2, (10 * index + second,)) for index in range(9) for second in range(10)]
            self.scored = [*first, *digits, self.digits.end]
            assert len(self.branches) == TREE_BRANCHES

    @property
    def path(self) -> str:
        """``"single-token"`` or ``"digit tree"``."""
        return "single-token" if self.number_ids is not None else "digit tree"

    def scores(self, prompt: str) -> torch.Tensor:
        """``(999,)`` log-scores of the prices 1..999 after ``prompt`` (not normalised), from one decode."""
        ids = self.engine.tokenize(prompt)
        if self.number_ids is not None:
            return torch.from_numpy(self.engine.logits(ids)[0, self.number_ids]).double()
        logits = torch.from_numpy(self.engine.logits(ids, self.branches, range(SEQUENCES)))
        return digit_tree_scores(logits[None], self.scored)[0]

    def distribution(self, prompts: list[str]) -> np.ndarray:
        """``(len(prompts), 999)`` probabilities of the prices 1..999 (each row sums to 1)."""
        books = tqdm(prompts, desc="llama.cpp", unit="book", leave=False, disable=config.progress_bars_off())
        return np.stack([torch.softmax(self.scores(prompt), dim=-1).numpy() for prompt in books])

    def predict(self, items: list[Item]) -> PriceDistributions:
        """The price distribution of each item, read by this predictor's ``reading``."""
        return PriceDistributions(self.distribution([item.test_prompt for item in items]), self.reading)

    def __call__(self, items: list[Item]) -> PriceDistributions:
        return self.predict(items)


class GGUFGeneratePredictor:
    """Greedy generation by llama.cpp, read as a number: the one price Ollama serves (its API returns at most the
    20 likeliest tokens of a position, not the whole distribution)."""

    path = "greedy generation"
    reading = POINT

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, items: list[Item]) -> GeneratedPrices:
        return GeneratedPrices(parse_price(self.engine.generate(self.engine.tokenize(item.test_prompt)))
                               for item in items)


def predictor(engine: Engine, reading: Reading = "median") -> GGUFPredictor | GGUFGeneratePredictor:
    """The price distribution where the engine's tokenizer allows it (as :func:`helpers.predict.llm_predictor`),
    else greedy generation."""
    try:
        return GGUFPredictor(engine, reading)
    except ValueError:
        return GGUFGeneratePredictor(engine)


def gguf_file(path: Path) -> Path:
    """A GGUF file given as itself or as the folder holding ``model.gguf`` (a ``gguf-<type>`` folder)."""
    path = Path(path)
    return path / gguf_export.GGUF_NAME if path.is_dir() else path


def describe(engine: Engine) -> str:
    """The model in the engine as people name it: the file's own name and type ("SmolLM2-135M-Instruct Book
    Pricer, GGUF q8_0, llama.cpp")."""
    meta = gguf.GGUFReader(engine.path).fields
    file_type = gguf.LlamaFileType(meta["general.file_type"].contents()).name.removeprefix("MOSTLY_")
    kind = next((kind for kind in (*gguf_export.GGUF_TYPES, *QUANTISED) if kind.upper() == file_type), file_type)
    return f"{meta['general.name'].contents()}, GGUF {kind}, llama.cpp"


# --- llama.cpp's quantiser -------------------------------------------------------------------
def quantize(source: Path, kind: str = "q4_K_M", output_dir: Path | None = None) -> Path:
    """A GGUF folder (``source``: :func:`helpers.gguf_export.convert`'s f16 one) quantised by llama.cpp's own
    ``llama_model_quantize`` into ``kind``, in ``gguf-<kind>/`` beside it (or ``output_dir``), with the
    source's license files and a Modelfile naming its type. Returns the folder."""
    if kind not in QUANTISED:
        raise ValueError(f"llama.cpp quantises here into {', '.join(QUANTISED)}, not {kind!r}.")
    lib, source = _library(), Path(source)
    folder = Path(output_dir or source.parent / f"gguf-{kind}")
    meta = gguf.GGUFReader(source / gguf_export.GGUF_NAME).fields
    name, eos = meta["general.name"].contents(), meta["tokenizer.ggml.eos_token_id"].contents()
    stop = meta["tokenizer.ggml.tokens"].contents(eos)

    def save(tmp: Path) -> None:
        params = lib.llama_model_quantize_default_params()
        params.ftype, params.nthread = getattr(lib, QUANTISED[kind]), threads()
        if lib.llama_model_quantize(str(source / gguf_export.GGUF_NAME).encode(),
                                    str(tmp / gguf_export.GGUF_NAME).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantise {source / gguf_export.GGUF_NAME} into {kind}.")
        text = gguf_export.modelfile(name, kind, stop, licensing.license_text(source))
        (tmp / gguf_export.MODELFILE_NAME).write_text(text, encoding="utf-8")
        for path in licensing.carried(source):
            shutil.copyfile(path, tmp / path.name)

    return write_folder_atomically(folder, save)
