# LoRA from Scratch: the two set-up commands (see README.md).
#
#   make book    install everything into .venv, then build the book into _build/html
#   make test    the same, then run every test (units, strict nbval, browser tests of the book)
#
# The plain commands work too (see README.md, "Working on the notebooks"):
#   jupyter-book build .   builds the same book (needs `npm ci` once: the vendor_assets
#                          extension in _config.yml stages the pinned JavaScript)
#   pytest --nbval         runs every test, skipping the browser tests when the book is not
#                          built or Chromium is missing; `make test` requires them
#                          (LORA_BOOK_TESTS=require turns a skip into an error)
#
# Other targets:
#   make notebooks   re-execute every chapter top to bottom and store its outputs
#   make benchmark   measure speed and rewrite benchmarks/results/*.md (shown in the book's appendix),
#                    then re-execute chapters 6 and 9, which plot and quote the .json results
#   make portability run every chapter under the CPU-kernel matrix and report every printed number
#                    that differs (benchmarks/results/portability.md, in the reproducibility appendix)
#   make clean       remove build products
#
# VENV selects the virtual environment (CI passes a fresh one); JB_FLAGS the book's build flags.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
JB_FLAGS ?= -W -n --keep-going
CHROMIUM ?= /usr/bin/chromium

.PHONY: book test notebooks benchmark portability clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

# The JavaScript the book ships so that it works offline; every book build stages it
# (the vendor_assets extension, tools/vendor_assets.py).
node_modules/.installed: package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund
	touch $@

book: $(VENV)/.installed node_modules/.installed
	$(BIN)/jupyter-book build $(JB_FLAGS) .

test: book
	@test -x $(CHROMIUM) || { echo "The browser tests need Chromium at $(CHROMIUM): apt-get install chromium (or set CHROMIUM=...)"; exit 1; }
	LORA_BOOK_TESTS=require CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest

notebooks: $(VENV)/.installed
	$(BIN)/python tools/run_notebooks.py

benchmark: $(VENV)/.installed
	$(BIN)/python benchmarks/lora_vs_peft.py --markdown benchmarks/results/lora_vs_peft.md
	$(BIN)/python benchmarks/explorer_latency.py --markdown benchmarks/results/explorer_latency.md
	$(BIN)/python benchmarks/frozen_features_speed.py --markdown benchmarks/results/frozen_features_speed.md
	$(BIN)/python benchmarks/mixed_batch.py --markdown benchmarks/results/mixed_batch.md
	$(BIN)/python benchmarks/dora_step.py --markdown benchmarks/results/dora_step.md
	$(BIN)/python benchmarks/suite_time.py --markdown benchmarks/results/suite_time.md
	$(BIN)/python tools/run_notebooks.py notebooks/06_from_scratch_to_peft.ipynb notebooks/09_dora_and_many_adapters.ipynb

portability: $(VENV)/.installed
	$(BIN)/python tools/portability.py --report benchmarks/results/portability.md
	$(BIN)/python tools/portability.py --checkpoints --report benchmarks/results/checkpoint_spread.md
	$(BIN)/python tools/float_drift.py --markdown benchmarks/results/float_drift.md

clean:
	rm -rf _build
