"""Driving PHALP's deep_sort tracker one frame at a time, and holding frames back until PHALP can no
longer edit them (it back-fills a newly confirmed track into the n_init-1 frames before)."""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from gpu_worker.engines.base import FrameOut, Person
from gpu_worker.engines.hmr2_phalp.geometry import person_from_detection

log = logging.getLogger(__name__)


class PendingFrames:
    """Frames the tracker may still add persons to, in push order.

    When a track reaches n_init hits at frame t, PHALP appends it to frames t-1 .. t-(n_init-1).
    So once frame t is tracked, every frame up to t-(n_init-1) is final."""

    def __init__(self, edit_window: int):
        self.edit_window = max(0, int(edit_window))
        self._frames: "OrderedDict[int, tuple[int, dict[int, Person]]]" = OrderedDict()
        self.late_edits = 0

    def __len__(self) -> int:
        return len(self._frames)

    def open(self, seq: int, index: int) -> None:
        self._frames[seq] = (index, {})

    def add(self, seq: int, person: Person) -> None:
        slot = self._frames.get(seq)
        if slot is None:
            # the frame was already emitted (or never pushed): its result can no longer change
            self.late_edits += 1
            log.warning("tracker edited frame %s after it was emitted; edit dropped", seq)
            return
        slot[1][int(person["track_id"])] = person

    def pop_final(self, latest_seq: int) -> list[FrameOut]:
        out = []
        while self._frames:
            seq = next(iter(self._frames))
            if seq > latest_seq - self.edit_window:
                break
            out.append(self._emit(seq))
        return out

    def flush(self) -> list[FrameOut]:
        return [self._emit(seq) for seq in list(self._frames)]

    def _emit(self, seq: int) -> FrameOut:
        index, persons = self._frames.pop(seq)
        return FrameOut(index, [persons[tid] for tid in sorted(persons)])


@dataclass
class TrackView:
    """What the engine needs from one confirmed PHALP track after a frame's update."""
    track_id: int
    hits: int
    time_since_update: int
    history: list  # the last n_init detection records, oldest first


def view_track(track: Any, n_init: int) -> TrackView:
    history = list(track.track_data["history"])[-n_init:]
    return TrackView(int(track.track_id), int(track.hits), int(track.time_since_update), history)


def prune_tracker_history(tracker: Any) -> None:
    """deep_sort's Tracker keeps every frame's cost matrices in tracked_cost (read only when PHALP
    dumps ground-truth distances); everything else it holds is bounded per live track."""
    cost = getattr(tracker, "tracked_cost", None)
    if cost:
        cost.clear()


def track_step(tracker: Any, detections: list, seq: int, frame_name: str, n_init: int,
               shot: int = 0) -> list[TrackView]:
    """One PHALP tracker update, as in PHALP.track's loop, returning the confirmed tracks."""
    tracker.predict()
    tracker.update(detections, seq, frame_name, shot)
    prune_tracker_history(tracker)
    return [view_track(track, n_init) for track in tracker.tracks if track.is_confirmed()]


def record_tracks(pending: PendingFrames, seq: int, views: list[TrackView], n_init: int,
                  to_person: Callable[[int, Mapping[str, Any]], Person] = person_from_detection) -> None:
    """PHALP's bookkeeping for one frame: observed confirmed tracks go to this frame; a track
    confirmed just now (hits == n_init) is also back-filled into the frames it was tentative in.
    Each history entry goes to the frame it was detected in (its own "time"), not to seq minus its
    position: a retried frame or a miss inside the history cannot shift it onto another frame."""
    for view in views:
        if view.time_since_update != 0:
            continue  # a "ghost": predicted, not seen in this frame
        pending.add(seq, to_person(view.track_id, view.history[-1]))
        if view.hits != n_init:
            continue
        for entry in view.history[-n_init:-1]:
            seen_at = int(entry.get("time", -1))
            if 0 <= seen_at < seq:
                pending.add(seen_at, to_person(view.track_id, entry))


def frame_name_for(seq: int) -> str:
    return f"{seq + 1:06d}.jpg"


def person_boxes(instances: Any, min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """Person (COCO class 0) boxes xyxy and scores from detectron2 Instances."""
    classes = instances.pred_classes.cpu().numpy()
    scores = instances.scores.cpu().numpy()
    boxes = instances.pred_boxes.tensor.cpu().numpy()
    keep = (classes == 0) & (scores > min_score)
    return boxes[keep].astype(np.float32), scores[keep].astype(np.float32)
