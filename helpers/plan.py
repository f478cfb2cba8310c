"""Sizing a QLoRA run before it starts: memory, the batch size the device holds, and time.

Everything here works offline from a model's *shape* (its ``config.json`` numbers): the
published shapes of Llama-3.1-8B and Llama-3.2-3B are built in, a local folder is read, and
the smoke model's is read from its cached checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from transformers import AutoConfig, LlamaConfig, PretrainedConfig

from helpers import assets, config
from helpers.environment import Device

# The published shapes (their config.json), so memory and time can be planned without the hub.
LLAMA_3_1_8B_SHAPE = LlamaConfig(
    vocab_size=128_256, hidden_size=4_096, intermediate_size=14_336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
)
LLAMA_3_2_3B_SHAPE = LlamaConfig(
    vocab_size=128_256, hidden_size=3_072, intermediate_size=8_192, num_hidden_layers=28,
    num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
)
KNOWN_SHAPES = {config.LLAMA_HUB_ID: LLAMA_3_1_8B_SHAPE, config.LLAMA_3B_HUB_ID: LLAMA_3_2_3B_SHAPE}
GIB = 2**30
MEMORY_HEADROOM = 0.85  # plan to fill at most this share of the GPU: fragmentation, long batches
LOGIT_COPIES = 3  # float32 logits, their log-softmax and its gradient, per token, over the vocabulary


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
    activations are a model, to be checked against ``benchmarks/bench_qlora_gpu.py`` on a GPU.
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


def fit_batch(model: str | PretrainedConfig, training: config.TrainingConfig,
              memory_gib: float) -> config.TrainingConfig:
    """``training`` with the largest per-device batch the GPU holds, the effective batch kept.

    The effective batch (``batch_size * gradient_accumulation_steps``) is what the learning
    rate was tuned for; only its split changes: 1 x 16 on a small GPU wastes a large one,
    where 16 x 1 runs several times faster. Candidates are the divisors of the effective batch.
    """
    effective = training.batch_size * training.gradient_accumulation_steps
    split = lambda batch: replace(training, batch_size=batch, gradient_accumulation_steps=effective // batch)
    divisors = [batch for batch in range(effective, 0, -1) if effective % batch == 0]
    fits = (batch for batch in divisors
            if memory_estimate(model, split(batch)).total <= MEMORY_HEADROOM * memory_gib)
    return split(next(fits, 1))


# --- time ---------------------------------------------------------------------------------
def gpu_key(device: Device) -> str | None:
    """The throughput table's name for ``device`` ("T4", "A100", "cpu"...), None if unknown."""
    if device.kind != "cuda":
        return "cpu"
    name = device.name.upper().replace("NVIDIA", "").replace("TESLA", "")
    return next((key for key in config.GPU_PEAK_TFLOPS if key in name.split("-")[0].split()), None)


def throughput(device_key: str | None, model: str) -> config.Throughput | None:
    """Training tokens/s for ``model`` on the device: from the table, else estimated by scaling."""
    if (device_key, model) in config.THROUGHPUTS:
        return config.THROUGHPUTS[device_key, model]
    anchor_gpu, anchor_model = config.ESTIMATE_ANCHOR
    if device_key not in config.GPU_PEAK_TFLOPS or model not in config.MODEL_BILLIONS:
        return None
    anchor = config.THROUGHPUTS[config.ESTIMATE_ANCHOR]
    scale = (config.GPU_PEAK_TFLOPS[device_key] / config.GPU_PEAK_TFLOPS[anchor_gpu]
             * config.MODEL_BILLIONS[anchor_model] / config.MODEL_BILLIONS[model])
    return config.Throughput(anchor.tokens_per_second * scale, "estimated",
                             f"the {anchor_gpu} figure for {anchor_model.rsplit('/', 1)[-1]} x {scale:.2f} "
                             f"(peak tensor TFLOP/s {config.GPU_PEAK_TFLOPS[device_key]} vs "
                             f"{config.GPU_PEAK_TFLOPS[anchor_gpu]}, parameters)")


def optimizer_steps(items: int, training: config.TrainingConfig, processes: int = 1) -> int:
    """Optimizer steps of a run, counted as the Trainer counts them (``max_steps`` wins when set)."""
    if training.max_steps > 0:
        return training.max_steps
    batches = math.ceil(items / (training.batch_size * processes))
    per_epoch = max(batches // training.gradient_accumulation_steps
                    + int(batches % training.gradient_accumulation_steps > 0), 1)
    return math.ceil(training.epochs * per_epoch)


@dataclass(frozen=True)
class TrainingPlan:
    """What a run will do and roughly how long it takes, printed before it starts."""

    profile: str
    model: str
    device: str
    items: int
    tokens_per_item: float
    training: config.TrainingConfig  # with the batch split chosen for the device
    steps: int
    memory: MemoryEstimate | None  # GPU memory at the chosen batch (None on CPU)
    speed: config.Throughput | None
    budget_minutes: float

    @property
    def tokens(self) -> float:
        """Training tokens the run reads: examples seen x mean tokens per example."""
        examples = self.steps * self.training.batch_size * self.training.gradient_accumulation_steps
        return examples * self.tokens_per_item

    @property
    def checkpoints(self) -> int:
        return math.ceil(self.steps / self.training.save_steps)

    @property
    def minutes(self) -> float | None:
        return self.tokens / self.speed.tokens_per_second / 60 if self.speed else None

    @property
    def fits_budget(self) -> bool | None:
        return None if self.minutes is None else self.minutes <= self.budget_minutes

    def lines(self) -> list[str]:
        """The plan as readable lines, ending with a warning when it does not fit the budget."""
        training = self.training
        lines = [
            f"Plan for profile {self.profile!r}: {self.model} on {self.device}",
            f"  {self.items:,} training books, ~{self.tokens_per_item:.0f} tokens each",
            f"  {self.steps:,} optimizer steps of {training.batch_size} x {training.gradient_accumulation_steps} "
            f"(per-device batch x accumulation), {self.tokens / 1e6:,.2f}M tokens",
            f"  a checkpoint every {training.save_steps} steps: {self.checkpoints} in all",
        ]
        if self.memory:
            lines.append(f"  GPU memory, estimated: {self.memory.total:.1f} GiB")
        if self.speed is None:
            lines.append("  time: no throughput figure for this device; the first logged steps will tell")
        else:
            lines.append(f"  time: ~{self.minutes:,.0f} min at {self.speed.tokens_per_second:,.0f} tokens/s "
                         f"({self.speed.kind}: {self.speed.source})")
        if self.fits_budget is False:
            lines.append(f"WARNING: ~{self.minutes:,.0f} min exceeds this profile's budget of "
                         f"{self.budget_minutes:.0f} min: use a "
                         "smaller profile (lite), fewer books or max_steps, or a faster GPU.")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())


def plan(profile: config.Profile, items: int, tokens_per_item: float, device: Device) -> TrainingPlan:
    """The plan for training ``profile`` on ``items`` books on ``device`` (batch split fitted to a GPU)."""
    training, memory = profile.training, None
    if device.kind == "cuda":
        training = fit_batch(profile.base_model, training, device.memory_gib)
        memory = memory_estimate(profile.base_model, training)
    return TrainingPlan(
        profile=profile.name, model=profile.base_model.rsplit("/", 1)[-1], device=device.name, items=items,
        tokens_per_item=tokens_per_item, training=training, steps=optimizer_steps(items, training),
        memory=memory, speed=throughput(gpu_key(device), profile.base_model),
        budget_minutes=profile.budget_minutes,
    )


# --- the profile x device table for the README ----------------------------------------------
TABLE_DEVICES = {
    "cpu": Device("cpu", "CPU", None, None),
    "T4": Device("cuda", "Tesla T4", (7, 5), 14.6),
    "L4": Device("cuda", "NVIDIA L4", (8, 9), 22.0),
    "A100": Device("cuda", "NVIDIA A100-SXM4-40GB", (8, 0), 39.4),
    "H100": Device("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 79.1),
}


def planned_items(profile: config.Profile) -> int:
    """Training books of ``profile`` before its data is curated (full's estimate, lite's subset), validation out."""
    curated = profile.train_subset or config.FULL_TRAIN_ITEMS_ESTIMATE
    return curated - min(config.MAX_VALIDATION_ITEMS, round(curated * config.VALIDATION_FRACTION))


def main() -> None:
    """Print the expected training minutes of every profile on the devices it suits, as Markdown."""
    from helpers import finetune  # finetune builds on this module

    smoke = config.get_profile("smoke")
    tokens = finetune.mean_tokens(assets.llama3_tokenizer_offline(), finetune.training_items(smoke)[0])
    rows = [finetune.training_plan(smoke, TABLE_DEVICES["cpu"])]
    for name in ("lite", "full"):
        profile = config.get_profile(name)
        rows += [plan(profile, planned_items(profile), tokens, TABLE_DEVICES[key]) for key in ("T4", "L4", "A100", "H100")]
    print("| profile | model | books | device | batch | steps | GPU memory (GiB, est.) | minutes | kind |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        memory = f"{row.memory.total:.1f}" if row.memory else "-"
        budget = "" if row.fits_budget is not False else f" (over the {row.budget_minutes:.0f}-min budget)"
        print(f"| {row.profile} | {row.model} | {row.items:,} | {row.device} | {row.training.batch_size} x "
              f"{row.training.gradient_accumulation_steps} | {row.steps:,} | {memory} | {row.minutes:,.0f}{budget} "
              f"| {row.speed.kind} |")
    print(f"\nBooks: smoke from its curated sample; lite its subset; full {config.FULL_TRAIN_ITEMS_ESTIMATE:,} "
          f"(estimated) less validation. Tokens per book: {tokens:.0f} (Llama 3.1, curated sample prompts).")


if __name__ == "__main__":
    main()
