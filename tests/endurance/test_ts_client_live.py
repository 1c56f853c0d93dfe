"""The TypeScript client in examples/ts-client compiled with `tsc` (strict) and run against a live
daemon with a token, as the backend would use it (its types are held to the OpenAPI document in
tests/test_ts_client.py). Needs node and npm; skips and says so without them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from support import REPO, Served, make_clip

CLIENT = REPO / "examples" / "ts-client"


@pytest.fixture(scope="module")
def built_client():
    npm = shutil.which("npm")
    if not shutil.which("node") or not npm:
        pytest.skip("node and npm are needed to build the TypeScript client (apt-get install nodejs npm)")
    install = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CLIENT,
                             capture_output=True, text=True, timeout=300)
    if install.returncode != 0:
        pytest.skip(f"npm could not install the client's compiler: {install.stderr.strip()[-300:]}")
    compiled = subprocess.run([str(CLIENT / "node_modules" / ".bin" / "tsc"), "-p", str(CLIENT)],
                              capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, f"tsc failed:\n{compiled.stdout}{compiled.stderr}"
    return CLIENT / "dist"


def test_the_client_compiles_and_runs_a_job_against_a_live_daemon(tmp_path, built_client):
    clip = make_clip(tmp_path / "clip.mp4", frames=24)
    token = "ts-client-test-token"
    served = Served(tmp_path / "served", ["engine.name=noop", "probe.enabled=false"],
                    env={"POSE_SERVICE_TOKEN": token})
    try:
        served.wait_ready(60)
        out = tmp_path / "result.json"
        env = {**os.environ, "POSE_SERVICE_URL": served.url, "POSE_SERVICE_TOKEN": token}
        run = subprocess.run(["node", str(built_client / "example.js"), str(clip), str(out)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        result = json.loads(out.read_text())
        assert [f["frame_index"] for f in result["frames"]] == list(range(24))
        assert result["engine"]["name"] == "noop"
        refused = subprocess.run(["node", str(built_client / "example.js"), str(clip), str(out)],
                                 env={**env, "POSE_SERVICE_TOKEN": "wrong"}, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 1 and "(401)" in refused.stderr, refused.stderr
    finally:
        served.stop()
