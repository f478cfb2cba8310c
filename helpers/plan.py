"""Sizing a QLoRA run before it starts: the books it reads, memory, the batch split, steps and time.

Everything here works offline from a model's *shape* (its ``config.json`` numbers): the
published shapes of Llama-3.1-8B and Llama-3.2-3B are built in, a local folder is read, and
the smoke model's is read from its cached checkpoint. Times are estimates until a run measures
its own steps (see ``time_budget_minutes``): a rate the course's own runs measured (run cards on
the same GPU kind and model, this machine's first, or the GPU check's report) wins over any
published or scaled figure, and the plan says which it uses.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from transformers import AutoConfig, BitsAndBytesConfig, LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase

from helpers import assets, config
from helpers.dataset import load_curated, load_manifest
from helpers.hardware import Hardware
from helpers.items import Item
from helpers.models import base_tokenizer, model_label, quantization_config
from helpers.predict import digit_token_ids, number_token_ids
from helpers.runs import TRAINER_STATE, RunDir, RunMismatch, differences, mismatch_message, run_cards

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
    """(train, validation) items of ``profile``'s curated data (a plan carries them: ``TrainingPlan.train_items``)."""
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


def measured_throughputs(hardware: Hardware | None = None,
                         home: Path | None = None) -> dict[tuple[str, str], config.Throughput]:
    """Rates this course's own runs measured, by (GPU kind, base model): run cards under ``runs/`` and the GPU
    check's report.

    Run cards of ``hardware``'s machine win ("measured here"), then the GPU check ("measured", a quiet run on
    that GPU kind), then run cards of other machines ("measured", naming them). Several cards give their
    median, so one run slowed by a busy machine does not stand for it; the source names the runs.
    """
    home = home or config.HOME
    here = hardware.machine if hardware else ""
    cards: dict[tuple[str, str], list[tuple[dict, Path]]] = {}
    for card_path in run_cards(home):
        card = json.loads(card_path.read_text(encoding="utf-8"))
        key = gpu_key(card.get("device") or "")
        if key and card.get("tokens_per_second"):
            cards.setdefault((key, card["base_model"]), []).append((card, card_path.relative_to(home)))
    found: dict[tuple[str, str], config.Throughput] = {}
    for pair, runs_of_pair in cards.items():  # other machines' first: this machine's replace them below
        found[pair] = _median_of_cards(runs_of_pair, "measured")
    report = home / "results" / GPU_CHECK_REPORT
    if report.exists():
        for row in json.loads(report.read_text(encoding="utf-8")).get("throughputs", []):
            if key := gpu_key(row["device"]):
                found[key, row["base_model"]] = config.Throughput(
                    row["tokens_per_second"], "measured", f"{row['source']} ({report.relative_to(home)})")
    for pair, runs_of_pair in cards.items():
        if here and (mine := [(card, path) for card, path in runs_of_pair if card.get("machine") == here]):
            found[pair] = _median_of_cards(mine, "measured here")
    return found


def _median_of_cards(cards: list[tuple[dict, Path]], kind: str) -> config.Throughput:
    rates = [card["tokens_per_second"] for card, _ in cards]
    machines = sorted({card.get("machine") or "machine not recorded" for card, _ in cards})
    runs_text = ", ".join(f"{path.parent} {card['tokens_per_second']:g}" for card, path in cards)
    where = "this machine" if kind == "measured here" else "; ".join(machines)
    return config.Throughput(statistics.median(rates), kind,
                             f"median of {len(rates)} run card(s) on {where} (tokens/s: {runs_text})")


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
    parameters = ", and parameters" if anchor_model != model else ""
    return config.Throughput(anchor.tokens_per_second * scale, "estimated",
                             f"the {gpu} figure for {anchor_model.rsplit('/', 1)[-1]} ({anchor.kind}) x {scale:.2f} "
                             f"(the smaller of the compute and bandwidth ratios{parameters})")


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
    quantization: dict = field(default_factory=dict)  # the 4-bit settings, part of the run's key
    # What a run folder makes of it (settle): the folder, the settings a continued run keeps (None: a new run),
    # the newest complete checkpoint and its step, and what the folder held when the plan was made.
    run: RunDir | None = None
    recorded: dict | None = None
    checkpoint: Path | None = None
    done_steps: int = 0
    done_tokens: int = 0  # the tokens that checkpoint had read: a resumed run's tokens/s counts only its own
    seen: tuple = ()
    # The books, read once: train() takes them from here.
    train_items: tuple[Item, ...] = field(default=(), repr=False, compare=False)
    validation_items: tuple[Item, ...] = field(default=(), repr=False, compare=False)

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
    def max_steps(self) -> int:
        """The steps the Trainer is told: the plan's, or what a continued run's time budget chose."""
        return (self.recorded or {}).get("budgeted_steps", self.steps)

    @property
    def finished(self) -> bool:
        """The run folder already holds this run's last step: training would do nothing."""
        return self.checkpoint is not None and self.done_steps >= self.max_steps

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
        if self.run is not None:
            lines.append(f"  run folder {self.run.path}: {self.run_line()}")
        if self.fits_budget is False:
            lines.append(f"WARNING: ~{self.minutes:,.0f} min exceeds this profile's budget of "
                         f"{self.budget_minutes:.0f} min: set a time budget (time_budget_minutes, TIME_BUDGET, "
                         "--time-budget), use a smaller profile (lite), fewer books or max_steps, or a faster GPU.")
        return lines

    def run_line(self) -> str:
        """What training will do in the run folder."""
        if self.finished:
            return (f"finished ({self.done_steps:,} of {self.max_steps:,} steps): train() trains nothing and "
                    "returns its adapter")
        if self.checkpoint is not None:
            budget = " (the steps its time budget chose)" if "budgeted_steps" in self.recorded else ""
            return (f"resumes from {self.checkpoint.name} (step {self.done_steps:,} of {self.max_steps:,}{budget}) "
                    "with its recorded batch split")
        if self.seen and self.seen != (None, None):
            return "a new run: train() first deletes the earlier run's checkpoints, adapter and card"
        return "a new run"

    def settings(self) -> dict:
        """What the run trains with, as ``run_config.json`` records it (see :mod:`helpers.runs`)."""
        return {"profile": self.profile, "base_model": self.base_model, "data_sha256": self.data_sha256,
                "train_books": self.books, "processes": self.processes, "effective_batch": self.effective_batch,
                "time_budget_minutes": self.time_budget, "planned_steps": self.steps,
                "training": asdict(self.training), "quantization": self.quantization}

    def __str__(self) -> str:
        return "\n".join(self.lines())


def describe_quantization(quantization: BitsAndBytesConfig) -> dict:
    """The quantisation settings that change what a run trains, for its key."""
    return {"quant_type": quantization.bnb_4bit_quant_type, "double_quant": quantization.bnb_4bit_use_double_quant,
            "compute_dtype": str(quantization.bnb_4bit_compute_dtype).removeprefix("torch.")}


def folder_state(run: RunDir, hardware: Hardware) -> tuple[dict | None, str | None]:
    """What a run folder holds now, as the main process reads it: its recorded settings and newest checkpoint."""
    checkpoint = run.last_checkpoint()
    return hardware.agree((run.recorded(), checkpoint.name if checkpoint else None))


def settle(the_plan: TrainingPlan, run: RunDir, hardware: Hardware, resume: bool = True) -> TrainingPlan:
    """The plan as ``run`` will train it: a new run, or (``resume``) the run the folder holds, continued.

    A continued run keeps its recorded batch split and steps (on another GPU too); one with other settings
    stops here with :class:`helpers.runs.RunMismatch` naming them, before anything loads.
    """
    recorded, newest = seen = folder_state(run, hardware)
    the_plan = replace(the_plan, run=run, seen=seen)
    if not resume:
        return the_plan
    if recorded is None:
        if newest is not None:
            raise RunMismatch(mismatch_message(run, ["run_config.json: missing (a run from an older version of the "
                                                     "course), so its settings cannot be checked"]))
        return the_plan
    if diffs := differences(recorded, the_plan.settings()):
        raise RunMismatch(mismatch_message(run, diffs))
    split = {name: recorded["training"][name] for name in ("batch_size", "gradient_accumulation_steps")}
    checkpoint = run.checkpoints / newest if newest else None
    state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8")) if checkpoint else {}
    return replace(the_plan, training=replace(the_plan.training, **split), steps=recorded["planned_steps"],
                   recorded=recorded, checkpoint=checkpoint, done_steps=state.get("global_step", 0),
                   done_tokens=state.get("num_input_tokens_seen", 0))


def make_plan(profile: config.Profile, hardware: Hardware, books: int | None = None,
              tokens_per_book: float | None = None, *, run: RunDir | None = None,
              resume: bool = True) -> TrainingPlan:
    """The plan for training ``profile`` on ``hardware``: its curated train books, read once and carried (or
    ``books``, a count, with ``tokens_per_book``, to plan before curation), the batch split fitted to the device
    and the processes; with ``run``, settled against that run folder (:func:`settle`)."""
    sha, training, train_items, validation_items = "", profile.training, [], []
    if books is None:
        curated, manifest = load_curated(profile)[0], load_manifest(profile)
        train_items, validation_items = split_validation(curated)
        tokenizer = base_tokenizer(profile)
        check_price_tokens(tokenizer, profile.base_model)
        books, sha = len(train_items), manifest["sha256"]
        tokens_per_book = mean_tokens(tokenizer, train_items)
        if training.max_length is None:
            training = replace(training, max_length=measured_max_length(tokenizer, train_items))
    elif training.max_length is None:
        training = replace(training, max_length=MAX_LENGTH_MULTIPLE * math.ceil(
            UNMEASURED_MARGIN * tokens_per_book / MAX_LENGTH_MULTIPLE))
    training = fit_batch(profile.base_model, training, hardware.memory_gib if hardware.kind == "cuda" else None,
                         hardware.world_size)
    memory = memory_estimate(profile.base_model, training) if hardware.kind == "cuda" else None
    the_plan = TrainingPlan(
        profile=profile.name, base_model=profile.base_model, model=model_label(profile), device=hardware.name,
        processes=hardware.world_size, books=books, tokens_per_book=tokens_per_book, training=training,
        steps=optimizer_steps(books, training, hardware.world_size), memory=memory,
        speed=throughput(gpu_key(hardware.name), profile.base_model, measured_throughputs(hardware)),
        budget_minutes=profile.budget_minutes, data_sha256=sha,
        quantization=describe_quantization(quantization_config(hardware)),
        train_items=tuple(train_items), validation_items=tuple(validation_items),
    )
    if run is None:
        return the_plan
    if not train_items:
        raise ValueError("A plan made from a count of books cannot train: make it from the curated data "
                         "(books=None) to settle it against a run folder.")
    return settle(the_plan, run, hardware, resume)


def planned_books(profile: config.Profile) -> int:
    """Training books of ``profile`` before its data is curated (full's estimate, lite's subset), validation out."""
    curated = profile.train_subset or config.FULL_TRAIN_ITEMS_ESTIMATE
    return curated - min(config.MAX_VALIDATION_ITEMS, round(curated * config.VALIDATION_FRACTION))
