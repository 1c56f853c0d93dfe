"""The TypeScript client in examples/ts-client: its types held to the OpenAPI document, compiled with
`tsc` (strict), and run against a live daemon with a token, as the backend would use it. Needs node
and npm (the typescript compiler comes from the npm registry through the package's own lockfile)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from support import REPO, Served, make_clip

CLIENT = REPO / "examples" / "ts-client"
OPENAPI = REPO / "gateway" / "openapi.yaml"
# TypeScript interface -> the OpenAPI schema it mirrors
MIRRORS = {"JobStatus": "Job", "HealthResponse": "Health", "NativeResult": "Result", "Person": "Person",
           "ErrorBody": "Error"}


def interface_fields(source: str, name: str) -> dict[str, bool]:
    """{field: optional?} of one `export interface` (index signatures left out)."""
    match = re.search(rf"export interface {name} \{{(.*?)\n\}}", source, re.S)
    assert match, f"interface {name} not found in the client"
    fields = {}
    for line in match.group(1).splitlines():
        field = re.match(r"\s+(\w+)(\??):", line)
        if field:
            fields[field.group(1)] = bool(field.group(2))
    return fields


def schema(name: str) -> dict:
    document = yaml.safe_load(OPENAPI.read_text())
    found = document["components"]["schemas"][name]
    return found


@pytest.mark.parametrize("interface,schema_name", sorted(MIRRORS.items()))
def test_the_client_types_match_the_openapi_document(interface, schema_name):
    fields = interface_fields((CLIENT / "src" / "index.ts").read_text(), interface)
    documented = schema(schema_name)
    properties = set(documented.get("properties", {}))
    assert set(fields) <= properties, f"{interface} reads fields the API does not document: {set(fields) - properties}"
    required = set(documented.get("required", []))
    missing = {f for f in required if f not in fields or fields[f]}
    assert not missing, f"{interface} leaves out or makes optional what the API always sends: {missing}"


def test_the_type_check_catches_a_field_the_api_does_not_have():
    """The comparison above can fail: a field the API lacks is found."""
    source = (CLIENT / "src" / "index.ts").read_text().replace("  attempts: number;", "  attempts: number;\n"
                                                                  "  invented_field: string;", 1)
    assert "invented_field" in interface_fields(source, "JobStatus")
    assert "invented_field" not in schema("Job").get("properties", {})


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
