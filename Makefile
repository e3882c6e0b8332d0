# Everything from nothing: a virtual environment in .venv with the pinned stack.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-slow benchmark

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

## The main job on the shipped sample data and model, into ./cams.zarr.
run: setup
	$(VENV)/bin/cam-pipeline run --overwrite

## The default test suite (slow tests excluded).
test: setup
	$(PY) -m pytest

## The slow tests (the full shipped sample); CI runs them too.
test-slow: setup
	$(PY) -m pytest -m slow

## Speed and memory, measured side by side; writes docs/benchmarks.md.
benchmark: setup
	$(PY) -m benchmarks.run
