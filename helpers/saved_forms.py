"""Every saved form of the fine-tune scored by the same harness on the same books: the 4-bit model with its
adapter, the merged 16-bit model (:mod:`helpers.export`) and each GGUF form (:mod:`helpers.gguf_export`), run by
llama.cpp where it is installed (:mod:`helpers.llamacpp`, with its own q4_K_M), else read by transformers.

:func:`score_saved_forms` records each on the leaderboard; :func:`saved_forms` compares each with the 4-bit
model by the leaderboard's paired bootstrap, and :func:`markdown` shows the comparison.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import config, export, llamacpp, models
from helpers.dataset import eval_items, load_curated
from helpers.evaluate import evaluate
from helpers.gguf_export import GGUF_NAME, GGUF_TYPES, convert, load_gguf
from helpers.hardware import Hardware
from helpers.items import Item
from helpers.leaderboard import Leaderboard, leaderboard
from helpers.predict import llm_predictor
from helpers.pricing import Predictor

GGUF_FORMS = (*GGUF_TYPES, *llamacpp.QUANTISED)  # the course's writer's types, then llama.cpp's quantiser's
FORMS = ("4-bit + adapter", "merged 16-bit", *(f"GGUF {kind}" for kind in GGUF_FORMS))  # as scored, in order


def form_keys(adapter: str) -> dict[str, str]:
    """The leaderboard key of each saved form of one fine-tune, ``adapter`` its adapter's folder or hub id
    (:func:`helpers.models.adapter_source`): the 4-bit model's is the adapter itself, the key notebooks 04 and 05
    record it under, so that it keeps one row however many notebooks score it; each other form's is the adapter
    and the form. A leaderboard keeps one row per key: one row per form."""
    return {form: adapter if form == FORMS[0] else f"{adapter} [{form}]" for form in FORMS}


def _megabytes(path: Path) -> float:
    """The size of a file, or of every file in a folder, in MB."""
    files = [path] if path.is_file() else [file for file in path.rglob("*") if file.is_file()]
    return round(sum(file.stat().st_size for file in files) / 1e6, 1)


def _score(board: Leaderboard, name: str, predictor: Predictor, items: list[Item], form: str, path: Path,
           adapter: str, compute: str) -> None:
    """Evaluate one form by the harness and record it on ``board`` under its key (:func:`form_keys`), with its
    form, its size on disk, what computed it (a dtype, or llama.cpp) and its speed in books a second."""
    started = time.perf_counter()
    evaluation = evaluate(name, predictor, items, batched=True)
    board.record(evaluation, key=form_keys(adapter)[form], form=form, size_mb=_megabytes(path), compute=compute,
                 books_per_s=round(len(items) / (time.perf_counter() - started), 2))


def score_saved_forms(profile: config.Profile, adapter: str | Path | None, hardware: Hardware,
                      merged: Path | None = None, ggufs: dict[str, Path] | None = None,
                      items: list[Item] | None = None, dtype: torch.dtype | None = None) -> pd.DataFrame:
    """Score every saved form of the fine-tune by the same harness on the same books (default: the profile's
    :func:`helpers.dataset.eval_items`), on ``hardware``'s device, each recorded on the leaderboard: the 4-bit
    model with its adapter (the reference, named as notebook 05 names it), the merged 16-bit model (``merged``,
    else saved now), and each GGUF form (``ggufs``, type -> folder, else converted now into f16 and q8_0). Where
    llama.cpp is installed, it runs every GGUF form, q4_K_M too (quantised now from the f16 file by llama.cpp,
    unless ``ggufs`` holds it): the engine that serves them. Without it, transformers reads the f16 and q8_0 files
    (an independent reader, dequantising them). The merged form, and the GGUF forms transformers reads, compute in
    ``dtype``, by default float32 on a CPU (so that only their stored weights differ: bf16 arithmetic alone moves
    a median by a dollar now and then) and bfloat16 on a GPU (half the memory: an 8B model in float32 needs
    32 GB). Returns :func:`saved_forms`: the rows, each compared with the 4-bit model."""
    dtype = dtype or (torch.bfloat16 if hardware.kind == "cuda" else torch.float32)
    items = items if items is not None else eval_items(load_curated(profile)[1], profile)
    board = leaderboard(profile)
    model, tokenizer = models.load_finetuned(profile, adapter, hardware)
    reference, source = models.finetuned_name(model, profile, adapter), models.adapter_source(profile, adapter)
    _score(board, reference, llm_predictor(model, tokenizer, profile), items, FORMS[0], Path(source), source,
           export.dtype_name(model.dtype))
    del model
    merged = Path(merged or export.save_merged(profile, adapter, hardware))
    saved = json.loads((merged / "config.json").read_text(encoding="utf-8"))["dtype"]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype, device_map=hardware.device_map)
    _score(board, f"{reference}, merged {saved}", llm_predictor(model, AutoTokenizer.from_pretrained(merged), profile),
           items, FORMS[1], merged, source, export.dtype_name(dtype))
    del model
    ggufs = dict(ggufs or {kind: convert(profile, merged, kind) for kind in GGUF_TYPES})
    engine_here = llamacpp.installed()
    if engine_here:
        ggufs |= {kind: llamacpp.quantize(ggufs["f16"], kind) for kind in llamacpp.QUANTISED if kind not in ggufs}
    for kind, folder in ggufs.items():
        path, name = Path(folder) / GGUF_NAME, f"{reference}, GGUF {kind}"
        if engine_here:
            engine = llamacpp.Engine(path)
            _score(board, name, llamacpp.GGUFPredictor(engine), items, f"GGUF {kind}", path, source, "llama.cpp")
            engine.close()
        else:
            model, tokenizer = load_gguf(folder, hardware, dtype)
            _score(board, name, llm_predictor(model, tokenizer, profile), items, f"GGUF {kind}", path, source,
                   export.dtype_name(dtype))
            del model
    return saved_forms(board, source)


def saved_forms(board: Leaderboard, adapter: str) -> pd.DataFrame:
    """One fine-tune's saved forms as :func:`score_saved_forms` recorded them on ``board``, ``adapter`` its
    adapter's folder or hub id: one row per form scored (:func:`form_keys`), the 4-bit model first, with its
    metrics and ``diff`` (``diff_ci_low``, ``diff_ci_high``): its MAE minus the 4-bit model's on the same books,
    by the leaderboard's paired bootstrap. Other rows of the same name (a run scored before its forms were, say)
    are other keys: never here."""
    keys = form_keys(adapter)
    rows = board.table().set_index("key").drop(columns=["vs_reference", "diff", "diff_ci_low", "diff_ci_high"])
    rows = rows.reindex(index=[key for key in keys.values() if key in rows.index],
                        columns=list(dict.fromkeys([*rows.columns, "size_mb", "compute", "books_per_s"]))).reset_index()
    rows["form"] = rows["key"].map({key: form for form, key in keys.items()})  # also where notebook 05 re-recorded
    rows[["diff", "diff_ci_low", "diff_ci_high"]] = [board.paired(key, adapter) for key in rows["key"]]
    return rows


def markdown(table: pd.DataFrame) -> str:
    """:func:`saved_forms`'s table as Markdown, one row per form (the model's name is each row's ``name``): its
    size, what ran it, its speed, MAE with its interval, and the paired difference against the 4-bit model with
    its interval, in dollars."""
    lines = [f"| form | size (MB) | run by | books/s | MAE ($) | {config.CONFIDENCE:.0%} CI ($) | vs {FORMS[0]} "
             f"({config.CONFIDENCE:.0%} CI) ($) | hit rate | failed |", "|---" * 9 + "|"]
    for row in table.itertuples():
        paired = "reference" if row.form == FORMS[0] else (f"{row.diff:+.2f} ({row.diff_ci_low:+.2f} to "
                                                           f"{row.diff_ci_high:+.2f})")
        size = "-" if pd.isna(row.size_mb) else f"{row.size_mb:,.1f}"  # the 4-bit row as notebook 05 re-recorded it
        ran = "-" if pd.isna(row.compute) else "llama.cpp" if row.compute == "llama.cpp" else f"torch {row.compute}"
        speed = "-" if pd.isna(row.books_per_s) else f"{row.books_per_s:.2f}"
        lines.append(f"| {row.form} | {size} | {ran} | {speed} | {row.mae:.2f} | {row.mae_ci_low:.2f}-"
                     f"{row.mae_ci_high:.2f} | {paired} | {row.hit_rate:.0%} | {row.n_failed} of {row.n} |")
    return "\n".join(lines)


def _size(path: Path) -> str:
    """A file's or folder's size as people write it: MB, or kB below a tenth of one."""
    megabytes = sum(file.stat().st_size for file in ([path] if path.is_file() else path.rglob("*"))
                    if file.is_file()) / 1e6
    return f"{megabytes:,.1f} MB" if megabytes >= 0.1 else f"{megabytes * 1e3:,.1f} kB"


def sizes_markdown(paths: dict[str, Path], what: str = "file") -> str:
    """A Markdown table of each path (labelled by its key) and its size on disk."""
    return "\n".join([f"| {what} | size |", "|---|---|",
                      *(f"| {label} | {_size(Path(path))} |" for label, path in paths.items())])


def by_book(board: Leaderboard, adapter: str, items: list[Item]) -> pd.DataFrame:
    """Book by book, the true price and each saved form's price (a column per form, as :func:`score_saved_forms`
    recorded them on ``board`` for ``items``: nothing is computed again). ``adapter``: as in :func:`saved_forms`."""
    books = board.predictions_of(items, fix="score the saved forms on them first (score_saved_forms)")
    table = pd.DataFrame({"book": [item.title for item in items], "true price": books["truth"]})
    for form, key in form_keys(adapter).items():
        if key in books:
            table[form] = books[key]
    return table


def by_book_markdown(table: pd.DataFrame, count: int = 8, width: int = 40) -> str:
    """The first ``count`` rows of :func:`by_book`'s table as Markdown, in dollars, titles cut to ``width``."""
    money = list(table.columns[1:])
    lines = ["| book | " + " | ".join(f"{column} ($)" for column in money) + " |", "|---" * (len(money) + 1) + "|"]
    for row in table.head(count).itertuples(index=False):
        title = row[0] if len(row[0]) <= width else row[0][: width - 1].rstrip() + "…"
        prices = ("-" if pd.isna(price) else f"{price:,.2f}" for price in row[1:])
        lines.append(f"| {title.replace('|', '/')} | " + " | ".join(prices) + " |")
    return "\n".join(lines)
