# Two commands for a fresh machine:
#   make train  install nlx into .venv and run the main job (train tiny HOPE on the embedded corpus)
#   make test   install nlx with its test and tpu extras into .venv and run the default test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist worksteal
# The pinned dependency set CI passed with; 'make test CONSTRAINTS=' tries the newest releases that
# setup.cfg's ranges allow.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install install-test constraints demo train test test-slow bench bench-models clean

# The config of 'make train': tiny HOPE (self-modifying Titans + CMS), 300 steps of 8 x 256 bytes.
# TRAIN_ARGS adds flags, e.g. TRAIN_ARGS="--config.train.steps=4" (what CI runs).
TRAIN_CONFIG ?= configs/hope.py:tiny
TRAIN_DIR    ?= runs/tiny
TRAIN_ARGS   ?=

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(VENV)/bin/python
	$(PY) -m pip install -q -e . $(PIP_CONSTRAINTS)

# The tpu extra (libtpu) lets the default suite compile for TPU ahead of time on CPU; the seqio,
# hf (datasets) and wandb extras are tested too.
install-test: $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[test,tpu,seqio,hf,wandb]" $(PIP_CONSTRAINTS)

# Rewrites constraints.txt from the packages of this venv (after a passing 'make test').
constraints: install-test
	{ sed -n '1,/^[^#]/{/^#/p}' constraints.txt; $(PY) -m pip list --format=freeze --exclude-editable | grep -vE '^(#|pip==|setuptools==|wheel==)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

demo: install
	$(PY) -m examples.demo

# Trains TRAIN_CONFIG on the embedded corpus (a few minutes on CPU): validation perplexity,
# plots and a checkpoint in TRAIN_DIR; then samples from it.
train: install
	$(VENV)/bin/nlx train --config $(TRAIN_CONFIG) --workdir $(TRAIN_DIR) $(TRAIN_ARGS)
	$(VENV)/bin/nlx generate --workdir $(TRAIN_DIR) --prompt "ROMEO:" --max_new_tokens 200

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS) -q

test-slow: install-test
	$(PY) -m pytest $(PYTEST_ARGS) -q -m slow

bench: install
	$(PY) -m benchmarks.ops --out bench_ops.json

bench-models: install
	$(PY) -m benchmarks.models --out bench_models.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
