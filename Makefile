# Setup is one target: a venv at .venv with everything the project needs, from PyPI only.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -q

.PHONY: install demo test bench serve

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# mediapipe 0.10.21 bundles its pose weights; its numpy<2 / jax pins are not needed for pose
	$(PY) -m pip install -q --no-deps mediapipe==0.10.21
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/pose-service run --demo --out result.json

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m bench

serve: install
	$(VENV)/bin/pose-service serve
