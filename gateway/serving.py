"""The HTTP server under the application, hardened where aiohttp leaves it to the application:

- Slow or idle clients: aiohttp's keep-alive timer starts when a connection opens and closes it
  when no complete request head has arrived by then (a half-sent or dripped head included), so
  `keepalive_timeout` (gateway.idle_timeout_s) is also the header read timeout. Each body read is
  bounded by gateway.body_timeout_s in the handlers (408); the whole body by gateway.body_deadline_s
  and gateway.body_min_bytes_per_s here (BodyWatch: 408, whatever reads it).
- Too many connections: aiohttp accepts every connection and leaves limits to the application
  (aio-libs/aiohttp#675). Above gateway.evict_idle_above of gateway.max_connections, a new connection
  first closes the oldest idle ones (kept alive after a full response, with no request in progress
  and no byte received since, read or unread), then cuts a body arriving below the minimum rate (it
  is answered 408). A connection whose request has not been read and answered is never closed.
  Past gateway.max_connections, a connection that has sent nothing at all since it opened is closed
  for the newcomer, oldest first; a newcomer that still finds no room gets a 503 and is closed. A
  flood of idle or slow connections therefore costs /health and the backend a retry, not the length
  of a timeout, and a burst of requests within gateway.max_connections is answered whole.
- Requests the HTTP parser refuses (a bad request line, header or chunk) are answered as JSON
  like every other error, without echoing the parser's words or the client's bytes."""
from __future__ import annotations

import asyncio
import fcntl
import itertools
import math
import struct
import termios
from http import HTTPStatus
from typing import Any, Iterable, Optional

from aiohttp import web

from configs import Config
from gateway.errors import BodyCut, error_body

CROWDED_GRACE_S = 1.0
PARSER_REFUSAL = "malformed HTTP request (request line, headers or chunked framing)"
BUSY_BODY = b'{"error": "too many connections; try again in a moment", "code": "too_many_connections"}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Retry-After: 1\r\nContent-Length: " + str(len(BUSY_BODY)).encode() + b"\r\n\r\n" + BUSY_BODY)


def unread_bytes(transport: Optional[asyncio.BaseTransport]) -> int:
    """Bytes the kernel holds for a connection that the event loop has not read yet (a request that
    has just arrived); -1 when that cannot be told."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return -1
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return -1


class JsonErrorsHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with its last-resort answers in JSON, keeping what the
    server needs to choose a connection it may close: whether a response was ever finished on it,
    and whether bytes arrived since (or since it opened)."""

    __slots__ = ("answered", "heard")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answered = False
        self.heard = False

    def data_received(self, data: bytes) -> None:
        self.heard = True
        super().data_received(data)

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: Optional[float]) -> tuple[web.StreamResponse, bool]:
        finished = await super().finish_response(request, resp, start_time)
        self.answered, self.heard = True, False
        return finished

    def quiet(self) -> bool:
        """Nothing received since it opened or since its last response, neither read nor waiting in
        the socket, and aiohttp waiting for the next request (the test its keep-alive timer uses:
        no request in progress, none queued)."""
        waiting = self._waiter is not None and not self._waiter.done()
        return waiting and not self.heard and unread_bytes(self.transport) == 0

    def idle_after_answer(self) -> bool:
        return self.answered and self.quiet()

    def never_used(self) -> bool:
        """Not a byte received since it opened, read or unread, so no request can be in progress
        (its handler task may not have started yet: a burst of connections accepted together)."""
        return not self.answered and not self.heard and unread_bytes(self.transport) == 0

    def handle_error(self, request, status: int = 500, exc: Optional[BaseException] = None,
                     message: Optional[str] = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; refuses once a response has started
        reason = PARSER_REFUSAL if status == 400 else HTTPStatus(status).phrase.lower()
        response = web.json_response(error_body(status, reason, **({"code": "malformed_http"} if status == 400
                                                                   else {})), status=status)
        response.force_close()
        return response


class BodyWatch:
    """One request body on its way in: past its deadline, or below the minimum rate once its grace is
    over, the body stream is failed with BodyCut, so every read of it (by any handler) ends in 408."""

    def __init__(self, stream, deadline_s: float, min_rate: float, grace_s: float):
        self.stream, self.deadline_s, self.min_rate, self.grace_s = stream, deadline_s, min_rate, grace_s
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()

    def arrived(self) -> bool:
        return self.stream.is_eof() or self.stream.exception() is not None

    def rate_due(self) -> float:
        """Seconds after the start at which the bytes so far fall below the minimum rate."""
        return self.stream.total_bytes / self.min_rate if self.min_rate > 0 else math.inf

    def too_slow(self) -> bool:
        """Below the minimum rate, with a second's grace instead of gateway.body_rate_grace_s (how a
        crowded server picks what to cut)."""
        return not self.arrived() and self.loop.time() - self.started >= max(CROWDED_GRACE_S, self.rate_due())

    async def run(self) -> None:
        while not self.arrived():
            elapsed = self.loop.time() - self.started
            rate_due = max(self.grace_s, self.rate_due())
            if elapsed >= self.deadline_s:
                return self.cut(f"the request body was still arriving after {self.deadline_s:g} s "
                                "(gateway.body_deadline_s)", "body_deadline")
            if elapsed >= rate_due:
                return self.cut(self.slow_reason(), "body_too_slow")
            await asyncio.sleep(max(0.05, min(self.deadline_s, rate_due) - elapsed))

    def slow_reason(self) -> str:
        return (f"the request body arrived slower than {self.min_rate:g} bytes/s "
                "(gateway.body_min_bytes_per_s)")

    def cut(self, reason: str, code: str) -> None:
        if not self.arrived():
            self.stream.set_exception(BodyCut(reason, code))


class Traffic:
    """What the server needs to know of the application's requests to choose a body to cut: which
    connections are inside a handler now, with their body's watch."""

    def __init__(self) -> None:
        self.in_flight: dict[Any, Optional[BodyWatch]] = {}

    def watch_requests(self, cfg: Config):
        """The middleware: registers each request's connection and watches its body, if it has one."""
        gateway = cfg.gateway
        limits = (float(gateway.body_deadline_s), float(gateway.body_min_bytes_per_s), float(gateway.body_rate_grace_s))

        @web.middleware
        async def watch(request: web.Request, handler):
            connection = request.protocol
            body = BodyWatch(request.content, *limits) if request.body_exists else None
            watcher = asyncio.create_task(body.run()) if body else None
            self.in_flight[connection] = body
            try:
                return await handler(request)
            finally:
                self.in_flight.pop(connection, None)
                if watcher:
                    watcher.cancel()

        return watch


def understood_expectations(app_handler):
    """aiohttp answers an `Expect` it does not know before any middleware runs, in plain text, and
    with a 500 when the header's bytes are not UTF-8; so anything but `100-continue` (which aiohttp
    answers itself) gets its JSON 417 here first."""
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        expect = request.headers.get("Expect")
        if expect and expect.lower() != "100-continue":
            return web.json_response(error_body(417, "the only expectation understood is Expect: 100-continue",
                                                code="expectation_failed"), status=417)
        return await app_handler(request)
    return handle


class GuardedServer(web.Server):
    def __init__(self, plain: web.Server, max_connections: int, evict_idle_above: float, traffic: Traffic,
                 **handler_args: Any):
        super().__init__(understood_expectations(plain.request_handler), request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation, **handler_args)
        self.handler_args = handler_args
        self.max_connections = max_connections
        self.crowded_at = max(1, int(max_connections * evict_idle_above))
        self.traffic = traffic
        self.closing: set = set()  # closed by us, not yet gone
        self.loop = asyncio.get_running_loop()

    def __call__(self) -> web.RequestHandler:
        return JsonErrorsHandler(self, loop=self.loop, **self.handler_args)

    def connection_made(self, handler: web.RequestHandler, transport) -> None:
        super().connection_made(handler, transport)
        live = self.live_connections()
        if len(live) > self.crowded_at:
            self.make_room(live, handler, len(live) - self.crowded_at)
            live = self.live_connections()
        if len(live) > self.max_connections:
            # someone goes unserved either way: rather one that has not spoken than the newcomer (a
            # flood of idle connections must not lock /health out until gateway.idle_timeout_s)
            unused = (h for h in live if h is not handler and h.never_used())
            self.close_oldest(unused, len(live) - self.max_connections)
            live = self.live_connections()
        if len(live) > self.max_connections:
            transport.write(BUSY)
            handler.force_close()
            transport.close()

    def live_connections(self) -> list[JsonErrorsHandler]:
        """Open connections, oldest first, less those already closed or being cut (aiohttp forgets a
        connection only once its handler task has ended)."""
        return [h for h in self.connections if isinstance(h, JsonErrorsHandler) and h.transport is not None
                and h not in self.closing]

    def connection_lost(self, handler: web.RequestHandler, exc: Optional[BaseException] = None) -> None:
        super().connection_lost(handler, exc)
        self.closing.discard(handler)

    def make_room(self, live: list[JsonErrorsHandler], newcomer: web.RequestHandler, wanted: int) -> None:
        """Close up to `wanted` connections idle after a response, oldest first; if that is not
        enough, cut bodies arriving below the minimum rate, slowest first."""
        wanted -= self.close_oldest((h for h in live if h is not newcomer and h.idle_after_answer()), wanted)
        slow = [(h, w) for h, w in self.traffic.in_flight.items() if w is not None and w.too_slow()
                and h not in self.closing]
        slow.sort(key=lambda item: item[1].stream.total_bytes / max(1e-3, self.loop.time() - item[1].started))
        for handler, watch in slow[:max(0, wanted)]:
            self.closing.add(handler)
            watch.cut(watch.slow_reason() + "; the server is near its connection limit", "body_too_slow")

    def close_oldest(self, candidates: Iterable[JsonErrorsHandler], wanted: int) -> int:
        """Close the first `wanted` of the candidates (oldest first). -> how many it closed."""
        closed = 0
        for handler in itertools.islice(candidates, max(0, wanted)):
            self.closing.add(handler)
            handler.force_close()
            closed += 1
        return closed


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server is a GuardedServer (the application's startup and cleanup unchanged)."""

    def __init__(self, app: web.Application, *, max_connections: int, evict_idle_above: float, traffic: Traffic,
                 shutdown_timeout: float, **handler_args: Any):
        super().__init__(app, shutdown_timeout=shutdown_timeout, **handler_args)
        self.handler_args = handler_args
        self.max_connections, self.evict_idle_above, self.traffic = max_connections, evict_idle_above, traffic

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(plain, self.max_connections, self.evict_idle_above, self.traffic, **self.handler_args)
