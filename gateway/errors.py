"""Every error leaves as JSON {error: <reason>, code: <stable machine word>, ...} with a meaningful
status; never a reset socket, never a traceback, an internal path or a library's own words."""
from __future__ import annotations

from http import HTTPStatus
from typing import Any, Optional

import structlog
from aiohttp import web

from pose_common.client import Unavailable

LOG_KEY = web.AppKey("log", structlog.stdlib.BoundLogger)  # what pose_common.logs.setup_logging returns
BODY_LIMIT_KEY = web.AppKey("body_limit", int)  # bytes aiohttp reads of a request body

# the code an error carries when its raiser names none: one word per status
CODE_OF_STATUS = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    408: "request_timeout", 409: "conflict", 410: "gone", 411: "length_required", 413: "too_large",
    415: "unsupported_media_type", 422: "unprocessable", 429: "queue_full", 431: "headers_too_large",
    500: "internal", 501: "not_implemented", 503: "unavailable", 504: "timeout", 507: "insufficient_storage",
}


def code_of(status: int) -> str:
    return CODE_OF_STATUS.get(status, "client_error" if status < 500 else "server_error")


def error_body(status: int, message: str, /, **extra: Any) -> dict:
    return {"error": message, "code": extra.pop("code", None) or code_of(status), **extra}


def with_code(body: dict, status: int) -> dict:
    """A handler's own error answer (the legacy shapes) gets its machine code too."""
    if status >= 400 and "error" in body and not body.get("code"):
        return {**body, "code": code_of(status)}
    return body


class ApiError(Exception):
    def __init__(self, status: int, message: str, /, headers: Optional[dict] = None, **extra: Any):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(status, message, **extra), headers or {}


class BodyCut(TimeoutError):
    """Set on a request's body stream when the body is too slow or too long (gateway.serving): each
    read of it raises this. A TimeoutError, so aiohttp's lingering read after the answer takes it
    for the timeout it is and closes the connection quietly."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.error = ApiError(408, message, code=code)


def json_error(status: int, message: str, /, headers: Optional[dict] = None, **extra: Any) -> ApiError:
    """extra may hold a body field named status (the job's), apart from the HTTP status."""
    return ApiError(status, message, headers, **extra)


@web.middleware
async def json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body, status=exc.status, headers=exc.headers)
    except BodyCut as exc:
        return web.json_response(exc.error.body, status=exc.error.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return aiohttp_error(request, exc)
    except Unavailable as exc:
        return web.json_response(error_body(503, str(exc), status="unavailable"), status=503)
    except Exception:  # a bug, not the client's doing: logged with its traceback, answered without it
        request.app[LOG_KEY].exception("handler_error", path=request.path)
        return web.json_response(error_body(500, "internal error (logged by the gateway)"), status=500)


def aiohttp_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (404 no route, 405 with its Allow header, 413 body limit) as JSON."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    body = error_body(exc.status, exc.reason or HTTPStatus(exc.status).phrase)
    if exc.status == 413:  # gateway.max_json_mb
        limit = request.app.get(BODY_LIMIT_KEY)
        body.update(error=f"request body larger than {limit or 0:,} bytes (gateway.max_json_mb)",
                    code="too_large", limit_bytes=limit)
    return web.json_response(body, status=exc.status, headers=headers)
