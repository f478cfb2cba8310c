"""The library messages the course silences, each with the reason it is safe to. Imported by ``helpers``.

Every other warning reaches the learner: it may be about their run.
"""

from __future__ import annotations

import logging
import warnings

from helpers import config

# bitsandbytes, on a CPU with AVX-512 BF16, tries to fetch an optional faster 4-bit kernel from the hub (the
# `kernels` package) and logs a warning when it cannot; it then runs its own CPU kernel, which is the one every
# smoke figure measures. Nothing for a learner to do: the GPU profiles use CUDA kernels.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# peft and trl still read transformers' old name `is_gradient_checkpointing` (renamed
# `is_activation_checkpointing`); the course's own code uses the new name. It goes when they update.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# peft's prepare_model_for_kbit_training calls the old `gradient_checkpointing_enable` (renamed
# `activation_checkpointing_enable`): the same deprecation, the same fix upstream.
warnings.filterwarnings("ignore", message="`gradient_checkpointing_enable` is deprecated", category=FutureWarning)

# On a CPU, bitsandbytes' paged AdamW has no GPU memory to page from and runs as plain AdamW; notebook 04 and the
# recipe say so, so the warning each step would only repeat it.
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)

# Bars are for watching: where TQDM_DISABLE says nobody watches (`make smoke` saves the notebooks to read later),
# transformers' own bars (loading checkpoint shards, reading a GGUF) go too; tqdm's notebook bar ignores the variable.
if config.progress_bars_off():
    from functools import partial

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # transformers' GGUF reader draws tqdm's bar itself, past the switch above: hand it a bar that stays off
    modeling_gguf_pytorch_utils.tqdm = partial(tqdm, disable=True)
