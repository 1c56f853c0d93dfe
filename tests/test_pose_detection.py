"""Issue 30: MediaPipe's pose detector and landmark model run by LiteRT as the graph runs them
(gpu_worker/engines/pose_detection.py), for the second pass's regions. Read wrongly (anchors out of
order, a wrong letterbox, a turn the wrong way), the same models find the rider somewhere else or not at
all; so each case compares with MediaPipe's own graph on the same pixels, or with the same person turned
by a known angle. The scikit-image photo needs no shared data; the shared clip adds a moving rider."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_worker.engines.pose_detection import INPUT_PX, anchor_centres
from gpu_worker.engines.roi import box_iou

from support import CLIP, needs_shared_data


@pytest.fixture(scope="module")
def engine(mediapipe_first_pass):
    return mediapipe_first_pass


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage.data import astronaut
    return np.ascontiguousarray(astronaut())


def agrees(ours: dict, theirs: dict, within: float = 0.08) -> None:
    """The same person: boxes overlapping, the landmarks the graph sees well within `within` of his size."""
    assert box_iou(ours["bbox_xyxy"], theirs["bbox_xyxy"]) > 0.6
    a, b = np.array(ours["keypoints_2d"]), np.array(theirs["keypoints_2d"])
    x0, y0, x1, y1 = theirs["bbox_xyxy"]
    seen = b[:, 2] > 0.5
    assert seen.sum() >= 8
    assert np.median(np.hypot(*(a[seen, :2] - b[seen, :2]).T)) < within * max(x1 - x0, y1 - y0)


def test_the_anchors_are_the_graphs_grids_in_the_models_order():
    """2254 anchors: a 28x28 grid of stride 8 with 2 a cell, 14x14 of stride 16 with 2, 7x7 of stride 32
    with 6, row by row; the model's 2254 outputs are read against them in this order."""
    centres = anchor_centres()
    assert centres.shape == (2254, 2)
    assert np.allclose(centres[0], centres[1]) and np.allclose(centres[0], [0.5 / 28, 0.5 / 28])
    assert np.allclose(centres[2], [1.5 / 28, 0.5 / 28])  # x moves first
    assert np.allclose(centres[28 * 28 * 2], [0.5 / 14, 0.5 / 14])
    assert np.allclose(centres[28 * 28 * 2 + 14 * 14 * 2 + 5], [0.5 / 7, 0.5 / 7])
    assert np.allclose(centres[-1], [6.5 / 7, 6.5 / 7])
    assert INPUT_PX == 224


def test_the_two_models_alone_find_the_graphs_person_in_a_photo(engine, astronaut):
    """The photo whole, and cut to a region around the person as the second pass cuts it: the same
    person as the graph's, in the same place."""
    graph = engine._find_in_image(astronaut)
    assert graph, "MediaPipe's graph finds nobody in the photo: nothing to compare with"
    agrees(engine.rider_models.find_in_region(astronaut)[0], graph[0])
    wide = np.zeros((400, 900, 3), dtype=np.uint8)  # letterboxed the other way: wider than tall
    wide[:, 300:700] = astronaut[56:456, 56:456]
    graph_wide = engine._find_in_image(wide)
    assert graph_wide
    agrees(engine.rider_models.find_in_region(wide)[0], graph_wide[0])


def test_a_sure_detection_is_the_first_pass_confidence_and_nobody_is_found_on_plain_pictures(engine, astronaut):
    """The stricter detector of the wide search (the first pass's confidence) still finds a plain
    person; on plain, noisy or dark pictures neither finds anyone."""
    assert engine.rider_models.find_unguided(astronaut)
    rng = np.random.default_rng(3)
    for picture in (np.full((360, 640, 3), 235, np.uint8), rng.integers(0, 255, (360, 640, 3), dtype=np.uint8),
                    np.zeros((256, 256, 3), np.uint8)):
        assert engine.rider_models.find_in_region(picture) == []
        assert engine.rider_models.find_unguided(picture) == []


def test_the_faint_detector_takes_its_own_confidence_and_finds_nobody_on_plain_pictures(engine, astronaut,
                                                                                        monkeypatch):
    """A video's tile the stricter detector finds nobody in goes to the detector at
    engine.options.second_pass_faint_detection_confidence (0.2 unless set); plain, noisy or dark pictures
    still hold nobody for it."""
    asked = []
    best = engine.rider_models.detector.best
    monkeypatch.setattr(engine.rider_models.detector, "best", lambda rgb, min_score=None: asked.append(min_score) or best(rgb, min_score))
    assert engine.rider_models.find_faint(astronaut)
    monkeypatch.setitem(engine.options, "second_pass_faint_detection_confidence", 0.25)
    engine.rider_models.find_faint(astronaut)
    assert asked == [0.2, 0.25]
    rng = np.random.default_rng(5)
    for picture in (np.full((360, 640, 3), 235, np.uint8), rng.integers(0, 255, (360, 640, 3), dtype=np.uint8),
                    np.zeros((256, 256, 3), np.uint8)):
        assert engine.rider_models.find_faint(picture) == []


def test_the_same_pixels_twice_in_a_row_run_the_detector_once(engine, astronaut, monkeypatch):
    """Issue 30 (cost): the second pass tries a region again at a fainter minimum score; the detector's
    outputs for the same pixels are read again, not computed again, and give what a fresh run gives. Other
    pixels, or the same array changed in place, run it again."""
    detector = engine.rider_models.detector
    runs = []
    invoke = detector.interpreter.invoke
    monkeypatch.setattr(detector.interpreter, "invoke", lambda: runs.append(1) or invoke())
    sure = detector.best(astronaut, 0.5)
    faint = detector.best(astronaut.copy(), 0.2)
    assert len(runs) == 1 and sure is not None and faint is not None
    detector.last = None
    fresh = detector.best(astronaut, 0.2)
    assert len(runs) == 2 and fresh is not None
    assert faint.score == fresh.score and np.array_equal(faint.keypoints, fresh.keypoints)
    changed = astronaut.copy()
    detector.last = None
    detector.best(changed)
    changed[200:260, 200:260] = 0  # in place: the detector kept its own copy of what it saw
    detector.best(changed)
    detector.best(np.ascontiguousarray(astronaut[:400]))
    assert len(runs) == 5


@pytest.mark.parametrize("quarter_turns", [1, 2, 3])
def test_a_turned_square_gives_the_person_back_where_he_is_in_the_frame(engine, astronaut, quarter_turns):
    """The photo turned by 90, 180 or 270 degrees: the landmark model on a square turned back by the same
    angle sees the person upright, and his landmarks come back in the turned frame's pixels, on the
    graph's landmarks turned the same way (a turn the wrong way would put them across the picture); his
    world landmarks, in the camera's axes as the graph gives them, turn with the picture."""
    upright = engine._find_in_image(astronaut)[0]
    turned = np.ascontiguousarray(np.rot90(astronaut, quarter_turns))
    size = astronaut.shape[0]
    assert astronaut.shape[1] == size  # a square photo: its size stays as it turns

    def rotate(x: float, y: float) -> tuple[float, float]:
        for _ in range(quarter_turns):  # np.rot90 turns the picture counter-clockwise
            x, y = y, size - x
        return x, y

    x0, y0, x1, y1 = upright["bbox_xyxy"]
    centre = rotate((x0 + x1) / 2, (y0 + y1) / 2)
    side = max(x1 - x0, y1 - y0) * 1.5
    turn = quarter_turns * math.pi / 2  # the cut turns clockwise (image coordinates, y down) to undo it
    found = engine.rider_models.landmarks.person_in(turned, centre, side, turn)
    assert found, "the model finds nobody in the square turned back upright"
    expected = np.array([rotate(x, y) for x, y, _ in upright["keypoints_2d"]])
    ours = np.array(found[0]["keypoints_2d"])[:, :2]
    seen = np.array(upright["keypoints_2d"])[:, 2] > 0.5
    assert np.median(np.hypot(*(ours[seen] - expected[seen]).T)) < 0.08 * side
    same_square = engine.rider_models.landmarks.person_in(astronaut, ((x0 + x1) / 2, (y0 + y1) / 2), side, 0.0)[0]
    world, expected_world = np.array(found[0]["keypoints_3d"])[:, :2], np.array(same_square["keypoints_3d"])[:, :2]
    for _ in range(quarter_turns):  # in the camera's axes, as the graph gives them: turned with the picture
        expected_world = np.stack([expected_world[:, 1], -expected_world[:, 0]], axis=1)
    assert np.median(np.hypot(*(world - expected_world).T)) < 0.03  # metres (the model's world output moves
    # with the square by more than this, so the upright square is the same one, not the graph's)


@needs_shared_data()
def test_on_the_shared_clip_the_two_models_agree_with_the_graph(engine):
    """Regions the second pass would cut around the rider of the shared clip: where both the graph and
    the two models alone find him, they put him in the same place; and they find him about as often. The
    detector is as sure of him as the graph's settings expect (0.87 on average over these frames; the
    pixels read in [0, 1] instead of the graph's [-1, 1], 0.75)."""
    from gpu_worker.engines.roi import around
    from pose_common.video import frames

    ours = theirs = 0
    scores = []
    for rgb in [rgb for _, _, _, rgb in frames(str(CLIP))][:100:10]:
        detection = engine.rider_models.detector.best(rgb, 0.05)
        scores.append(detection.score if detection else 0.0)
        graph = engine._find_in_image(rgb)
        if not graph:
            continue
        for grow in (2.0, 3.0):
            region = around(graph[0]["bbox_xyxy"], grow, None, rgb.shape[1], rgb.shape[0])
            assert region is not None
            cut = region.cut(rgb)
            alone, again = engine.rider_models.find_in_region(cut), engine._find_in_image(cut)
            ours, theirs = ours + bool(alone), theirs + bool(again)
            if alone and again:
                agrees(alone[0], again[0], within=0.1)
    assert theirs >= 10 and ours >= theirs - 2
    assert np.mean(scores) > 0.8, scores


class RejectingFirst:
    """The landmark model, turning down its first square (as its flag does when the square's size is off
    for this rider), then answering as itself; records the squares' sides."""

    def __init__(self, model) -> None:
        self.model, self.sides = model, []

    def person_in(self, rgb, centre, side, turn):
        self.sides.append(side)
        return [] if len(self.sides) == 1 else self.model.person_in(rgb, centre, side, turn)


def test_a_sure_detection_the_landmark_model_turns_down_gets_one_larger_square(engine, astronaut):
    """The photo's detection is sure (above RETRY_MIN_DETECTION): when the model turns its square down,
    the same square RETRY_GROW times larger is looked at once, and that answer stands."""
    from gpu_worker.engines.rider_models import RETRY_GROW, RETRY_MIN_DETECTION

    assert engine.rider_models.detector.best(astronaut).score >= RETRY_MIN_DETECTION
    model, recorder = engine.rider_models.landmarks, RejectingFirst(engine.rider_models.landmarks)
    engine.rider_models.landmarks = recorder
    try:
        found = engine.rider_models.find_in_region(astronaut)
    finally:
        engine.rider_models.landmarks = model
    assert found and len(recorder.sides) == 2
    assert recorder.sides[1] == pytest.approx(recorder.sides[0] * RETRY_GROW)
    accepting = RejectingFirst(model)
    accepting.sides.append(0.0)  # its first call already spent: it accepts
    engine.rider_models.landmarks = accepting
    try:
        assert engine.rider_models.find_in_region(astronaut)
    finally:
        engine.rider_models.landmarks = model
    assert len(accepting.sides) == 2  # one square only: no retry when the model accepts
