# Every target sets itself up: a fresh clone needs nothing but python3 (3.10+).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TINY_MODEL ?= $(HOME)/.cache/qwen2_5_vl_ray/tiny-qwen2.5-vl
CONF ?= conf/tiny_cpu.yaml
RUN_OUTPUT ?= outputs/tiny_cpu/results.jsonl

.PHONY: setup run test test-fast test-slow test-all lint tiny-model bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

tiny-model: setup
	$(PY) -m cluster.tools.tiny_checkpoint $(TINY_MODEL)

# The demo run replaces its previous results (a launch never overwrites results by itself).
run: tiny-model
	rm -f $(RUN_OUTPUT) $(basename $(RUN_OUTPUT)).summary.json $(basename $(RUN_OUTPUT)).*.png
	$(PY) -m cluster.launch $(CONF) output_path=$(RUN_OUTPUT)

# Everything but the slowest restart-and-kill tests (tests/conftest.py SLOW_TESTS; `make test-slow`).
test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -m "not slow" --durations=20

# Unit tests only: no Ray cluster, subprocess or process group (tests/conftest.py marks those `integration`).
test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -m "not integration"

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Decode (transformers vs ours, in process and through Ray), serving (continuous vs static batching
# under Poisson arrivals), vision tower (ours vs transformers on a large image), int8 vs float decode,
# the Coordinator with fake worker groups, prefix caching and the paged pool, HTTP vs Ray API.
bench: tiny-model
	$(PY) -m cluster.tools.bench
	$(PY) -m cluster.tools.bench_scheduler
	$(PY) -m cluster.tools.bench_vision
	$(PY) -m cluster.tools.bench_encode
	$(PY) -m cluster.tools.bench_mixed
	$(PY) -m cluster.tools.bench_quant
	$(PY) -m cluster.tools.bench_calls --calls 100 --repeats 3
	$(PY) -m cluster.tools.bench_tpot --json outputs/bench_tpot.json
	$(PY) -m cluster.tools.bench_coordinator
	$(PY) -m cluster.tools.bench_coordinator --group-coordinators
	$(PY) -m cluster.tools.bench_prefix
	$(PY) -m cluster.tools.simulate conf/qwen2_5_vl_72b.yaml --model-shape qwen2.5-vl-72b --hardware a3 \
		--workload chat --requests 1000 --rate 5 --json outputs/simulate/chat_a3.json
	$(PY) -m cluster.tools.sim_validate --calibrate --json outputs/simulate/validate_cpu_here.json
	$(PY) -m cluster.tools.spec_projection --json outputs/simulate/spec_a3.json
	$(PY) -m cluster.tools.bench_spec --k 3 --json outputs/bench_spec.json
	$(PY) -m cluster.tools.bench_constrained $(HOME)/.cache/qwen2_5_vl_ray/bench-small --graph
	$(PY) -m cluster.tools.bench_video --served $(CONF) --ttft
	$(PY) -m cluster.tools.bench_stream $(CONF) world_size=1 parallel_config.tp_size=1 data_config.max_new_tokens=600
	$(PY) -m cluster.tools.bench_serve $(CONF) --num-requests 32 --request-rate 2 --max-tokens 32 --rounds 4

clean:
	rm -rf $(VENV) build outputs
