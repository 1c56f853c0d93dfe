"""Size limits read from headers, before a single pixel is decoded: a 1 MB PNG can declare
20000x20000 pixels (1.2 GB of RGB) and a tiny video can declare frames just as large."""
from __future__ import annotations

import io

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000   # a 24 MP phone photo fits twice over
DEFAULT_MAX_VIDEO_PIXELS = 40_000_000   # 8K UHD (7680x4320 = 33 MP) fits


class TooLarge(ValueError):
    """The input declares more pixels than allowed; the message says how many of each."""

    def __init__(self, what: str, width: int, height: int, limit: int):
        super().__init__(f"{what} of {width}x{height} pixels is larger than the limit of {limit:,} pixels")
        self.width, self.height, self.limit = width, height, limit


class NotAnImage(ValueError):
    pass


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header; NotAnImage when it is not a format we read."""
    from PIL import Image, UnidentifiedImageError
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # we apply our own limit below
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise NotAnImage("Failed to decode image: not a JPEG/PNG/BMP/WebP image") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def check_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    width, height = image_size(data)
    if width * height > max_pixels:
        raise TooLarge("an image", width, height, max_pixels)
    return width, height


def check_frame(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise TooLarge("a video frame", width, height, max_pixels)
