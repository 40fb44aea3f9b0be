# Two commands do all set-up: `make run` (the default study) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this kind of machine's disk; GPU users: `make TORCH=torch`.
TORCH ?= torch==2.13.0

# The offline text corpus (Jane Austen, from Debian's r-cran-janeaustenr package).
DATA_DIR ?= $(or $(POLCA_DATA_DIR),data)

.PHONY: install corpus run test lint bench tune compare compare-modes clean-cache

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,postgres]"
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

$(DATA_DIR)/austen/SOURCE: | $(VENV)/.installed
	$(VENV)/bin/polca-study-data fetch --data-dir $(DATA_DIR)

corpus: $(DATA_DIR)/austen/SOURCE

run: install corpus
	POLCA_DATA_DIR=$(DATA_DIR) $(VENV)/bin/polca-study $(ARGS)

# The corpus tests skip without the corpus when pytest runs alone; here they must run.
# The slowest tests are listed at the end: the whole command is to stay near 15 minutes.
# Tests run in TEST_WORKERS processes (pytest-xdist), a module's tests in one of them (its
# module fixtures are computed once); most tests are single-threaded.
TEST_WORKERS ?= 2
PYTEST_ARGS ?= --durations=15
test: install corpus
	POLCA_REQUIRE_CORPUS=1 POLCA_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -m "" -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The method comparison (docs/comparison.md): tune every method's clustering on seeds 100
# and 101 with the same budget, then run every method on the held-out seeds 200-204 with
# the settings that tuning chose (the packaged ones when `make tune` has not run here).
TUNED := $(abspath multirun/studies/tune_methods/configs)
tune: install
	$(VENV)/bin/polca-study -m +sweep=tune_methods $(ARGS)

COMPARE = $(VENV)/bin/polca-study -m +sweep=compare_methods \
	$(if $(wildcard $(TUNED)/tuned_method),hydra.searchpath=[file://$(TUNED)]) $(ARGS)
# Every method and basis ablation on seeds 200-204 in both data regimes, then the same
# jobs under the paper's clustering protocol (clustering only: every stage is cached).
compare: install
	$(COMPARE)
	$(COMPARE) cluster=paper
	$(VENV)/bin/polca-study-wandb multirun/studies/compare_methods --study-group tune_methods

# POLCA's exact and paper second-order modes, into the same directory and tables. One
# exact decomposition (about 11x path's) serves both: the paper jobs run after, on it.
compare-modes: install
	$(COMPARE) seed=200,201,202 method=polca polca=exact
	$(COMPARE) seed=200,201,202 method=polca polca=paper

bench: install
	$(PY) benchmarks/stages.py
	$(PY) benchmarks/polca_routes.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/basis_memory.py
	$(PY) benchmarks/recorder.py
	$(PY) benchmarks/causal_lm.py

clean-cache:
	rm -rf .cache/polca_study
