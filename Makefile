# Two commands on a fresh machine: `make demo` (the main job on synthetic faces) and `make test`.
# Both create .venv and install the project into it when it is missing or pyproject.toml changed; the align
# extra is included so that tests/test_align.py runs (a 1.9 MB pure-Python wheel with its weights: seconds).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest processes (pytest-xdist); the tests that start Ray or use SLURM run one at a time in one of them.
TEST_PROCESSES ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_PROCESSES) --dist loadgroup --durations=15

.PHONY: demo test test-fast bench clean-shards

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,align]"
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m pipeline.demo

# pytest exits 5 when it collects no test; that is a failure here too, so it is not masked.
test: $(INSTALLED)
	$(PYTEST) $(PYTEST_ARGS)

# The inner loop: everything but the end-to-end tests marked slow (1-2 minutes on 2 cores).
test-fast: $(INSTALLED)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

bench: $(INSTALLED)
	$(PY) bench/shard_throughput.py
	$(PY) bench/loader_throughput.py
	$(PY) bench/ddp_overhead.py
	$(PY) bench/channels_last.py
	$(PY) bench/omp_wait_policy.py

clean-shards:
	find shards -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
