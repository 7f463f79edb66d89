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
# pytest-xdist workers: the tests that start a Ray run in two chains, one a worker, each one test after another
# (tests/ray_session.py), the rest where a worker is free; 0 runs every test in pytest's own process.
PYTEST_WORKERS ?= 2
# extra flags for `make run`, e.g. make run SERVE_ARGS="--port 50052 --host 0.0.0.0"
SERVE_ARGS ?=

.PHONY: run test setup clean protos

# The build's own requirements (pyproject.toml's build-system; grpcio-tools generates the stubs) go into the venv,
# where the test extra wants grpcio-tools too, instead of into a throwaway build environment as well. No bytecode
# is compiled up front (~17,000 files, a minute of a core): Python compiles what is imported, once, when it is.
$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS) $(wildcard protos/moeserve/v1/*.proto)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		> $(VENV)/build-requirements.txt
	$(PY) -m pip install -q --no-compile $(PIP_FLAGS) -r $(VENV)/build-requirements.txt
	$(PY) -m pip install --no-compile --no-build-isolation $(PIP_FLAGS) -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/moeserve serve $(SERVE_ARGS)

# Bytecode is written (into the venv, not beside the sources), also where the environment says not to
# (PYTHONDONTWRITEBYTECODE=1): the Ray tests start many Python processes (Ray workers and actors, Ray's agents),
# and without .pyc files each compiled ray, torch and the rest from source again, ~5 s of a core per process.
PYCACHE := $(abspath $(VENV))/pycache

# PYTHONSAFEPATH=1: pytest (and each xdist worker) does not put the checkout's root on sys.path, where its
# kernels/ folder would stand in for the PyPI package `kernels` that transformers imports (from 5.25 on).
test: setup
	PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(PYCACHE) $(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info protos/moeserve/v1/*_pb2*.py* protos/moeserve/v1/__init__.py
