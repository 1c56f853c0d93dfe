"""Videos the legacy async routes accept only to report them refused.

The backend's proxy turns any non-2xx from /process_video_async into `500 "Request failed with status
code 415"`, so the mobile screens never see why a video was refused. The app's first service accepted
such a video and the screens showed the reason from /job_status. So on the legacy async route a video
refused up front (415 not a video, 422 undecodable, 413 frames too large) gets a job id all the same;
its first poll answers status `error` with the reason, the code and the status the native route gives.
Nothing is queued: the supervisor never sees it. The native /v1/jobs keeps refusing up front.

The record is a small JSON file under storage_dir/refused (kept across gateway restarts, shared by
the gateways of a shared storage); the newest KEEP are kept."""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Optional

from aiohttp import web

from gateway.errors import ApiError
from pose_common.job_states import REFUSED

PREFIX = "refused-"
KEEP = 1000
# the native route's refusals of the video itself; any other refusal (size, roots, queue) is the request's
VIDEO_REFUSALS = ("not_a_video", "undecodable_video", "video_too_large")


def is_video_refusal(exc: ApiError) -> bool:
    return exc.body.get("code") in VIDEO_REFUSALS


class RefusedJobs:
    def __init__(self, directory: str):
        self.directory = directory

    def record(self, refusal: ApiError) -> dict:
        """-> the job as /job_status shows it: status error, with the native answer's reason and code."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        job = {"job_id": PREFIX + uuid.uuid4().hex, "status": REFUSED.status, "created_at": round(time.time(), 3),
               "error": refusal.body["error"], "code": refusal.body.get("code"), "http_status": refusal.status}
        path = self._path(job["job_id"])
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(job, fh)
        os.replace(path + ".tmp", path)
        self._prune()
        return job

    def get(self, job_id: str) -> Optional[dict]:
        if not job_id.startswith(PREFIX) or not job_id[len(PREFIX):].isalnum():
            return None
        try:
            with open(self._path(job_id)) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def _path(self, job_id: str) -> str:
        return os.path.join(self.directory, job_id + ".json")

    def _prune(self) -> None:
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.stat().st_mtime)
        except OSError:
            return
        for entry in entries[:-KEEP]:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


STORE_KEY = web.AppKey("refused_jobs", RefusedJobs)


def refused_jobs(app: web.Application) -> RefusedJobs:
    return app[STORE_KEY]


def add_store(app: web.Application, storage_dir: str) -> None:
    app[STORE_KEY] = RefusedJobs(os.path.join(storage_dir, "refused"))
