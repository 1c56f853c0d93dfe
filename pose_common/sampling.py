"""Which frames a job with `max_frames` processes: spread evenly over the video, as the app's
first service did (its VideoMeshProcessor took frame int(i * total / max_frames) for each i)."""
from __future__ import annotations


def sampled_indices(total: int, max_frames: int) -> list[int]:
    if max_frames <= 0 or total <= max_frames:
        return list(range(max(0, total)))
    step = total / max_frames
    return sorted({int(i * step) for i in range(max_frames)})
