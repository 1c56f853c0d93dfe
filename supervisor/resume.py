"""What a replacement worker needs to keep a resumed job's track identities: the persons already
stored for the frames just before the resume point. The worker runs its tracker over those frames
again without storing them (a tracker needs history), then maps its own track ids onto the stored
ones by where the persons were (gpu_worker/track_ids.py). The worker never reads the ledger."""
from __future__ import annotations

from typing import Any

# frames re-run before the resume point: more than PHALP's n_init (5), so tracks confirmed before
# the death are confirmed again before the first new frame is emitted
WARM_FRAMES = 12


def resume_context(ledger: Any, job_id: str, start_frame: int, warm_frames: int = WARM_FRAMES) -> dict[str, Any]:
    """Extra RUN_JOB fields (pose_common/protocol.py): warm_from, stored_tracks, next_track_id.
    Empty for a job that starts at its first frame."""
    if start_frame <= 0 or warm_frames <= 0:
        return {}
    warm_from = max(0, start_frame - warm_frames)
    stored: dict[str, list[list[float]]] = {}
    highest = 0
    for frame in ledger.iter_frames(job_id):
        ids = [int(p["track_id"]) for p in frame["persons"] if p.get("track_id") is not None]
        highest = max([highest, *ids])
        if warm_from <= frame["frame_index"] < start_frame and not frame.get("error"):
            stored[str(frame["frame_index"])] = [
                [int(p["track_id"]), *map(float, p["bbox_xyxy"][:4])]
                for p in frame["persons"] if p.get("track_id") is not None and p.get("bbox_xyxy")]
    return {"warm_from": warm_from, "stored_tracks": stored, "next_track_id": highest + 1}
