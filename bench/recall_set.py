"""A harder test set for finding the rider, generated from the shared clip and photo (issue 30, item 1).

The rider is made small (the frame scaled to 1/2 or 1/3 and placed in a larger frame of snow and
trees), partly hidden (his lower body behind a white mound, as behind a jump's lip), backlit, put
against a busy background (pine trees drawn up to his outline), cut between shots of background only, and
moved fast (with motion blur). The ground truth comes from the generation: where the rider is in the
source (the engine's own detection on the unmodified frame; a frame whose source box is unknown is left
out of the score), moved by the same transform as the pixels. Background-only images (crops of the
frames beside the rider, the photo above the person) have "nobody" as their truth.

Everything here is the generator's: the engine reads none of these numbers. Deterministic for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from gpu_worker.engines.roi import box_iou

Box = tuple[float, float, float, float]
WIDTH, HEIGHT = 640, 360


@dataclass(frozen=True)
class Rider:
    """Where the rider is in an image: `box`, the truth (the engine's box on the unmodified frame), and
    `clear`, what drawn scenery must leave uncovered: his outline's box (`Source.outlines`), at least `box`.
    The landmarks' box is tighter than the rider: on the shared clip his outline (MediaPipe's segmentation)
    reaches beyond it by up to 0.39 / 0.43 / 0.24 / 0.38 of its longer side (left / top / right / bottom),
    his head and an arm, so pines drawn up to the box stood in front of his head."""
    box: Box
    clear: Box

    def moved(self, factor: float, x: float, y: float) -> Rider:
        return Rider(scaled(self.box, factor, x, y), scaled(self.clear, factor, x, y))


def scaled(box: Box, factor: float, x: float, y: float) -> Box:
    """`box` in an image scaled by `factor` and pasted at (x, y)."""
    return (box[0] * factor + x, box[1] * factor + y, box[2] * factor + x, box[3] * factor + y)


# A transform of one frame: (rgb, the rider or None, position in the clip) -> the same, changed.
Transform = Callable[[np.ndarray, Optional[Rider], int], tuple[np.ndarray, Optional[Rider]]]


@dataclass(frozen=True)
class Sample:
    """One image of the set: its truth is the rider's box, None for nobody. `scored` is False where the
    source box was unknown (the truth cannot be told), so the frame counts for neither measure."""
    name: str
    rgb: np.ndarray
    truth: Optional[Box]
    scored: bool = True


@dataclass
class Clip:
    name: str
    frames: list[Sample] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """The shared clip's frames with the rider's box in each (None: unknown), and the photo with its box;
    optionally, per frame, the box of the rider's outline (None, or none given: his box)."""
    frames: Sequence[np.ndarray]
    boxes: Sequence[Optional[Box]]
    photo: np.ndarray
    photo_box: Box
    outlines: Sequence[Optional[Box]] = ()

    def rider(self, index: int) -> Optional[Rider]:
        box = self.boxes[index]
        if box is None:
            return None
        outline = self.outlines[index] if index < len(self.outlines) else None
        return Rider(box, box if outline is None else union(box, outline))


def union(a: Box, b: Box) -> Box:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def is_the_rider(found: Sequence[float], truth: Box) -> bool:
    """A found box is the rider when it overlaps the truth box by a quarter (IoU), or lies on him no
    larger than twice his box: his upper body alone, when the model found only what shows above a mound."""
    box = (found[0], found[1], found[2], found[3])
    if box_iou(list(box), list(truth)) >= 0.25:
        return True
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    inside = truth[0] <= cx <= truth[2] and truth[1] <= cy <= truth[3]
    return inside and area(box) <= 2 * area(truth)


def area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


# ---- pictures without the rider ------------------------------------------------------------------

def plate(frame: np.ndarray, box: Box, rng: np.random.Generator) -> np.ndarray:
    """A 640x360 background with nobody in it: a 16:9 crop of the frame beside the rider (the wider
    side, his width away from his box: a board or an arm may reach beyond it), enlarged."""
    import cv2
    height, width = frame.shape[:2]
    margin = box[2] - box[0]
    left, right = int(box[0] - margin), int(box[2] + margin)
    x0, x1 = (0, left) if left >= width - right else (right, width)
    crop_w = max(16, x1 - x0)
    crop_h = min(height, int(crop_w * 9 / 16))
    y0 = int(rng.integers(0, height - crop_h + 1))
    crop = frame[y0:y0 + crop_h, x0:x0 + crop_w]
    return cv2.resize(crop, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)


def photo_plate(photo: np.ndarray, box: Box) -> np.ndarray:
    """The photo above the person (houses, a hedge, a lamp post), 16:9, as a 640x360 background."""
    import cv2
    top = int(box[1] * 0.9)
    crop_h = min(top, int(photo.shape[1] * 9 / 16))
    crop_w = int(crop_h * 16 / 9)
    return cv2.resize(photo[top - crop_h:top, :crop_w], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)


def panned(background: np.ndarray, t: int, speed: int = 3) -> np.ndarray:
    """The background moved sideways by `speed` px a frame (a camera panning over an empty slope)."""
    return np.roll(background, t * speed, axis=1)


# ---- transforms ----------------------------------------------------------------------------------

def into_plate(background: np.ndarray, factor: float, start: tuple[int, int], step: tuple[int, int],
               blur_px: int = 0) -> Transform:
    """The frame scaled by `factor`, pasted into the background at `start` moved `step` px a frame
    (bouncing off the edges), optionally smeared sideways by `blur_px` (a fast pan)."""
    import cv2

    def apply(rgb: np.ndarray, rider: Optional[Rider], t: int) -> tuple[np.ndarray, Optional[Rider]]:
        small = cv2.resize(rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        h, w = small.shape[:2]
        x, y = bounce(start[0] + step[0] * t, WIDTH - w), bounce(start[1] + step[1] * t, HEIGHT - h)
        out = background.copy()
        out[y:y + h, x:x + w] = small
        if blur_px > 1:
            out = cv2.filter2D(out, -1, np.full((1, blur_px), 1.0 / blur_px))
        return out, None if rider is None else rider.moved(factor, x, y)
    return apply


def bounce(position: int, span: int) -> int:
    """Position moving back and forth over [0, span]."""
    if span <= 0:
        return 0
    period = position % (2 * span)
    return period if period <= span else 2 * span - period


def trees(rng: np.random.Generator, count: int = 28) -> Transform:
    """Dark pines drawn over the background up to the rider's outline's box (`Rider.clear`), never over it."""
    import cv2
    shapes = [(int(rng.integers(0, WIDTH)), int(rng.integers(HEIGHT // 4, HEIGHT)),
               int(rng.integers(30, 110)), int(rng.integers(14, 34)), int(rng.integers(20, 60)))
              for _ in range(count)]

    def apply(rgb: np.ndarray, rider: Optional[Rider], t: int) -> tuple[np.ndarray, Optional[Rider]]:
        layer = rgb.copy()
        for x, base, tall, half_w, shade in shapes:
            pts = np.array([[x, base - tall], [x - half_w, base], [x + half_w, base]], dtype=np.int32)
            cv2.fillPoly(layer, [pts], (shade // 2, shade + 20, shade // 2))
            cv2.line(layer, (x, base), (x, base + tall // 6), (40, 30, 20), 3)
        if rider is not None:  # the rider stays in front of the trees
            x0, y0, x1, y1 = (int(v) for v in rider.clear)
            layer[max(0, y0):y1, max(0, x0):x1] = rgb[max(0, y0):y1, max(0, x0):x1]
        return layer, rider
    return apply


def mound(rng: np.random.Generator, hidden: float = 0.45) -> Transform:
    """A white mound in front of the rider hiding the lower `hidden` of his box (a jump's lip): snow
    below a dome whose top is at that height over the rider and falls away to the sides."""
    import cv2
    wide, shift = float(rng.uniform(1.2, 1.8)), float(rng.uniform(-0.2, 0.2))

    def apply(rgb: np.ndarray, rider: Optional[Rider], t: int) -> tuple[np.ndarray, Optional[Rider]]:
        if rider is None:
            return rgb, rider
        x0, y0, x1, y1 = rider.box
        w, h = x1 - x0, y1 - y0
        ys, xs = np.mgrid[0:rgb.shape[0], 0:rgb.shape[1]]
        dome_top = (y1 - hidden * h) + h * ((xs - (x0 + x1) / 2 - shift * w) / (wide * w)) ** 2
        mask = (ys >= dome_top).astype(np.float32)
        alpha = cv2.GaussianBlur(mask, (5, 5), 0)[..., None]
        shade = np.linspace(250, 228, rgb.shape[0])[:, None, None]
        snow = shade + np.array([-6.0, -2.0, 0.0])
        return (rgb * (1 - alpha) + snow * alpha).astype(np.uint8), rider
    return apply


def backlit(rng: np.random.Generator) -> Transform:
    """Against the light: the scene darkened and a low sun glowing behind the rider, above his head."""
    sun_shift, strength = float(rng.uniform(-1.0, 1.0)), float(rng.uniform(0.35, 0.45))

    def apply(rgb: np.ndarray, rider: Optional[Rider], t: int) -> tuple[np.ndarray, Optional[Rider]]:
        box = None if rider is None else rider.box
        h, w = rgb.shape[:2]
        cx = (box[0] + box[2]) / 2 + sun_shift * (box[2] - box[0]) if box else w / 2
        cy = box[1] - (box[3] - box[1]) / 2 if box else h / 4
        ys, xs = np.mgrid[0:h, 0:w]
        glow = 210 * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * (0.35 * h) ** 2))
        out = rgb.astype(np.float32) * strength + glow[..., None] * np.array([1.0, 0.93, 0.8])
        return np.clip(out, 0, 255).astype(np.uint8), rider
    return apply


def chain(*transforms: Transform) -> Transform:
    def apply(rgb: np.ndarray, rider: Optional[Rider], t: int) -> tuple[np.ndarray, Optional[Rider]]:
        for transform in transforms:
            rgb, rider = transform(rgb, rider, t)
        return rgb, rider
    return apply


# ---- the set -------------------------------------------------------------------------------------

def transformed_clip(name: str, source: Source, start: int, length: int, transform: Transform) -> Clip:
    clip = Clip(name)
    for t in range(length):
        index = (start + t) % len(source.frames)
        rgb, rider = transform(source.frames[index], source.rider(index), t)
        clip.frames.append(Sample(f"{name}/{index:03d}", rgb, None if rider is None else rider.box,
                                  scored=source.boxes[index] is not None))
    return clip


def empty_shot(name: str, background: np.ndarray, length: int) -> list[Sample]:
    return [Sample(f"{name}/empty{t:02d}", panned(background, t), None) for t in range(length)]


def cut_clip(name: str, source: Source, start: int, shot: int, rng: np.random.Generator) -> Clip:
    """Shots in turn: the rider whole, background only, the rider at 1/2 elsewhere, background only,
    the rider at 1/3 (each shot `shot` frames, the empty ones 2/3 as long)."""
    clip = Clip(name)
    rider_shots = [lambda rgb, rider, t: (rgb, rider),
                   into_plate(some_plate(source, rng), 1 / 2, (int(rng.integers(0, 320)), 20), (2, 1)),
                   into_plate(some_plate(source, rng), 1 / 3, (int(rng.integers(0, 420)), 150), (-2, 0))]
    for number, transform in enumerate(rider_shots):
        first = start + number * shot
        clip.frames += transformed_clip(f"{name}/shot{number}", source, first, shot, transform).frames
        if number < len(rider_shots) - 1:
            clip.frames += empty_shot(f"{name}/gap{number}", some_plate(source, rng), shot * 2 // 3)
    return clip


def some_plate(source: Source, rng: np.random.Generator) -> np.ndarray:
    """A background from a seeded frame (the next one whose rider's box is known: the draw does not
    depend on which are)."""
    count = len(source.frames)
    drawn = int(rng.integers(0, count))
    index = next(i % count for i in range(drawn, drawn + count) if source.boxes[i % count] is not None)
    box = source.boxes[index]
    assert box is not None
    return plate(source.frames[index], box, rng)


def clips(source: Source, length: int, seed: int = 0) -> list[Clip]:
    """The video part of the set: each clip `length` frames from a seeded start in the source."""
    rng = np.random.default_rng(seed)

    def start() -> int:
        return int(rng.integers(0, max(1, len(source.frames) - length)))

    def placed(factor: float, step: tuple[int, int] = (2, 1), blur: int = 0) -> Transform:
        x, y = int(rng.integers(0, int(WIDTH * (1 - factor)))), int(rng.integers(0, int(HEIGHT * (1 - factor))))
        return into_plate(some_plate(source, rng), factor, (x, y), step, blur)

    made = [
        transformed_clip("small_half", source, start(), length, placed(1 / 2)),
        transformed_clip("small_third", source, start(), length, placed(1 / 3)),
        transformed_clip("mound", source, start(), length, mound(rng)),
        transformed_clip("small_half_mound_trees", source, start(), length,
                         chain(placed(1 / 2), trees(rng), mound(rng))),
        transformed_clip("backlit", source, start(), length, backlit(rng)),
        transformed_clip("busy_half", source, start(), length, chain(placed(1 / 2), trees(rng))),
        transformed_clip("fast_blurred_half", source, start(), length, placed(1 / 2, step=(26, 7), blur=15)),
        cut_clip("cuts", source, start(), max(4, length // 3), rng),
    ]
    made.append(Clip("empty", empty_shot("empty/slope", some_plate(source, rng), length // 2)
                     + empty_shot("empty/photo", photo_plate(source.photo, source.photo_box), length // 2)))
    return made


def stills(source: Source, per_clip: int, seed: int = 0) -> list[Sample]:
    """Single images: the photo's person small, hidden or backlit in a background, frames of the clips
    above taken alone, and background only."""
    rng = np.random.default_rng(seed + 1)
    photo = photo_in_frame(source, some_plate(source, rng))
    out = [
        photo_sample("photo_half", photo, 1 / 2, (int(rng.integers(0, 400)), 90)),
        photo_sample("photo_third", photo, 1 / 3, (int(rng.integers(0, 440)), 150)),
    ]
    half_rgb, half_box = photo(1 / 2, (int(rng.integers(0, 400)), 100))
    for name, transform in (("photo_half_mound", mound(rng)), ("photo_half_backlit", backlit(rng))):
        rgb, rider = transform(half_rgb, Rider(half_box, half_box), 0)
        out.append(Sample(name, rgb, None if rider is None else rider.box))
    for clip in clips(source, length=per_clip * 4, seed=seed + 2):
        chosen = rng.choice(len(clip.frames), size=min(per_clip, len(clip.frames)), replace=False)
        out += [clip.frames[int(i)] for i in sorted(chosen)]
    out.append(Sample("empty/photo_plate", photo_plate(source.photo, source.photo_box), None))
    return out


def photo_in_frame(source: Source, background: np.ndarray) -> Callable[[float, tuple[int, int]],
                                                                        tuple[np.ndarray, Box]]:
    """The photo scaled so its height is `factor` of the frame's, pasted into the background at `at`."""
    import cv2

    def place(factor: float, at: tuple[int, int]) -> tuple[np.ndarray, Box]:
        scale = HEIGHT * factor / source.photo.shape[0]
        small = cv2.resize(source.photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        h, w = small.shape[:2]
        x, y = min(at[0], WIDTH - w), min(at[1], HEIGHT - h)
        out = background.copy()
        out[y:y + h, x:x + w] = small
        return out, scaled(source.photo_box, scale, x, y)
    return place


def photo_sample(name: str, place: Callable[[float, tuple[int, int]], tuple[np.ndarray, Box]], factor: float,
                 at: tuple[int, int]) -> Sample:
    rgb, box = place(factor, at)
    return Sample(name, rgb, box)


def with_noise(clips: list[Clip], stills: list[Sample], seed: int, levels: int = 2) -> tuple[list[Clip], list[Sample]]:
    """The same set with every pixel moved by up to `levels` grey levels (seeded), the truth unchanged: a
    library's rounding (OpenCV 5.1's warpAffine against 4.13's, one level on 1% of the pixels) moved the
    full set's recall by 2.7 points, so a change to the search is judged over a few such draws, not one."""
    rng = np.random.default_rng(seed)

    def shaken(sample: Sample) -> Sample:
        moved = sample.rgb.astype(np.int16) + rng.integers(-levels, levels + 1, sample.rgb.shape, dtype=np.int16)
        return Sample(sample.name, np.clip(moved, 0, 255).astype(np.uint8), sample.truth, sample.scored)
    return [Clip(clip.name, [shaken(s) for s in clip.frames]) for clip in clips], [shaken(s) for s in stills]


# ---- sizes ---------------------------------------------------------------------------------------

CORE = {"length": 16, "stills_per_clip": 1, "seed": 30}
FULL = {"length": 122, "stills_per_clip": 4, "seed": 31}


def generated(source: Source, size: dict) -> tuple[list[Clip], list[Sample]]:
    return (clips(source, size["length"], size["seed"]),
            stills(source, size["stills_per_clip"], size["seed"]))
