"""Sizing a QLoRA run before it starts: the books it reads, memory, the batch split, steps and time.

Everything here works offline from a model's *shape* (its ``config.json`` numbers): the
published shapes of Llama-3.1-8B and Llama-3.2-3B are built in, a local folder is read, and
the smoke model's is read from its cached checkpoint. Times are estimates until a run measures
its own steps (see ``time_budget_minutes``): a rate measured here, in a run card on the same GPU
kind and model or in the GPU check's report, wins over any published or scaled figure.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from transformers import AutoConfig, LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase

from helpers import assets, config
from helpers.curate import load_curated, load_manifest
from helpers.hardware import Hardware
from helpers.items import Item
from helpers.models import base_tokenizer, model_label
from helpers.predict import digit_token_ids, number_token_ids

# The published shapes (their config.json), so memory and time can be planned without the hub.
LLAMA_3_1_8B_SHAPE = LlamaConfig(
    vocab_size=128_256, hidden_size=4_096, intermediate_size=14_336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
)
LLAMA_3_2_3B_SHAPE = LlamaConfig(
    vocab_size=128_256, hidden_size=3_072, intermediate_size=8_192, num_hidden_layers=28,
    num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
)
LLAMA_3_1_70B_SHAPE = LlamaConfig(  # too large for one GPU even in 4 bits: the FSDP recipe's example
    vocab_size=128_256, hidden_size=8_192, intermediate_size=28_672, num_hidden_layers=80,
    num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
)
SMOLLM2_1_7B_SHAPE = LlamaConfig(  # HuggingFaceTB/SmolLM2-1.7B, the lite-open profile's model
    vocab_size=49_152, hidden_size=2_048, intermediate_size=8_192, num_hidden_layers=24,
    num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True,
)
KNOWN_SHAPES = {config.LLAMA_HUB_ID: LLAMA_3_1_8B_SHAPE, config.LLAMA_3B_HUB_ID: LLAMA_3_2_3B_SHAPE,
                config.OPEN_HUB_ID: SMOLLM2_1_7B_SHAPE}
GIB = 2**30
MEMORY_HEADROOM = 0.85  # plan to fill at most this share of the GPU: fragmentation, long batches
LOGIT_COPIES = 3  # float32 logits, their log-softmax and its gradient, per token, over the vocabulary
PLAN_SAMPLE = 200  # training prompts tokenised to measure the mean example length
MAX_LENGTH_MULTIPLE = 8  # a measured max_length is rounded up to this (tensor-core friendly shapes)
UNMEASURED_MARGIN = 1.2  # before curation, max_length is estimated as this x the mean example length
GPU_CHECK_REPORT = "gpu_check.json"  # benchmarks/gpu_check.py's report, in the state folder's results/


# --- the books a run reads ------------------------------------------------------------------
def split_validation(train_items: list[Item]) -> tuple[list[Item], list[Item]]:
    """(train, validation): a seeded slice of the curated train items, so the test set stays unseen."""
    shuffled = random.Random(config.SEED).sample(train_items, len(train_items))
    size = min(config.MAX_VALIDATION_ITEMS, max(1, round(len(train_items) * config.VALIDATION_FRACTION)))
    return shuffled[size:], shuffled[:size]


def training_items(profile: config.Profile) -> tuple[list[Item], list[Item]]:
    """(train, validation) items of ``profile``'s curated data."""
    return split_validation(load_curated(profile)[0])


def check_price_tokens(tokenizer: PreTrainedTokenizerBase, base_model: str) -> None:
    """Stop before training a base model whose tokenizer writes prices neither as one token nor digit by digit:
    no price distribution could be read from it, so the course could not score it."""
    if number_token_ids(tokenizer) is None and digit_token_ids(tokenizer) is None:
        raise ValueError(f"{base_model}'s tokenizer writes prices neither as single tokens 1..999 (Llama 3) nor digit "
                         f"by digit after {config.ANSWER_PREFIX!r} (SmolLM2, Qwen, Mistral), so no price distribution "
                         "can be read from it: choose another base model (a notebook's BASE_MODEL, --base-model, or "
                         "get_profile(..., base_model=...)), e.g. a Llama 3.x or SmolLM2 model.")


def measured_max_length(tokenizer: PreTrainedTokenizerBase, items: list[Item]) -> int:
    """The longest training example (begin, prompt, answer, end) in the base model's own tokens, rounded up to 8.

    Tokenizers differ by tens of tokens on the same prompt (a digit tokenizer writes "1999" in four), so a
    profile with ``max_length=None`` measures it instead of guessing: no example is cut, none padded further.
    """
    longest = max(len(ids) + 1 for ids in tokenizer([item.prompt for item in items])["input_ids"])
    return MAX_LENGTH_MULTIPLE * math.ceil(longest / MAX_LENGTH_MULTIPLE)


def mean_tokens(tokenizer: PreTrainedTokenizerBase, items: list[Item]) -> float:
    """Mean tokens of a training example (begin, prompt, answer, end), over the first PLAN_SAMPLE items."""
    sample = [item.prompt for item in items[:PLAN_SAMPLE]]
    return statistics.fmean(len(ids) + 1 for ids in tokenizer(sample)["input_ids"])


# --- the model's shape --------------------------------------------------------------------
def model_shape(model: str | PretrainedConfig) -> PretrainedConfig:
    """A model's configuration without downloading weights (Llama-3.1-8B's and 3.2-3B's are built in)."""
    if isinstance(model, PretrainedConfig):
        return model
    if model in KNOWN_SHAPES:
        return KNOWN_SHAPES[model]
    return assets.from_hub(AutoConfig.from_pretrained, assets.model_path(model))


def _projection_sizes(shape: PretrainedConfig) -> dict[str, tuple[int, int]]:
    hidden = shape.hidden_size
    head_dim = getattr(shape, "head_dim", None) or hidden // shape.num_attention_heads
    queries, kv = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
    return {"q_proj": (hidden, queries), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (queries, hidden),
            "gate_proj": (hidden, shape.intermediate_size), "up_proj": (hidden, shape.intermediate_size),
            "down_proj": (shape.intermediate_size, hidden)}


def parameter_count(shape: PretrainedConfig) -> dict[str, int]:
    """Parameters of a Llama-style decoder: ``linear`` (stored in 4-bit) and ``embeddings`` (kept, with norms)."""
    linear = sum(inputs * outputs for inputs, outputs in _projection_sizes(shape).values())
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * shape.num_hidden_layers + 1) * shape.hidden_size
    return {"linear": shape.num_hidden_layers * linear, "embeddings": embeddings + norms}


def lora_parameter_count(shape: PretrainedConfig, training: config.TrainingConfig) -> int:
    """LoRA adds ``r * (in + out)`` parameters to each targeted projection of each layer."""
    sizes = _projection_sizes(shape)
    return shape.num_hidden_layers * sum(training.lora_r * sum(sizes[name]) for name in training.target_modules)


# --- memory -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """A GPU memory budget for QLoRA training, in GiB."""

    parameters: float  # the model's parameter count (not GiB)
    weights: float
    adapter_and_optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.adapter_and_optimizer + self.activations + self.overhead

    def sharded(self, processes: int) -> MemoryEstimate:
        """Per GPU under FSDP over ``processes`` GPUs: weights, adapter and optimizer state split, activations not."""
        return replace(self, weights=self.weights / processes,
                       adapter_and_optimizer=self.adapter_and_optimizer / processes)


def memory_estimate(model: str | PretrainedConfig, training: config.TrainingConfig,
                    overhead_gib: float = 1.0) -> MemoryEstimate:
    """GPU memory to QLoRA-train ``model`` (a model id, ``"smollm2"``, a folder or a config) with ``training``.

    * weights: linear layers in NF4 at 4 bits plus ~0.127 bits of double-quantised scales per
      parameter; the embeddings, the output head and the norms in float32, because
      ``prepare_model_for_kbit_training`` upcasts every parameter it does not quantise;
    * adapter: LoRA weights (float32), their gradients and AdamW's two moments: 16 bytes each;
    * activations with gradient checkpointing, per token of the per-device batch: one 16-bit
      hidden state per layer, one layer's full activations (~34 hidden-sized values) recomputed
      at a time, and float32 logits over the vocabulary with their log-softmax and gradient;
    * overhead: CUDA context and allocator slack (``overhead_gib``).

    The weights are checked against a real 4-bit model in the tests (within 10%); the
    activations are a model, to be checked against ``benchmarks/gpu_check.py`` on a GPU.
    """
    shape = model_shape(model)
    counts = parameter_count(shape)
    tokens = training.batch_size * training.max_length
    weights = counts["linear"] * (4 + 0.127) / 8 + counts["embeddings"] * 4
    adapter = lora_parameter_count(shape, training) * 16
    activations = tokens * (shape.num_hidden_layers * shape.hidden_size * 2 + 34 * shape.hidden_size * 2
                            + shape.vocab_size * 4 * LOGIT_COPIES)
    return MemoryEstimate(parameters=sum(counts.values()), weights=weights / GIB,
                          adapter_and_optimizer=adapter / GIB, activations=activations / GIB,
                          overhead=overhead_gib)


def fit_batch(model: str | PretrainedConfig, training: config.TrainingConfig, memory_gib: float | None,
              processes: int = 1) -> config.TrainingConfig:
    """``training`` split for ``processes`` and the device: the effective batch kept, the per-device batch as
    large as the GPU holds (``memory_gib`` None: a CPU, where the recipe's per-device batch is kept if it can be).

    The effective batch (``batch_size * gradient_accumulation_steps * processes``) is what the learning
    rate was tuned for: N processes each take 1/N of it (as nanoGPT divides its accumulation), and only
    its split changes: 1 x 16 on a small GPU wastes a large one, where 16 x 1 runs several times faster.
    Candidates are the divisors of the per-process share.
    """
    effective = training.batch_size * training.gradient_accumulation_steps
    share = max(1, round(effective / processes))  # an effective batch not divisible by N is rounded: the plan says so

    def split(batch: int) -> config.TrainingConfig:
        return replace(training, batch_size=batch, gradient_accumulation_steps=share // batch)

    divisors = [batch for batch in range(share, 0, -1) if share % batch == 0]
    if memory_gib is None:
        return split(next((batch for batch in divisors if batch <= training.batch_size), 1))
    fits = (batch for batch in divisors
            if memory_estimate(model, split(batch)).total <= MEMORY_HEADROOM * memory_gib)
    return split(next(fits, 1))


# --- time ---------------------------------------------------------------------------------
def gpu_key(name: str) -> str | None:
    """The throughput table's name for a device called ``name`` ("T4", "A100", "cpu"...), None if unknown."""
    if name == "CPU":
        return "cpu"
    words = name.upper().replace("NVIDIA", "").replace("TESLA", "").split()
    return next((key for key in config.GPU_PEAK_TFLOPS if words and key == words[0].split("-")[0]), None)


def measured_throughputs(home: Path | None = None) -> dict[tuple[str, str], config.Throughput]:
    """Rates measured here: every run card under ``runs/`` and the GPU check's report, by (GPU kind, base model).

    The newest file wins for a pair.
    """
    home = home or config.HOME
    found: dict[tuple[str, str], tuple[float, config.Throughput]] = {}
    for card_path in (home / "runs").glob("*/*/run_card.json"):
        card = json.loads(card_path.read_text())
        key, rate = gpu_key(card.get("device") or ""), card.get("tokens_per_second")
        if key and rate:
            mtime = card_path.stat().st_mtime
            measured = config.Throughput(rate, "measured here", f"run card {card_path.relative_to(home)}")
            if found.get((key, card["base_model"]), (0.0,))[0] <= mtime:
                found[key, card["base_model"]] = (mtime, measured)
    report = home / "results" / GPU_CHECK_REPORT
    if report.exists():
        mtime = report.stat().st_mtime
        for row in json.loads(report.read_text()).get("throughputs", []):
            key = gpu_key(row["device"])
            if key and found.get((key, row["base_model"]), (0.0,))[0] <= mtime:
                found[key, row["base_model"]] = (mtime, config.Throughput(
                    row["tokens_per_second"], "measured here", f"{row['source']} ({report.relative_to(home)})"))
    return {pair: throughput for pair, (_, throughput) in found.items()}


def _resource_ratio(to: str, start: str) -> float:
    """How much faster GPU ``to`` trains 4-bit QLoRA than ``start``: the smaller of the peak-compute and the
    memory-bandwidth ratios, since either can bound a step (see config.GPU_BANDWIDTH_GBS)."""
    return min(config.GPU_PEAK_TFLOPS[to] / config.GPU_PEAK_TFLOPS[start],
               config.GPU_BANDWIDTH_GBS[to] / config.GPU_BANDWIDTH_GBS[start])


def throughput(device_key: str | None, model: str,
               measured: dict[tuple[str, str], config.Throughput] | None = None) -> config.Throughput | None:
    """Training tokens/s for ``model`` on the device: measured here, else published, else estimated.

    An estimate scales the figure of the GPU nearest in peak compute (the same model's first) by
    :func:`_resource_ratio`, and a figure for another model by the parameter ratio (the work per token
    grows with the parameters). None when nothing applies.
    """
    table = {**config.THROUGHPUTS, **(measured or {})}
    if (device_key, model) in table:
        return table[device_key, model]
    if device_key not in config.GPU_PEAK_TFLOPS or model not in config.MODEL_BILLIONS:
        return None
    anchors = [(gpu, anchor_model) for gpu, anchor_model in table
               if gpu in config.GPU_PEAK_TFLOPS and anchor_model in config.MODEL_BILLIONS]
    if not anchors:
        return None
    gpu, anchor_model = min(anchors, key=lambda pair: (
        abs(math.log(config.GPU_PEAK_TFLOPS[pair[0]] / config.GPU_PEAK_TFLOPS[device_key])), pair[1] != model))
    anchor = table[gpu, anchor_model]
    scale = _resource_ratio(device_key, gpu) * config.MODEL_BILLIONS[anchor_model] / config.MODEL_BILLIONS[model]
    return config.Throughput(anchor.tokens_per_second * scale, "estimated",
                             f"the {gpu} figure for {anchor_model.rsplit('/', 1)[-1]} ({anchor.kind}) x {scale:.2f} "
                             f"(the smaller of the compute and bandwidth ratios{', and parameters' if anchor_model != model else ''})")


def optimizer_steps(books: int, training: config.TrainingConfig, processes: int = 1) -> int:
    """Optimizer steps of a run, counted as the Trainer counts them (``max_steps`` wins when set).

    Each of the ``processes`` reads its share of the books, ``batch_size`` at a time.
    """
    if training.max_steps > 0:
        return training.max_steps
    batches = math.ceil(books / (training.batch_size * processes))
    per_epoch = max(batches // training.gradient_accumulation_steps
                    + int(batches % training.gradient_accumulation_steps > 0), 1)
    return math.ceil(training.epochs * per_epoch)


@dataclass(frozen=True)
class TrainingPlan:
    """What a run will do and roughly how long it takes, printed before it starts."""

    profile: str
    base_model: str
    model: str  # its readable label
    device: str
    processes: int
    books: int
    tokens_per_book: float
    training: config.TrainingConfig  # with the batch split chosen for the device and the processes
    steps: int
    memory: MemoryEstimate | None  # GPU memory at the chosen batch (None on CPU)
    speed: config.Throughput | None
    budget_minutes: float
    data_sha256: str = ""

    @property
    def effective_batch(self) -> int:
        """Books per optimizer step, over every process."""
        return self.training.batch_size * self.training.gradient_accumulation_steps * self.processes

    @property
    def tokens(self) -> float:
        """Training tokens the run reads: examples seen x mean tokens per example."""
        return self.steps * self.effective_batch * self.tokens_per_book

    @property
    def checkpoints(self) -> int:
        return math.ceil(self.steps / self.training.save_steps)

    @property
    def minutes(self) -> float | None:
        return self.tokens / self.speed.tokens_per_second / 60 if self.speed else None

    @property
    def time_budget(self) -> float | None:
        return self.training.time_budget_minutes

    @property
    def budgeted_steps(self) -> int | None:
        """The steps the time budget is expected to allow, by the speed figure (calibration fixes the real number)."""
        if self.time_budget is None or self.speed is None:
            return None
        step_seconds = self.effective_batch * self.tokens_per_book / self.speed.tokens_per_second
        return max(1, min(self.steps, int(self.time_budget * 60 / step_seconds)))

    @property
    def fits_budget(self) -> bool | None:
        if self.time_budget is not None:  # the budget stops the run: it always fits, maybe with fewer books
            return True
        return None if self.minutes is None else self.minutes <= self.budget_minutes

    def lines(self) -> list[str]:
        """The plan as readable lines, ending with a warning when it does not fit the budget."""
        training = self.training
        split = f"{training.batch_size} x {training.gradient_accumulation_steps}"
        if self.processes > 1:
            split += f" x {self.processes} processes"
        lines = [
            f"Plan for profile {self.profile!r}: {self.model} on {self.device}",
            f"  {self.books:,} training books, ~{self.tokens_per_book:.0f} tokens each",
            f"  {self.steps:,} optimizer steps of {self.effective_batch} books ({split}: per-device batch x "
            f"accumulation{' x processes' if self.processes > 1 else ''}), {self.tokens / 1e6:,.2f}M tokens",
            f"  a checkpoint every {training.save_steps} steps: {self.checkpoints} in all",
        ]
        if self.memory:
            lines.append(f"  GPU memory, estimated: {self.memory.total:.1f} GiB")
        if self.speed is None:
            lines.append("  time: no throughput figure for this device; the first logged steps will tell")
        else:
            lines.append(f"  time: ~{self.minutes:,.0f} min at {self.speed.tokens_per_second:,.0f} tokens/s "
                         f"({self.speed.kind}: {self.speed.source})")
        if self.time_budget is not None:
            expected = (f": ~{self.budgeted_steps:,} steps, {self.budgeted_steps * self.effective_batch:,} books by "
                        f"the figure above" if self.budgeted_steps else "")
            lines.append(f"  time budget {self.time_budget:g} min: the first steps are timed on this device, then "
                         f"the run stops inside the budget{expected} (an estimate until calibration)")
        if self.fits_budget is False:
            lines.append(f"WARNING: ~{self.minutes:,.0f} min exceeds this profile's budget of "
                         f"{self.budget_minutes:.0f} min: set a time budget (time_budget_minutes, TIME_BUDGET, "
                         "--time-budget), use a smaller profile (lite), fewer books or max_steps, or a faster GPU.")
        return lines

    def settings(self) -> dict:
        """What the run trains with, as ``run_config.json`` records it (see :mod:`helpers.runs`)."""
        return {"profile": self.profile, "base_model": self.base_model, "data_sha256": self.data_sha256,
                "train_books": self.books, "processes": self.processes, "effective_batch": self.effective_batch,
                "time_budget_minutes": self.time_budget, "planned_steps": self.steps,
                "training": asdict(self.training)}

    def __str__(self) -> str:
        return "\n".join(self.lines())


def make_plan(profile: config.Profile, hardware: Hardware, books: int | None = None,
              tokens_per_book: float | None = None) -> TrainingPlan:
    """The plan for training ``profile`` on ``hardware``: its curated train books (or ``books``, a count, with
    ``tokens_per_book``, to plan before curation), the batch split fitted to the device and the processes."""
    sha, training = "", profile.training
    if books is None:
        train_items, tokenizer = training_items(profile)[0], base_tokenizer(profile)
        check_price_tokens(tokenizer, profile.base_model)
        books, sha = len(train_items), load_manifest(profile)["sha256"]
        tokens_per_book = mean_tokens(tokenizer, train_items)
        if training.max_length is None:
            training = replace(training, max_length=measured_max_length(tokenizer, train_items))
    elif training.max_length is None:
        training = replace(training, max_length=MAX_LENGTH_MULTIPLE * math.ceil(
            UNMEASURED_MARGIN * tokens_per_book / MAX_LENGTH_MULTIPLE))
    training = fit_batch(profile.base_model, training, hardware.memory_gib if hardware.kind == "cuda" else None,
                         hardware.world_size)
    memory = memory_estimate(profile.base_model, training) if hardware.kind == "cuda" else None
    return TrainingPlan(
        profile=profile.name, base_model=profile.base_model, model=model_label(profile), device=hardware.name,
        processes=hardware.world_size, books=books, tokens_per_book=tokens_per_book, training=training,
        steps=optimizer_steps(books, training, hardware.world_size), memory=memory,
        speed=throughput(gpu_key(hardware.name), profile.base_model, measured_throughputs()),
        budget_minutes=profile.budget_minutes, data_sha256=sha,
    )


def planned_books(profile: config.Profile) -> int:
    """Training books of ``profile`` before its data is curated (full's estimate, lite's subset), validation out."""
    curated = profile.train_subset or config.FULL_TRAIN_ITEMS_ESTIMATE
    return curated - min(config.MAX_VALIDATION_ITEMS, round(curated * config.VALIDATION_FRACTION))
