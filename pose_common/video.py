"""Frame-by-frame decoding with PyAV: any container ffmpeg reads, rotation applied, no frame cap,
memory flat in video length (one frame alive at a time)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Iterator, Optional

import av
import numpy as np

from pose_common.limits import DEFAULT_MAX_VIDEO_PIXELS, TooLarge, check_frame


class VideoError(ValueError):
    """The input is not a video we can decode; the message is meant for the user."""


class NotAVideo(VideoError):
    """Readable, but not a video: a still image (whatever its name says) or a file with no video."""


STILL_IMAGE_FORMATS = frozenset({"image2", "gif", "apng"})


def is_still_image(container) -> bool:
    """ffmpeg reads a JPEG or PNG as a one-frame 'video'; its demuxer gives it away."""
    name = container.format.name
    return name in STILL_IMAGE_FORMATS or name.endswith("_pipe")


@dataclass
class VideoMeta:
    fps: float
    frame_count: int          # from the container; the result's count is what was decoded
    width: int                # display size, after rotation
    height: int
    duration_s: float
    rotation: int
    codec: str

    def as_dict(self) -> dict:
        return asdict(self)


class FramesTooLarge(VideoError):
    """The container declares frames larger than allowed (checked before decoding one)."""


def probe(path: str, max_pixels: int = DEFAULT_MAX_VIDEO_PIXELS) -> VideoMeta:
    """Read the header and decode the first frame; raise VideoError with a readable reason."""
    try:
        with av.open(path) as container:
            if is_still_image(container):
                raise NotAVideo(f"{path}: a still image ({container.format.name}), not a video")
            stream = _video_stream(container, path)
            check_declared_size(stream, max_pixels)
            first = next(container.decode(stream), None)
            if first is None:
                raise VideoError(f"{path}: no decodable video frame")
            return _meta(stream, first)
    except VideoError:
        raise
    except (av.FFmpegError, OSError, StopIteration, ValueError) as exc:
        raise VideoError(f"{path}: not a readable video ({_reason(exc)})") from None


def frames(path: str, start: int = 0, max_pixels: int = DEFAULT_MAX_VIDEO_PIXELS,
           pixel_format: str = "rgb24") -> Iterator[tuple[VideoMeta, int, float, np.ndarray]]:
    """Yield (meta, index, pts_s, rgb) for every decoded frame with index >= start (bgr24 for
    OpenCV drawing, converted once by FFmpeg instead of flipped by a copy).

    Frames before `start` are decoded and dropped so indices stay exact on resume."""
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: not a readable video ({_reason(exc)})") from None
    with container:
        stream = _video_stream(container, path)
        check_declared_size(stream, max_pixels)
        stream.thread_type = "AUTO"
        meta: Optional[VideoMeta] = None
        for index, frame in enumerate(_decode(container, stream, path)):
            if meta is None:
                meta = _meta(stream, frame)
            if index < start:
                continue
            yield meta, index, _pts_seconds(frame, stream, index, meta.fps), to_rgb(frame, pixel_format)


def _decode(container, stream, path):
    try:
        yield from container.decode(stream)
    except av.FFmpegError as exc:
        # A truncated tail: everything before it has been yielded; say why it stopped.
        raise TruncatedVideo(f"{path}: decoding stopped ({_reason(exc)})") from None


class TruncatedVideo(VideoError):
    pass


def check_declared_size(stream, max_pixels: int) -> None:
    """From the codec's header, before a frame is decoded: a small file can declare huge frames."""
    try:
        check_frame(stream.codec_context.width or 0, stream.codec_context.height or 0, max_pixels)
    except TooLarge as exc:
        raise FramesTooLarge(str(exc)) from None


def _video_stream(container, path):
    if not container.streams.video:
        raise NotAVideo(f"{path}: the file has no video stream")
    return container.streams.video[0]


def _meta(stream, first_frame) -> VideoMeta:
    rate = stream.guessed_rate or stream.average_rate or Fraction(30)
    fps = float(rate)
    rotation = display_rotation_cw(first_frame)
    width, height = first_frame.width, first_frame.height
    if rotation in (90, 270):
        width, height = height, width
    duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
    count = int(stream.frames or 0)
    if not duration and count:
        duration = count / fps
    return VideoMeta(fps=round(fps, 5), frame_count=count, width=width, height=height,
                     duration_s=round(duration, 5), rotation=rotation, codec=stream.codec_context.name)


def _pts_seconds(frame, stream, index: int, fps: float) -> float:
    if frame.pts is not None and stream.time_base is not None:
        start = stream.start_time or 0
        return round(float((frame.pts - start) * stream.time_base), 6)
    return round(index / fps, 6)


def display_rotation_cw(frame) -> int:
    """Clockwise degrees to turn the decoded frame upright (a phone's `rotate=90` gives 90).
    PyAV reports the display matrix's counter-clockwise angle, in [-180, 180]."""
    return (-int(getattr(frame, "rotation", 0) or 0)) % 360


def to_rgb(frame, pixel_format: str = "rgb24") -> np.ndarray:
    rgb = frame.to_ndarray(format=pixel_format)
    clockwise = display_rotation_cw(frame)
    if clockwise:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=-(clockwise // 90)))  # rot90 turns counter-clockwise
    return rgb


def user_reason(exc: BaseException) -> str:
    """What a client is told: what went wrong with its video, without our paths or FFmpeg's words
    (those go to the log)."""
    if isinstance(exc, TruncatedVideo):
        return "decoding stopped early: the video is cut or damaged after its first frames"
    if isinstance(exc, FramesTooLarge):
        return str(exc)
    if isinstance(exc, NotAVideo):
        return "not a video: a still image, or a file without a video stream"
    if isinstance(exc, VideoError):
        return "the video could not be decoded: damaged, cut before its first frame, or not a video format"
    return str(exc)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.split("\n")[0][:300]
