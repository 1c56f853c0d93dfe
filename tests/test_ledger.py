"""The job ledger (SQLite): frames exactly once, leases and fencing, claims, attempts, reopening;
and the wire protocol's envelope round trip."""
from __future__ import annotations

import msgpack
import pytest

from pose_common import protocol as P
from pose_common.ledger import Ledger


# --- protocol -------------------------------------------------------------------------------------
def test_protocol_roundtrip_with_binary_part():
    env = P.Envelope(P.T.RUN_IMAGE, {"x": 1}, gen=3, job="j", req="r", blobs=[b"\x00" * 100_000])
    back = P.unpack(P.pack(env))
    assert (back.type, back.body, back.gen, back.job, back.req) == (P.T.RUN_IMAGE, {"x": 1}, 3, "j", "r")
    assert bytes(back.blobs[0]) == b"\x00" * 100_000


@pytest.mark.parametrize("parts", [
    [], [b""], [b"\xc1"], [msgpack.packb([1, 2])], [msgpack.packb({"v": 99, "type": "x", "body": {}})],
    [msgpack.packb({"v": 1, "type": 5, "body": {}})], [msgpack.packb({"v": 1, "type": "x", "body": []})],
    [b"x" * (P.MAX_HEADER_BYTES + 1)], [msgpack.packb({"v": 1, "type": "x", "body": {}})] + [b""] * 20,
])
def test_protocol_rejects_garbage(parts):
    with pytest.raises(P.ProtocolError):
        P.unpack(parts)


# --- ledger ---------------------------------------------------------------------------------------
def test_ledger_frames_exactly_once_and_resume_point(tmp_path):
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    job, created = ledger.accept("/v.mp4", idempotency_key="k")
    again, created_again = ledger.accept("/v.mp4", idempotency_key="k")
    assert created and not created_again and again.job_id == job.job_id
    assert ledger.next_frame(job.job_id) == 0
    lease = ledger.claim("host-a", lease_s=60).lease
    for i in (0, 1, 2, 4):
        assert ledger.add_frame(lease, i, i / 30, [])
    assert ledger.add_frame(lease, 2, 2 / 30, [{"dup": True}]) is False  # recomputed after a crash: ignored
    assert ledger.next_frame(job.job_id) == 3 and ledger.frames_done(job.job_id) == 4
    assert ledger.requeue_running() == 1 and ledger.job(job.job_id).state == "queued"
    assert ledger.record_frame_death(job.job_id, 3, "segfault") == 1
    assert ledger.record_frame_death(job.job_id, 3, "abort") == 2
    assert list(ledger.poison_frames(job.job_id, threshold=2)) == [3]


def test_a_lease_taken_over_fences_out_its_old_holder(tmp_path):
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    job, _ = ledger.accept("/v.mp4")
    old = ledger.claim("host-a", lease_s=-1).lease  # expired as soon as claimed: host-a is presumed dead
    assert ledger.add_frame(old, 0, 0.0, [])
    new = ledger.claim("host-b", lease_s=60).lease
    assert new.gen == old.gen + 1 and new.owner == "host-b"
    assert ledger.add_frame(old, 1, 0.03, []) is None            # refused: not the holder any more
    assert not ledger.renew(old, 60) and not ledger.finish(old) and not ledger.release(old)
    assert ledger.add_frame(new, 1, 0.03, []) is True
    assert ledger.stored_indices(job.job_id) == {0, 1}


def test_claim_takes_the_oldest_free_job_and_prefers_its_own(tmp_path):
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    first, _ = ledger.accept("/a.mp4")
    second, _ = ledger.accept("/b.mp4")
    assert ledger.claim("host-a", 60).job_id == first.job_id
    assert ledger.claim("host-b", 60).job_id == second.job_id   # the first is held
    assert ledger.claim("host-c", 60) is None
    assert ledger.claim("host-a", 60).job_id == first.job_id     # back after an outage: its own again


def test_artifacts_are_taken_over_only_under_an_expired_lease(tmp_path):
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    job, _ = ledger.accept("/v.mp4")
    lease = ledger.claim("host-a", 60).lease
    ledger.add_frame(lease, 0, 0.0, [])
    assert ledger.mark_rendering(lease, 1, "/r.json", None, {})
    assert ledger.claim_render("host-a", 60) is None and ledger.claim_render("host-b", 60) is None
    ledger.requeue_running()  # a new supervisor on this machine: its predecessor's lease is void
    taken = ledger.claim_render("host-b", 60)
    assert taken.job_id == job.job_id and taken.lease.gen == lease.gen + 1
    assert not ledger.finish(lease) and ledger.finish(taken.lease)


def test_ledger_survives_reopen(tmp_path):
    path = str(tmp_path / "l.sqlite3")
    ledger = Ledger(path)
    job, _ = ledger.accept("/v.mp4")
    ledger.add_frame(ledger.claim("a", 60).lease, 0, 0.0, [{"track_id": 1}])
    ledger.close()
    again = Ledger(path)
    assert again.job(job.job_id).state == "running" and again.schema_version() == 2
    assert next(again.iter_frames(job.job_id))["persons"] == [{"track_id": 1}]


def test_a_job_stopped_on_purpose_gets_its_attempt_back_and_a_death_does_not(tmp_path):
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    job, _ = ledger.accept("/v.mp4")
    ledger.release(ledger.claim("a", 60).lease, charge_attempt=False)  # a reload: not the job's fault
    assert ledger.job(job.job_id).attempts == 0
    ledger.add_event(job.job_id, "restart", {"cause": "oom_killed"})
    ledger.release(ledger.claim("a", 60).lease)                          # a death under it
    assert ledger.job(job.job_id).attempts == 1
    assert ledger.attempt_causes(job.job_id) == ["oom_killed"]
