"""Async request/response client for the supervisor's ROUTER (used by the gateway and the CLI).
A request that cannot be delivered at once, or gets no answer in time, raises Unavailable."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Optional

import zmq
import zmq.asyncio

from pose_common import protocol as P


class Unavailable(RuntimeError):
    """The supervisor is not there or did not answer in time."""


class SupervisorClient:
    def __init__(self, runtime_dir: str, timeout_s: float = 0.8):
        self.endpoint = P.endpoints(runtime_dir).gateway
        self.timeout_s = timeout_s
        self.ctx = zmq.asyncio.Context()
        self.sock: Optional[zmq.asyncio.Socket] = None
        self.pending: dict[str, asyncio.Future] = {}
        self.reader: Optional[asyncio.Task] = None
        self.dropped = 0

    async def start(self) -> None:
        self.sock = P.connect_dealer(self.ctx, self.endpoint, f"client-{uuid.uuid4().hex[:8]}")
        self.reader = asyncio.create_task(self.read_replies())

    async def close(self) -> None:
        if self.reader:
            self.reader.cancel()
        if self.sock:
            self.sock.close(linger=0)
        self.ctx.term()

    def started_sock(self) -> zmq.asyncio.Socket:
        if self.sock is None:
            raise RuntimeError("SupervisorClient.start() was not awaited")
        return self.sock

    async def read_replies(self) -> None:
        sock = self.started_sock()
        while True:
            parts = await sock.recv_multipart(copy=False)
            try:
                env = P.unpack(parts)
            except P.ProtocolError:
                self.dropped += 1
                continue
            future = self.pending.pop(env.req or "", None)
            if future is not None and not future.done():
                future.set_result(env)

    async def request(self, kind: str, timeout_s: Optional[float] = None, blobs: Optional[list] = None,
                      **body: Any) -> tuple[int, dict]:
        """-> (status, body). Raises Unavailable."""
        timeout = timeout_s or self.timeout_s
        req = uuid.uuid4().hex
        body["deadline"] = time.time() + timeout
        sock = self.started_sock()
        future = asyncio.get_running_loop().create_future()
        self.pending[req] = future
        try:
            await sock.send_multipart(P.pack(P.Envelope(kind, body, req=req, blobs=blobs or [])),
                                           flags=zmq.NOBLOCK, copy=False)
            env = await asyncio.wait_for(future, timeout)
        except zmq.Again:
            raise Unavailable("supervisor is not running (no connection)") from None
        except asyncio.TimeoutError:
            raise Unavailable(f"supervisor did not answer within {timeout:g}s") from None
        finally:
            self.pending.pop(req, None)
        return (env.status if env.status is not None else 200), env.body
