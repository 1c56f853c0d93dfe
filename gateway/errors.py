"""Every error leaves as JSON {error, ...} with a meaningful status; never a reset socket."""
from __future__ import annotations

from typing import Any, Optional

from aiohttp import web

from pose_common.client import Unavailable

LOG_KEY = web.AppKey("log", object)
BODY_LIMIT_KEY = web.AppKey("body_limit", int)  # bytes aiohttp reads of a request body


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Optional[dict] = None, **extra: Any):
        super().__init__(message)
        self.status, self.body, self.headers = status, {"error": message, **extra}, headers or {}


def json_error(status: int, message: str, headers: Optional[dict] = None, **extra: Any) -> ApiError:
    return ApiError(status, message, headers, **extra)


@web.middleware
async def json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body, status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body, headers = {"error": exc.reason}, {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        if exc.status == 413:  # aiohttp's own body limit (gateway.max_json_mb); its text names the limit
            body.update(error=exc.text or exc.reason, code="too_large", limit_bytes=request.app.get(BODY_LIMIT_KEY))
        return web.json_response(body, status=exc.status, headers=headers)
    except Unavailable as exc:
        return web.json_response({"error": str(exc), "status": "unavailable"}, status=503)
    except Exception as exc:  # last resort: still JSON
        request.app[LOG_KEY].exception("handler_error", path=request.path)
        return web.json_response({"error": f"Server error: {type(exc).__name__}: {exc}"}, status=500)
