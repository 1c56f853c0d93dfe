# Setup is one target: a venv at .venv with everything the project needs, from PyPI only.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -q

.PHONY: install demo test test-core test-endurance bench serve system-packages

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# mediapipe 0.10.21 bundles its pose weights; its numpy<2 / jax pins are not needed for pose
	$(PY) -m pip install -q --no-deps mediapipe==0.10.21
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
# generations) and attacked (Schemathesis against its own OpenAPI document).
CORE_TESTS := tests --ignore=tests/endurance --ignore=tests/upstream

test: test-core test-endurance

test-core: install system-packages
	$(PY) -m pytest $(PYTEST_ARGS) $(CORE_TESTS)

test-endurance: install
	$(PY) -m pytest $(PYTEST_ARGS) tests/endurance

bench: install
	$(PY) -m bench

serve: install
	$(VENV)/bin/pose-service serve
