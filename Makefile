# cljax: every target does its own set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VARIANT ?= agem_new
SEEDS ?= 10
ARGS ?=
EXTRAS ?= tfds,plot,test,lint
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed-$(shell echo '$(EXTRAS)' | tr ',' '-')

.PHONY: setup data run sweep which-agem grouped paper test lint format bench-qp bench-run bench-sweep bench-grouped bench-cifar seed-variants clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

# Real Fashion-MNIST from Debian's package (offline-installable); otherwise say how to get it.
data:
	@if [ -n "$$CLJAX_DATA" ] || [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ]; then \
	  echo "data: Fashion-MNIST IDX files found in $${CLJAX_DATA:-$(FMNIST_DIR)}"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "data: installing Debian's dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	else \
	  echo "data: Fashion-MNIST not found in $(FMNIST_DIR). Either run"; \
	  echo "        sudo apt-get install dataset-fashion-mnist"; \
	  echo "      or point CLJAX_DATA / --data_path at a folder of the four IDX .gz files,"; \
	  echo "      or use TFDS: pip install 'cljax[tfds]' and pass --source tfds (needs internet or a TFDS data_dir)."; \
	  exit 1; \
	fi

run: setup data
	$(PY) -m cljax --model $(VARIANT) $(ARGS)

# SEEDS seeds (a count or a list) of one variant; --lr / --memory_strength lists in ARGS form a grid.
sweep: setup data
	$(PY) -m cljax.sweep_cli --model $(VARIANT) --seeds $(SEEDS) $(ARGS)

which-agem: setup data
	$(PY) experiments/which_agem.py --seeds $(SEEDS) $(ARGS)

# gem vs the grouped variants, 5 seeds: experiments/results/grouped.md.
grouped: setup data
	$(PY) experiments/grouped.py $(ARGS)

# single, independent, ewc, er, gem, agem under gem_paper_mnist, 3 seeds, three protocols:
# experiments/results/paper_protocols.md (resumable: records in results/paper_protocols).
paper: setup data
	$(PY) experiments/paper_protocols.py $(ARGS)

# Two worker processes (one per core here), a test file per worker; the 25 slowest tests printed.
PYTEST_WORKERS ?= 2
test: setup data
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-qp: setup
	$(PY) experiments/bench_qp.py $(ARGS)

bench-run: setup data
	$(PY) experiments/bench_run.py --e2e agem_new gem --out experiments/results/bench_run.md $(ARGS)

bench-sweep: setup data
	$(PY) experiments/bench_sweep.py $(ARGS)

bench-grouped: setup
	$(PY) experiments/bench_grouped.py --out experiments/results/bench_grouped.md $(ARGS)

# Split CIFAR-100 under gem_paper_cifar: time per step and per evaluation (synthetic images).
bench-cifar: setup
	$(PY) experiments/bench_cifar.py --out experiments/results/bench_cifar.md $(ARGS)

seed-variants: setup data
	$(PY) experiments/seed_variants.py $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
