# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Without a GPU take the CPU wheel (~200 MB) instead of the multi-GB CUDA build pip picks by default.
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)

.PHONY: help install demo test test-slow test-all lint format bench analyze clean distclean \
	slurm-start slurm-stop slurm-status test-slurm

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch alone from its index (--no-deps: its dependencies come from the default index next,
	# so an unreachable extra index costs one quick try, not one per dependency)
	$(PY) -m pip install -q --no-deps --retries 0 --timeout 15 \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## create .venv and install the suite (done by demo/test on first use)

demo: install ## a small real rank sweep, offline (~2 min); prints where its plots and summary are
	$(PY) experiments/rank_sweep.py -m experiment=demo

test: install ## the default test suite (no slow tests, no network)
	$(PY) -m pytest

test-slow: install ## the slow tests only (real runs read back from W&B, kill-and-resume, a full tmpfs, memory)
	$(PY) -m pytest -m slow

test-all: install ## every test, slow ones included
	$(PY) -m pytest -m "slow or not slow"

# A single-node SLURM cluster on this machine (root; scripts/slurm_cluster.sh) and the suite
# that runs every experiment's sweep on it (tests_slurm/, not part of `make test`).
KS_SLURM_DIR ?= /tmp/ks-slurm
export KS_SLURM_DIR

slurm-start: ## start a single-node SLURM cluster here (root; installs packages if missing)
	scripts/slurm_cluster.sh start

slurm-stop: ## stop that cluster's daemons by their recorded PIDs
	scripts/slurm_cluster.sh stop

slurm-status: ## which of its daemons run, and sinfo
	scripts/slurm_cluster.sh status

test-slurm: install ## the SLURM suite on a running cluster (skips without one)
	SLURM_CONF=$${SLURM_CONF:-$(KS_SLURM_DIR)/slurm.conf} $(PY) -m pytest tests_slurm

lint: install ## ruff check and format check, then the import contracts (pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install ## speed benchmarks (tables and ratios)
	$(PY) benchmarks/bench_ksmm.py
	$(PY) benchmarks/bench_scaling.py
	$(PY) benchmarks/bench_rank_dynamics.py
	$(PY) benchmarks/bench_upload_rank_dynamics.py
	$(PY) benchmarks/bench_rank_probe.py
	$(PY) benchmarks/bench_multimodal.py

analyze: install ## every report on the newest local outputs, rank dynamics, outputs/index.html
	$(PY) analysis/analyze_newest.py

clean: ## remove outputs, caches and W&B offline files (keeps .venv)
	rm -rf outputs multirun wandb .pytest_cache .ruff_cache .import_linter_cache bench_results
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean ## also remove .venv
	rm -rf $(VENV)
