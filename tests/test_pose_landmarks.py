"""Issue 30: MediaPipe's pose landmark model run alone, on a square the second pass chooses
(gpu_worker/engines/pose_landmarks.py). Its output must read as MediaPipe's own graph reads it (the
same landmarks, in the same places, for the same person), and its presence flag must keep it from
finding a person where there is none."""
from __future__ import annotations

import numpy as np
import pytest

from support import CLIP, needs_shared_data


@pytest.fixture(scope="module")
def engine(mediapipe_first_pass):
    return mediapipe_first_pass


@pytest.fixture(scope="module")
def rider_frames():
    from pose_common.video import frames
    return [rgb for _, _, _, rgb in frames(str(CLIP))][:40:4]


def model_alone(engine, rgb: np.ndarray, box: list[float]) -> list[dict]:
    for grow in (1.5, 1.8, 2.1):
        found = engine.rider_models.follow(rgb, box, grow)
        if found:
            return found
    return []


@needs_shared_data()
def test_the_model_alone_gives_the_graphs_landmarks_for_the_same_person(engine, rider_frames):
    """On frames of the shared clip, a square on the graph's own person gives his 33 landmarks within a
    few pixels of the graph's (a wrong axis order, a missing sigmoid or a wrong scale back to the frame
    would put them tens of pixels off or make every visibility near 0 or 1), and world coordinates in
    metres, hip-centred, with the graph's heights."""
    compared = 0
    for rgb in rider_frames:
        graph = engine._find_in_image(rgb)
        if not graph:
            continue
        alone = model_alone(engine, rgb, graph[0]["bbox_xyxy"])
        assert alone, "the model alone finds nobody where the graph found the rider"
        ours, theirs = np.array(alone[0]["keypoints_2d"]), np.array(graph[0]["keypoints_2d"])
        x0, y0, x1, y1 = graph[0]["bbox_xyxy"]
        size = max(x1 - x0, y1 - y0)
        seen = theirs[:, 2] > 0.5
        assert np.median(np.hypot(*(ours[seen, :2] - theirs[seen, :2]).T)) < 0.08 * size
        assert ((0 <= ours[:, 2]) & (ours[:, 2] <= 1)).all()  # visibility as a probability, as the graph's
        assert np.corrcoef(ours[:, 2], theirs[:, 2])[0, 1] > 0.5  # the same joints are seen
        world_ours, world_theirs = np.array(alone[0]["keypoints_3d"]), np.array(graph[0]["keypoints_3d"])
        assert np.linalg.norm(world_ours[23:25].mean(axis=0)) < 0.1  # hip-centred, in metres, as the graph's
        assert np.median(np.abs(world_ours[:, 1] - world_theirs[:, 1])) < 0.1  # heights agree (depth may not:
        # the graph turns its square upright first, and the model's depth moves with the square)
        assert set(alone[0]) >= {"track_id", "score", "bbox_xyxy", "keypoints_2d", "keypoints_3d"}
        compared += 1
    assert compared >= 5


@needs_shared_data()
def test_the_model_alone_finds_nobody_where_nobody_is(engine, rider_frames):
    """Its presence flag: squares of the rider's size on the snow and sky beside him, and on plain
    images, give nobody."""
    empty = 0
    for rgb in rider_frames:
        graph = engine._find_in_image(rgb)
        if not graph:
            continue
        x0, y0, x1, y1 = graph[0]["bbox_xyxy"]
        w = x1 - x0
        for shift in (-2.5 * w, 2.5 * w):
            if 0 <= x0 + shift and x1 + shift <= rgb.shape[1]:
                assert model_alone(engine, rgb, [x0 + shift, y0, x1 + shift, y1]) == []
                empty += 1
    for plain in (np.full((360, 640, 3), 128, np.uint8), np.zeros((360, 640, 3), np.uint8)):
        assert model_alone(engine, plain, [300.0, 150.0, 340.0, 230.0]) == []
    assert empty >= 5


def graph_answer(points: list[tuple[float, float]]):
    """MediaPipe Pose's result as the solution API gives it: normalised landmarks, world landmarks."""
    from types import SimpleNamespace

    landmarks = [SimpleNamespace(x=x, y=y, z=0.0, visibility=0.9) for x, y in points]
    return SimpleNamespace(pose_landmarks=SimpleNamespace(landmark=landmarks),
                           pose_world_landmarks=SimpleNamespace(landmark=landmarks))


def test_a_graph_pose_wholly_beyond_the_frames_edge_is_nobody():
    """After a cut to an empty shot the graph kept a pose above the picture; its box, clipped to the frame,
    has no height, and no person is returned. One partly out of the frame (a rider entering it) is."""
    from gpu_worker.engines.mediapipe_engine import persons_in

    above = [(0.5 + 0.01 * i, -0.4 + 0.005 * i) for i in range(33)]
    assert persons_in(graph_answer(above), 640, 360) == []
    entering = [(-0.05 + 0.004 * i, 0.3 + 0.01 * i) for i in range(33)]
    person = persons_in(graph_answer(entering), 640, 360)
    assert person and person[0]["bbox_xyxy"][0] == 0.0 and person[0]["bbox_xyxy"][2] > 0
