"""Issue 28: resuming at the edges of a video. A job whose every frame is stored before `done` (the
supervisor killed in between) must end done, not as an undecodable video; a resume deep into a long
video must reach its start frame without decoding everything before it, and give exactly the frames
decoding from frame 0 gives (index, pts, pixels), whatever the container."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Optional

import av
import numpy as np
import pytest

from pose_common import video

from support import Stack, make_clip

NOOP_FAST = ["engine.name=noop", "probe.enabled=false", "supervisor.heartbeat_s=0.2", "supervisor.liveness_misses=15",
             "supervisor.backoff_initial_s=0.1"]
GOP = 12  # FFmpeg's mpeg4 encoder: a keyframe every 12 frames


def numbered_frame(index: int, size: int) -> np.ndarray:
    """A frame whose pixels spell its index (12 bits as white squares): an off-by-one shows."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    cell = size // 4
    for bit in range(12):
        if (index >> bit) & 1:
            row, col = divmod(bit, 4)
            img[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = 255
    return img


def numbered_clip(path: Path, frames: int, codec: str = "mpeg4", fmt: Optional[str] = None,
                  variable_rate: bool = False, options: Optional[dict] = None, size: int = 32) -> Path:
    """A clip of numbered frames; `variable_rate` spaces them 20 to 59 ms apart."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=30, options=options or {})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if variable_rate:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        at_ms = 0
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(numbered_frame(index, size), format="rgb24")
            if variable_rate:
                frame.pts, frame.time_base = at_ms, Fraction(1, 1000)
                at_ms += 20 + (index * 7) % 40
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded(path: Path, start: int = 0) -> list[tuple[int, float, np.ndarray]]:
    return [(index, pts, rgb) for _, index, pts, rgb in video.frames(str(path), start)]


def assert_same_frames(got: list, expected: list) -> None:
    assert [(i, pts) for i, pts, _ in got] == [(i, pts) for i, pts, _ in expected]
    for (index, _, rgb), (_, _, want) in zip(got, expected):
        assert np.array_equal(rgb, want), f"frame {index} differs from decoding from frame 0"


class CountingDecode:
    """Counts the frames pose_common.video decodes (its one call into the decoder)."""

    def __init__(self, monkeypatch):
        self.count = 0
        inner = video._decode

        def counting(container, stream, path):
            for frame in inner(container, stream, path):
                self.count += 1
                yield frame
        monkeypatch.setattr(video, "_decode", counting)


# --- 1. a job whose every frame is stored ends done ---------------------------------------------------

def interrupted_job(state_dir: Path, clip: Path, max_frames: Optional[int] = None) -> tuple[str, list[int]]:
    """The ledger a supervisor SIGKILLed after storing the job's last frame, before `done`, leaves:
    the job running under a dead owner with every frame it needs stored. -> job id, frames stored."""
    from configs import ledger_path, load_config
    from pose_common.ledger_open import open_ledger
    from pose_common.sampling import sampled_indices

    state_dir.mkdir(parents=True, exist_ok=True)
    ledger = open_ledger(None, ledger_path(load_config([f"state_dir={state_dir}"])))
    try:
        job, _ = ledger.accept(str(clip), max_frames=max_frames)
        held = ledger.claim("a-supervisor-that-was-killed", lease_s=0)
        assert held is not None and held.job_id == job.job_id
        meta = video.probe(str(clip))
        ledger.set_video_meta(held.lease, meta.as_dict())
        wanted = sampled_indices(meta.frame_count, max_frames) if max_frames else list(range(meta.frame_count))
        for index in wanted:
            assert ledger.add_frame(held.lease, index, index / meta.fps, [])
        assert ledger.job(job.job_id).state == "running"
        return job.job_id, wanted
    finally:
        ledger.close()


@pytest.mark.parametrize("max_frames", [None, 2], ids=["every_frame", "max_frames_2"])
def test_a_job_whose_every_frame_is_stored_ends_done_when_resumed(tmp_path, max_frames):
    clip = make_clip(tmp_path / "clip.mp4", frames=48)
    job_id, stored = interrupted_job(tmp_path / "state", clip, max_frames)
    stack = Stack(tmp_path, NOOP_FAST)
    try:
        job = stack.wait_job(job_id, timeout=60)
        assert job["state"] == "done" and not job.get("error"), job
        assert job["attempts"] == 2, job
        frames = stack.result(job)["frames"]
        assert [f["frame_index"] for f in frames] == stored
        assert stack.crashes() == []
    finally:
        stack.stop()


def test_the_frame_source_at_the_end_of_the_video_says_where_it_ended(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=20)
    long_clip = numbered_clip(tmp_path / "long.mp4", frames=200)
    for path, count in ((clip, 20), (long_clip, 200)):  # decoded forward; reached by a seek
        for start in (count, count + 7):
            source = video.FrameSource(str(path), start)
            assert list(source) == []
            assert source.end == count, (path.name, start)
    source = video.FrameSource(str(long_clip), 200)
    list(source)
    assert source.sought and source.decoded <= 2 * GOP + 1


def test_the_worker_tells_a_finished_video_from_an_undecodable_one(tmp_path):
    from gpu_worker.main import frames_decoded_with_nothing_left

    clip = make_clip(tmp_path / "clip.mp4", frames=20)
    at_end = video.FrameSource(str(clip), 20)
    list(at_end)
    assert frames_decoded_with_nothing_left(at_end, 20) == 20
    sample_done = video.FrameSource(str(clip), 11)  # max_frames=2: frames 0 and 10 stored, the rest not sampled
    list(sample_done)
    assert frames_decoded_with_nothing_left(sample_done, 11) == 11
    cut_since = video.FrameSource(str(clip), 30)
    list(cut_since)
    assert frames_decoded_with_nothing_left(cut_since, 30) == 20  # the truth; finalize then says what is missing
    nothing = video.FrameSource(str(clip), 0)
    with pytest.raises(video.VideoError):
        frames_decoded_with_nothing_left(nothing, 0)  # not one frame decoded


# --- 2. a resume deep into a long video ---------------------------------------------------------------

@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    path = numbered_clip(tmp_path_factory.mktemp("long") / "long.mp4", frames=3000)
    return path, decoded(path)


@pytest.mark.parametrize("start", [100, 1500, 2990])
def test_a_deep_resume_gives_the_frames_decoding_from_0_gives(long_clip, start):
    path, from_zero = long_clip
    assert_same_frames(decoded(path, start), from_zero[start:])


def test_the_cost_of_the_first_frame_does_not_grow_with_the_resume_point(long_clip, monkeypatch):
    path, _ = long_clip
    counts = {}
    for start in (100, 1000, 2000, 2990):
        decode = CountingDecode(monkeypatch)
        first = next(iter(video.frames(str(path), start)))
        assert first[1] == start
        counts[start] = decode.count
    # a keyframe at most GOP frames back, plus the first frame for the video's meta; never `start`
    assert max(counts.values()) <= 2 * GOP + 2, counts


CONTAINERS = {  # name -> how the clip is made
    "mp4_bframes_variable_rate": dict(codec="libx264", variable_rate=True, options={"bf": "3", "g": "50"}),
    "mkv_bframes_variable_rate": dict(codec="libx264", variable_rate=True, options={"bf": "3", "g": "50"}),
    "mpegts_no_index": dict(codec="libx264", fmt="mpegts", options={"bf": "3", "g": "50"}),
    "raw_h264_no_timestamps": dict(codec="libx264", fmt="h264", options={"bf": "3", "g": "50"}),
}
SUFFIX = {"mp4_bframes_variable_rate": "mp4", "mkv_bframes_variable_rate": "mkv", "mpegts_no_index": "ts",
          "raw_h264_no_timestamps": "h264"}


@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_every_container_resumes_at_the_exact_frame(tmp_path, name):
    if "libx264" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx264 encoder")
    path = numbered_clip(tmp_path / f"clip.{SUFFIX[name]}", frames=400, **CONTAINERS[name])
    from_zero = decoded(path)
    assert len(from_zero) == 400
    for start in (48, 173, 350, 399, 400):
        source = video.FrameSource(str(path), start)
        got = [(index, pts, rgb) for _, index, pts, rgb in source]
        assert_same_frames(got, from_zero[start:])
        assert source.end == 400
        assert source.sought == (name != "raw_h264_no_timestamps"), (start, source.seek_refused)


def test_reading_up_to_the_resume_point_without_a_seek_reports_progress(tmp_path):
    if "libx264" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx264 encoder")
    path = numbered_clip(tmp_path / "clip.h264", frames=300, **CONTAINERS["raw_h264_no_timestamps"])
    reports: list[video.VideoMeta] = []
    source = video.FrameSource(str(path), 290, on_skip=reports.append)
    assert [index for _, index, _, _ in source] == list(range(290, 300))
    assert not source.sought and "pts" in (source.seek_refused or "")
    assert len(reports) >= 290 // video.SKIP_REPORT_EVERY
