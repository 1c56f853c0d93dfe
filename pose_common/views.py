"""What a client sees of a job: one shape for the supervisor's answers and the gateway's own reads."""
from __future__ import annotations

from typing import Any

from pose_common.job_states import IN_QUEUE, JobState, shown
from pose_common.ledger import Job, SqlLedger


def job_view(job: Job, ledger: SqlLedger) -> dict[str, Any]:
    """What a client sees of a job. `status` is queued|running|done|error; while the result's files are
    written the job is still `running`, with `phase: rendering`."""
    view = {k: getattr(job, k) for k in ("job_id", "state", "video_path", "created_at", "started_at",
                                         "finished_at", "attempts", "frames_total", "error", "warning",
                                         "result_path", "source", "max_frames")}
    view["status"], view["phase"] = shown(job.state).status, shown(job.state).phase
    view["frames_done"] = ledger.frames_done(job.job_id)
    view["video"] = job.meta()
    if job.state == JobState.RUNNING and (event := ledger.last_event(job.job_id)) and event["type"] == "resuming":
        view["phase"] = "resuming"  # re-running the frames before the resume point; frames_done waits
        view["resume"] = {k: event["data"][k] for k in ("resume_at", "warm_frames", "warm_frames_done")}
    if job.overlay_path and job.state == JobState.DONE:
        view["overlay_path"] = job.overlay_path
    if job.state in IN_QUEUE:
        view["queue_position"] = ledger.queue_position(job.job_id)
    if job.removed_at:
        view["removed"] = {"at": job.removed_at, "reason": job.removed_reason}
    return view
