"""Every error leaves as JSON {error, ...} with a meaningful status; never a reset socket."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from pose_common.client import Unavailable

LOG_KEY = web.AppKey("log", object)


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.body = status, {"error": message, **extra}


def json_error(status: int, message: str, **extra: Any) -> ApiError:
    return ApiError(status, message, **extra)


@web.middleware
async def json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body, status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)
    except Unavailable as exc:
        return web.json_response({"error": str(exc), "status": "unavailable"}, status=503)
    except Exception as exc:  # last resort: still JSON
        request.app[LOG_KEY].exception("handler_error", path=request.path)
        return web.json_response({"error": f"Server error: {type(exc).__name__}: {exc}"}, status=500)
