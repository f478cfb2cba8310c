#!/usr/bin/env bash
# The pinned wheels that an offline GPU machine lacks, for benchmarks/gpu_check.py: into .whl/ (ignored by git).
#
#   bash benchmarks/gpu_wheels.sh          # here, with PyPI and the course installed (make setup)
#
# then, on the GPU machine, from the repository's root (.whl/ travels with the tree):
#
#   python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. timeout 480 python3 benchmarks/gpu_check.py --smollm2-shape .whl/smollm2-shape --out "$OUT"
#
# The image it is made for has torch (built for CUDA 13.0), transformers 5.17, peft, accelerate 1.15.0, tiktoken,
# pyarrow, pandas, xxhash, fsspec, psutil, tensorboard and matplotlib, but not bitsandbytes, trl, datasets or
# llama-models. So: bitsandbytes, trl, datasets, transformers, peft and tokenizers at the course's pins
# (requirements.txt); llama-models, whose tokenizer.model is the offline Llama 3.1 tokenizer; dill and
# multiprocess, which datasets needs and the image lacks (at the versions installed here). --target keeps the
# image's own packages untouched: PYTHONPATH puts these first.
#
# bitsandbytes ships a library for every CUDA, ROCm and XPU version (43 MB); only the CUDA ones named in
# BNB_CUDA (default "130 132", for torch's CUDA 13.0) and the CPU one are kept, the wheel's RECORD rewritten to
# match, so that the folder travels with the tree (a device machine takes 64 MiB in all): for a torch built for
# CUDA 12.8, BNB_CUDA=128. .whl/smollm2-shape holds SmolLM2's config and tokenizer without its weights (the
# smoke model's package is 94 MB): the check builds random weights at that shape for the digit-tree part.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BNB_CUDA=${BNB_CUDA:-130 132}
WHEELS=.whl

pin() { grep -E "^$1==" requirements.txt; }
installed() { echo "$1==$("$PYTHON" -c "from importlib.metadata import version; print(version('$1'))")"; }

rm -rf "$WHEELS"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "$(pin bitsandbytes)" "$(pin trl)" "$(pin datasets)" "$(pin transformers)" "$(pin peft)" \
    "$(pin tokenizers)" "$(pin llama-models)" "$(installed dill)" "$(installed multiprocess)"

"$PYTHON" - "$WHEELS" $BNB_CUDA <<'PY'
"""Keep only the named CUDA libraries (and the CPU one) in the bitsandbytes wheel; rewrite its RECORD."""
import re
import sys
import zipfile
from pathlib import Path

folder, kept = Path(sys.argv[1]), {f"libbitsandbytes_cuda{version}.so" for version in sys.argv[2:]}
wheel = next(folder.glob("bitsandbytes-*.whl"))
library = re.compile(r"bitsandbytes/libbitsandbytes_(cuda|rocm|xpu)\w*\.so$")
dropped = lambda name: bool(library.search(name)) and name.rsplit("/", 1)[-1] not in kept
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    for info in source.infolist():
        if dropped(info.filename):
            continue
        data = source.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if not dropped(line.split(b",", 1)[0].decode()))
        target.writestr(info, data)
slim.replace(wheel)
PY

"$PYTHON" - "$WHEELS/smollm2-shape" <<'PY'
"""SmolLM2-135M's config and tokenizer, without its weights."""
import shutil
import sys

from helpers import assets

shutil.copytree(assets.smollm2_checkpoint(), sys.argv[1], ignore=shutil.ignore_patterns("*.safetensors"))
PY

ls -l "$WHEELS" "$WHEELS/smollm2-shape"
du -sh "$WHEELS"
