"""The second pass: when an engine's detector finds nobody in a frame, look again where the rider was
(the last box, enlarged) and then in the whole frame and overlapping tiles of it, upscaled.

A small rider (about 100 px in a 640x360 clip) is a few dozen pixels at a detector's input size; cut
out and enlarged, the same pixels are big enough. Every person returned was found by the engine's own
model in this frame's pixels (never copied from a neighbour); only the coordinates are mapped back.
Frames the first pass finds never reach this module, so they cost nothing extra.

A single image (no video around it) gets more: after the whole frame and the tiles, enlarged centre
crops and smaller tiles (a distant rider in a wide shot), within a time budget.

Any engine can use it: give RiderSearch a function that finds persons in an RGB image, with no video
state (MediaPipe's static-image graph, a detector + pose model), and call `fill()` on each result."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from gpu_worker.engines.base import Person

Detect = Callable[[np.ndarray], list[Person]]

# Measured on the shared clip (its first-pass misses, by grow and upscale): no single enlargement
# finds the rider in every missed frame, a few in turn do. Each entry is (grow factor of the last box, upscale).
AROUND_LAST_BOX = ((2.0, 1), (1.5, 1), (3.0, 1), (2.0, 2), (1.5, 2), (2.5, 2))
# Half-overlapping tiles: a rider up to half a tile in each direction is whole in one of them.
TILE_ROWS, TILE_COLS, TILE_OVERLAP, TILE_SCALE = 2, 3, 0.5, 2
MIN_REGION_PX = 32
EDGE_PX = 2
# The second pass looks where a rider is likely (where one just was, or a tile enlarged), so it accepts
# a weaker detection: with MediaPipe, 0.3 finds all 7 first-pass misses of the shared clip, 0.5 finds 3.
DEFAULT_MIN_DETECTION_CONFIDENCE = 0.3
# A single image: centre crops of 1/2 and 1/3 of the frame's shorter side (square, as the pose
# detector's input is), enlarged; then 4 x 6 half-overlapping tiles (2/5 of the frame's height), 3x.
CENTRE_FRACTIONS = ((2, 2), (3, 3))  # (1/fraction of the shorter side, upscale)
CLOSE_TILE_ROWS, CLOSE_TILE_COLS, CLOSE_TILE_SCALE = 4, 6, 3
DEFAULT_IMAGE_BUDGET_S = 4.0


def min_detection_confidence(options: dict[str, Any]) -> float:
    """engine.options.second_pass_min_detection_confidence, for the detector the second pass runs."""
    return float(options.get("second_pass_min_detection_confidence", DEFAULT_MIN_DETECTION_CONFIDENCE))


@dataclass(frozen=True)
class Region:
    x0: int
    y0: int
    x1: int
    y1: int
    scale: int
    kind: str  # "last_box", "frame", "tile" or "centre"

    def cut(self, rgb: np.ndarray) -> np.ndarray:
        import cv2
        crop = np.ascontiguousarray(rgb[self.y0:self.y1, self.x0:self.x1])
        if self.scale == 1:
            return crop
        return cv2.resize(crop, None, fx=self.scale, fy=self.scale, interpolation=cv2.INTER_CUBIC)

    def holds_whole(self, box: list[float], width: int, height: int) -> bool:
        """False when the box (frame coordinates) touches an edge of this region that is not the frame's:
        the person probably goes on beyond it, and a neighbouring region may hold all of them."""
        x0, y0, x1, y1 = box
        return ((self.x0 == 0 or x0 > self.x0 + EDGE_PX) and (self.y0 == 0 or y0 > self.y0 + EDGE_PX)
                and (self.x1 == width or x1 < self.x1 - EDGE_PX) and (self.y1 == height or y1 < self.y1 - EDGE_PX))

    def to_frame(self, person: Person) -> Person:
        """A person found in the cut-out, in the frame's pixel coordinates (3D stays as the model gave it)."""
        def x(value: float) -> float:
            return round(self.x0 + value / self.scale, 2)

        def y(value: float) -> float:
            return round(self.y0 + value / self.scale, 2)

        mapped = dict(person)
        bx0, by0, bx1, by1 = person["bbox_xyxy"]
        mapped["bbox_xyxy"] = [x(bx0), y(by0), x(bx1), y(by1)]
        mapped["keypoints_2d"] = [[x(kx), y(ky), *rest] for kx, ky, *rest in person.get("keypoints_2d", [])]
        mapped["found_by"] = f"second_pass:{self.kind}"
        return mapped


def around(box: list[float], grow: float, scale: int, width: int, height: int) -> Optional[Region]:
    """A square `grow` times the box's longer side, centred on it, clipped to the frame."""
    x0, y0, x1, y1 = box
    half = max(x1 - x0, y1 - y0) * grow / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    region = Region(int(max(0, cx - half)), int(max(0, cy - half)), int(min(width, cx + half)),
                    int(min(height, cy + half)), scale, "last_box")
    return region if min(region.x1 - region.x0, region.y1 - region.y0) >= MIN_REGION_PX else None


def tiles(width: int, height: int, rows: int = TILE_ROWS, cols: int = TILE_COLS,
          overlap: float = TILE_OVERLAP, scale: int = TILE_SCALE) -> list[Region]:
    """rows x cols tiles covering the frame, neighbours sharing `overlap` of a tile (a rider on a seam is
    whole in one of them)."""
    tile_w = width / (cols - overlap * (cols - 1))
    tile_h = height / (rows - overlap * (rows - 1))
    out = []
    for row in range(rows):
        for col in range(cols):
            x0, y0 = col * tile_w * (1 - overlap), row * tile_h * (1 - overlap)
            out.append(Region(int(x0), int(y0), int(min(width, round(x0 + tile_w))),
                              int(min(height, round(y0 + tile_h))), scale, "tile"))
    return out


class RiderSearch:
    """Remembers where the rider was; on an empty frame, tries the regions in order and stops at the
    first that holds a whole person. Options (engine.options): second_pass (default true),
    second_pass_memory_frames (how long a last box is trusted, default 30), second_pass_retry_frames
    (after a whole-frame search found nobody, the empty frames before the next one, default 5: a clip
    with nobody in it for a while costs a few detections per frame, not twenty); for single images,
    second_pass_image_closer (centre crops and smaller tiles too, default true) and
    second_pass_image_budget_s (the most a single image's search may take, default 4 s)."""

    def __init__(self, detect: Detect, options: dict[str, Any]):
        self.detect = detect
        self.enabled = bool(options.get("second_pass", True))
        self.memory_frames = int(options.get("second_pass_memory_frames", 30))
        self.retry_frames = int(options.get("second_pass_retry_frames", 5))
        self.image_closer = bool(options.get("second_pass_image_closer", True))
        self.image_budget_s = float(options.get("second_pass_image_budget_s", DEFAULT_IMAGE_BUDGET_S))
        self.tried = 0  # regions run through the detector (the second pass's whole cost)
        self.forget()

    def forget(self) -> None:
        """A new video: nothing is known about where the rider is."""
        self.last_box: Optional[list[float]] = None
        self.frames_since_seen = 0
        self.wide_search_in = 0

    def fill(self, persons: list[Person], rgb: np.ndarray, follow: bool = True) -> list[Person]:
        """`persons` as the first pass found them, or what the second pass finds when they are none.
        follow=False (single images): no memory of a previous frame, every region tried."""
        if not persons and self.enabled:
            deadline = None if follow else time.monotonic() + self.image_budget_s
            persons = self.search(rgb, self.regions_for(rgb.shape[1], rgb.shape[0], follow), deadline)
        if follow:
            self.remember(persons)
        return persons

    def regions_for(self, width: int, height: int, follow: bool) -> list[Region]:
        if not follow:
            return wide(width, height) + (closer(width, height) if self.image_closer else [])
        chosen = [] if self.last_box is None else near(self.last_box, width, height)
        if self.wide_search_in > 0:
            self.wide_search_in -= 1
            return chosen
        self.wide_search_in = self.retry_frames
        return chosen + wide(width, height)

    def remember(self, persons: list[Person]) -> None:
        if persons:
            self.last_box, self.frames_since_seen, self.wide_search_in = list(persons[0]["bbox_xyxy"]), 0, 0
            return
        self.frames_since_seen += 1
        if self.frames_since_seen > self.memory_frames:
            self.last_box = None

    def search(self, rgb: np.ndarray, regions: list[Region], deadline: Optional[float] = None) -> list[Person]:
        """The first region whose person is whole, tried until `deadline` (time.monotonic()) if given. One
        cut by the region's edge inside the frame is not taken: measured on the shared clip, such
        cut-offs were mostly a false, flattened pose at a tile's corner."""
        height, width = rgb.shape[:2]
        for region in regions:
            if deadline is not None and time.monotonic() > deadline:
                break
            self.tried += 1
            found = [region.to_frame(person) for person in self.detect(region.cut(rgb))]
            if found and region.holds_whole(found[0]["bbox_xyxy"], width, height):
                return found
        return []


def near(last_box: list[float], width: int, height: int) -> list[Region]:
    """Where the rider was, enlarged by each of AROUND_LAST_BOX in turn."""
    regions = [around(last_box, grow, scale, width, height) for grow, scale in AROUND_LAST_BOX]
    return [region for region in regions if region is not None]


def wide(width: int, height: int) -> list[Region]:
    """The whole frame enlarged, then tiles, then smaller tiles (a smaller rider needs more enlarging)."""
    return [Region(0, 0, width, height, TILE_SCALE, "frame"), *tiles(width, height),
            *tiles(width, height, rows=TILE_ROWS + 1, cols=TILE_COLS + 1)]


def closer(width: int, height: int) -> list[Region]:
    """For a single image, after `wide`: enlarged centre crops, then smaller tiles."""
    return [*centre_crops(width, height),
            *tiles(width, height, rows=CLOSE_TILE_ROWS, cols=CLOSE_TILE_COLS, scale=CLOSE_TILE_SCALE)]


def centre_crops(width: int, height: int) -> list[Region]:
    """Squares on the frame's centre, 1/2 and 1/3 of its shorter side, enlarged."""
    regions = []
    for fraction, scale in CENTRE_FRACTIONS:
        half = min(width, height) / fraction / 2
        region = Region(int(width / 2 - half), int(height / 2 - half), int(width / 2 + half),
                        int(height / 2 + half), scale, "centre")
        if min(region.x1 - region.x0, region.y1 - region.y0) >= MIN_REGION_PX:
            regions.append(region)
    return regions
