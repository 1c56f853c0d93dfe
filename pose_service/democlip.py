"""A demo clip with a real person in it, made on the spot: the public-domain NASA portrait that
ships inside scikit-image (skimage.data.astronaut), drifting across a 640x360 frame."""
from __future__ import annotations

import os

import av
import numpy as np


def make_demo_clip(path: str, frames: int = 60, fps: int = 30) -> str:
    from skimage.data import astronaut

    person = astronaut()  # 512x512 RGB, head and torso
    person = person[::2, ::2]  # 256x256 keeps the clip small and fast
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(frames):
            canvas = np.full((360, 640, 3), 235, dtype=np.uint8)
            x = 40 + int(300 * i / max(1, frames - 1))
            canvas[52:308, x:x + 256] = person
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
