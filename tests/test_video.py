"""PyAV decoding: exact frame indices and timestamps, resume offsets, rotation, odd containers."""
from __future__ import annotations

import numpy as np
import pytest

from pose_common import video

from support import CLIP, make_clip, needs_shared_data


@needs_shared_data()
def test_shared_clip_decodes_every_frame_with_pts():
    seen = [(index, pts) for _, index, pts, _ in video.frames(str(CLIP))]
    assert [i for i, _ in seen] == list(range(122))
    assert seen[1][1] == pytest.approx(1 / 29.97, abs=1e-3)
    meta = video.probe(str(CLIP))
    assert (meta.width, meta.height, meta.frame_count, meta.rotation) == (640, 360, 122, 0)


def test_resume_skips_to_the_start_frame_keeping_indices(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", frames=20)
    assert [i for _, i, _, _ in video.frames(str(clip), start=13)] == list(range(13, 20))


@pytest.mark.parametrize("container", ["mkv", "avi", "mov", "MP4"])
def test_any_container_ffmpeg_reads(tmp_path, container):
    clip = make_clip(tmp_path / f"c.{container}", frames=7)
    assert len(list(video.frames(str(clip)))) == 7


class FakeFrame:
    def __init__(self, rotation):
        self.rotation = rotation
        self.array = np.arange(6, dtype=np.uint8).reshape(2, 3, 1).repeat(3, axis=2)

    def to_ndarray(self, format):
        return self.array


def test_portrait_phone_video_is_turned_upright():
    frame = FakeFrame(rotation=-90)  # what PyAV reports for a `rotate=90` (clockwise) phone clip
    assert video.display_rotation_cw(frame) == 90
    upright = video.to_rgb(frame)
    assert upright.shape[:2] == (3, 2)
    assert upright[0, -1, 0] == frame.array[0, 0, 0]  # top-left went to top-right: turned clockwise


def test_not_a_video_is_a_readable_error(tmp_path):
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("hello")
    with pytest.raises(video.VideoError, match="not a readable video"):
        video.probe(str(bogus))
