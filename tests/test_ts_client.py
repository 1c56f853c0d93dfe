"""The TypeScript client in examples/ts-client: its types held to the OpenAPI document, compiled with
`tsc` (strict), and run against a live daemon with a token, as the backend would use it. Needs node
and npm (the typescript compiler comes from the npm registry through the package's own lockfile);
the compile-and-run test is in the endurance tier (tests/endurance/test_ts_client_live.py)."""
from __future__ import annotations

import re

import pytest
import yaml

from support import REPO

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
