# Two commands for a fresh machine:
#   make demo   install nlx into .venv and run the main job (tiny associative-recall model on the ops)
#   make test   install nlx with its test and tpu extras into .venv and run the default test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: install install-test demo test test-slow bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(VENV)/bin/python
	$(PY) -m pip install -q -e .

# The tpu extra (libtpu) lets the default suite compile the TPU kernels ahead of time on CPU.
install-test: $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[test,tpu]"

demo: install
	$(VENV)/bin/nlx demo

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS) -q

test-slow: install-test
	$(PY) -m pytest $(PYTEST_ARGS) -q -m slow

bench: install
	$(VENV)/bin/nlx bench ops --out bench_ops.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
