#!/usr/bin/env bash
# Install the systemd units for this checkout (kept for older instructions): the work is done by
# `pose-service install-service`, which takes the same options; see `--help`.
set -euo pipefail
exec "$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/pose-service" install-service "$@"
