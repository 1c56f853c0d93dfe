"""A resumed job keeps its track ids: the supervisor's resume context and the worker's id mapping."""
from __future__ import annotations

from gpu_worker.track_ids import Resume, TrackIdMap, match_tracks
from pose_common.ledger import Ledger
from supervisor.resume import resume_context


def person(tid: int, x: float) -> dict:
    return {"track_id": tid, "bbox_xyxy": [x, 10.0, x + 40.0, 110.0], "score": 0.9}


def test_resume_context_sends_the_stored_boxes_before_the_resume_point(tmp_path):
    ledger = Ledger(str(tmp_path / "ledger.db"))
    job, _ = ledger.accept("/v.mp4")
    lease = ledger.claim("me", 30).lease
    for index in range(20):
        persons = [person(4, 100 + index), person(9, 300)] if index < 15 else [person(11, 500)]
        ledger.add_frame(lease, index, index / 30, [] if index == 17 else persons,
                         error="killed the worker twice" if index == 17 else None)
    context = resume_context(ledger, job.job_id, 20, warm_frames=6)
    assert context["warm_from"] == 14
    assert sorted(map(int, context["stored_tracks"])) == [14, 15, 16, 18, 19]
    assert context["stored_tracks"]["14"] == [[4, 114.0, 10.0, 154.0, 110.0], [9, 300.0, 10.0, 340.0, 110.0]]
    assert context["next_track_id"] == 12
    assert resume_context(ledger, job.job_id, 0) == {}


def test_new_tracks_map_onto_stored_ids_by_place_and_others_get_fresh_ids():
    stored = {t: [[4, 100.0 + t, 10, 140.0 + t, 110], [9, 300.0, 10, 340.0, 110]] for t in range(6)}
    warm = {t: [person(1, 300), person(2, 100 + t)] for t in range(6)}
    assert match_tracks(warm, stored) == {1: 9, 2: 4}
    ids = TrackIdMap(match_tracks(warm, stored), next_id=12)
    renamed = ids.rename([person(2, 106), person(1, 300), person(3, 500)])
    assert [p["track_id"] for p in renamed] == [4, 9, 12]
    assert ids.rename([person(3, 505)])[0]["track_id"] == 12


def test_resume_warms_only_frames_stored_without_error_and_maps_on_first_send():
    body = {"warm_from": 3, "stored_tracks": {"3": [[7, 0, 0, 50, 100]], "5": [[7, 2, 0, 52, 100]]},
            "next_track_id": 8}
    resume = Resume.from_run_job(body, start=6)
    assert [i for i in range(8) if resume.warms(i)] == [3, 5]  # 4 killed a worker: not re-run
    resume.keep_warm(3, [person(1, 0)])
    resume.keep_warm(5, [person(1, 2)])
    assert [p["track_id"] for p in resume.rename([person(1, 4), person(2, 300)])] == [7, 8]
    assert Resume.from_run_job({"start_frame": 6}, start=6) is None
