"""Every saved form of the fine-tune scored by the same harness on the same books: the 4-bit model with its
adapter, the merged 16-bit model (:mod:`helpers.export`) and each GGUF form (:mod:`helpers.gguf_export`).

:func:`score_saved_forms` records each on the leaderboard; :func:`saved_forms` compares each with the 4-bit
model by the leaderboard's paired bootstrap, and :func:`markdown` shows the comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from helpers import config, export, models
from helpers.dataset import eval_items, load_curated
from helpers.evaluate import evaluate
from helpers.gguf_export import GGUF_NAME, GGUF_TYPES, convert, load_gguf
from helpers.hardware import Hardware
from helpers.items import Item
from helpers.leaderboard import Leaderboard, leaderboard
from helpers.predict import llm_predictor

FORMS = ("4-bit + adapter", "merged 16-bit", *(f"GGUF {kind}" for kind in GGUF_TYPES))  # as scored, in order
FORM_ORDER = {form: index for index, form in enumerate(FORMS)}


def _megabytes(path: Path) -> float:
    """The size of a file, or of every file in a folder, in MB."""
    files = [path] if path.is_file() else [file for file in path.rglob("*") if file.is_file()]
    return round(sum(file.stat().st_size for file in files) / 1e6, 1)


def _score(board: Leaderboard, name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
           profile: config.Profile, items: list[Item], form: str, path: Path) -> None:
    """Evaluate one form by the harness and record it on ``board``, with its form, its size on disk and the
    dtype it computed in."""
    evaluation = evaluate(name, llm_predictor(model, tokenizer, profile), items, batched=True)
    board.record(evaluation, form=form, size_mb=_megabytes(path), compute=str(model.dtype).removeprefix("torch."))


def score_saved_forms(profile: config.Profile, adapter: str | Path | None, hardware: Hardware,
                      merged: Path | None = None, ggufs: dict[str, Path] | None = None,
                      items: list[Item] | None = None, dtype: torch.dtype | None = None) -> pd.DataFrame:
    """Score every saved form of the fine-tune by the same harness on the same books (default: the profile's
    :func:`helpers.dataset.eval_items`), on ``hardware``'s device, each recorded on the leaderboard: the 4-bit
    model with its adapter (the reference, named as notebook 05 names it), the merged 16-bit model (``merged``,
    else saved now), and each GGUF form (``ggufs``, type -> folder, else converted now into f16 and q8_0) as
    transformers reads it. The merged and GGUF forms compute in ``dtype``, by default float32 on a CPU (so that
    only their stored weights differ: bf16 arithmetic alone moves a median by a dollar now and then) and
    bfloat16 on a GPU (half the memory: an 8B model in float32 needs 32 GB). Returns :func:`saved_forms`: the
    rows, each compared with the 4-bit model."""
    dtype = dtype or (torch.bfloat16 if hardware.kind == "cuda" else torch.float32)
    items = items if items is not None else eval_items(load_curated(profile)[1], profile)
    board = leaderboard(profile)
    model, tokenizer = models.load_finetuned(profile, adapter, hardware)
    reference = models.finetuned_name(model, profile, adapter)
    _score(board, reference, model, tokenizer, profile, items, FORMS[0], Path(models.adapter_source(profile, adapter)))
    del model
    merged = Path(merged or export.save_merged(profile, adapter, hardware))
    saved = json.loads((merged / "config.json").read_text(encoding="utf-8"))["dtype"]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype, device_map=hardware.device_map)
    _score(board, f"{reference}, merged {saved}", model, AutoTokenizer.from_pretrained(merged), profile, items,
           FORMS[1], merged)
    del model
    for kind, folder in (ggufs or {kind: convert(profile, merged, kind) for kind in GGUF_TYPES}).items():
        model, tokenizer = load_gguf(folder, hardware, dtype)
        _score(board, f"{reference}, GGUF {kind}", model, tokenizer, profile, items, f"GGUF {kind}",
               Path(folder) / GGUF_NAME)
        del model
    return saved_forms(board, reference)


def saved_forms(board: Leaderboard, reference: str) -> pd.DataFrame:
    """One fine-tune's saved forms as :func:`score_saved_forms` recorded them on ``board``: the 4-bit model
    (named ``reference``) first, then each form named after it, with its metrics and ``diff`` (``diff_ci_low``,
    ``diff_ci_high``): its MAE minus the 4-bit model's on the same books, by the leaderboard's paired bootstrap."""
    rows = board.table()
    rows = rows[(rows["name"] == reference) | rows["name"].str.startswith(f"{reference}, ")]
    rows = rows.drop(columns=["vs_reference", "diff", "diff_ci_low", "diff_ci_high"], errors="ignore")
    rows = rows.sort_values("form", key=lambda forms: forms.map(FORM_ORDER), kind="stable").reset_index(drop=True)
    rows[["diff", "diff_ci_low", "diff_ci_high"]] = [board.paired(name, reference) for name in rows["name"]]
    return rows


def markdown(table: pd.DataFrame) -> str:
    """:func:`saved_forms`'s table as Markdown: MAE with its interval, and the paired difference against the
    4-bit model with its interval, in dollars."""
    lines = [f"| model | form | size (MB) | MAE ($) | {config.CONFIDENCE:.0%} CI ($) | vs {FORMS[0]} "
             f"({config.CONFIDENCE:.0%} CI) ($) | hit rate | failed |", "|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        paired = "reference" if row.form == FORMS[0] else (f"{row.diff:+.2f} ({row.diff_ci_low:+.2f} to "
                                                           f"{row.diff_ci_high:+.2f})")
        lines.append(f"| {row.name} | {row.form} | {row.size_mb:,.1f} | {row.mae:.2f} | {row.mae_ci_low:.2f}-"
                     f"{row.mae_ci_high:.2f} | {paired} | {row.hit_rate:.0%} | {row.n_failed} of {row.n} |")
    return "\n".join(lines)
