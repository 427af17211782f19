# The one entry point: every target sets up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup install train test lint format bench gpu-check clean server first second

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ray]'
	touch $(STAMP)

setup: $(STAMP)

# The seed's instructions run `make setup`, then `make install`: setup installs the package
# (editable) already, so install is the same step.
install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/distbelief train $(ARGS)

# Four test processes on 2 cores: most integration tests wait on processes they started, not
# on the CPU (with three the suite left half the CPU time idle). Tests of one xdist_group run
# in one process (the Ray tests share one Ray cluster). Bytecode is written even where the
# environment says not to: each of the suite's few hundred Python processes would otherwise
# compile the package (and each test process rewrite every test module) from source again.
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 4 --dist loadgroup --durations=20 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks examples
	$(VENV)/bin/ruff format src tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/wire.py
	$(PY) benchmarks/overhead.py

# The GPU check: the tests marked gpu, then a short benchmark of Downpour on CUDA against local
# SGD on CUDA. Where there is no CUDA device the tests skip and the benchmark says so.
gpu-check: $(STAMP)
	$(PY) -m pytest -q -m gpu tests
	$(PY) benchmarks/gpu.py --quick

clean:
	rm -rf $(VENV) build src/*.egg-info

# The seed's three-terminal example: `make server`, then `make first` and `make second`.
EXAMPLE_ARGS ?=
server: $(STAMP)
	$(PY) examples/main.py --rank 0 --world-size 3 --server $(EXAMPLE_ARGS)

first: $(STAMP)
	$(PY) examples/main.py --rank 1 --world-size 3 $(EXAMPLE_ARGS)

second: $(STAMP)
	$(PY) examples/main.py --rank 2 --world-size 3 $(EXAMPLE_ARGS)
