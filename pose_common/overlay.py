"""Overlay video: the source frames of a job's result with the stored poses drawn on, at the source
frame rate (every frame, or the sampled ones for a max_frames job).

It is drawn while the job is inferred: the supervisor starts `python -m pose_common.overlay LEDGER
JOB VIDEO OUT` when the job first reaches a worker, at a lower CPU priority than the worker. The
process follows the ledger: it decodes a frame, waits until the worker has stored it, draws and
encodes it, and so ends a few frames after the last inference. A worker that dies mid-job changes
nothing here (its replacement stores the missing frames; stored frames are never written twice),
so the video has every frame once. It reads the ledger, never the GPU, and writes to a temporary
name first: the overlay exists whole or not at all. A job that fails or is cancelled meanwhile
leaves no partial file (exit JOB_GONE).

`python -m pose_common.overlay --standby FD` is the same renderer started ahead of need: past its
imports, it waits on the Unix socket FD for one job (ledger, job id, output path, and the video as an
open descriptor, so it reads the very file the supervisor checked), says it has taken it, draws it as
above and exits with the same statuses."""
from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import time
from collections import deque
from typing import Callable, Optional

import av

from pose_common.children import name_process
from pose_common.drawing import draw_persons
from pose_common.job_states import IN_QUEUE, INFERRED
from pose_common.ledger import SqlLedger
from pose_common.ledger_open import open_ledger_at
from pose_common.video import TruncatedVideo, frames

JOB_GONE = 3           # exit status: the job failed, was cancelled or removed while it was drawn
POLL_S = (0.02, 1.0)   # an unstored frame is looked for again after 20 ms, backing off to 1 s (a requeued job)
FETCH = 64             # frames read from the ledger at a time
STANDBY_NAME = "overlay-standby"  # the process name (top, ps -o comm) while a standby waits for a job ...
DRAWING_NAME = "overlay"          # ... and once it draws one
TAKEN = b"taken"                  # a standby's word that it holds the job: its exit status is the job's


class JobGone(Exception):
    """The job stopped being one whose overlay anybody will want."""


class StoredFrames:
    """The job's stored frames in index order, waiting for the worker where it has not got yet.
    Workers store a job's frames in index order (a resumed one starts at the first gap), so once a
    frame at or after an index is stored, whether that index is in the result is settled."""

    def __init__(self, ledger: SqlLedger, job_id: str, sleep: Callable[[float], None] = time.sleep):
        self.ledger, self.job_id, self.sleep = ledger, job_id, sleep
        self.pending: deque[dict] = deque()
        self.last = -1
        self.ended = False
        self.idle_polls = 0

    def at(self, index: int) -> Optional[dict]:
        """-> the stored frame `index`, or None when it is not part of the result."""
        while self.pending and self.pending[0]["frame_index"] < index:
            self.pending.popleft()
        while not self.pending and not self.ended:
            self.wait_for_more()
        if self.pending and self.pending[0]["frame_index"] == index:
            return self.pending.popleft()
        return None

    def finished(self) -> bool:
        """No frame is stored beyond those already handed out, and none will be."""
        return self.ended and not self.pending

    def wait_for_more(self) -> None:
        if self.fetch():
            self.idle_polls = 0
            return
        state = self.state()
        if state in INFERRED:  # every frame the job will have is stored
            self.ended = not self.fetch()  # frames stored just before the state changed
            return
        if state not in IN_QUEUE:
            raise JobGone(f"the job is {state or 'gone'}")
        self.sleep(min(POLL_S[1], POLL_S[0] * 2 ** min(self.idle_polls, 6)))
        self.idle_polls += 1

    def fetch(self) -> bool:
        batch = list(itertools.islice(self.ledger.iter_frames(self.job_id, after=self.last, batch=FETCH), FETCH))
        if batch:
            self.pending.extend(batch)
            self.last = batch[-1]["frame_index"]
        return bool(batch)

    def state(self) -> Optional[str]:
        job = self.ledger.job(self.job_id)
        return None if job is None or job.removed_at else job.state


def render_overlay(ledger_path: str, job_id: str, video: str, out: str) -> int:
    """-> the number of frames written."""
    ledger = open_ledger_at(ledger_path, readonly=True)
    try:
        job = ledger.job(job_id)
        names = (job.engine() if job else {}).get("joint_names") or []
        return draw_video(video, StoredFrames(ledger, job_id), names, out)
    finally:
        ledger.close()


def draw_video(video: str, stored: StoredFrames, names: list, out: str) -> int:
    tmp = out + ".tmp.mp4"
    try:
        count = _encode(video, stored, names, tmp)
    except BaseException:
        remove(tmp)
        raise
    os.replace(tmp, out)
    return count


def _encode(video: str, stored: StoredFrames, names: list, tmp: str) -> int:
    count = 0
    with av.open(tmp, "w") as container:
        stream = None
        for meta, index, _pts, bgr in decoded(video):
            entry = stored.at(index)
            if entry is None:
                if stored.finished():
                    break
                continue  # not part of the result (a sampled job)
            if stream is None:
                stream = _open_stream(container, meta.fps, bgr.shape[1], bgr.shape[0])
            drawn = draw_persons(bgr, entry["persons"], names)
            for packet in stream.encode(as_i420(drawn)):
                container.mux(packet)
            count += 1
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return count


def as_i420(bgr) -> av.VideoFrame:
    """The encoder's pixel format, converted by OpenCV: about 1 ms a frame less than FFmpeg's
    bgr24 scaler at 640x360, on the cores the worker shares. Cropped to even sides as the stream is."""
    import cv2

    even = bgr[: bgr.shape[0] - bgr.shape[0] % 2, : bgr.shape[1] - bgr.shape[1] % 2]
    return av.VideoFrame.from_ndarray(cv2.cvtColor(even, cv2.COLOR_BGR2YUV_I420), format="yuv420p")


def decoded(video: str):
    """The video's frames up to where decoding stops (a truncated file's result ends there too)."""
    try:
        yield from frames(video, pixel_format="bgr24")
    except TruncatedVideo:
        return


def _open_stream(container, fps: float, width: int, height: int):
    from fractions import Fraction

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    stream.width, stream.height = width - width % 2, height - height % 2
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
        # one encoding thread and the superfast preset: the overlay runs beside the worker and must not
        # take its cores (about half veryfast's CPU, files about 30% larger); no lookahead or B-frames
        # (zerolatency): each frame is encoded as it is drawn, none is left to flush while the user waits
        # for `done`, and it costs a third less CPU a frame than superfast alone for a file 1% larger
        stream.options = {"preset": "superfast", "tune": "zerolatency", "crf": "23", "threads": "1"}
    return stream


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def overlay_path(result_path: str) -> str:
    return result_path[: -len(".json")] + ".overlay.mp4"


def partial_path(result_path: str) -> str:
    """Where an overlay being drawn is written until it is whole."""
    return overlay_path(result_path) + ".tmp.mp4"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--standby"]:
        return stand_by(int(argv[1]))
    try:
        return 0 if render_overlay(*argv[:4]) > 0 else 1
    except JobGone:
        return JOB_GONE


# --- the warm standby ------------------------------------------------------------------------------------
def stand_by(channel_fd: int) -> int:
    """Wait for one job on the socket, then draw it. Nothing handed over (the supervisor let the
    standby go) is exit 0."""
    warm_up()
    name_process(STANDBY_NAME)
    with socket.socket(fileno=channel_fd) as channel:
        message, fds, _flags, _address = socket.recv_fds(channel, 4096, 1)
        if not message or len(fds) != 1:
            return 0
        try:
            channel.sendall(TAKEN)
        except OSError:
            return JOB_GONE  # the supervisor dropped the job as it was handed over
    name_process(DRAWING_NAME)
    job = json.loads(message)
    return main([job["ledger"], job["job_id"], f"/proc/self/fd/{fds[0]}", job["out"]])


def handoff_message(ledger_path: str, job_id: str, out: str) -> bytes:
    """What the supervisor sends a standby, beside the video's descriptor."""
    return json.dumps({"ledger": ledger_path, "job_id": job_id, "out": out}).encode()


def warm_up() -> None:
    """What a cold renderer would load on its first frame."""
    import fractions  # noqa: F401

    import cv2  # noqa: F401


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:5]))
