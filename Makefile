# Two commands do all set-up: `make run` (the default study) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this kind of machine's disk; GPU users: `make TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: install run test lint bench clean-cache

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,postgres]"
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/polca-study $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check polca_study tests benchmarks

bench: install
	$(PY) benchmarks/stages.py
	$(PY) benchmarks/polca_routes.py

clean-cache:
	rm -rf .cache/polca_study
