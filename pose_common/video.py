"""Frame-by-frame decoding with PyAV: any container ffmpeg reads, rotation applied, no frame cap,
memory flat in video length (one frame alive at a time); a resume deep into a video starts at a
keyframe, with the exact indices decoding from frame 0 gives (FrameSource)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Callable, Iterator, Optional

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
    OpenCV drawing, converted once by FFmpeg instead of flipped by a copy). See FrameSource."""
    yield from FrameSource(path, start, max_pixels, pixel_format)


# From this far in, a resume starts at a keyframe; nearer, decoding forward costs less than the scan.
SEEK_FROM = 48
# The scan reads this many packets past the start frame: B-frame reordering never reaches this far,
# so every frame presented before the start frame has been counted.
REORDER_MARGIN = 32
SKIP_REPORT_EVERY = 32  # packets scanned, or frames decoded and dropped, between two calls of on_skip


class SeekNotExact(Exception):
    """Starting at a keyframe would not give the exact frame indices; decoding from frame 0 does."""


class LandedLate(SeekNotExact):
    """The seek landed after the keyframe (a container without an index seeks by dts, not pts)."""


@dataclass
class KeyframeStart:
    """Where decoding starts for a resume: a keyframe at or before the start frame, and the index
    of every frame the scan saw from it on, by its pts (frames are presented in pts order, one per
    packet)."""
    pts: int
    index: int
    index_of_pts: dict[int, int]
    seek_timestamps: list[int]    # its pts, then its dts where that differs: what containers seek by
    frame_count: Optional[int]    # when the scan read every packet


def seek_timestamps(keyframes: dict[int, int], chosen: int) -> list[int]:
    """Where to seek for the keyframe with pts `chosen`, best first: its pts (containers with an
    index), its dts (a search by timestamp, as in MPEG-TS), then the keyframe before it (a search
    that lands late)."""
    tries = [chosen, keyframes[chosen]]
    earlier = [pts for pts in keyframes if pts < chosen]
    if earlier:
        tries.append(keyframes[max(earlier)])
    return list(dict.fromkeys(tries))


class FrameSource:
    """The frames of a video with index >= start, as (meta, index, pts_s, rgb).

    Indices are the order in which decoding from the first frame presents them. A start deep in
    the video is reached without decoding everything before it: the packets up to it are read
    (not decoded) to count the frames and find the keyframe at or before it, the container seeks
    there and decodes forward; every frame decoded before the first one yielded must have the
    index its pts gives, else (no pts, shared pts, a discarded packet, an inexact seek) the source
    decodes forward from frame 0 instead. `on_skip(meta)` is called while frames before `start`
    are read, so a caller can show it is moving.

    After iterating: `end` is the index after the last frame decoded (the frame count, when the
    video was decoded to its end; 0 when no frame decoded), `decoded` how many frames were decoded
    in all, `sought` whether decoding started at a keyframe."""

    def __init__(self, path: str, start: int = 0, max_pixels: int = DEFAULT_MAX_VIDEO_PIXELS,
                 pixel_format: str = "rgb24", on_skip: Optional[Callable[[VideoMeta], None]] = None):
        self.path, self.start, self.max_pixels, self.pixel_format = path, start, max_pixels, pixel_format
        self.on_skip = on_skip
        self.end = 0
        self.decoded = 0
        self.sought = False
        self.seek_refused: Optional[str] = None

    def __iter__(self) -> Iterator[tuple[VideoMeta, int, float, np.ndarray]]:
        if self.start >= SEEK_FROM:
            try:
                yield from self._from_keyframe()
                return
            except SeekNotExact as exc:  # raised only before the first frame is yielded
                self.seek_refused, self.sought, self.end = str(exc), False, 0
        yield from self._from_first_frame()

    # --- decoding forward from frame 0 ------------------------------------------------------------
    def _from_first_frame(self) -> Iterator[tuple[VideoMeta, int, float, np.ndarray]]:
        with self._open() as container:
            stream = self._stream(container)
            meta: Optional[VideoMeta] = None
            for index, frame in enumerate(_decode(container, stream, self.path)):
                self.decoded, self.end = self.decoded + 1, index + 1
                if meta is None:
                    meta = _meta(stream, frame)
                if index < self.start:
                    self._skipped(meta, index)
                    continue
                yield self._output(meta, stream, index, frame)

    # --- starting at a keyframe -------------------------------------------------------------------
    def _from_keyframe(self) -> Iterator[tuple[VideoMeta, int, float, np.ndarray]]:
        meta = self._first_frame_meta()
        with self._open() as container:
            stream = self._stream(container)
            keyframe = self._scan(container, stream, meta)
            self.sought = True
            *first_tries, last_try = keyframe.seek_timestamps
            for timestamp in first_tries:
                try:
                    yield from self._after_seek(container, stream, timestamp, keyframe, meta)
                    return
                except LandedLate:  # raised before the first frame is yielded
                    continue
            yield from self._after_seek(container, stream, last_try, keyframe, meta)

    def _after_seek(self, container, stream, timestamp: int, keyframe: KeyframeStart,
                    meta: VideoMeta) -> Iterator[tuple[VideoMeta, int, float, np.ndarray]]:
        self._seek(container, stream, timestamp)
        for index, frame in self._indexed_from(_decode(container, stream, self.path), keyframe):
            if index < self.start:
                self._skipped(meta, index)
                continue
            yield self._output(meta, stream, index, frame)

    def _indexed_from(self, decoded: Iterator, keyframe: KeyframeStart) -> Iterator[tuple[int, Any]]:
        """(index, frame) from the keyframe on. Up to the start frame each index is checked against
        the one its pts gives; from there on frames are counted, as decoding from frame 0 counts."""
        index = keyframe.index
        for frame in decoded:
            self.decoded += 1
            if index <= self.start:
                if frame.pts is not None and frame.pts < keyframe.pts:
                    continue  # presented before the keyframe (an open GOP's leading frame): not needed
                at = keyframe.index_of_pts.get(frame.pts) if frame.pts is not None else None
                if index == keyframe.index and frame.pts is not None and frame.pts > keyframe.pts:
                    raise LandedLate(f"the seek landed at pts {frame.pts}, after the keyframe's {keyframe.pts}")
                if at != index:
                    raise SeekNotExact(f"after the seek, frame {index} came with pts {frame.pts}")
            self.end = index + 1
            yield index, frame
            index += 1
        if index == keyframe.index:
            raise LandedLate("the seek landed past the last frame")
        if index <= self.start and index != keyframe.frame_count:
            raise SeekNotExact(f"after the seek, decoding ended at frame {index}")

    def _first_frame_meta(self) -> VideoMeta:
        """The meta decoding from frame 0 gives (its size and rotation come from the first frame)."""
        with self._open() as container:
            stream = self._stream(container)
            first = next(_decode(container, stream, self.path), None)
            if first is None:
                raise SeekNotExact("no first frame")
            self.decoded += 1
            return _meta(stream, first)

    def _scan(self, container, stream, meta: VideoMeta) -> KeyframeStart:
        """Read (not decode) the packets up to a little past the start frame: the pts of every frame
        before it, and the last keyframe at or before it."""
        seen: list[int] = []
        keyframes: dict[int, int] = {}  # pts -> dts (pts where the container stores no dts)
        frame_count: Optional[int] = None
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    frame_count = len(seen)  # the demuxer's end-of-stream marker
                    continue
                if packet.pts is None or packet.is_corrupt or packet.is_discard:
                    raise SeekNotExact("a packet without a usable pts")
                seen.append(packet.pts)
                if packet.is_keyframe:
                    keyframes[packet.pts] = packet.pts if packet.dts is None else packet.dts
                if len(seen) % SKIP_REPORT_EVERY == 0:
                    self._report(meta)
                if len(seen) > self.start + REORDER_MARGIN:
                    break
        except (av.FFmpegError, OSError) as exc:  # damage: decoding from frame 0 says where, and keeps what is before
            raise SeekNotExact(f"reading packets failed ({_reason(exc)})") from None
        in_order = sorted(seen)
        if not in_order or len(set(in_order)) != len(in_order):
            raise SeekNotExact("no packets, or two packets with the same pts")
        target = in_order[min(self.start, len(in_order) - 1)]  # past the end: the last frame
        keyframe = max((pts for pts in keyframes if pts <= target), default=None)
        if keyframe is None:
            raise SeekNotExact("no keyframe before the start frame")
        first = in_order.index(keyframe)
        index_of_pts = {pts: first + i for i, pts in enumerate(in_order[first:])}
        return KeyframeStart(keyframe, first, index_of_pts, seek_timestamps(keyframes, keyframe), frame_count)

    def _seek(self, container, stream, pts: int) -> None:
        try:
            container.seek(pts, backward=True, any_frame=False, stream=stream)
        except (av.FFmpegError, OSError) as exc:
            raise SeekNotExact(f"seek failed ({_reason(exc)})") from None

    # --- shared ------------------------------------------------------------------------------------
    def _open(self):
        try:
            return av.open(self.path)
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.path}: not a readable video ({_reason(exc)})") from None

    def _stream(self, container):
        stream = _video_stream(container, self.path)
        check_declared_size(stream, self.max_pixels)
        stream.thread_type = "AUTO"
        return stream

    def _output(self, meta: VideoMeta, stream, index: int, frame) -> tuple[VideoMeta, int, float, np.ndarray]:
        return meta, index, _pts_seconds(frame, stream, index, meta.fps), to_rgb(frame, self.pixel_format)

    def _skipped(self, meta: VideoMeta, index: int) -> None:
        if index % SKIP_REPORT_EVERY == 0:
            self._report(meta)

    def _report(self, meta: VideoMeta) -> None:
        if self.on_skip is not None:
            self.on_skip(meta)


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
