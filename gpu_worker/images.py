"""Single images for the engine at its working size, whatever size they come in.

A 7000x7000 JPEG is 147 MB of pixels, and MediaPipe copies it again into its own image type while
holding the GIL; the second pass then enlarges regions of it. Neither the models (a few hundred
pixels in) nor the second pass need more than `engine.image_max_side`, so a big image is reduced
before anything sees it: a JPEG is decoded already reduced (libjpeg scales while it decodes, so the
full image never exists in memory), anything else is decoded and then shrunk. The persons found are
mapped back to the original image's pixels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pose_common.limits import check_image

JPEG_MAGIC = b"\xff\xd8\xff"
# OpenCV decodes a JPEG at 1/2, 1/4 or 1/8 of its size with these flags
REDUCED_JPEG_FLAGS = ((8, "IMREAD_REDUCED_COLOR_8"), (4, "IMREAD_REDUCED_COLOR_4"), (2, "IMREAD_REDUCED_COLOR_2"))


@dataclass(frozen=True)
class EngineImage:
    rgb: np.ndarray  # what the engine sees, longest side <= max_side
    width: int  # the original image's size
    height: int

    @property
    def scale(self) -> float:
        """Original pixels per engine pixel (1.0 when the image was not reduced)."""
        return self.width / self.rgb.shape[1]


def decode_for_engine(data: bytes, max_pixels: int, max_side: int) -> EngineImage:
    """Header first (a small file may declare a huge image: 413-style refusal before decoding), then
    the pixels at no more than max_side on the longest side. ValueError for what is not an image."""
    width, height = check_image(data, max_pixels)
    factor = jpeg_reduction(data, width, height, max_side)
    bgr = _decode(data, factor)
    if bgr is None:
        raise ValueError("Failed to decode image: not a JPEG/PNG/BMP/WebP image")
    if _turned(width, height, bgr):  # the decoder applied the JPEG's EXIF rotation; the header did not
        width, height = height, width
    return EngineImage(_to_rgb(_shrink(bgr, max_side)), width, height)


def _turned(width: int, height: int, bgr: np.ndarray) -> bool:
    return width != height and (width > height) != (bgr.shape[1] > bgr.shape[0])


def jpeg_reduction(data: bytes, width: int, height: int, max_side: int) -> int:
    """The largest of 8/4/2 that still leaves the JPEG at least max_side on its longest side (1: none)."""
    if not data.startswith(JPEG_MAGIC) or max_side <= 0:
        return 1
    longest = max(width, height)
    return next((factor for factor, _ in REDUCED_JPEG_FLAGS if longest // factor >= max_side), 1)


def _decode(data: bytes, factor: int):
    import cv2

    flag = cv2.IMREAD_COLOR if factor == 1 else getattr(cv2, dict(REDUCED_JPEG_FLAGS)[factor])
    try:
        return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    except cv2.error:  # e.g. an empty buffer: a bad request, not a reason for the worker to die
        return None


def _shrink(bgr: np.ndarray, max_side: int) -> np.ndarray:
    import cv2

    height, width = bgr.shape[:2]
    longest = max(width, height)
    if max_side <= 0 or longest <= max_side:
        return bgr
    ratio = max_side / longest
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)


def _to_rgb(bgr: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def to_original(persons: list[dict], image: EngineImage) -> list[dict]:
    """Persons found in the engine's image, in the original image's pixels (3D and scores unchanged)."""
    sx, sy = image.width / image.rgb.shape[1], image.height / image.rgb.shape[0]
    if sx == 1 and sy == 1:
        return persons
    return [_scaled(person, sx, sy) for person in persons]


def _scaled(person: dict, sx: float, sy: float) -> dict:
    def point(x, y):
        return (None if x is None else round(x * sx, 2)), (None if y is None else round(y * sy, 2))

    out = dict(person)
    if person.get("bbox_xyxy"):
        x0, y0, x1, y1 = person["bbox_xyxy"]
        out["bbox_xyxy"] = [*point(x0, y0), *point(x1, y1)]
    if person.get("keypoints_2d"):
        out["keypoints_2d"] = [[*point(kp[0], kp[1]), *kp[2:]] for kp in person["keypoints_2d"]]
    camera = person.get("camera")
    if camera and camera.get("focal_length") is not None:  # pixels; the translation (metres) stands
        out["camera"] = {**camera, "focal_length": camera["focal_length"] * sx}
    return out
