"""The HTTP server under the application, hardened where aiohttp leaves it to the application:

- Slow or idle clients: aiohttp's keep-alive timer starts when a connection opens and closes it
  when no complete request head has arrived by then (a half-sent or dripped head included), so
  `keepalive_timeout` (gateway.idle_timeout_s) is also the header read timeout. Body reads are
  bounded by gateway.body_timeout_s in the handlers (408).
- Too many connections: aiohttp accepts every connection and leaves limits to the application
  (aio-libs/aiohttp#675), so past gateway.max_connections a new connection gets a 503 and is closed.
- Requests the HTTP parser refuses (a bad request line, header or chunk) are answered as JSON
  like every other error, without echoing the parser's words or the client's bytes."""
from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any, Optional

from aiohttp import web

from gateway.errors import error_body

PARSER_REFUSAL = "malformed HTTP request (request line, headers or chunked framing)"
BUSY_BODY = b'{"error": "too many connections; try again in a moment", "code": "too_many_connections"}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Retry-After: 1\r\nContent-Length: " + str(len(BUSY_BODY)).encode() + b"\r\n\r\n" + BUSY_BODY)


class JsonErrorsHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with its last-resort answers in JSON."""

    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: Optional[BaseException] = None,
                     message: Optional[str] = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; refuses once a response has started
        reason = PARSER_REFUSAL if status == 400 else HTTPStatus(status).phrase.lower()
        response = web.json_response(error_body(status, reason, **({"code": "malformed_http"} if status == 400
                                                                   else {})), status=status)
        response.force_close()
        return response


class GuardedServer(web.Server):
    def __init__(self, plain: web.Server, max_connections: int, **handler_args: Any):
        super().__init__(plain.request_handler, request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation, **handler_args)
        self.handler_args = handler_args
        self.max_connections = max_connections
        self.loop = asyncio.get_running_loop()

    def __call__(self) -> web.RequestHandler:
        return JsonErrorsHandler(self, loop=self.loop, **self.handler_args)

    def connection_made(self, handler: web.RequestHandler, transport) -> None:
        super().connection_made(handler, transport)
        if len(self.connections) > self.max_connections:
            transport.write(BUSY)
            handler.force_close()
            transport.close()


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server is a GuardedServer (the application's startup and cleanup unchanged)."""

    def __init__(self, app: web.Application, *, max_connections: int, shutdown_timeout: float,
                 **handler_args: Any):
        super().__init__(app, shutdown_timeout=shutdown_timeout, **handler_args)
        self.handler_args = handler_args
        self.max_connections = max_connections

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(plain, self.max_connections, **self.handler_args)
