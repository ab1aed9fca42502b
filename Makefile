# The two commands from the README: `make serve` and `make test` (the linter, then the
# tests). Both create the virtual environment and install the pinned dependencies first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= models/default
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[server,dev]'
	# openpi's own client, for the wire tests: without its numpy<2 pin (it works with numpy 2)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt openpi-client
	touch $(STAMP)

serve: install
	$(PY) server.py --model-path $(MODEL) $(ARGS)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_protocol.py --json bench-results/protocol.json
	$(PY) benchmarks/bench_serving.py --json bench-results/serving.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
