"""Property-based fuzz of every message type the supervisor reads, on both of its sockets, with
wrong types and values (Hypothesis, bounded): the supervisor must drop and count what does not fit,
answer requests with a 4xx, keep its PID, and still run a job afterwards."""
from __future__ import annotations

import uuid

import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pose_common import protocol as P

from support import Stack, make_clip, wait_for

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=True)
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


def bodies_for(kind: str) -> st.SearchStrategy:
    """Bodies that use the schema's own field names (so validation, not just decoding, is hit)."""
    schema = P.SCHEMAS.get(kind)
    names = list(schema.__struct_fields__) if schema else []
    keys = st.sampled_from(names) | st.text(max_size=12) if names else st.text(max_size=12)
    return st.dictionaries(keys, JUNK, max_size=len(names) + 2)


def messages(running_job: str) -> st.SearchStrategy:
    """(type, body, job, blobs); the job is often the one running, so job messages reach the handlers."""
    jobs = st.none() | st.just(running_job) | st.just(running_job) | st.text(max_size=20) | st.integers()
    return st.sampled_from(sorted(P.SCHEMAS) + ["nonsense", ""]).flatmap(
        lambda kind: st.tuples(st.just(kind), bodies_for(kind), jobs, st.lists(st.binary(max_size=64), max_size=2)))


def fuzz(sock: zmq.Socket, strategy: st.SearchStrategy) -> None:
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(strategy)
    def run(message):
        send_raw(sock, *message)
    run()


def send_raw(sock: zmq.Socket, kind, body, job, blobs) -> None:
    header = {"v": P.PROTOCOL_VERSION, "type": kind, "seq": 1, "gen": None, "job": job,
              "req": uuid.uuid4().hex, "body": body}
    try:
        sock.send_multipart([msgpack.packb(header, use_bin_type=True), *blobs], flags=zmq.NOBLOCK)
    except (zmq.Again, TypeError, ValueError, OverflowError):
        pass  # unencodable on our side (e.g. a huge int): nothing reaches the supervisor


def test_garbage_in_every_message_type_on_both_sockets_never_takes_the_supervisor_down(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=20)
    long_clip = make_clip(tmp_path / "long.mp4", frames=300)
    stack = Stack(tmp_path, ["engine.name=noop", "probe.enabled=false", "supervisor.heartbeat_s=0.2",
                             "supervisor.liveness_misses=15", "+engine.options.frame_delay_s=0.05"])
    ctx = zmq.Context()
    try:
        generation = stack.wait_ready(30)["generation"]
        pid = stack.procs["supervisor"].pid
        running = stack.submit(long_clip)
        wait_for(lambda: stack.conn.health().get("running_job") == running, 20, what="a job on the worker")
        ends = P.endpoints(str(stack.state_dir / "run"))
        front = P.connect_dealer(ctx, ends.gateway, "fuzz-client")
        # an identity of the current generation, so worker messages reach the handlers
        back = P.connect_dealer(ctx, ends.worker, P.worker_identity(generation, "fuzz").decode())

        fuzz(back, messages(running))  # first: worker messages reach the handlers while the job runs
        assert stack.conn.health()["generation"] == generation, "the worker was replaced during the fuzz"
        # job messages from this generation's identity do reach the job: one forged verdict ends it,
        # and what is said about it afterwards is refused as stale
        if stack.conn.job(running)["state"] == "running":
            send_raw(back, P.T.JOB_FAILED, {"reason": "forged"}, running, [])
            wait_for(lambda: stack.conn.job(running)["state"] == "error", 10, what="the forged verdict")
        stale = stack.conn.diagnostics()["messages"]["stale_job"]
        send_raw(back, P.T.FRAME, {"index": 999, "persons": []}, running, [])
        wait_for(lambda: stack.conn.diagnostics()["messages"]["stale_job"] > stale, 10, what="a stale frame")
        fuzz(front, messages(running))  # then requests (a valid reload or drill may replace the worker)
        answers = 0
        while front.poll(500):
            front.recv_multipart()
            answers += 1
        assert stack.procs["supervisor"].poll() is None and stack.procs["supervisor"].pid == pid
        assert answers > 50  # requests with bad bodies were answered (4xx), not left hanging
        counts = stack.conn.diagnostics()["messages"]
        assert counts["invalid"] > 50 and counts["wrong_socket"] > 50, counts
        assert stack.conn.request("reload")[0] == 200
        wait_for(lambda: (h := stack.conn.health()).get("status") == "ready" and h["generation"] > generation, 30,
                 what="a fresh worker")
        stack.conn.request("cancel", job_id=running)
        job = stack.wait_job(stack.submit(clip), timeout=60)
        assert job["state"] == "done" and job["frames_done"] == 20, job
    finally:
        ctx.destroy(linger=0)
        stack.stop()
