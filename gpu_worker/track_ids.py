"""Track identities across a worker's death: a replacement worker's tracker numbers its tracks from
1 again. After it has re-run the frames before the resume point (not stored again), each of its
tracks is matched to the stored track that was in the same place in those frames; its other tracks
get ids above every stored one, so no id names two people."""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

MIN_OVERLAP = 0.5  # intersection over union for two boxes to be the same person in a frame


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_tracks(warm: Mapping[int, list[dict]], stored: Mapping[int, list[Sequence[float]]]) -> dict[int, int]:
    """new track id -> stored track id, from the frames both saw: pairs are counted over frames
    where their boxes overlap, and taken greedily, most frames first, each id once."""
    votes: Counter = Counter()
    for index, persons in warm.items():
        for person in persons:
            for stored_id, *box in stored.get(index, []):
                if iou(person["bbox_xyxy"], box) >= MIN_OVERLAP:
                    votes[(int(person["track_id"]), int(stored_id))] += 1
    mapping: dict[int, int] = {}
    for (new_id, stored_id), _ in sorted(votes.items(), key=lambda item: (-item[1], item[0])):
        if new_id not in mapping and stored_id not in mapping.values():
            mapping[new_id] = stored_id
    return mapping


class TrackIdMap:
    """Renames the persons a resumed job emits."""

    def __init__(self, mapping: Mapping[int, int], next_id: int):
        self.mapping = dict(mapping)
        self.next_id = max([next_id, *[v + 1 for v in self.mapping.values()]])

    def rename(self, persons: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for person in persons:
            if person.get("track_id") is not None:
                person = {**person, "track_id": self.id_for(int(person["track_id"]))}
            out.append(person)
        return out

    def id_for(self, new_id: int) -> int:
        if new_id not in self.mapping:
            self.mapping[new_id] = self.next_id
            self.next_id += 1
        return self.mapping[new_id]


class Resume:
    """A job resumed at `start` after a worker death: the frames from warm_from that were stored
    without error are run again to warm the tracker, their results kept here (not sent), and
    every frame from `start` on is sent with its track ids mapped onto the stored ones."""

    def __init__(self, start: int, warm_from: int, stored: Mapping[int, list], next_id: int):
        self.start, self.warm_from, self.stored, self.next_id = start, warm_from, dict(stored), next_id
        self.warm: dict[int, list[dict]] = {}
        self.ids: TrackIdMap | None = None

    @classmethod
    def from_run_job(cls, body: Mapping[str, Any], start: int) -> "Resume | None":
        if start <= 0 or body.get("warm_from") is None:
            return None
        stored = {int(k): v for k, v in (body.get("stored_tracks") or {}).items()}
        return cls(start, int(body["warm_from"]), stored, int(body.get("next_track_id") or 1))

    def warms(self, index: int) -> bool:
        """Re-run this frame? Only those stored without error: a frame that killed a worker is not retried."""
        return index < self.start and index in self.stored

    def keep_warm(self, index: int, persons: list[dict]) -> None:
        self.warm[index] = persons

    def rename(self, persons: list[dict]) -> list[dict]:
        if self.ids is None:  # the first frame sent: every warm frame has come out of the engine
            self.ids = TrackIdMap(match_tracks(self.warm, self.stored), self.next_id)
        return self.ids.rename(persons)
