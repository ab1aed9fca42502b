# The two commands from the README: `make serve` and `make test` (the linter, then the
# tests). Both create the virtual environment and install the pinned dependencies first.
# Opt in, as root with podman (docs/deployment.md): `make image`, `make container-test`
# (the image built and run hardened, drained on stop) and `make compose-demo` (two
# instances behind nginx).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= models/default
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test bench clean image container-test compose-demo

install: $(STAMP)

# checkov gets a venv of its own (deploy/checkov-constraints.txt says why); where it cannot
# be installed, the test that runs it is skipped and says so.
$(STAMP): setup.cfg pyproject.toml constraints.txt deploy/checkov-constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[server,dev]'
	# openpi's own client, for the wire tests: without its numpy<2 pin (it works with numpy 2)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt openpi-client
	test -x $(VENV)/checkov/bin/python || $(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet --disable-pip-version-check -c deploy/checkov-constraints.txt checkov \
		|| echo "checkov could not be installed: tests/test_deployment.py skips its check"
	touch $(STAMP)

serve: install
	$(PY) server.py --model-path $(MODEL) $(ARGS)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_protocol.py --json bench-results/protocol.json
	$(PY) benchmarks/bench_serving.py --json bench-results/serving.json

image:
	bash deploy/build_image.sh --nginx

container-test: install
	bash deploy/container_test.sh

compose-demo: install
	bash deploy/compose_demo.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
