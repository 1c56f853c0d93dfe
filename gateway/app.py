"""The aiohttp application: the native /v1 API (gateway.native) and the backend's legacy routes
(gateway.legacy) on one port, with one supervisor client and one error middleware."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
from contextlib import asynccontextmanager

from aiohttp import web

from configs import Config
from gateway import apidoc, legacy, native, security
from gateway.errors import BODY_LIMIT_KEY, LOG_KEY, json_errors
from gateway.helpers import CFG_KEY, CLIENT_KEY
from gateway.serving import GuardedRunner, Traffic
from gateway.store import READER_KEY, LedgerReader
from pose_common.client import SupervisorClient
from pose_common.logs import setup_logging

TRAFFIC_KEY = web.AppKey("traffic", Traffic)


def build_app(cfg: Config) -> web.Application:
    traffic = Traffic()
    app = web.Application(middlewares=[json_errors, traffic.watch_requests(cfg),
                                       security.guard(cfg, security.read_token(cfg))],
                          client_max_size=cfg.gateway.max_json_mb << 20)
    app[TRAFFIC_KEY] = traffic
    app[CFG_KEY] = cfg
    app[BODY_LIMIT_KEY] = cfg.gateway.max_json_mb << 20
    app[LOG_KEY] = setup_logging("gateway", cfg.log_level)
    app.cleanup_ctx.append(supervisor_client)
    app.cleanup_ctx.append(ledger_reader)
    app.add_routes(native.routes)
    app.add_routes(apidoc.routes)
    legacy.add_routes(app)
    return app


@asynccontextmanager
async def _client_ctx(app: web.Application):
    cfg = app[CFG_KEY]
    sup = SupervisorClient(cfg.runtime_dir, cfg.gateway.supervisor_timeout_s)
    await sup.start()
    app[CLIENT_KEY] = sup
    try:
        yield
    finally:
        await sup.close()


async def ledger_reader(app: web.Application):
    app[READER_KEY] = LedgerReader(app[CFG_KEY])
    yield
    app[READER_KEY].close()


async def supervisor_client(app: web.Application):
    async with _client_ctx(app):
        yield


def main(cfg: Config) -> int:
    """The caller (pose_service.cli) has checked security.startup_refusal first."""
    app = build_app(cfg)
    app[LOG_KEY].info("gateway_start", host=cfg.gateway.host, port=cfg.gateway.port)
    asyncio.run(serve(app, cfg))
    return 0


async def serve(app: web.Application, cfg) -> None:
    """Serve until SIGTERM/SIGINT, then finish what is in flight (up to 10 s). Slow, idle and surplus
    connections are dealt with by gateway.serving."""
    runner = GuardedRunner(app, max_connections=cfg.gateway.max_connections,
                           evict_idle_above=cfg.gateway.evict_idle_above, traffic=app[TRAFFIC_KEY],
                           shutdown_timeout=10, keepalive_timeout=cfg.gateway.idle_timeout_s, access_log=None)
    await runner.setup()
    handed_over = os.environ.get("POSE_SERVICE_LISTEN_FD")  # the service manager's listening socket
    site = web.SockSite(runner, socket.socket(fileno=int(handed_over))) if handed_over else \
        web.TCPSite(runner, cfg.gateway.host, cfg.gateway.port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
