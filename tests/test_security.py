"""Nothing takes it down from outside, and the door is locked (HTTP side). A web page cannot drive or
read the service (Host and Origin checks); a token, when set, guards every route but liveness; a
symlink swapped in after acceptance is refused wherever the video is reopened; a decompression-bomb
image is refused from its header; files and sockets are private; slow, idle and surplus connections
cannot pile up; an operator's mistyped override is one line; and a property-based fuzz of every
route gets no 5xx, only JSON errors with a code, and leaves the supervisor's PID unchanged."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from http.client import HTTPConnection
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import load_config
from gateway.app import build_app

from support import PHOTO, REPO, Stack, assert_token_guards, free_port, http, make_clip, wait_for

NOOP = ["engine.name=noop", "probe.enabled=false"]
LIVENESS = ("/health", "/v1/health")
REFUSED_PATH = {"outside_roots", "symlink"}


def routes_of_the_app(**overrides) -> list[tuple[str, str]]:
    """(method, path template) for every route the application serves, read from its router."""
    app = build_app(load_config([f"{k}={v}" for k, v in overrides.items()]))
    found = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info()
        found.append((route.method, info.get("path") or info.get("formatter")))
    return found


def concrete(template: str, **values: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "nojob" if m.group(1) == "job_id" else "0"),
                  template)


def send(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, dict, bytes]:
    """One request through http.client (raw bytes in, raw bytes out). -> (status, headers, body)."""
    parsed = urllib.parse.urlsplit(url)
    conn = HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send bytes as they are; -> all that comes back until the server closes (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except socket.timeout:
            pass
        return answer


@pytest.fixture
def gateway(tmp_path):
    stack = Stack(tmp_path, [*NOOP, "gateway.max_connections=40", "gateway.idle_timeout_s=1",
                             "gateway.body_timeout_s=1"], gateway=True)
    wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 60, what="the daemon")
    yield stack
    stack.stop()


# --- a web page cannot drive or read it ---------------------------------------------------------------
def test_cross_site_posts_and_foreign_hosts_are_refused_and_the_backend_still_works(gateway):
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"}
    generation = gateway.conn.health().get("generation")
    status, body = http("POST", gateway.url + "/v1/reload", raw=b"a=1", headers=form)
    assert status == 403 and body["code"] == "origin_not_allowed"
    status, body = http("POST", gateway.url + "/reload", raw=b"{}",
                        headers={"Content-Type": "application/json", "Origin": "null"})  # a sandboxed page
    assert status == 403 and body["code"] == "origin_not_allowed"
    assert gateway.conn.health().get("generation") == generation  # nothing was reloaded
    for method, path in (("GET", "/v1/jobs"), ("GET", "/health"), ("POST", "/v1/reload")):
        status, body = http(method, gateway.url + path, raw=b"{}" if method == "POST" else None,
                            headers={"Host": f"rebind.evil.example:{gateway.port}", "Content-Type": "application/json"})
        assert status == 403 and body["code"] == "host_not_allowed", (path, status, body)
    # what the backend sends: no Origin; Host localhost, an IP literal, or its docker-compose name
    for host in (f"localhost:{gateway.port}", f"127.0.0.1:{gateway.port}", f"pose-service:{gateway.port}",
                 f"172.24.183.130:{gateway.port}", f"[::1]:{gateway.port}"):
        assert http("GET", gateway.url + "/health", headers={"Host": host})[0] == 200, host
    assert http("POST", gateway.url + "/reload", {})[0] == 200
    # the service's own pages (same origin) may post
    same = {"Content-Type": "application/json", "Origin": gateway.url}
    assert http("POST", gateway.url + "/v1/reload", raw=b"{}", headers=same)[0] == 200


def test_a_configured_host_name_and_origin_work_and_get_cors(tmp_path):
    stack = Stack(tmp_path, [*NOOP, "gateway.allowed_origins=[http://coach.example]",
                             "gateway.allowed_hosts=[gpu-box.lan]"], gateway=True)
    try:
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 60, what="the daemon")
        assert http("GET", stack.url + "/health", headers={"Host": "gpu-box.lan:5000"})[0] == 200
        assert http("GET", stack.url + "/health", headers={"Host": "pose-service"})[0] == 403  # no longer listed
        status, headers, _ = send(stack.url, "GET", "/v1/health", headers={"Origin": "http://coach.example"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://coach.example"
        status, headers, _ = send(stack.url, "OPTIONS", "/v1/jobs", headers={
            "Origin": "http://coach.example", "Access-Control-Request-Method": "POST"})
        assert status == 204 and "POST" in headers["Access-Control-Allow-Methods"]
        assert "Authorization" in headers["Access-Control-Allow-Headers"]
        status, headers, _ = send(stack.url, "GET", "/v1/health", headers={"Origin": "http://other.example"})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers
        status, _, _ = send(stack.url, "POST", "/v1/reload", b"{}", {"Origin": "http://coach.example",
                                                                     "Content-Type": "application/json"})
        assert status == 200
    finally:
        stack.stop()


# --- a locked door -----------------------------------------------------------------------------------------
def test_with_a_token_every_route_but_liveness_needs_it(tmp_path):
    token = "s3cret-" + os.urandom(8).hex()
    stack = Stack(tmp_path, [*NOOP, f"gateway.auth_token={token}"], gateway=True)
    try:
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 60, what="the daemon")
        routes = routes_of_the_app(**{"gateway.auth_token": token})
        assert len(routes) > 20 and {"/pose/hybrid", "/v1/jobs", "/frame/{job_id}/{idx}"} <= {p for _, p in routes}
        for method, template in routes:
            path = concrete(template)
            for credentials in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                status, headers, data = send(stack.url, method, path, b"{}", credentials)
                if template in LIVENESS:
                    assert status != 401, (method, path)
                    continue
                assert status == 401 and json.loads(data)["code"] == "unauthorized", (method, path, status)
                assert headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
            status, _, _ = send(stack.url, method, path, b"{}", {"Authorization": f"Bearer {token}",
                                                                "Content-Type": "application/json"})
            assert status != 401 and status < 500, (method, path, status)
    finally:
        stack.stop()


def test_the_token_can_come_from_the_environment_or_a_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    for env, overrides, token in (({"POSE_SERVICE_TOKEN": "from-env"}, [], "from-env"),
                                  ({}, [f"gateway.auth_token_file={token_file}"], "from-a-file")):
        port = free_port()
        argv = [sys.executable, "-m", "pose_service.cli", "gateway", f"state_dir={tmp_path / 'state'}",
                f"gateway.port={port}", *overrides]
        proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            assert_token_guards(f"http://127.0.0.1:{port}", token)
        finally:
            proc.terminate()
            proc.wait(15)


@pytest.mark.parametrize("verb", ["serve", "gateway"])
def test_listening_beyond_loopback_without_a_token_refuses_to_start(tmp_path, verb):
    base = [sys.executable, "-m", "pose_service.cli", verb, f"state_dir={tmp_path}"]
    for overrides in (["gateway.host=0.0.0.0"], ["gateway.auth_token_file=/nonexistent/token"]):
        run = subprocess.run([*base, *overrides], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "refusing to start" in run.stderr and "auth_token" in run.stderr and "Traceback" not in run.stderr
    # a listening socket handed over (as systemd's socket unit does) is judged by its real address
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        run = subprocess.run([*base[:3], "gateway", f"state_dir={tmp_path}"], capture_output=True, text=True,
                             cwd=REPO, timeout=60, pass_fds=[listener.fileno()],
                             env={**os.environ, "POSE_SERVICE_LISTEN_FD": str(listener.fileno())})
        assert run.returncode == 2 and "0.0.0.0" in run.stderr, run.stderr


@pytest.mark.parametrize("override,expected", [
    ("gateway.prot=5", ["unknown config key 'gateway.prot'", "gateway.port"]),
    ("+gateway.prot=5", ["unknown config key 'gateway.prot'", "gateway.port"]),
    ("gateway.port=abc", ["gateway.port", "expected an integer"]),
    ("gateway.idle_timeout_s=soon", ["gateway.idle_timeout_s", "expected a number"]),
    ("supervisor.intesity=3", ["supervisor.intesity", "supervisor.intensity"]),
    ("engine.options.x=5", ["+engine.options.x=5"]),
])
def test_operator_errors_are_one_line_naming_the_key(tmp_path, override, expected):
    run = subprocess.run([sys.executable, "-m", "pose_service.cli", "serve", override, f"state_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and all(word in run.stderr for word in expected), run.stderr


# --- what is checked is what is read -------------------------------------------------------------------------
def test_a_symlink_swapped_in_after_acceptance_is_refused_everywhere(tmp_path):
    videos, outside = tmp_path / "videos", tmp_path / "outside"
    videos.mkdir()
    outside.mkdir()
    secret = make_clip(outside / "secret.mp4", frames=30)
    stack = Stack(tmp_path, [*NOOP, f"jobs.allowed_roots=[{videos}]", "+engine.options.frame_delay_s=0.05",
                             "supervisor.heartbeat_s=0.2"], gateway=True)
    try:
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 60, what="the daemon")
        done_clip = make_clip(videos / "done.mp4", frames=10)
        status, job = http("POST", stack.url + "/v1/jobs", {"video_path": str(done_clip)})
        assert status == 202, job
        job = stack.wait_job(job["job_id"], 30)
        assert http("GET", f"{stack.url}/frame/{job['job_id']}/0")[0] == 200
        alias = videos / "alias.mp4"
        alias.symlink_to(done_clip)  # a link inside the roots is resolved once, at acceptance
        status, body = http("POST", stack.url + "/v1/jobs", {"video_path": str(alias)})
        assert status == 202 and body["video_path"] == str(done_clip), body
        stack.wait_job(body["job_id"], 30)
        done_clip.unlink()
        done_clip.symlink_to(secret)  # swapped after the job finished
        status, body = http("GET", f"{stack.url}/frame/{job['job_id']}/0")
        assert status == 403 and body["code"] in REFUSED_PATH and str(outside) not in json.dumps(body), body
        # a job re-queued after a crash reopens its path: checked again, on the open file
        running_clip = make_clip(videos / "running.mp4", frames=120)
        status, job = http("POST", stack.url + "/v1/jobs", {"video_path": str(running_clip)})
        job_id = job["job_id"]
        wait_for(lambda: stack.conn.job(job_id).get("frames_done", 0) >= 10, 30, interval=0.05, what="10 frames")
        running_clip.unlink()
        running_clip.symlink_to(secret)
        os.kill(stack.worker_pid(), signal.SIGKILL)
        job = stack.wait_job(job_id, 60)
        assert job["state"] == "error" and ("outside the allowed roots" in job["error"]
                                            or "symbolic link" in job["error"]), job
        assert job["frames_done"] < 120 and str(outside) not in job["error"]
        status, body = http("POST", stack.url + "/v1/jobs", {"video_path": str(running_clip)})
        assert status == 403 and body["code"] in REFUSED_PATH, body
    finally:
        stack.stop()


def test_outside_the_roots_present_or_missing_gets_the_same_answer(gateway, tmp_path):
    outside = Path("/etc/hostname") if Path("/etc/hostname").exists() else Path(__file__)
    missing = outside.parent / "no-such-file-here.mp4"
    for route in ("/v1/jobs", "/pose/video"):
        present_answer = http("POST", gateway.url + route, {"video_path": str(outside)})
        missing_answer = http("POST", gateway.url + route, {"video_path": str(missing)})
        assert present_answer[0] == missing_answer[0] and 400 <= present_answer[0] < 500, route
        assert present_answer[1]["code"] == missing_answer[1]["code"] == "outside_roots", route
        assert str(tmp_path.parent) not in json.dumps(present_answer[1]), route  # the roots are not shown


def test_the_cli_runs_a_clip_from_anywhere(tmp_path):
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    clip = make_clip(elsewhere / "clip.mp4", frames=12)
    run = subprocess.run([sys.executable, "-m", "pose_service.cli", "run", str(clip), "--out", str(tmp_path / "r.json"),
                          "--no-overlay", *NOOP, f"state_dir={tmp_path / 'state'}", "jobs.allowed_roots=[]"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(json.loads((tmp_path / "r.json").read_text())["frames"]) == 12


# --- size limits from headers -------------------------------------------------------------------------------------
def png_bomb(side: int = 20000) -> bytes:
    """A valid PNG of side x side grey pixels that is small on disk (rows of zeros, deflated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" * (side + 1)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_20000_by_20000_png_is_refused_from_its_header(gateway):
    bomb = png_bomb()
    assert len(bomb) < 2_000_000
    gateway_proc = psutil.Process(http("GET", gateway.url + "/v1/diagnostics")[1]["gateway_pid"])
    worker = psutil.Process(gateway.worker_pid())
    before = (gateway_proc.memory_info().rss, worker.memory_info().rss)
    started = time.monotonic()
    status, body = http("POST", gateway.url + "/pose/hybrid", {"image_base64": base64.b64encode(bomb).decode()})
    elapsed = time.monotonic() - started
    assert status == 413 and body["code"] == "image_too_large" and elapsed < 1.0, (body, elapsed)
    boundary = "b0und"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"frame\"; filename=\"f.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + bomb + f"\r\n--{boundary}--\r\n".encode()
    status, body = http("POST", gateway.url + "/pose/hybrid", raw=form,
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 413 and body["code"] == "image_too_large", body
    status, body = gateway.conn.request("image", blobs=[bomb])  # straight to the worker, past the gateway
    assert status == 400 and "larger than the limit" in body["error"], body
    after = (gateway_proc.memory_info().rss, worker.memory_info().rss)
    print(f"rss delta: gateway {(after[0] - before[0]) / 2**20:+.1f} MB, worker {(after[1] - before[1]) / 2**20:+.1f} MB")
    assert abs(after[0] - before[0]) < 50 << 20 and abs(after[1] - before[1]) < 50 << 20, (before, after)
    assert gateway.procs["gateway"].poll() is None and worker.is_running()


def test_a_video_declaring_frames_over_the_limit_is_refused_before_decoding(tmp_path):
    stack = Stack(tmp_path, [*NOOP, "jobs.max_video_pixels=1000"], gateway=True)
    try:
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 60, what="the daemon")
        clip = make_clip(tmp_path / "big.mp4", frames=5, size=64)  # 4096 pixels a frame
        status, body = http("POST", stack.url + "/v1/jobs", {"video_path": str(clip)})
        assert status == 413 and body["code"] == "video_too_large" and "64x64" in body["error"], body
    finally:
        stack.stop()


# --- private files --------------------------------------------------------------------------------------------
def test_state_and_storage_are_private(gateway, tmp_path):
    boundary = "b0und"
    clip = make_clip(tmp_path / "up.mp4", frames=5).read_bytes()
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"a.mp4\"\r\n\r\n".encode()
               + clip + f"\r\n--{boundary}--\r\n".encode())
    status, job = http("POST", gateway.url + "/v1/jobs", raw=payload,
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 202, job
    job = gateway.wait_job(job["job_id"], 30)
    assert job["state"] == "done", job
    state = gateway.state_dir
    for path in (state, state / "run", state / "uploads", state / "results"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path
    for path in (state / "ledger.sqlite3", job["result_path"], job["overlay_path"], job["video_path"]):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    sockets = [p for p in (state / "run").iterdir() if stat.S_ISSOCK(os.stat(p).st_mode)]
    assert sockets, "no socket found in the runtime dir"
    everything = [Path(root) / name for root, dirs, files in os.walk(state) for name in [*dirs, *files]]
    assert len(everything) > 8
    shared = [(str(p), oct(stat.S_IMODE(os.lstat(p).st_mode))) for p in everything if os.lstat(p).st_mode & 0o077]
    assert shared == []


# --- slow, idle and surplus connections --------------------------------------------------------------------------
def test_idle_slow_and_surplus_connections_are_closed_not_held(gateway):
    started = time.monotonic()
    half_head = raw_exchange(gateway.port, b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
    assert half_head == b"" and time.monotonic() - started < 4  # closed after gateway.idle_timeout_s
    stalled = raw_exchange(gateway.port, b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                         b"application/json\r\nContent-Length: 100\r\n\r\n{\"video_")
    assert stalled.startswith(b"HTTP/1.1 408") and b'"code": "body_timeout"' in stalled, stalled[:300]
    held = []
    try:
        for _ in range(60):  # more than gateway.max_connections (40), all idle: the oldest are closed for the new
            held.append(socket.create_connection(("127.0.0.1", gateway.port)))
        assert http("GET", gateway.url + "/v1/health", timeout=5)[0] == 200  # at once, not after idle_timeout_s
        closed = sum(1 for sock in held[:30] if closed_by_server(sock))
        assert closed >= 20, closed
    finally:
        for sock in held:
            sock.close()


def test_when_every_connection_is_busy_a_new_one_gets_a_503(gateway):
    """40 (gateway.max_connections) bodies arriving fast enough are neither idle nor slow: nothing can be
    closed for a 41st connection, which is answered 503 at once."""
    busy, stop = [], threading.Event()
    pump = threading.Thread(target=keep_sending, args=(busy, stop), daemon=True)
    try:
        pump.start()
        for count in range(40):
            sock = socket.create_connection(("127.0.0.1", gateway.port))
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 10000000\r\n\r\n" + b" " * 5000)
            busy.append(sock)
            time.sleep(0.05 if count < 28 else 0.3)  # in a handler before a crowded server counts the next
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as extra:
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer, answer[:200]
    finally:
        stop.set()
        pump.join(10)
        for sock in busy:
            sock.close()
    assert wait_for(lambda: http("GET", gateway.url + "/v1/health")[0] == 200, 10, what="service after the flood")


def keep_sending(socks: list, stop: threading.Event, rounds: int = 100) -> None:
    """5 kB to each socket every 0.1 s (50 kB/s each, well above gateway.body_min_bytes_per_s)."""
    for _ in range(rounds):
        if stop.is_set():
            return
        for sock in list(socks):
            try:
                sock.sendall(b" " * 5000)
            except OSError:
                pass
        time.sleep(0.1)


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_what_the_http_parser_refuses_is_json_too(gateway):
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header: y\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n",
                    b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        answer = raw_exchange(gateway.port, garbage)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.") and b" 400 " in head.split(b"\r\n")[0], answer[:200]
        assert json.loads(body)["code"] == "malformed_http", answer[:300]


# --- every route, fuzzed ------------------------------------------------------------------------------------------
PRINTABLE = st.characters(min_codepoint=32, max_codepoint=126)
JUNK_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=3), max_leaves=10)
FIELDS = ("video_path", "image_base64", "max_frames", "idempotency_key", "kind", "at", "frame_number", "visualize")
QUERIES = st.sampled_from(["", "?format=ndjson", "?format=phalp_pkl", "?limit=-1", "?limit=5&before=x", "?timeout=x",
                           "?timeout=0", "?state=%00", "?state=done", "?vertices=2", "?overlay=0", "?last_event_id=9"])


def bodies(clip: bytes) -> st.SearchStrategy:
    json_bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JUNK_JSON, max_size=4).map(
        lambda d: ("application/json", json.dumps(d).encode()))
    deep = st.integers(min_value=1000, max_value=100_000).map(lambda n: ("application/json", b"[" * n + b"]" * n))
    raw = st.tuples(st.sampled_from(["application/json", "multipart/form-data; boundary=x", "text/plain",
                                     "multipart/form-data", "application/x-www-form-urlencoded", "image/png", ""]),
                    st.binary(max_size=200))
    field_names = st.sampled_from(["video", "file", "frame", "image", "max_frames", "frameNumber"]) | st.text(max_size=8)
    contents = st.binary(max_size=100) | st.just(clip) | st.just(png_bomb(3000))
    multipart = st.tuples(field_names, st.text(max_size=10), contents).map(
        lambda t: ("multipart/form-data; boundary=zz",
                   f"--zz\r\nContent-Disposition: form-data; name=\"{t[0]}\"; filename=\"{t[1]}\"\r\n\r\n"
                   .encode("utf-8", "surrogatepass") + t[2] + b"\r\n--zz--\r\n"))
    cut_multipart = multipart.map(lambda m: (m[0], m[1][:len(m[1]) // 2]))  # a broken boundary
    return json_bodies | deep | raw | multipart | cut_multipart


def path_values(job_ids: list[str]) -> st.SearchStrategy:
    odd = st.text(max_size=40).map(lambda t: urllib.parse.quote(t, safe=""))
    return st.fixed_dictionaries({"job_id": st.sampled_from(job_ids) | odd,
                                  "idx": st.integers(-3, 200).map(str) | odd})


HEADERS = st.fixed_dictionaries({}, optional={
    "Idempotency-Key": st.text(PRINTABLE, max_size=300), "Last-Event-ID": st.text(PRINTABLE, max_size=30),
    "Range": st.text(PRINTABLE, max_size=30) | st.tuples(st.integers(-10**6, 10**7), st.integers(-10, 10**7)).map(
        lambda r: f"bytes={r[0]}-{r[1] if r[1] >= 0 else ''}"),
    "Authorization": st.text(PRINTABLE, max_size=30),
    "Accept": st.sampled_from(["text/html", "application/json", "*/*"])})


# Arbitrary header bytes, as a hostile client sends them: latin-1, controls, bytes that are not UTF-8
# (the server decodes them to lone surrogates); only CR and LF are left out, being HTTP's framing.
HEADER_BYTES = st.binary(max_size=40).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))
# what passes the HTTP parser (no controls) and so reaches the application's own checks
HIGH_BYTES = st.lists(st.integers(0x20, 0xFF).filter(lambda byte: byte != 0x7F), max_size=40).map(bytes)
RAW_HEADER_NAMES = ("Authorization", "Range", "If-Range", "Idempotency-Key", "Last-Event-ID", "Origin", "Host",
                    "Content-Type", "Accept", "Accept-Encoding", "Cookie", "Expect", "X-Forwarded-For", "User-Agent")


def raw_headers(token: str | None) -> st.SearchStrategy:
    """Up to three headers of arbitrary bytes, and an Authorization that is, a third of the time each,
    `Bearer <arbitrary bytes>`, absent (or junk), or the real token (so the routes behind it are
    reached too)."""
    value = HEADER_BYTES | HIGH_BYTES | st.sampled_from([b"\xc3\x28", b"bytes=\xff-", b"http://\xff"])
    junk = st.dictionaries(st.sampled_from(RAW_HEADER_NAMES), value, max_size=3)
    bearer_junk = (HIGH_BYTES | HEADER_BYTES | st.sampled_from([b"\xff", b"\xed\xa0\x80"])).map(
        lambda raw: {"Authorization": b"Bearer " + raw})
    real = [st.just({"Authorization": f"Bearer {token}".encode()})] if token else []
    return st.tuples(junk, st.one_of(st.just({}), bearer_junk, *real)).map(lambda pair: {**pair[0], **pair[1]})


EXAMPLES_PER_ROUTE = 10  # here; the endurance tier runs the same fuzz deeper (tests/endurance/test_route_fuzz.py)
HEADER_BYTES_EXAMPLES_PER_ROUTE = 6


def test_fuzzing_every_route_gives_no_server_error_and_the_supervisor_survives(gateway, tmp_path):
    fuzz_every_route(gateway, tmp_path, EXAMPLES_PER_ROUTE)


def test_arbitrary_header_bytes_on_every_route_with_a_token_give_no_server_error(tmp_path):
    """The fuzz that would have found `Authorization: Bearer \\xff` -> 500: a token set, and header
    values of any bytes on every route."""
    fuzz_header_bytes_with_a_token(tmp_path, HEADER_BYTES_EXAMPLES_PER_ROUTE)


def fuzz_header_bytes_with_a_token(tmp_path, examples_per_route: int) -> None:
    token = "fuzz-" + os.urandom(6).hex()
    stack = Stack(tmp_path, [*NOOP, f"gateway.auth_token={token}", "gateway.max_connections=40",
                             "gateway.idle_timeout_s=1", "gateway.body_timeout_s=1"], gateway=True)
    try:
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 60, what="the daemon")
        fuzz_every_route(stack, tmp_path, examples_per_route, token)
    finally:
        stack.stop()


def fuzz_every_route(gateway, tmp_path, examples: int, token: str | None = None) -> None:
    """Every route the router has (a new one is fuzzed without editing this test), with junk in its
    path parameters, query, headers (printable ones and arbitrary bytes) and body: never a 5xx,
    every error JSON with a code."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    clip = make_clip(tmp_path / "fuzz.mp4", frames=8)
    status, done = http("POST", gateway.url + "/v1/jobs", {"video_path": str(clip)}, headers=auth)
    assert status == 202, done
    gateway.wait_job(done["job_id"], 30)
    routes = routes_of_the_app()
    supervisor = gateway.procs["supervisor"].pid
    failures, sent = [], []
    started = time.monotonic()
    for method, template in sorted(routes, key=lambda route: route[0] == "DELETE"):  # the finished job goes last
        fuzz_route(gateway, method, template, done["job_id"], clip.read_bytes(), failures, sent, examples, token)
    print(f"fuzz: {len(sent)} requests over {len(routes)} routes in {time.monotonic() - started:.1f} s")
    assert failures == []
    assert len(sent) >= len(routes) * examples // 2
    assert gateway.procs["supervisor"].poll() is None and gateway.procs["supervisor"].pid == supervisor
    assert http("GET", gateway.url + "/v1/health")[0] == 200


def fuzz_route(stack, method: str, template: str, job_id: str, clip: bytes, failures: list, sent: list,
               examples: int, token: str | None = None) -> None:
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None)
    @given(path_values([job_id, "nojob"]), QUERIES, bodies(clip), HEADERS, raw_headers(token))
    def fuzz(values, query, body, headers, raw):
        ctype, data = body
        path = concrete(template, **values) + query
        sent_headers = {**headers, **({"Content-Type": ctype} if ctype else {}), **raw}
        status, answer_headers, answer = send(stack.url, method, path, data, sent_headers)
        sent.append(template)
        if status >= 500 or (status >= 400 and not is_json_error(answer_headers, answer)):
            failures.append((method, path, ctype, data[:80], raw, status, answer[:200]))
        if template in ("/v1/reload", "/reload") and status == 200:  # let the new worker come up
            wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 60, what="the reloaded worker")

    fuzz()


def is_json_error(headers: dict, body: bytes) -> bool:
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return "json" in headers.get("Content-Type", "") and isinstance(parsed.get("error"), str) \
        and isinstance(parsed.get("code"), str)


def test_a_real_photo_is_within_the_limits(gateway):
    if not PHOTO.exists():
        pytest.skip("shared test data not found at ../shared/data")
    status, body = http("POST", gateway.url + "/pose/hybrid",
                        {"image_base64": base64.b64encode(PHOTO.read_bytes()).decode()}, timeout=60)
    assert status == 200 and body["frame_width"] == 1068
