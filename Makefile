# LoRA from Scratch: the two set-up commands (see README.md).
#
#   make book    install everything into .venv and build the book into _build/html
#   make test    install everything into .venv and run every test
#
# Other targets: `make notebooks` re-executes every chapter and stores its outputs,
# `make benchmark` prints the timing figures, `make clean` removes build products.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
JB_FLAGS ?= -W -n --keep-going

.PHONY: book test notebooks benchmark clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

book: $(VENV)/.installed
	$(BIN)/jupyter-book build $(JB_FLAGS) .

test: $(VENV)/.installed
	$(BIN)/python -m pytest

notebooks: $(VENV)/.installed
	$(BIN)/python tools/run_notebooks.py

benchmark: $(VENV)/.installed
	$(BIN)/python benchmarks/suite_time.py

clean:
	rm -rf _build
