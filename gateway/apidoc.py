"""The API described the standard way: GET /openapi.json (from gateway/openapi.yaml, which
tests/test_openapi.py holds to the application's routes) and GET /docs, a self-contained page."""
from __future__ import annotations

import html
from functools import lru_cache
from pathlib import Path

import yaml
from aiohttp import web

SPEC = Path(__file__).with_name("openapi.yaml")
METHODS = ("get", "post", "put", "patch", "delete")

routes = web.RouteTableDef()


@lru_cache(maxsize=1)
def spec() -> dict:
    return yaml.safe_load(SPEC.read_text())


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(spec())


@routes.get("/docs")
async def docs(request: web.Request) -> web.Response:
    return web.Response(text=render(spec()), content_type="text/html", charset="utf-8")


def render(document: dict) -> str:
    rows = []
    for path, item in document["paths"].items():
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            codes = ", ".join(sorted(operation.get("responses", {})))
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(', '.join(operation.get('tags', [])))}</td>"
                        f"<td>{html.escape(operation.get('summary', ''))}</td><td>{html.escape(codes)}</td></tr>")
    info = document["info"]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(info['title'])} API"
            "</title><style>body{font-family:system-ui,sans-serif;margin:2em}td,th{padding:3px 8px;text-align:left;"
            "border-bottom:1px solid #ddd}table{border-collapse:collapse}</style></head><body>"
            f"<h1>{html.escape(info['title'])} API</h1><p>{html.escape(info.get('description', ''))}</p>"
            "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a></p><table><tr><th>method</th><th>path</th>"
            f"<th>tags</th><th>what</th><th>answers</th></tr>{''.join(rows)}</table></body></html>")
