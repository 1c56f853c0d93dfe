"""Issue 30: the rider found where a person sees him, on a set generated from the shared clip and photo
(bench/recall_set.py): small (1/2, 1/3 of the frame), behind a white mound, backlit, among trees, cut
between shots of background only, moving fast with motion blur; and nobody found on backgrounds.
The truth comes from the generation; the engine reads none of the generator's numbers."""
from __future__ import annotations

import numpy as np
import pytest

from bench.recall_set import CORE, Rider, Source, clips, generated, is_the_rider, plate, trees
from gpu_worker.engines.person_detection import installed

from support import PHOTO, needs_shared_data

# The goal. The engine reaches 1.0 on the set now with the person detector (137 of 137; 0.993
# without it, bench/RESULTS.md; 0.82 before the second pass followed the rider with the pose model alone,
# 0.73 before issue 30): room for the detectors' answers turning on a pixel of a cut and the still
# search's time budget on a loaded machine.
MIN_RECALL = 0.98
BLURRED_DRAWS = (32, 33, 34)


@pytest.fixture(scope="module")
def source() -> Source:
    from bench.recall_bench import shared_source

    if not PHOTO.exists():
        pytest.skip(f"{PHOTO.name} not found in the shared data: the set is made from it and the clip")
    return shared_source()


@pytest.fixture(scope="module")
def core_set(source):
    from bench.recall_bench import loaded_engine

    engine = loaded_engine()
    clips, stills = generated(source, CORE)
    yield engine, clips, stills
    engine.close()


def synthetic_source() -> Source:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (360, 640, 3), dtype=np.uint8) for _ in range(6)]
    boxes = [(300.0, 120.0, 340.0, 220.0) if i != 2 else None for i in range(6)]
    return Source(frames, boxes, rng.integers(0, 255, (1600, 1068, 3), dtype=np.uint8), (400.0, 800.0, 900.0, 1500.0))


def test_the_generator_is_deterministic_and_its_truth_follows_the_pixels():
    source = synthetic_source()
    size = {"length": 6, "stills_per_clip": 1, "seed": 5}
    first, again = generated(source, size), generated(source, size)
    for a, b in zip(first[0], again[0]):
        assert [s.truth for s in a.frames] == [s.truth for s in b.frames]
        assert all(np.array_equal(x.rgb, y.rgb) for x, y in zip(a.frames, b.frames))
    clips = {clip.name: clip for clip in first[0]}
    third = clips["small_third"].frames[0]
    x0, y0, x1, y1 = third.truth
    assert x1 - x0 == pytest.approx(40 / 3) and y1 - y0 == pytest.approx(100 / 3)  # the box scaled with the frame
    assert all(s.truth is None for s in clips["empty"].frames)
    unknown = [s for clip in first[0] for s in clip.frames if s.name.endswith("/002")]
    assert unknown and not any(s.scored for s in unknown)  # a frame whose source box is unknown is not scored
    assert any(s.truth is None for s in clips["cuts"].frames) and any(s.truth for s in clips["cuts"].frames)


def test_drawn_pines_keep_off_the_riders_outline_not_only_his_box():
    """The landmarks' box is tighter than the rider (his head, an arm): pines stand behind his outline's
    box, which follows the frame's placement as his box does; a frame with no outline keeps off his box."""
    box, outline = (300.0, 120.0, 340.0, 220.0), (285.0, 95.0, 352.0, 228.0)
    source = Source([np.zeros((360, 640, 3), np.uint8)] * 2, [box, box], np.zeros((10, 10, 3), np.uint8), box,
                    [outline, None])
    assert source.rider(0) == Rider(box, outline) and source.rider(1) == Rider(box, box)
    white = np.full((360, 640, 3), 255, np.uint8)
    drawn, rider = trees(np.random.default_rng(0), count=400)(white, source.rider(0), 0)
    assert rider == source.rider(0)
    assert (drawn[95:228, 285:352] == 255).all()  # nothing over his outline
    only_box, _ = trees(np.random.default_rng(0), count=400)(white, source.rider(1), 0)
    assert (only_box[95:120, 285:352] < 255).any()  # the same pines over his head when only the box is kept
    assert (drawn[:95] < 255).any()  # and up to the outline elsewhere
    placed = Rider(box, outline).moved(0.5, 10, 20)
    assert placed.box == (160.0, 80.0, 180.0, 130.0) and placed.clear == (152.5, 67.5, 186.0, 134.0)


def test_a_plate_has_no_rider_in_it_and_the_match_rule_needs_the_rider():
    frame = np.zeros((360, 640, 3), dtype=np.uint8)
    frame[100:200, 300:340] = 255  # the 'rider'
    background = plate(frame, (300.0, 100.0, 340.0, 200.0), np.random.default_rng(0))
    assert background.shape == (360, 640, 3) and background.max() == 0
    truth = (100.0, 100.0, 140.0, 200.0)
    assert is_the_rider([102, 98, 141, 205], truth)
    assert is_the_rider([105, 100, 135, 150], truth)  # his upper body, above a mound
    assert not is_the_rider([20, 80, 160, 160], truth)  # a body stretched over the landscape, on his arm
    assert not is_the_rider([300, 100, 340, 200], truth)


@needs_shared_data()
def test_the_rider_is_found_on_the_generated_set_and_nobody_on_its_backgrounds(core_set):
    from bench.recall_bench import score

    engine, clips, stills = core_set
    tally = score(engine, clips, stills)
    summary = tally.summary()
    assert summary["visible"] >= 120 and summary["empty"] >= 20
    assert summary["false_persons"] == 0, [row["false"] for row in summary["groups"].values()]
    assert tally.recall() >= MIN_RECALL, {name: row["missed"] for name, row in summary["groups"].items()}


@needs_shared_data()
def test_each_frame_says_which_pass_found_the_rider(core_set):
    from bench.recall_bench import video_persons

    engine, clips, _ = core_set
    small = next(clip for clip in clips if clip.name == "small_third")
    persons = video_persons(engine, [s.rgb for s in small.frames])
    kinds = {p[0].get("found_by", "first_pass") for p in persons if p}
    assert kinds and all(kind == "first_pass" or kind.startswith("second_pass:") for kind in kinds)
    assert any(kind.startswith("second_pass:") for kind in kinds)  # a rider of 1/3 needs the second pass


@needs_shared_data()
@pytest.mark.skipif(installed() is None, reason="the person detector is not installed in this venv: `make install` "
                    "(or `python -m gpu_worker.engines.person_detection install`) puts it there")
def test_a_blurred_rider_from_a_videos_first_frame_is_found_with_the_person_detector(source):
    """Issue 30: the rider at half size, moving 26 px a frame under a 15-px blur, at the start of a video
    (no track yet): MediaPipe's pose detector misses him in frames the person detector's boxes, given to the
    pose model alone, find him in. Three draws of 24 frames (bench/RESULTS.md: 72 of 72 with it, 60 without)."""
    from bench.recall_bench import loaded_engine, video_persons

    found, by_boxes = {}, 0
    for with_detector in (True, False):
        engine = loaded_engine({"person_detector": with_detector})
        assert (engine.describe()["person_detector"] == "on") is with_detector
        found[with_detector] = visible = 0
        for seed in BLURRED_DRAWS:
            clip = next(clip for clip in clips(source, 24, seed) if clip.name == "fast_blurred_half")
            persons = video_persons(engine, [sample.rgb for sample in clip.frames])
            for sample, frame in zip(clip.frames, persons):
                if sample.truth is None or not sample.scored:
                    continue
                visible += 1
                found[with_detector] += bool(frame) and is_the_rider(frame[0]["bbox_xyxy"], sample.truth)
                by_boxes += with_detector and bool(frame) and frame[0].get("found_by", "").endswith("_person_detector")
        engine.close()
    assert visible >= 60 and found[True] >= visible - 2, found
    assert by_boxes >= 1 and found[True] > found[False], (found, by_boxes)
