"""Bounded disk: finished jobs' files go after an age and, oldest first, over a total size; the
ledger keeps a tombstone saying why; videos given by path are never touched."""
from __future__ import annotations

import os

from pose_common.ledger import Ledger
from supervisor.retention import Retention

from support import Stack, make_clip, wait_for


class Log:
    def info(self, *_a, **_k):
        pass


def finished_job(ledger: Ledger, results: str, source: str, size: int, finished_at: float, video: str) -> str:
    job, _ = ledger.accept(video, source)
    lease = ledger.claim("host", 60).lease
    ledger.add_frame(lease, 0, 0.0, [])
    ledger.mark_rendering(lease, 1, os.path.join(results, f"{job.job_id}.json"), None, {})
    ledger.finish(lease)
    ledger.db.execute("UPDATE jobs SET finished_at=? WHERE job_id=?", (finished_at, job.job_id))
    for suffix in (".json", ".overlay.mp4"):
        with open(os.path.join(results, job.job_id + suffix), "wb") as fh:
            fh.write(b"x" * size)
    return job.job_id


def test_age_and_size_limits_remove_oldest_first_and_leave_tombstones(tmp_path):
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"))
    results = tmp_path / "results"
    results.mkdir()
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    user_video = tmp_path / "mine.mp4"
    user_video.write_bytes(b"v" * 1000)
    old = finished_job(ledger, str(results), "path", 1000, finished_at=0.0, video=str(user_video))
    upload = uploads / "u.mp4"
    upload.write_bytes(b"u" * 1000)
    mid = finished_job(ledger, str(results), "upload", 1000, finished_at=500.0, video=str(upload))
    new = finished_job(ledger, str(results), "path", 1000, finished_at=900.0, video=str(user_video))
    running, _ = ledger.accept(str(user_video))
    retention = Retention(ledger, str(results), keep_s=600, max_bytes=4500, every_s=60, log=Log(),
                          clock=lambda: 1000.0)
    assert retention.maybe_sweep() == 2  # `old` by age; then `mid` (3 files) to get under 4500 bytes
    assert retention.maybe_sweep() == 0  # not again within every_s
    gone = {job_id: ledger.job(job_id) for job_id in (old, mid, new)}
    assert "days" in gone[old].removed_reason and "MB" in gone[mid].removed_reason
    assert gone[new].removed_at is None and ledger.frames_done(new) == 1
    assert ledger.frames_done(old) == 0 and ledger.job(old).state == "done"  # tombstone: the row stays
    assert not upload.exists() and user_video.exists()  # an upload is ours to remove; a path is the user's
    assert sorted(os.listdir(results)) == [f"{new}.json", f"{new}.overlay.mp4"]
    assert ledger.job(running.job_id).state == "queued"


def test_a_finished_job_disappears_with_its_files_in_the_running_daemon(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", frames=10)
    stack = Stack(tmp_path, ["engine.name=noop", "probe.enabled=false", "jobs.keep_finished_s=1",
                             "jobs.retention_sweep_s=0.3"])
    try:
        job = stack.wait_job(stack.submit(clip), timeout=60)
        assert job["state"] == "done" and os.path.exists(job["overlay_path"])
        removed = wait_for(lambda: (j := stack.conn.job(job["job_id"])).get("removed") and j, 20, what="removal")
        assert "keep_finished_s" in removed["removed"]["reason"]
        assert not os.path.exists(job["result_path"]) and not os.path.exists(job["overlay_path"])
        assert clip.exists()
    finally:
        stack.stop()
