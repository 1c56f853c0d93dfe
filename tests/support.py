"""Helpers for tests that run the real processes: start/stop a supervisor (and gateway), talk to
them over the real protocol, make small clips. Every wait is bounded."""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import av
import numpy as np
import zmq

from pose_common import protocol as P

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CLIP = SHARED_DATA / "snowboard_k0z18lmds.mp4"
PHOTO = SHARED_DATA / "person_standing.jpg"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_clip(path: Path, frames: int = 48, size: int = 64, fps: int = 30) -> Path:
    """A tiny synthetic clip (moving square), enough for engines that find nobody."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.zeros((size, size, 3), dtype=np.uint8)
            img[(i * 2) % (size - 8):(i * 2) % (size - 8) + 8, 10:18] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_while_progressing(predicate: Callable[[], Any], progress: Callable[[], Any], stall: float, cap: float,
                           interval: float = 0.2, what: str = "condition") -> Any:
    """Like wait_for, but a slow machine is not a failure: the wait runs out only when `progress()` has
    not changed for `stall` seconds (or after `cap` in all), so a CPU-starved run that keeps storing
    frames is told from one that stopped."""
    started = last_change = time.monotonic()
    seen = progress()
    while (now := time.monotonic()) - last_change < stall and now - started < cap:
        value = predicate()
        if value:
            return value
        if (current := progress()) != seen:
            seen, last_change = current, now
        time.sleep(interval)
    raise AssertionError(f"no progress for {stall}s (or {cap}s in all) waiting for {what}; last seen {seen}")


class SupervisorConn:
    """A blocking DEALER client speaking the real protocol."""

    def __init__(self, runtime_dir: str):
        self.ctx = zmq.Context()
        self.sock = P.connect_dealer(self.ctx, P.endpoints(runtime_dir).gateway, f"test-{uuid.uuid4().hex[:6]}")

    def request(self, kind: str, timeout: float = 5.0, blobs: Optional[list] = None, **body) -> tuple[int, dict]:
        req = uuid.uuid4().hex
        body["deadline"] = time.time() + timeout
        try:
            self.sock.send_multipart(P.pack(P.Envelope(kind, body, req=req, blobs=blobs or [])), flags=zmq.NOBLOCK)
        except zmq.Again:
            return 0, {"error": "unavailable"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                env = P.unpack(self.sock.recv_multipart())
                if env.req == req:
                    return (env.status if env.status is not None else 200), env.body
        return 0, {"error": "timeout"}

    def health(self) -> dict:
        status, body = self.request("health")
        return body.get("health", {}) if status else {}

    def job(self, job_id: str) -> dict:
        return self.request("status", job_id=job_id)[1].get("job", {})

    def diagnostics(self) -> dict:
        return self.request("diagnostics", timeout=10)[1]

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class Stack:
    """A supervisor (and optionally a gateway) as real subprocesses with their own state dir."""

    def __init__(self, tmp: Path, overrides: list[str], gateway: bool = False):
        self.state_dir = tmp / "state"
        self.port = free_port()
        # the pytest run's temp root holds every clip a test makes; the supervisor refuses the rest
        roots = [] if any(o.startswith("jobs.allowed_roots=") for o in overrides) else \
            [f"jobs.allowed_roots=[{tmp.parent},{SHARED_DATA}]"]
        self.overrides = [f"state_dir={self.state_dir}", f"gateway.port={self.port}", *roots, *overrides]
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = tmp
        self.start("supervisor")
        if gateway:
            self.start("gateway")
        self.conn = SupervisorConn(str(self.state_dir / "run"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, role: str) -> subprocess.Popen:
        log = open(self.logs / f"{role}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "pose_service.cli", role, *self.overrides],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO)
        self.procs[role] = proc
        return proc

    def wait_ready(self, timeout: float = 60) -> dict:
        return wait_for(lambda: self.conn.health().get("status") in ("ready", "degraded") and self.conn.health(),
                        timeout, what="worker ready")

    def submit(self, path: Path, **extra) -> str:
        """Retries while the supervisor is still starting."""
        status, body = wait_for(lambda: (r := self.conn.request("submit", video_path=str(path), **extra))[0] and r,
                                30, what="supervisor to accept")
        assert status in (200, 202), body
        return body["job"]["job_id"]

    def wait_job(self, job_id: str, timeout: float = 60) -> dict:
        return wait_for(lambda: (j := self.conn.job(job_id)).get("state") in ("done", "error") and j, timeout,
                        what=f"job {job_id} to finish")

    def result(self, job: dict) -> dict:
        with open(job["result_path"]) as fh:
            return json.load(fh)

    def crashes(self) -> list[dict]:
        return self.conn.diagnostics().get("crashes", [])

    def worker_pid(self) -> Optional[int]:
        return self.conn.diagnostics().get("worker", {}).get("pid")

    def stop(self) -> None:
        self.conn.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def log_text(self, role: str = "supervisor") -> str:
        return (self.logs / f"{role}.log").read_text(errors="replace")


def http(method: str, url: str, body: Any = None, timeout: float = 10, headers: Optional[dict] = None,
         raw: Optional[bytes] = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    request = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
            return response.status, _parse(payload, response.headers.get("Content-Type", ""))
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        return exc.code, _parse(payload, exc.headers.get("Content-Type", ""))
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, {"connection_error": str(exc)}


def multipart(files: dict[str, tuple[str, bytes, str]], fields: dict[str, str]) -> tuple[bytes, str]:
    """What form-data / React Native FormData send: -> (body, content type)."""
    boundary = f"----formdata-{uuid.uuid4().hex}"
    out = bytearray()
    for name, value in fields.items():
        out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
    for name, (filename, data, ctype) in files.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def post_form(url: str, fields: dict, file_field: str, filename: str, data: bytes, timeout: float = 600,
              content_type: str = "video/mp4") -> tuple[int, Any]:
    body, ctype = multipart({file_field: (filename, data, content_type)}, fields)
    return http("POST", url, raw=body, headers={"Content-Type": ctype}, timeout=timeout)


def _parse(payload: bytes, content_type: str) -> Any:
    if "json" in content_type:
        return json.loads(payload)
    return payload


def process_name(pid: int) -> str:
    """The name /proc shows for the process (set by prctl or the executable), "" once it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie child of a dead parent counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] == "Z"
    except OSError:
        return True
    return False


def needs_shared_data():
    import pytest
    return pytest.mark.skipif(not CLIP.exists(), reason=f"shared test data not found at ../shared/data "
                                                        f"(a user's clone has none); {CLIP.name} is needed")


class Served:
    """`pose-service serve` as systemd runs it, with its own state dir and port; stopped by the test."""

    def __init__(self, tmp: Path, overrides: list[str], env: Optional[dict] = None, port: Optional[int] = None,
                 pass_fds: tuple = (), argv_prefix: Optional[list[str]] = None):
        self.tmp, self.port = tmp, port or free_port()
        self.state_dir = tmp / "state"
        self.overrides = [f"state_dir={self.state_dir}", f"gateway.port={self.port}",
                          f"jobs.allowed_roots=[{tmp.parent},{SHARED_DATA}]", *overrides]
        self.log_path = tmp / "serve.log"
        tmp.mkdir(parents=True, exist_ok=True)
        argv = [*(argv_prefix or []), sys.executable, "-m", "pose_service.cli", "serve", *self.overrides]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=log, env={**os.environ, **(env or {})},
                                         pass_fds=pass_fds)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> dict:
        return wait_for(lambda: (r := http("GET", self.url + "/v1/health", timeout=2))[0] == 200 and r[1], timeout,
                        what="serve ready")

    def diagnostics(self) -> dict:
        return http("GET", self.url + "/v1/diagnostics", timeout=10)[1]

    def job(self, job_id: str) -> dict:
        status, body = http("GET", f"{self.url}/v1/jobs/{job_id}", timeout=5)
        return body if status == 200 else {}

    def finished_job(self, job_id: str) -> Optional[dict]:
        job = self.job(job_id)
        return job if job.get("status") in ("done", "error") else None

    def wait_job(self, job_id: str, timeout: float = 60) -> dict:
        return wait_for(lambda: self.finished_job(job_id), timeout, interval=0.2, what=f"job {job_id} to finish")

    def job_progress(self, job_id: str) -> tuple:
        job = self.job(job_id)
        return (job.get("status"), job.get("phase"), job.get("frames_done"), job.get("attempts"),
                (job.get("resume") or {}).get("warm_frames_done"))

    def wait_job_progressing(self, job_id: str, stall: float = 300, cap: float = 3600) -> dict:
        """Waits as long as the job keeps moving (status, phase, stored frames, attempts, warm-up)."""
        return wait_while_progressing(lambda: self.finished_job(job_id), lambda: self.job_progress(job_id), stall, cap,
                                      what=f"job {job_id} to finish")

    def stop(self, timeout: float = 30) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET: collects what the service says."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.seen: list[tuple[float, str]] = []

    def drain(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.seen
            self.seen.extend((time.monotonic(), line) for line in data.decode().splitlines())

    def lines(self, prefix: str) -> list[float]:
        return [at for at, line in self.drain() if line.startswith(prefix)]

    def close(self) -> None:
        self.sock.close()


class PostgresServer:
    """A throwaway PostgreSQL (Debian's packages) in a temp dir, on a unix socket only. initdb refuses
    root, so as root it runs as the package's `postgres` user. Started and stopped by the test."""

    def __init__(self, durable: bool = False):
        import glob
        import shutil
        import tempfile

        self.durable = durable  # fsync on, as in production; tests run without it
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
        if not found or not found[-1]:
            import pytest
            pytest.skip("PostgreSQL server not installed (Debian package postgresql)")
        self.bin = Path(found[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="pose-pg-"))
        self.as_user = []
        if os.geteuid() == 0:
            import pwd
            owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = self.dir / "data"
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()
        self._run("createdb", "-h", str(self.dir), "-U", "postgres", "pose")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/pose?host={self.dir}"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-o",
                  f"-k {self.dir} -c listen_addresses='' -c fsync={'on' if self.durable else 'off'}"
                  " -c max_connections=100", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        import shutil
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class HeadlessChromium:
    """Debian's Chromium, headless, driven over the DevTools protocol (aiohttp's websocket client):
    open a page, collect console errors and exceptions, evaluate script, take a screenshot."""

    FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", "--window-size=1200,1600", "--autoplay-policy=no-user-gesture-required"]

    def __init__(self, tmp: Path):
        import shutil
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            import pytest
            pytest.skip("chromium not installed (Debian package chromium; `make test` installs it as root)")
        profile = tmp / "chromium-profile"
        self.proc = subprocess.Popen([binary, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        wait_for(port_file.exists, 30, what="chromium's DevTools port")
        self.port = int(wait_for(lambda: port_file.read_text().split("\n")[0], 10, what="port number"))
        self.errors: list[str] = []

    def visit(self, url: str, script: str, timeout: float = 30) -> tuple[Any, bytes]:
        """Load `url`, evaluate `script` (may return a promise), screenshot. -> (value, png)."""
        import asyncio
        return asyncio.run(asyncio.wait_for(self._visit(url, script), timeout))

    async def _visit(self, url: str, script: str) -> tuple[Any, bytes]:
        import base64

        import aiohttp

        async with aiohttp.ClientSession() as http_session:
            async with http_session.put(f"http://127.0.0.1:{self.port}/json/new?about:blank") as response:
                target = await response.json(content_type=None)
            async with http_session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                session = _CdpSession(ws, self.errors)
                for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
                    await session.call(domain)
                await session.call("Page.navigate", url=url)
                await session.until("Page.loadEventFired")
                value = await session.call("Runtime.evaluate", expression=script, awaitPromise=True,
                                           returnByValue=True)
                shot = await session.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
                return value["result"].get("value"), base64.b64decode(shot["data"])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class _CdpSession:
    def __init__(self, ws, errors: list[str]):
        self.ws, self.errors, self.next_id, self.seen = ws, errors, 0, []

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self._receive()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def until(self, event: str) -> dict:
        if any(m.get("method") == event for m in self.seen):
            return next(m for m in self.seen if m.get("method") == event)
        while (message := await self._receive()).get("method") != event:
            pass
        return message

    async def _receive(self) -> dict:
        message = await self.ws.receive_json()
        self.seen.append(message)
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(str(params.get("exceptionDetails", {}).get("text")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(str(params.get("args")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.errors.append(str(params["entry"].get("text")))
        return message


def assert_token_guards(url: str, token: str) -> None:
    """A gateway that just started: liveness open, the rest only with `Authorization: Bearer <token>`."""
    wait_for(lambda: http("GET", url + "/health")[0] == 200, 30, what="the gateway")
    assert http("GET", url + "/v1/jobs")[0] == 401
    assert http("GET", url + "/v1/jobs", headers={"Authorization": f"Bearer {token}"})[0] != 401


def closed_by_server(socks: list[socket.socket]) -> list[socket.socket]:
    """The sockets the server has closed (readable, and nothing to read), seen in one look, in the
    order given."""
    readable, _, _ = select.select(socks, [], [], 0.5)
    closed = []
    for sock in readable:
        try:
            if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                closed.append(sock)
        except BlockingIOError:
            pass
        except OSError:
            closed.append(sock)
    return sorted(closed, key=socks.index)
