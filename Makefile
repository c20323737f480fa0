# Every target sets itself up: a fresh clone needs nothing but python3 (3.10+).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TINY_MODEL ?= $(HOME)/.cache/qwen2_5_vl_ray/tiny-qwen2.5-vl
CONF ?= conf/tiny_cpu.yaml

.PHONY: setup run test test-fast lint tiny-model bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

tiny-model: setup
	$(PY) -m model.tiny_checkpoint $(TINY_MODEL)

run: tiny-model
	$(PY) -m cluster.launch $(CONF)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# Unit tests only: no Ray cluster, subprocess or process group (tests/conftest.py marks those `integration`).
test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not integration"

lint: setup
	$(PY) -m ruff check .

bench: tiny-model
	$(PY) -m cluster.bench

clean:
	rm -rf $(VENV) build outputs
