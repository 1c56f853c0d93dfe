"""The API description cannot drift from the code: every route the application serves is in
/openapi.json with the same methods, and nothing else is; Schemathesis then fuzzes every operation of
that document against a running daemon (bounded): no 5xx, no response that breaks the document."""
from __future__ import annotations

from configs import load_config
from gateway.apidoc import METHODS, spec
from gateway.app import build_app

from support import Stack, http, wait_for


def served_operations() -> set[tuple[str, str]]:
    app = build_app(load_config([]))
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        if route.method.lower() in METHODS:
            found.add((route.method.lower(), path))
    return found


def described_operations() -> set[tuple[str, str]]:
    return {(method, path) for path, item in spec()["paths"].items() for method in METHODS if method in item}


def test_every_route_is_described_and_nothing_else():
    served, described = served_operations(), described_operations()
    assert served - described == set(), "routes missing from gateway/openapi.yaml"
    assert described - served == set(), "documented operations that no route serves"


def test_the_document_is_served_and_valid_openapi(tmp_path):
    from openapi_spec_validator import validate
    stack = Stack(tmp_path, ["engine.name=noop", "probe.enabled=false"], gateway=True)
    try:
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] in (200, 503), 30, what="gateway")
        status, document = http("GET", stack.url + "/openapi.json")
        assert status == 200 and document == spec()
        validate(document)
        status, page = http("GET", stack.url + "/docs")
        assert status == 200 and b"/v1/jobs/{job_id}/events" in page
    finally:
        stack.stop()


def test_enumerations_in_the_document_are_the_codes():
    from pose_common.faults import KINDS
    drill = spec()["paths"]["/v1/drill"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert tuple(drill["properties"]["kind"]["enum"]) == KINDS
    from gateway.native import JOB_STATES
    states = next(p for p in spec()["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "state")
    assert tuple(states["schema"]["enum"]) == JOB_STATES
