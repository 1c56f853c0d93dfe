"""Schemathesis against /openapi.json with the daemon running, bounded in time: no 5xx, no status
code or body the document does not describe, no schema-violating request accepted, 405s with their
Allow header, DELETE meaning gone. Left out, each for a reason: POST /v1/drill, /v1/reload and
/reload restart or crash the worker on purpose (a 503 while it reloads is their documented effect,
tested in test_lifecycle and test_supervision); and the check that every schema-valid request is
accepted (a random byte string that is `format: binary` is not a decodable video, and a random
string is not a path inside the allowed roots)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import Stack, http, make_clip, wait_for


def test_schemathesis_finds_nothing(tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    clip = make_clip(tmp_path / "c.mp4", frames=10)
    stack = Stack(tmp_path, ["engine.name=noop", "probe.enabled=false"], gateway=True)
    try:
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 60, what="the gateway")
        stack.wait_job(stack.submit(clip), 30)  # a finished job for the stateful phase to find
        run = subprocess.run(
            [st, "run", stack.url + "/openapi.json", "--url", stack.url, "--checks", "all",
             "--exclude-checks", "positive_data_acceptance", "--exclude-path", "/v1/drill",
             "--exclude-path", "/v1/reload", "--exclude-path", "/reload", "--max-examples", "5", "--seed", "1",
             "--request-timeout", "20", "--workers", "1", "--max-time", "150", "--no-shrink"],
            capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-8000:]
        assert stack.procs["supervisor"].poll() is None
    finally:
        stack.stop()
