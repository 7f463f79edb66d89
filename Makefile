# The two commands a new user types: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Dev and CI use the CPU build of torch that lies on local disk; GPU users install the project
# their own way and are not bound by this constraint.
CONSTRAINTS := constraints/cpu.txt
WHEELS := $(wildcard /opt/wheels)
PIP_FLAGS := -c $(CONSTRAINTS) $(if $(WHEELS),--find-links $(WHEELS),)
PYTEST_ARGS ?=
# extra flags for `make run`, e.g. make run SERVE_ARGS="--port 50052 --host 0.0.0.0"
SERVE_ARGS ?=

.PHONY: run test setup clean protos

$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS) $(wildcard protos/moeserve/v1/*.proto)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/moeserve serve $(SERVE_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info protos/moeserve/v1/*_pb2*.py* protos/moeserve/v1/__init__.py
