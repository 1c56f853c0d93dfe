"""Issue 28, item 4: the gateway's two regressions, on a real daemon over real connections. A burst of
job posts within gateway.max_connections is answered whole (none closed unanswered by the eviction
meant for idle connections); a reconnect to a finished job's events after its last event closes at
once, however many events it has. And the legacy synchronous route waits out a ledger it cannot read."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPResponse
from typing import Union

import pytest

from gateway import legacy
from gateway.errors import ApiError, json_error
from pose_common.ledger import Ledger

from support import Stack, closed_by_server, http, make_clip, wait_for

BURST = 200  # within gateway.max_connections (256), past gateway.evict_idle_above x it (192)
ANSWER_TIMEOUT_S = 30.0
FRAME_DELAY_S = 0.05


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A daemon with the default connection limits; the supervisor is given time to answer a burst of
    submissions (what is measured is the gateway), and a job takes FRAME_DELAY_S a frame."""
    tmp = tmp_path_factory.mktemp("regressions")
    served = Stack(tmp, ["engine.name=noop", "probe.enabled=false", f"+engine.options.frame_delay_s={FRAME_DELAY_S}",
                         "jobs.render_overlay=false", "gateway.supervisor_timeout_s=10"], gateway=True)
    served.tmp = tmp
    try:
        wait_for(lambda: http("GET", served.url + "/v1/health")[0] == 200, 60, what="the daemon")
        yield served
    finally:
        served.stop()


# --- a finished job's events --------------------------------------------------------------------------------
def add_progress_events(stack: Stack, job_id: str, count: int) -> None:
    ledger = Ledger(str(stack.state_dir / "ledger.sqlite3"))
    try:
        with ledger.transaction():
            for i in range(count):
                ledger.add_event(job_id, "progress", {"frames_done": 0, "frames_total": 1, "filler": i})
    finally:
        ledger.close()


def event_rows(stack: Stack, job_id: str) -> list[tuple[int, str]]:
    ledger = Ledger(str(stack.state_dir / "ledger.sqlite3"), readonly=True)
    try:
        return [(e["id"], e["type"]) for e in ledger.events_since(job_id, 0, limit=100_000)]
    finally:
        ledger.close()


def read_event_stream(url: str, last_event_id: int, timeout: float) -> tuple[bytes, float]:
    """The whole stream after `last_event_id`, and how long it stayed open."""
    request = urllib.request.Request(url, headers={"Last-Event-ID": str(last_event_id)})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as stream:
            body = stream.read()
    except TimeoutError:
        pytest.fail(f"the event stream was still open {timeout:g} s after a reconnect with the last event's id")
    return body, time.monotonic() - started


def test_a_reconnect_after_the_last_of_over_500_events_closes_at_once(stack):
    clip = make_clip(stack.tmp / "long.mp4", frames=60)  # 3 s of frames: the filler goes in before the end
    status, job = http("POST", stack.url + "/v1/jobs", {"video_path": str(clip)})
    assert status == 202, job
    add_progress_events(stack, job["job_id"], 600)
    assert stack.wait_job(job["job_id"], 60)["state"] == "done"
    rows = event_rows(stack, job["job_id"])
    kinds = [kind for _, kind in rows]
    assert kinds.index("done") >= 500, kinds[:20]  # past the first page of events_since
    url = f"{stack.url}/v1/jobs/{job['job_id']}/events"
    body, open_s = read_event_stream(url, rows[-1][0], timeout=5)
    print(f"{len(rows)} events; a reconnect after the last closed in {open_s:.2f} s")
    assert b"id:" not in body and open_s < 1.0, body[:300]
    body, open_s = read_event_stream(url, rows[-2][0], timeout=5)
    assert body.count(b"id:") == 1 and b"event: done" in body and open_s < 1.0, body[:300]


# --- a burst of job posts -------------------------------------------------------------------------------------
def job_post(clip) -> bytes:
    body = json.dumps({"video_path": str(clip)}).encode()
    return (b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def answer_on(sock: socket.socket) -> Union[int, str]:
    """The status of the answer on this connection, or what happened instead."""
    reply = HTTPResponse(sock)
    try:
        reply.begin()
        reply.read()
    except TimeoutError:
        return f"no answer within {ANSWER_TIMEOUT_S:g} s"
    except ConnectionError:  # RemoteDisconnected included: closed before a byte of an answer
        return "closed unanswered"
    return reply.status


def send(sock: socket.socket, request: bytes) -> bool:
    try:
        sock.sendall(request)
        return True
    except ConnectionError:
        return False


def assert_all_answered(outcomes: list[Union[int, str]], what: str) -> None:
    counts = Counter(outcomes)
    print(f"{what}: {dict(counts)}")
    assert len(outcomes) == BURST and set(counts) <= {202, 429}, counts


def test_200_connections_opened_together_then_posting_jobs_are_all_answered(stack):
    """A client pool that opens its connections a moment before using them: past 192 open (the
    eviction mark), none of them is idle, since none has been answered yet."""
    request = job_post(make_clip(stack.tmp / "pool.mp4", frames=2))
    socks = [socket.create_connection(("127.0.0.1", stack.port), timeout=ANSWER_TIMEOUT_S) for _ in range(BURST)]
    try:
        time.sleep(0.5)  # every connection accepted by the server before any request is sent
        sent = [send(sock, request) for sock in socks]
        outcomes = [answer_on(sock) if ok else "closed unanswered" for sock, ok in zip(socks, sent)]
    finally:
        for sock in socks:
            sock.close()
    assert_all_answered(outcomes, f"{BURST} pooled connections")


def test_a_burst_of_200_concurrent_job_posts_is_answered_whole(stack):
    request = job_post(make_clip(stack.tmp / "burst.mp4", frames=2))
    start = threading.Barrier(BURST)

    def post() -> Union[int, str]:
        start.wait(30)
        with socket.create_connection(("127.0.0.1", stack.port), timeout=ANSWER_TIMEOUT_S) as sock:
            return answer_on(sock) if send(sock, request) else "closed unanswered"

    with ThreadPoolExecutor(BURST) as pool:
        outcomes = list(pool.map(lambda _: post(), range(BURST)))
    assert_all_answered(outcomes, f"{BURST} concurrent posts")


def test_connections_kept_alive_after_an_answer_still_make_room_oldest_first(stack):
    """What eviction is for: past the mark, a new connection closes the oldest idle ones (18 here:
    210 open, 192 kept)."""
    health = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    socks = [socket.create_connection(("127.0.0.1", stack.port), timeout=ANSWER_TIMEOUT_S) for _ in range(BURST)]
    try:
        for sock in socks:
            assert send(sock, health) and answer_on(sock) == 200
        newcomers = [socket.create_connection(("127.0.0.1", stack.port), timeout=ANSWER_TIMEOUT_S)
                     for _ in range(10)]
        socks += newcomers
        assert all(send(sock, health) and answer_on(sock) == 200 for sock in newcomers)
        closed = closed_by_server(socks)
        print(f"{len(socks)} connections kept alive: the server closed the oldest {len(closed)}")
        assert len(closed) >= 10 and closed == socks[:len(closed)]
    finally:
        for sock in socks:
            sock.close()


# --- the legacy synchronous route ---------------------------------------------------------------------------------
def test_the_synchronous_wait_outlasts_a_ledger_it_cannot_read_and_nothing_else(monkeypatch):
    unreadable = json_error(503, "the job ledger is unavailable; try again shortly", code="ledger_unavailable")
    answers = iter([unreadable, unreadable, {"job_id": "j", "state": "running"}, {"job_id": "j", "state": "done"}])

    async def job_status(request, job_id: str) -> dict:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(legacy, "job_status", job_status)
    assert asyncio.run(legacy.wait_for_job(None, "j", 10))["state"] == "done"

    async def unknown(request, job_id: str) -> dict:
        raise json_error(404, "Job not found")

    monkeypatch.setattr(legacy, "job_status", unknown)
    with pytest.raises(ApiError) as raised:
        asyncio.run(legacy.wait_for_job(None, "j", 10))
    assert raised.value.status == 404
