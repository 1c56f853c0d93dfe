"""The native result, written once from the ledger when a job completes. Streamed frame by frame
so neither the supervisor nor the file writer holds a whole long video in memory."""
from __future__ import annotations

import json
import os
from typing import Optional

from supervisor.ledger import Job, Ledger

VIDEO_KEYS = ("fps", "frame_count", "width", "height", "duration_s", "rotation", "codec")


def result_header(job: Job, frames_decoded: int, joint_names: list[str], warning: Optional[str]) -> dict:
    meta = job.meta()
    video = {k: meta.get(k) for k in VIDEO_KEYS}
    video["frame_count"] = frames_decoded
    video["container_frame_count"] = meta.get("frame_count")
    engine = json.loads(job.engine_meta) if job.engine_meta else {}
    header = {"job_id": job.job_id, "video_path": job.video_path, "video": video,
              "engine": {k: engine.get(k) for k in ("name", "version", "device")},
              "joint_names": joint_names}
    if warning:
        header["warning"] = warning
    return header


def write_result(path: str, job: Job, ledger: Ledger, joint_names: list[str], warning: Optional[str],
                 run_facts: Optional[dict] = None, mesh_faces: Optional[list] = None) -> None:
    frames_decoded = ledger.frames_done(job.job_id)
    header = result_header(job, frames_decoded, joint_names, warning)
    if mesh_faces is not None:
        header["mesh_faces"] = mesh_faces  # once per result, not per person
    with_person = 0
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        out.write(json.dumps(header)[:-1] + ', "frames": [')
        for i, frame in enumerate(ledger.iter_frames(job.job_id)):
            with_person += bool(frame["persons"])
            out.write(("," if i else "") + json.dumps(frame))
        summary = {"frames": frames_decoded, "frames_with_person": with_person, **(run_facts or {})}
        out.write(f'], "summary": {json.dumps(summary)}}}')
    os.replace(tmp, path)
