"""The second pass: when an engine's detector finds nobody in a frame, look again where the rider is
likely to be (where his track says he is now, enlarged), once per lost stretch in overlapping tiles of
the frame at three sizes, enlarged, and then with the pose model alone on where his track puts him.

A small rider (a few dozen pixels in a 640x360 clip) is too small for a pose detector that sees the
frame at 224 px; cut out and enlarged, the same pixels are big enough. A blurred or fast rider the
detector misses even so, but the pose model alone, given a square on him, finds him (its own presence
flag says whether anyone is there): this is what MediaPipe's video graph does from frame to frame, with
the square placed by the track's motion rather than by the last landmarks. Every person returned was
found by the engine's own model in this frame's pixels (never copied from a neighbour); only the
coordinates are mapped back. Frames the first pass finds reach the search only when its person is in
doubt (below), so they cost nothing extra.

What keeps it cheap (issue 30): the track's regions are few and come first; the wide search runs when
the track is unknown (a new video, a cut, a stretch lost for long), not on every lost frame, and less
often the longer the frame stays empty; a rider a track's region cuts by its edge is looked at whole by
the pose model alone, not searched for again region by region. In a video, a tile the stricter detector
finds nobody in is tried once more with a fainter one (a blurred rider with no track yet), and so is a
small rider's track region the second pass's own detector finds nobody in. What keeps it
honest: a person found in a large region who is small in it must be found again in a region cut around
him (the model, closer, agrees); a person whose landmarks the model itself barely believes (mean
visibility below MIN_PERSON_SCORE), who lies across the picture (a body stretched over scenery), or whom
a region no track placed finds at the frame's edge, is dropped; so is a person, from either pass, as
narrow as a pole.

The first pass's own person is doubted when he starts a track, lies across the picture, or strays from
where the track says the rider is: the video graph can settle on a body it drew into the scenery and
keep it while the rider goes on beside it. A doubted person is looked at closer; if the closer look, or
the pose model on the track, puts the person elsewhere, that answer is taken; if no look agrees with him,
he is returned but the rider's track stays where it was.

Where the engine has a detector made for persons (person_detection.py: `detect_persons`), a video frame
all of that finds nobody in is searched once more, on its boxes in the track's regions and the coarsest
tiles, each given to the pose model alone (a blurred rider the pose detector misses); and a person the
second look would keep whom it does not see is searched past (the video graph's body over drawn pines).

A single image (no video around it) gets every region, centre crops too, within a time budget: first
with the engine's stricter detector for regions no track placed, then with the second pass's own, whose
persons must be found again in a square cut closer around them.

Any engine can use it: give RiderSearch a function that finds persons in an RGB image, with no video
state (MediaPipe's two models run without the graph, a detector + pose model), optionally a stricter one
for the regions no track placed, and call `fill()` on each result."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from gpu_worker.engines.base import Person

Detect = Callable[[np.ndarray], list[Person]]
# The pose model alone on a square `grow` times a box's longer side, centred on it: the person it finds
# there, if its own presence flag says one is (pose_landmarks.LandmarkModel.person_at).
Follow = Callable[[np.ndarray, list[float], float], list[Person]]
# A detector made for persons (person_detection.py): (score, box in the image's pixels) of each person at
# the given minimum score or more, surest first.
ScoredBoxes = list[tuple[float, list[float]]]
DetectPersons = Callable[[np.ndarray, float], ScoredBoxes]

# Around the rider's last box: a square this many times the box's longer side, enlarged by the given
# factor (None: enough for the landmark model), in this order; which list by his size in the frame.
# A rider of a fifth of the frame's height or more: on the shared clip's 100-px rider no one of these
# finds him in all of its first-pass misses, all of them in turn do (dropping the ones that found
# fewest on the clip 5x re-encoded lost 3 of the clip's 122 frames); 4x his size goes beyond the frame.
# A smaller rider: measured on the generated set (bench/recall_set.py, a seed the tests do not use) with
# the true box, 4x his size finds him most often (the pose detector wants context around a small
# person), then 3x and 2x; 1.5x and 6x add nothing.
LARGE_RIDER_REGIONS: tuple[tuple[float, Optional[int]], ...] = (
    (2.0, 1), (1.5, 1), (3.0, 1), (2.0, 2), (1.5, 2), (2.5, 2), (3.0, None))
SMALL_RIDER_REGIONS: tuple[tuple[float, Optional[int]], ...] = ((4.0, None), (3.0, None), (2.0, None))
SMALL_RIDER_SHARE = 0.2
# A cut-out is enlarged (whole factors, up to this) until its shorter side reaches the pose landmark
# model's input (256 px): the model gets the rider's own pixels, not the graph's coarser resampling.
LANDMARK_INPUT_PX, MAX_SCALE = 256, 4
# Half-overlapping tiles at three sizes: a rider up to half a tile in each direction is whole in one.
TILE_ROWS, TILE_COLS, TILE_OVERLAP, TILE_SCALE = 2, 3, 0.5, 2
CLOSE_TILE_ROWS, CLOSE_TILE_COLS, CLOSE_TILE_SCALE = 4, 6, 3
MIN_REGION_PX = 32
EDGE_PX = 2
# The second pass looks where a rider is likely, so it accepts a weaker detection than the first pass.
DEFAULT_MIN_DETECTION_CONFIDENCE = 0.3
DEFAULT_FAINT_DETECTION_CONFIDENCE = 0.2
# Regions no track placed (the wide search's tiles, a single image's centre crops, and on a cut's own frame
# the squares around the rider's box before it): the engine may give a stricter detector for them
# (`detect_unguided`: MediaPipe's takes the first pass's confidence, 0.5). On the generated set's empty
# frames the weaker one found bodies in the scenery at 0.37-0.40, and a track started on one followed it
# for frames.
# A person such a region finds is kept only when the model finds him again closer: on copies of the
# core set with every pixel moved by up to 2 grey levels, a tile right after a cut to an empty shot took
# a body in the snow (0.72, nearly twice as wide as tall) that no closer look found again, and a track
# followed it into the next frame (2 false persons on 2 of 6 copies; none with the check, recall the same
# there and on the full set, seeds 31-33). The squares around the rider before a cut, held to the track's
# rules instead, took a body in the snow of an empty shot the same way (1 on the three copies); held to
# these, none, and the backlit rider whose light changed at once is found where he stood (seed 32, frame
# 114; seeds 31-33 925 / 931 / 940 -> 926 / 932 / 940).
UNGUIDED_KINDS = ("tile", "centre", "cut")
# In a video, a tile the stricter detector finds nobody in is tried once more with one that takes fainter
# detections (`detect_faint`: MediaPipe's at 0.2). The blurred rider at half size scored 0.1-0.5 with the
# detector there while the landmark model, on a square around him, was sure of him (0.8-1.0). Such a faint
# find must also be no more than this many times as wide as tall: of the two faint finds away from the
# rider inside the frame, one lay 2.4 times as wide (the rider's, 0.6-1.7). A track then follows him.
FAINT_MAX_WIDTH_PER_HEIGHT = 2.0
# A track's regions of a small rider (SMALL_RIDER_SHARE) are tried with the fainter detector too, in a
# video, once the second pass's own found nobody there: the blurred rider his track had lost for frames
# (seed 31's blurred rider: 66 -> 86 of 115 frames). Such a find must be sized like the rider,
# neither side more than this many times larger or smaller: the faint finds that broke a blurred rider's
# track were the smear beside him, 2.8 times his width (seed 33). The rider's size is the median of his
# track's last boxes (`Track.size`), not the last one alone: the pose model alone found a 24-px part of a
# 41-px blurred rider, and in the next frame his track's region found him whole but took him for a body
# not sized like him, and a scrap beside him instead (seed 35, never tuned on: the track followed scraps
# for nine frames). Draws 31-35 943 / 941 / 937 / 937 / 925 -> 943 / 944 / 935 / 939 / 934, the core set
# and its noisy copies the same, no false person more.
FAINT_TRACK_GROWTH = 2.0
# A single image the stricter detector finds nobody in is searched again with the second pass's own; a
# person that finds is kept only if it finds him again closer, in a square this many times his size, or
# the pose model alone does on its squares (FOLLOW_GROWS). Of 8 hard frames of the shared clip taken as
# stills (JPEG, as the app sends them), 5 riders found so were found again (3 by the closer squares);
# the two bodies found in the generated sets' scenery (a car in grass at the photo's corner, drawn pines)
# by neither (the car only in a square 3x its size).
CLOSER_LOOK_GROWS = (1.25, 1.5, 2.0)
# A person whose landmarks' mean visibility is below this is the model guessing a body into texture (a
# hedge, a tree line): such persons on the generated set's backgrounds scored 0.25-0.37, riders the
# model barely sees (mid-jump, legs hidden) from 0.45. The first pass's person is held to it too: the
# graph's riders scored 0.62 and up (the shared clip, the full set's seed 31), and on a copy of the set with
# every pixel moved by up to 2 grey levels it returned a person at an empty frame's corner at 0.19.
MIN_PERSON_SCORE = 0.4
# A person whose landmarks' box is more than this many times as wide as tall lies across the picture: a
# rider who fell, or (what the second pass found, measured on the generated set) a body the model
# stretched across scenery: such persons from the second pass were 2.1-7 times as wide as tall (median),
# the rider it found 0.7 (95th percentile 1.3), and the first pass's rider up to 2.1 (95th percentile).
# The second pass takes nobody that wide; a first-pass person that wide is looked at closer.
MAX_WIDTH_PER_HEIGHT = 2.5
# A person narrower than this share of his height is a tree trunk or a pole: right after a cut, MediaPipe's
# graph took a pine 0.13 times as wide as tall for a person (and a closer look agreed); the shared clip's
# rider is 0.34 to 2.1 times as wide as tall. Neither pass's person that narrow is taken.
MIN_WIDTH_PER_HEIGHT = 0.2
# A person whose box is smaller than this share of the region he was found in is checked again closer,
# in squares of these sizes around him (as the track's regions).
CONFIRM_BELOW, CONFIRM_GROWS = 1 / 3, (3.0, 2.0)
# A single image: centre crops of 1/2 and 1/3 of the frame's shorter side (square, as the pose
# detector's input is), enlarged.
CENTRE_FRACTIONS = ((2, 2), (3, 3))  # (1/fraction of the shorter side, upscale)
DEFAULT_IMAGE_BUDGET_S = 4.0
# A cut: the mean change of a 32x18 grey thumbnail between two frames, in grey levels. Measured on the
# generated set (seeds 31-33): cuts between two snowy shots 19-66, its fastest pan (26 px a frame,
# blurred) at most 10.5; the shared clip within a shot at most 7.
THUMB_SIZE, CUT_LEVELS = (32, 18), 15.0
TRACK_LENGTH = 3
# Around where the track's motion puts the rider when that is a quarter of his size or more from his
# last box (a small rider: the first two of SMALL_RIDER_REGIONS).
MOTION_REGIONS: tuple[tuple[float, Optional[int]], ...] = ((2.0, None), (3.0, None))
MOVED_SHARE = 0.25
# The first pass's person strays from the track when his box overlaps where the track puts the rider by
# less than this (IoU), the track having seen the rider within RECENT_FRAMES. A rider's own box from one
# frame to the next, arms out or a fast move, overlaps the prediction by more.
STRAY_IOU, RECENT_FRAMES = 0.3, 2
# A doubted first-pass person is looked at again in a square this many times his box, enlarged.
SECOND_LOOK_GROW = 1.5
# What a frame's person does to the rider's track (`RiderSearch.remember`): extends it, confirmed by a
# closer look or not yet (a new track's first persons); or nothing (OFF_TRACK), though he is returned: a
# first-pass person away from a recent track that knows the rider's motion (two sightings), whom no closer
# look agrees with and no look on the track replaces, such as the video graph's body over the pines (0.6
# of the frame tall). Moved onto that body, the track led the pose model alone into the pines for frames
# while the rider went on beside it. Left so for RECENT_FRAMES, the track is no longer recent and the
# first pass's person starts the next one.
CONFIRMED, UNCONFIRMED, OFF_TRACK = "confirmed", "unconfirmed", "off_track"
# A track started on a first-pass person is looked at closer on each of its first frames until a
# closer look agrees (or finds the rider elsewhere), at most this many times: the detector's answer
# turns on a pixel of the cut, so one look can miss him.
CONFIRM_TRIES = 2
# Following the rider with the pose model alone: squares of these sizes (times his box's longer side)
# on where his track puts him, tried in turn, while the track was seen within FOLLOW_FRAMES. On the
# generated set, a cut on the rider's box of the frame before found him in 116 of 117 frames this way
# (the model's flag is sensitive to the cut's size, hence three).
FOLLOW_GROWS, FOLLOW_FRAMES = (1.5, 1.8, 2.1), 3
# A person a track's region finds cut by the region's own edge (not the frame's) is looked at whole: the
# pose model alone on squares of these sizes around what the region showed of him, in the frame; the
# first such person of a frame at both sizes, the second at the first size, no more. Measured on the
# shared clip 5x (x264): of 21 first looks, 13 found the rider (10 at 1.8, 3 at 1.5) whom the next
# regions had to find again, a detector and a model call each, mostly turned down; the clip's lost frames
# went from 3 to 0, the second pass's model calls from 288 to 206. On the full generated set (seeds 31-33)
# recall 0.868/0.888/0.912 -> 0.876/0.904/0.949, no false person. A second look found 10 riders of 23 on
# seed 33 (7 at 1.8), none of 8 on the clip 5x; 1.5 alone lost two blurred frames of the core set.
WHOLE_LOOK_GROWS: tuple[tuple[float, ...], ...] = ((1.8, 1.5), (1.8,))
# The person detector (`detect_persons`, where the engine has one) on a video frame everything else found
# nobody in (`searched_frame`), and on a single image after the stricter detector: in a track's region, or
# a tile of the coarsest grid (at least BOX_TILE_SHARE of the frame tall; a finer grid's tiles would cost a
# call each for a rider the coarse ones hold). Its surest PERSON_BOXES_TRIED boxes at PERSON_BOX_MIN_SCORE
# or more, each given to the pose model alone (FOLLOW_GROWS), whose person must lie on the box (IoU
# PERSON_BOX_AGREES). At 0.3 it took the scenery's pines (median 0.15, 0.3 at the 90th percentile); the
# blurred rider, in a region about four times his size, scored 0.45-0.63 on every frame the second pass
# had missed. Run after the rest rather than in each region as the pose detector misses it: on the shared
# clip 5x the regions before the one that found the rider cost it 31 calls for 2 finds (15.6% -> about
# 19%), on the full set's blurred rider (seeds 31-33) 114/111/113 of 115 against 107/109/114 now.
PERSON_BOX_MIN_SCORE, PERSON_BOXES_TRIED, PERSON_BOX_AGREES = 0.4, 2, 0.3
BOX_TILE_SHARE = 0.6
# A person the second look would keep (or put elsewhere) must be one the person detector sees: a box at
# SEEN_MIN_SCORE or more on him (IoU SEEN_IOU) in a square SEEN_GROW times his size. On seed 31 it saw
# 83-100% of the riders the video graph found (per clip; the shared clip's 93%) and 8% of its bodies over
# drawn pines. One it does not see is searched past (`searched_frame`), and a person it sees found there is
# taken instead; else he stands, but moves the track only when sized like the rider
# (FAINT_TRACK_GROWTH): a body five times the rider starts no track. Always moving it (a blurred rider the
# detector missed for a frame keeps his track so) lost the pines clip of seed 31 (92 -> 48 of 115); never
# moving it lost the blurred rider of seed 32 for 7 frames after such a frame. The same question is asked of
# a person not sized like the rider: a first-pass one is doubted (the second look), and a track's region's
# is passed over unless the detector sees him. The video graph had followed a body in the pines four times
# the rider's height, found by a track's region: seed 32's rider among pines 107 -> 114 of 115 (seeds 31-33
# full set 917 / 909 / 939 -> 918 / 924 / 939, the shared clip 5x's searches unchanged). Without the
# detector's say (size alone), the mound's rider, whose box grows when the model draws his hidden legs and
# shrinks when it does not, was passed over (seed 32's mound 112 -> 108).
# A person the second look leaves unsettled (off the track, unseen, or lying across the picture) gives way
# to the pose model alone on the detector's surest boxes in that square (PERSON_BOX_MIN_SCORE, as for a
# region's): a blurred rider turned back while his track went on the other way, and the graph smeared a
# pose over him for five frames that the looks, placed by the track, could not replace. Seeds 31-33
# 918 / 924 / 939 -> 925 / 929 / 941; the shared clip 5x takes the same searches. A person a look put in
# the first pass's place that it does not see gives way to the first pass's if it sees him (the pose model
# alone had put a scrap where the turned rider's track went on), and a person too small for the square is
# looked at in one the rider's last box's size (an 8-px scrap on him was believed unseen): 925 / 931 / 940.
SEEN_GROW, SEEN_MIN_SCORE, SEEN_IOU = 1.5, 0.3, 0.3
# A first-pass person no look agrees with (UNCONFIRMED: no closer look finds him, no look on a track replaces
# him) where no confirmed track is near must be seen surely: a box at PROVEN_MIN_SCORE or more on him, the
# score the person detector's own finds need (PERSON_BOX_MIN_SCORE). Else the frame is searched past him and
# he is not returned. After a cut to an empty shot the video graph drew a body lying across tilted pines
# (seed 34, never tuned on: 8 frames) that started a track no look confirmed; the detector saw it at 0.31-0.40,
# the riders returned so on draws 31-35 at 0.42 and up (19 frames). Seed 34 930 -> 937 of 952, false persons
# 8 -> 1 (the blurred rider's smears went too, and the search found him); seeds 31-33 and the core set the same.
# The same sure box is asked of the last resort's find in a region no track placed (the pose model alone on the
# detector's box in a tile), asked again in a square SEEN_GROW times the person the model found: on the first
# frame of an empty shot it took a pine as a 228 x 285 body (the detector's box in the tile 0.47, around the
# body 0.36) and the track followed it for 16 frames (seed 35, never tuned on: 8 false persons -> 0); the
# blurred riders found so scored 0.51-0.63 around themselves. Seed 33 lost one still (938 -> 937), draws 31,
# 32, 34, 35 and the core set kept every rider.
PROVEN_MIN_SCORE = PERSON_BOX_MIN_SCORE
BY_PERSON_DETECTOR = "_person_detector"  # ends the `found_by` of a person found on its box


def min_detection_confidence(options: dict[str, Any]) -> float:
    """engine.options.second_pass_min_detection_confidence, for the detector the second pass runs."""
    return float(options.get("second_pass_min_detection_confidence", DEFAULT_MIN_DETECTION_CONFIDENCE))


def faint_detection_confidence(options: dict[str, Any]) -> float:
    """engine.options.second_pass_faint_detection_confidence, for a video's tiles once the stricter
    detector found nobody in them."""
    return float(options.get("second_pass_faint_detection_confidence", DEFAULT_FAINT_DETECTION_CONFIDENCE))


@dataclass(frozen=True)
class Region:
    x0: int
    y0: int
    x1: int
    y1: int
    scale: int
    kind: str  # "track", "tile", "centre" or "cut" (around the rider's box before a cut)

    def cut(self, rgb: np.ndarray) -> np.ndarray:
        import cv2
        crop = np.ascontiguousarray(rgb[self.y0:self.y1, self.x0:self.x1])
        if self.scale == 1:
            return crop
        return cv2.resize(crop, None, fx=self.scale, fy=self.scale, interpolation=cv2.INTER_CUBIC)

    @property
    def side(self) -> int:
        return min(self.x1 - self.x0, self.y1 - self.y0)

    def holds_whole(self, box: list[float], width: int, height: int) -> bool:
        """False when the box (frame coordinates) touches an edge of this region that is not the frame's:
        the person probably goes on beyond it, and a neighbouring region may hold all of them."""
        x0, y0, x1, y1 = box
        return ((self.x0 == 0 or x0 > self.x0 + EDGE_PX) and (self.y0 == 0 or y0 > self.y0 + EDGE_PX)
                and (self.x1 == width or x1 < self.x1 - EDGE_PX) and (self.y1 == height or y1 < self.y1 - EDGE_PX))

    def is_small_in(self, box: list[float]) -> bool:
        return max(box[2] - box[0], box[3] - box[1]) < CONFIRM_BELOW * self.side

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


def enlargement(side: int) -> int:
    return max(1, min(MAX_SCALE, math.ceil(LANDMARK_INPUT_PX / max(1, side))))


def around(box: list[float], grow: float, scale: Optional[int], width: int, height: int,
           kind: str = "track") -> Optional[Region]:
    """A square `grow` times the box's longer side, centred on it, clipped to the frame; enlarged by
    `scale`, or (None) enough for the landmark model."""
    x0, y0, x1, y1 = box
    half = max(x1 - x0, y1 - y0) * grow / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(max(0, cx - half)), int(max(0, cy - half))
    right, bottom = int(min(width, cx + half)), int(min(height, cy + half))
    if min(right - left, bottom - top) < MIN_REGION_PX:
        return None
    return Region(left, top, right, bottom, scale or enlargement(min(right - left, bottom - top)), kind)


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


def nearest_first(regions: list[Region], x: float, y: float) -> list[Region]:
    """Regions by the distance of their centre to (x, y): where the rider last was, or the frame's centre
    (a camera follows its rider)."""
    return sorted(regions, key=lambda r: ((r.x0 + r.x1) / 2 - x) ** 2 + ((r.y0 + r.y1) / 2 - y) ** 2)


def wide(width: int, height: int, near: Optional[tuple[float, float]] = None) -> list[Region]:
    """Tiles at three sizes (a smaller rider needs a smaller tile, more enlarged), each size nearest
    `near` (default the frame's centre) first. Not the whole frame: the first pass saw it, and enlarged
    whole at a lower threshold it gave mostly a tiny rider stretched into a lying body."""
    x, y = near or (width / 2, height / 2)
    return [*nearest_first(tiles(width, height), x, y),
            *nearest_first(tiles(width, height, rows=TILE_ROWS + 1, cols=TILE_COLS + 1), x, y),
            *nearest_first(tiles(width, height, rows=CLOSE_TILE_ROWS, cols=CLOSE_TILE_COLS,
                                 scale=CLOSE_TILE_SCALE), x, y)]


def closer(width: int, height: int) -> list[Region]:
    """For a single image, after `wide`: enlarged centre crops."""
    return centre_crops(width, height)


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


class CutDetector:
    """Tells a new shot from the next frame of the same one, by how much a tiny grey thumbnail changed."""

    def __init__(self) -> None:
        self.previous: Optional[np.ndarray] = None

    def is_cut(self, rgb: np.ndarray) -> bool:
        import cv2
        thumb = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), THUMB_SIZE, interpolation=cv2.INTER_AREA)
        thumb = thumb.astype(np.float32)
        previous, self.previous = self.previous, thumb
        return previous is not None and float(np.abs(thumb - previous).mean()) > CUT_LEVELS


class Track:
    """The rider's last few boxes (frame number, box): where he should be now, moving as he moved."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[float]]] = []
        self.unconfirmed = False  # started on a first-pass person no closer look has yet agreed with
        self.tries = 0  # closer looks spent on confirming it

    def add(self, frame: int, box: list[float], confirmed: bool = True) -> None:
        if not self.seen:
            self.unconfirmed, self.tries = not confirmed, 0
        elif confirmed:
            self.unconfirmed = False
        self.seen = [*self.seen[-(TRACK_LENGTH - 1):], (frame, list(box))]

    def predicted(self, frame: int) -> Optional[list[float]]:
        """The last box moved to `frame` by the velocity of its centre over the last sightings (its size
        kept: a box that grows or shrinks mostly shows the pose changing)."""
        if not self.seen:
            return None
        last_frame, last = self.seen[-1]
        if len(self.seen) < 2:
            return last
        first_frame, first = self.seen[0]
        ahead = (frame - last_frame) / max(1, last_frame - first_frame)
        dx = ((last[0] + last[2]) - (first[0] + first[2])) / 2 * ahead
        dy = ((last[1] + last[3]) - (first[1] + first[3])) / 2 * ahead
        return [last[0] + dx, last[1] + dy, last[2] + dx, last[3] + dy]

    def size(self) -> tuple[float, float]:
        """The rider's width and height: the median of his last boxes' (a box the pose model alone found on a
        part of him, one frame, does not shrink it)."""
        return (float(np.median([box[2] - box[0] for _, box in self.seen])),
                float(np.median([box[3] - box[1] for _, box in self.seen])))

    def last_centre(self) -> Optional[tuple[float, float]]:
        if not self.seen:
            return None
        box = self.seen[-1][1]
        return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def lies_across(box: list[float], most: float = MAX_WIDTH_PER_HEIGHT) -> bool:
    return box[2] - box[0] > most * max(1e-6, box[3] - box[1])


def too_narrow(box: list[float]) -> bool:
    return box[2] - box[0] < MIN_WIDTH_PER_HEIGHT * (box[3] - box[1])


def is_body_shaped(box: list[float]) -> bool:
    """Neither lying across the picture nor as narrow as a pole."""
    return not lies_across(box) and not too_narrow(box)


def touches_frame_edge(box: list[float], width: int, height: int) -> bool:
    """A person a region no track placed finds is refused when this holds (a region's own edges are,
    `Region.holds_whole`): on the generated set, 11 of the 13 faint finds away from the rider (seeds 31
    and 32) and the stricter detector's one person on a still with nobody in it (seeds 32 and 33) were
    scenery cut by the frame."""
    return box[0] <= EDGE_PX or box[1] <= EDGE_PX or box[2] >= width - EDGE_PX or box[3] >= height - EDGE_PX


def sees(scored: ScoredBoxes, box: list[float], min_score: float = 0.0) -> bool:
    """One of the person detector's boxes at `min_score` or more lies on `box` (SEEN_IOU)."""
    return any(score >= min_score and box_iou(seen, box) >= SEEN_IOU for score, seen in scored)


def seen_square(box: list[float], width: int, height: int) -> Optional[Region]:
    """The square the person detector is asked about a person in: SEEN_GROW times his box, not enlarged."""
    return around(box, SEEN_GROW, 1, width, height, kind="seen")


def box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def is_small_rider(box: list[float], height: int) -> bool:
    """The box's longer side is under SMALL_RIDER_SHARE of the frame's height."""
    return max(box[2] - box[0], box[3] - box[1]) < SMALL_RIDER_SHARE * height


def regions_around_rider(box: list[float], width: int, height: int, kind: str = "track") -> list[Optional[Region]]:
    """The squares around the rider's box, by his size (SMALL_RIDER_REGIONS or LARGE_RIDER_REGIONS); None
    for one too small to cut."""
    return [around(box, grow, scale, width, height, kind)
            for grow, scale in (SMALL_RIDER_REGIONS if is_small_rider(box, height) else LARGE_RIDER_REGIONS)]


def once(regions: list[Optional[Region]]) -> list[Region]:
    """Each region once, in order (two entries can give the same region: a large rider's 3x square needs
    no enlargement), without the ones too small to cut."""
    return list(dict.fromkeys(region for region in regions if region is not None))


def moved(last: list[float], predicted: list[float]) -> bool:
    size = max(last[2] - last[0], last[3] - last[1])
    shift = max(abs(a - b) for a, b in zip(last, predicted))
    return shift >= MOVED_SHARE * size


class RiderSearch:
    """Follows the rider; on an empty frame, tries the regions in order and stops at the first that
    holds a whole, believable person. Options (engine.options): second_pass (default true),
    second_pass_memory_frames (how long a track is trusted, default 30), second_pass_retry_frames
    (the empty frames between two wide searches in a lost stretch, default 5, doubled after each that
    finds nobody, up to second_pass_memory_frames: a long empty stretch costs almost nothing),
    second_pass_follow (the pose model alone on the track, when the engine gives a `follow`, default
    true); for single images, second_pass_image_closer (centre crops too, default true) and
    second_pass_image_budget_s (the most a single image's search may take, default 4 s). The engine
    gives the detectors; MediaPipe's read second_pass_min_detection_confidence (0.3) and
    second_pass_faint_detection_confidence (0.2, a video's tiles once the stricter one found nobody), and
    give a person detector (`detect_persons`) where one is installed."""

    def __init__(self, detect: Detect, options: dict[str, Any], follow: Optional[Follow] = None,
                 detect_unguided: Optional[Detect] = None, detect_faint: Optional[Detect] = None,
                 detect_persons: Optional[DetectPersons] = None):
        self.detect = detect
        self.detect_unguided = detect_unguided or detect
        self.detect_faint = detect_faint
        self.detect_persons = detect_persons
        self.follow = follow if bool(options.get("second_pass_follow", True)) else None
        self.enabled = bool(options.get("second_pass", True))
        self.memory_frames = int(options.get("second_pass_memory_frames", 30))
        self.retry_frames = int(options.get("second_pass_retry_frames", 5))
        self.image_closer = bool(options.get("second_pass_image_closer", True))
        self.image_budget_s = float(options.get("second_pass_image_budget_s", DEFAULT_IMAGE_BUDGET_S))
        self.tried = 0  # regions run through the detector (the second pass's whole cost)
        self.wide_searches = 0
        self.forget()

    def forget(self) -> None:
        """A new video: nothing is known about where the rider is."""
        self.track = Track()
        self.cuts = CutDetector()
        self.frame = -1
        self.before_cut: Optional[tuple[int, list[float]]] = None
        self.lost_run = 0  # consecutive frames with nobody found, by either pass
        self.whole_looks = len(WHOLE_LOOK_GROWS)  # cut-off persons looked at whole in this frame (none to come)
        self.wide_in = 0  # empty frames before the next wide search may run
        self.wide_gap = self.retry_frames

    def fill(self, persons: list[Person], rgb: np.ndarray, follow: bool = True) -> list[Person]:
        """`persons` as the first pass found them, or what the second pass finds when they are none.
        follow=False (single images): no memory of a previous frame, every region tried."""
        if self.enabled and persons and not self.believable_first(persons[0]):
            persons = []
        if not follow:
            self.whole_looks = len(WHOLE_LOOK_GROWS)
            if not self.enabled:
                return persons
            if persons:
                return self.looked_closer(persons, rgb)[0]
            return self.searched_image(rgb)
        self.frame += 1
        self.whole_looks = 0
        if self.cuts.is_cut(rgb):
            self.new_shot()
        standing = CONFIRMED
        if persons and self.enabled and self.doubts(persons[0]):
            persons, standing = self.second_look(persons, rgb)
        elif not persons and self.enabled:
            persons = self.searched_frame(rgb)
        self.remember(persons, standing)
        return persons

    @staticmethod
    def believable_first(person: Person) -> bool:
        """The first pass's person is not as narrow as a pole, and the model believes his landmarks
        (MIN_PERSON_SCORE, as for the second pass's)."""
        return not too_narrow(person["bbox_xyxy"]) and float(person.get("score", 1.0)) >= MIN_PERSON_SCORE

    def searched_frame(self, rgb: np.ndarray) -> list[Person]:
        """A video frame with nobody in it yet: the track's regions and the wide search when due, the pose
        model alone on the track, and only then the person detector's boxes in those regions (the frames
        the rest finds cost it nothing)."""
        regions = self.regions_for(rgb.shape[1], rgb.shape[0])
        return self.search(rgb, regions, faint=True) or self.followed(rgb) or self.search(rgb, regions, boxes=True)

    def searched_image(self, rgb: np.ndarray) -> list[Person]:
        """A single image: every region with the stricter detector, then the person detector's boxes in the
        coarse tiles; then, if they found nobody and there is time, every region with the second pass's
        own, a person it finds kept only when it finds him again in a square cut closer around him. A single
        image has no track to say where the rider is, and the weaker detector alone found bodies in scenery
        that a closer look does not find again."""
        deadline = time.monotonic() + self.image_budget_s
        regions = wide(rgb.shape[1], rgb.shape[0]) + (closer(rgb.shape[1], rgb.shape[0]) if self.image_closer else [])
        found = self.search(rgb, regions, deadline) or self.search(rgb, regions, deadline, boxes=True)
        if found or self.detect_unguided is self.detect:
            return found
        height, width = rgb.shape[:2]
        for region in regions:
            if time.monotonic() > deadline:
                break
            weak = self.whole_person_in(region, rgb, width, height, detect=self.detect)
            if weak and self.found_again_closer(weak[0]["bbox_xyxy"], rgb):
                return weak
        return []

    def found_again_closer(self, box: list[float], rgb: np.ndarray) -> bool:
        """The detector finds a person again in a square cut closer around `box`, or the pose model alone
        does on one."""
        height, width = rgb.shape[:2]
        for grow in CLOSER_LOOK_GROWS:
            region = around(box, grow, None, width, height)
            if region is not None and self.whole_person_in(region, rgb, width, height, detect=self.detect):
                return True
        return bool(self.model_alone_on(rgb, box))

    def followed(self, rgb: np.ndarray, accept: Callable[[Person], bool] = lambda person: True) -> list[Person]:
        """The pose model alone where the track puts the rider now (then on his last box, if the track
        says he moved), as MediaPipe's video graph follows him from frame to frame but placed by his
        motion; nobody if the track is older than FOLLOW_FRAMES or there is no follow function."""
        predicted = self.track.predicted(self.frame)
        if self.follow is None or predicted is None or self.frame - self.track.seen[-1][0] > FOLLOW_FRAMES:
            return []
        last = self.track.seen[-1][1]
        for box in ([predicted, last] if moved(last, predicted) else [predicted]):
            found = self.model_alone_on(rgb, box, accept)
            if found:
                return [{**person, "found_by": "second_pass:follow"} for person in found]
        return []

    def model_alone_on(self, rgb: np.ndarray, box: list[float],
                       accept: Callable[[Person], bool] = lambda person: True,
                       grows: tuple[float, ...] = FOLLOW_GROWS) -> list[Person]:
        """The first of the pose model alone's squares on `box` (`grows` times its longer side) where it
        finds an accepted, body-shaped person (`is_body_shaped`); nobody without a follow function."""
        if self.follow is None:
            return []
        for grow in grows:
            self.tried += 1
            found = self.follow(rgb, box, grow)
            if found and is_body_shaped(found[0]["bbox_xyxy"]) and accept(found[0]):
                return found
        return []

    def doubts(self, person: Person) -> bool:
        """True when the first pass's person starts a track, or lies across the picture, or his track
        has not yet been confirmed by a closer look (up to CONFIRM_TRIES frames), or he lies away from
        where the track says the rider is, or (where the engine has a person detector, which the second
        look then asks) he is not sized like the rider: the video graph, before it has seen the rider well
        or once it has lost him, can settle on a body drawn into the scenery (a stretched pose across
        trees) and keep it while the rider goes on beside it."""
        predicted = self.track.predicted(self.frame)
        if predicted is None or not self.recently_seen() or lies_across(person["bbox_xyxy"]):
            return True
        if self.track.unconfirmed and self.track.tries < CONFIRM_TRIES:
            return True
        if self.detect_persons is not None and not self.sized_like_the_rider(person["bbox_xyxy"]):
            return True
        return box_iou(person["bbox_xyxy"], predicted) < STRAY_IOU

    def second_look(self, persons: list[Person], rgb: np.ndarray) -> tuple[list[Person], str]:
        """`looked_again`, then, where the engine has a person detector, the person it would keep looked at
        with it (SEEN_GROW). One the looks left unsettled (off the track, lying across the picture, or not
        seen by it) gives way to the pose model alone on its boxes there (`person_on_boxes`), which then
        leads the track. A first-pass person no look agreed with, away from a confirmed track, that it does
        not see surely (`unproven`) is searched past and not returned. Else one it sees stands, and one it does
        not see is `unseen_looked_past`."""
        looked, standing = self.looked_again(persons, rgb)
        if self.detect_persons is None:
            return looked, standing
        near = self.person_boxes_near(looked[0], rgb)
        seen = near is None or sees(near[1], looked[0]["bbox_xyxy"])
        unsettled = standing == OFF_TRACK or not seen or lies_across(looked[0]["bbox_xyxy"])
        on_box = self.person_on_boxes(*near, rgb) if near is not None and unsettled else []
        if on_box:
            return on_box, CONFIRMED
        if looked is persons and standing == UNCONFIRMED and near is not None and self.unproven(looked[0], near[1]):
            instead = self.searched_past(rgb)
            return instead, CONFIRMED if instead else UNCONFIRMED
        if seen:
            return looked, standing
        return self.unseen_looked_past(persons, looked, standing, rgb)

    def unproven(self, person: Person, near: ScoredBoxes) -> bool:
        """No confirmed track is near and the person detector does not see him surely (PROVEN_MIN_SCORE)."""
        confirmed_track = self.recently_seen() and not self.track.unconfirmed
        return not confirmed_track and not sees(near, person["bbox_xyxy"], PROVEN_MIN_SCORE)

    def recently_seen(self) -> bool:
        """The track saw the rider within RECENT_FRAMES."""
        return bool(self.track.seen) and self.frame - self.track.seen[-1][0] <= RECENT_FRAMES

    def searched_past(self, rgb: np.ndarray) -> list[Person]:
        """The frame searched as if the first pass had found nobody; a person found there only if the person
        detector sees him."""
        instead = self.searched_frame(rgb)
        return instead if instead and self.person_detector_sees(instead[0], rgb) else []

    def unseen_looked_past(self, persons: list[Person], looked: list[Person], standing: str,
                           rgb: np.ndarray) -> tuple[list[Person], str]:
        """The person the second look would keep, which the person detector does not see: the first pass's
        person searched past (a person it sees found there instead), or a look's person given up for the
        first pass's if it sees him; else he stands, moving the track only when sized like the rider."""
        if looked is persons:
            instead = self.searched_past(rgb)
            if instead:
                return instead, CONFIRMED
        elif self.person_detector_sees(persons[0], rgb):
            return persons, CONFIRMED
        if self.track.seen and self.sized_like_the_rider(looked[0]["bbox_xyxy"]):
            return looked, standing
        return looked, OFF_TRACK

    def looked_again(self, persons: list[Person], rgb: np.ndarray) -> tuple[list[Person], str]:
        """The model's answer closer in, around the first pass's person: if it is the same person, his
        track is confirmed; if it puts the person elsewhere, that answer (the closer look sees the rider
        larger; a stretched body does not survive it). Then, for a person away from a recent track, the
        pose model alone where the track says the rider is, and for one lying across the picture too, the
        track's regions. Else the first pass's person stands; off the track (OFF_TRACK) if no look agreed
        with him and the track knows the rider's motion. -> (the persons, what they do to the track)."""
        first = persons[0]["bbox_xyxy"]
        predicted = self.track.predicted(self.frame)
        recent = predicted is not None and self.recently_seen()
        if recent and self.track.unconfirmed:
            self.track.tries += 1
        looked, agreed = self.looked_closer(persons, rgb)
        if looked is not persons:
            return looked, CONFIRMED
        if predicted is None or not recent or box_iou(first, predicted) >= STRAY_IOU:
            return persons, CONFIRMED if agreed else UNCONFIRMED
        on_track = self.followed(rgb, accept=lambda person: box_iou(person["bbox_xyxy"], predicted) >= STRAY_IOU)
        if not on_track and lies_across(first):
            on_track = self.search(rgb, self.track_regions(predicted, rgb.shape[1], rgb.shape[0]))
        if on_track or agreed:
            return on_track or persons, CONFIRMED
        return persons, UNCONFIRMED if len(self.track.seen) < 2 else OFF_TRACK

    def looked_closer(self, persons: list[Person], rgb: np.ndarray) -> tuple[list[Person], bool]:
        """(the closer look's persons if it puts the person elsewhere, else `persons`; whether it found
        the same person)."""
        height, width = rgb.shape[:2]
        first = persons[0]["bbox_xyxy"]
        region = around(first, SECOND_LOOK_GROW, None, width, height, kind="second_look")
        closer_look = self.whole_person_in(region, rgb, width, height) if region is not None else []
        if closer_look and box_iou(closer_look[0]["bbox_xyxy"], first) < STRAY_IOU:
            return closer_look, False
        return persons, bool(closer_look)

    def new_shot(self) -> None:
        """After a cut the rider may be anywhere: the old track is no guide, a wide search is due (after
        a look where the rider was, if the track saw him a moment ago)."""
        recent = self.recently_seen()
        self.before_cut = (self.frame, self.track.seen[-1][1]) if recent else None
        self.track = Track()
        self.wide_in, self.wide_gap = 0, self.retry_frames

    def regions_for(self, width: int, height: int) -> list[Region]:
        """The track's regions; then, if due, the wide search: when there is no track (a new video, a
        cut) or it is older than second_pass_retry_frames (a rider seen a moment ago is near his track:
        searching the whole frame for him again and again was most of the cost). On a cut's own frame, the
        regions around the rider's box before it come first, their finds held to the tiles' rules (the
        light changed at once but he stood where he was)."""
        predicted = self.track.predicted(self.frame)
        chosen = [] if predicted is None else self.track_regions(predicted, width, height)
        if self.before_cut is not None and self.before_cut[0] == self.frame:  # the track was just forgotten
            chosen = once(regions_around_rider(self.before_cut[1], width, height, kind="cut"))
        if (predicted is not None and self.frame - self.track.seen[-1][0] <= self.retry_frames) or self.wide_in > 0:
            self.wide_in = max(0, self.wide_in - 1)
            return chosen
        self.wide_searches += 1
        self.wide_in, self.wide_gap = self.wide_gap, min(self.memory_frames, self.wide_gap * 2)
        return chosen + wide(width, height, self.track.last_centre())

    def track_regions(self, predicted: list[float], width: int, height: int) -> list[Region]:
        """Around the last box, then around where the track's motion puts him now (a fast rider has
        left the last box; a rider slowed in the air has not)."""
        last = self.track.seen[-1][1]
        regions = regions_around_rider(last, width, height)
        if moved(last, predicted):
            small = is_small_rider(last, height)
            regions += [around(predicted, grow, scale, width, height)
                        for grow, scale in (SMALL_RIDER_REGIONS[:2] if small else MOTION_REGIONS)]
        return once(regions)

    def rider_is_small(self, height: int) -> bool:
        return bool(self.track.seen) and is_small_rider(self.track.seen[-1][1], height)

    def remember(self, persons: list[Person], standing: str = CONFIRMED) -> None:
        if persons and standing != OFF_TRACK:
            self.track.add(self.frame, persons[0]["bbox_xyxy"], standing == CONFIRMED)
            self.lost_run, self.wide_in, self.wide_gap = 0, 0, self.retry_frames
            return
        self.lost_run += 1
        if self.track.seen and self.frame - self.track.seen[-1][0] > self.memory_frames:
            self.track = Track()

    def search(self, rgb: np.ndarray, regions: list[Region], deadline: Optional[float] = None,
               faint: bool = False, boxes: bool = False) -> list[Person]:
        """The first region that holds a whole, believable person, tried until `deadline`
        (time.monotonic()) if given; with `faint`, a region no track placed, or a track's region while
        the rider is small, is tried once more with the fainter detector. A person a region no track
        placed finds is kept only when the model finds him again closer (the one small in his region,
        in a region cut around him; else `found_again_closer`), and, found on the person detector's box, when
        that detector sees him surely around him (`seen_surely_around`). With `boxes`, the person detector's boxes in
        the regions it looks in (`person_box_in`) instead of the pose detector (the pose model alone has already
        looked at such a person closer, on his box)."""
        height, width = rgb.shape[:2]
        small = self.rider_is_small(height)
        for region in regions:
            if deadline is not None and time.monotonic() > deadline:
                break
            if boxes:
                if not self.boxes_looked_for_in(region, height):
                    continue
                found = self.person_box_in(region, rgb)
            else:
                found = self.whole_person_in(region, rgb, width, height)
            if not found and faint and (region.kind in UNGUIDED_KINDS or (region.kind == "track" and small)):
                found = self.faint_person_in(region, rgb, width, height)
            if found and not boxes and region.is_small_in(found[0]["bbox_xyxy"]):
                found = self.confirmed_closer(found, rgb, width, height)
            elif found and region.kind in UNGUIDED_KINDS and not self.found_again_closer(found[0]["bbox_xyxy"], rgb):
                found = []
            if found and boxes and region.kind in UNGUIDED_KINDS and not self.seen_surely_around(found[0], rgb):
                found = []
            if found and region.kind == "track" and not self.believable_on_track(found[0], rgb):
                found = []
            if found:
                return found
        return []

    def believable_on_track(self, person: Person, rgb: np.ndarray) -> bool:
        """A person a track's region found is sized like the rider, or the person detector sees him (true
        without one): the pose model draws a body into pines beside a small rider, four times his size,
        that the video graph then follows."""
        if not self.track.seen or self.sized_like_the_rider(person["bbox_xyxy"]):
            return True
        return self.person_detector_sees(person, rgb)

    def boxes_looked_for_in(self, region: Region, height: int) -> bool:
        if self.detect_persons is None:
            return False
        return region.kind == "track" or (region.kind == "tile" and region.y1 - region.y0 >= BOX_TILE_SHARE * height)

    def person_box_in(self, region: Region, rgb: np.ndarray) -> list[Person]:
        """The pose model alone on the person detector's surest boxes in the region (PERSON_BOX_MIN_SCORE or
        more, `person_on_boxes`)."""
        return self.person_on_boxes(region, self.person_boxes_in(region, rgb, PERSON_BOX_MIN_SCORE), rgb)

    def person_on_boxes(self, region: Region, scored: ScoredBoxes, rgb: np.ndarray) -> list[Person]:
        """The pose model alone on the person detector's first PERSON_BOXES_TRIED boxes in the region at
        PERSON_BOX_MIN_SCORE or more: the first person it finds lying on his box (PERSON_BOX_AGREES),
        believable, and in a region no track placed, clear of the frame's edge."""
        height, width = rgb.shape[:2]
        for box in [box for score, box in scored if score >= PERSON_BOX_MIN_SCORE][:PERSON_BOXES_TRIED]:
            if not is_body_shaped(box):
                continue
            found = self.model_alone_on(rgb, box)
            if not found or box_iou(found[0]["bbox_xyxy"], box) < PERSON_BOX_AGREES:
                continue
            if float(found[0].get("score", 1.0)) < MIN_PERSON_SCORE:
                continue
            if region.kind in UNGUIDED_KINDS and touches_frame_edge(found[0]["bbox_xyxy"], width, height):
                continue
            return [{**person, "found_by": f"second_pass:{region.kind}{BY_PERSON_DETECTOR}"} for person in found]
        return []

    def person_detector_sees(self, person: Person, rgb: np.ndarray) -> bool:
        """The person detector puts a person on him (SEEN_IOU) in a square SEEN_GROW times his size (true
        for a person it found, and where the square is too small to look at)."""
        near = self.person_boxes_near(person, rgb)
        return near is None or sees(near[1], person["bbox_xyxy"])

    def seen_surely_around(self, person: Person, rgb: np.ndarray) -> bool:
        """The person detector, asked again in a square SEEN_GROW times the person's size, puts a box at
        PROVEN_MIN_SCORE or more on him (true where the square is too small to look at)."""
        region = seen_square(person["bbox_xyxy"], rgb.shape[1], rgb.shape[0])
        return region is None or sees(self.person_boxes_in(region, rgb, PROVEN_MIN_SCORE), person["bbox_xyxy"])

    def person_boxes_near(self, person: Person, rgb: np.ndarray) -> Optional[tuple[Region, ScoredBoxes]]:
        """The square SEEN_GROW times the person's size and the person detector's boxes in it at
        SEEN_MIN_SCORE or more, surest first; None where it is not asked (no detector, a person it found, a
        square too small to look at). A person too small for such a square is looked at in one the rider's
        size, where the track knows it: a scrap the model found beside him is not believed unseen."""
        if self.detect_persons is None or str(person.get("found_by", "")).endswith(BY_PERSON_DETECTOR):
            return None
        width, height, box = rgb.shape[1], rgb.shape[0], person["bbox_xyxy"]
        region = seen_square(box, width, height)
        if region is None and self.track.seen:
            region = seen_square(self.at_least_the_riders_size(box), width, height)
        if region is None:
            return None
        return region, self.person_boxes_in(region, rgb, SEEN_MIN_SCORE)

    def person_boxes_in(self, region: Region, rgb: np.ndarray, min_score: float) -> ScoredBoxes:
        """The person detector's (score, box) in the region's own pixels (never enlarged: the detector scales
        its input itself), surest first, in frame coordinates."""
        assert self.detect_persons is not None
        self.tried += 1
        crop = np.ascontiguousarray(rgb[region.y0:region.y1, region.x0:region.x1])
        return [(score, [x0 + region.x0, y0 + region.y0, x1 + region.x0, y1 + region.y0])
                for score, (x0, y0, x1, y1) in self.detect_persons(crop, min_score)]

    def whole_person_in(self, region: Region, rgb: np.ndarray, width: int, height: int,
                        detect: Optional[Detect] = None) -> list[Person]:
        """The persons the model finds in the region (with `detect`, else the detector for the region's
        kind), if the first is whole in it and believable. One cut by the region's edge inside the frame
        is not taken from it: measured on the shared clip, such cut-offs were mostly a false, flattened
        pose at a tile's corner; one a track's region cut is looked at whole (`looked_at_whole`)."""
        self.tried += 1
        detect = detect or (self.detect_unguided if region.kind in UNGUIDED_KINDS else self.detect)
        found = [region.to_frame(person) for person in detect(region.cut(rgb))]
        box = found[0]["bbox_xyxy"] if found else None
        if box is None or not is_body_shaped(box) or float(found[0].get("score", 1.0)) < MIN_PERSON_SCORE:
            return []
        if not region.holds_whole(box, width, height):
            return self.looked_at_whole(found[0], rgb) if region.kind == "track" else []
        if region.kind in UNGUIDED_KINDS and touches_frame_edge(box, width, height):
            return []
        return found

    def looked_at_whole(self, cut_off: Person, rgb: np.ndarray) -> list[Person]:
        """A person a track's region showed cut by its edge: the pose model alone on squares around him in
        the frame, where no region's edge cuts him (WHOLE_LOOK_GROWS: the first two such persons of a video
        frame, never in a single image), keeping the region's name."""
        if self.whole_looks >= len(WHOLE_LOOK_GROWS):
            return []
        grows, self.whole_looks = WHOLE_LOOK_GROWS[self.whole_looks], self.whole_looks + 1
        found = self.model_alone_on(rgb, cut_off["bbox_xyxy"], grows=grows)
        return [{**person, "found_by": cut_off["found_by"]} for person in found]

    def faint_person_in(self, region: Region, rgb: np.ndarray, width: int, height: int) -> list[Person]:
        """whole_person_in with the fainter detector, if the engine gives one; its person no wider than
        FAINT_MAX_WIDTH_PER_HEIGHT times his height, and in a track's region sized like the rider
        (FAINT_TRACK_GROWTH)."""
        if self.detect_faint is None:
            return []
        found = self.whole_person_in(region, rgb, width, height, detect=self.detect_faint)
        if not found or lies_across(found[0]["bbox_xyxy"], FAINT_MAX_WIDTH_PER_HEIGHT):
            return []
        if region.kind == "track" and not self.sized_like_the_rider(found[0]["bbox_xyxy"]):
            return []
        return found

    def at_least_the_riders_size(self, box: list[float]) -> list[float]:
        """`box` grown about its centre to at least the rider's last box in each direction."""
        last = self.track.seen[-1][1]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        half_w, half_h = max(box[2] - box[0], last[2] - last[0]) / 2, max(box[3] - box[1], last[3] - last[1]) / 2
        return [cx - half_w, cy - half_h, cx + half_w, cy + half_h]

    def sized_like_the_rider(self, box: list[float]) -> bool:
        """Neither side of `box` more than FAINT_TRACK_GROWTH times larger or smaller than his (`Track.size`)."""
        for side, riders in zip((box[2] - box[0], box[3] - box[1]), self.track.size()):
            if not riders / FAINT_TRACK_GROWTH <= side <= riders * FAINT_TRACK_GROWTH:
                return False
        return True

    def confirmed_closer(self, found: list[Person], rgb: np.ndarray, width: int, height: int) -> list[Person]:
        """A person small in a large region, found again in a region cut around him: that answer (the
        model sees him larger), keeping the first region's name; nobody if the model does not agree."""
        for grow in CONFIRM_GROWS:
            region = around(found[0]["bbox_xyxy"], grow, None, width, height)
            if region is None:
                return found
            closer_look = self.whole_person_in(region, rgb, width, height)
            if closer_look:
                return [{**person, "found_by": found[0]["found_by"]} for person in closer_look]
        return []
