"""The CPU rung (configs/gpu.yaml): HMR2 + PHALP on the CPU with MediaPipe's person box as the
detector, over video."""
from __future__ import annotations

import cv2
import numpy as np
from conftest import run_on_frames

from gpu_worker.engines.person_detection import installed


def test_cpu_rung_tracks_the_rider_with_the_mediapipe_person_box(cache, frames_dir):
    out, engine = run_on_frames(cache.options(detector="mediapipe", detector_overrides=[]), frames_dir, 12)
    assert engine.describe()["appearance"] == "hmar" and engine.describe()["device"] == "cpu"
    assert engine.describe()["person_detector"].startswith("on" if installed() else "absent")
    assert [f.index for f in out] == list(range(12))
    first = cv2.imread(str(sorted(frames_dir.glob("*.jpg"))[0]))
    with_rider = [f for f in out if f.persons]
    assert len(with_rider) >= 6, "MediaPipe finds the rider in most frames of this clip"
    assert {p["track_id"] for f in with_rider for p in f.persons} == {with_rider[0].persons[0]["track_id"]}
    person = with_rider[-1].persons[0]
    assert np.asarray(person["smpl"]["body_pose"]).shape == (23, 3, 3) and len(person["keypoints_3d"]) == 45
    x0, y0, x1, y1 = person["bbox_xyxy"]
    assert 0 <= x0 < x1 <= first.shape[1] and 0 <= y0 < y1 <= first.shape[0]


def test_cpu_rung_detector_finds_the_small_rider_the_first_pass_misses():
    """Frames 104-121 of the shared clip: MediaPipe's first pass misses the rider in 7 of them; with the
    second pass (engines/roi.py) the CPU rung's detector hands PHALP a box in every one."""
    import av

    from gpu_worker.engines.hmr2_phalp import MediaPipePersonDetector

    from support import CLIP

    with av.open(str(CLIP)) as container:
        bgr = [frame.to_ndarray(format="bgr24") for index, frame in enumerate(container.decode(video=0))
               if index >= 104]
    counts = {}
    for second_pass in (False, True):
        detector = MediaPipePersonDetector({"second_pass": second_pass})
        detector.begin_video()
        found = [detector(image)["instances"] for image in bgr]
        counts[second_pass] = sum(len(instances) for instances in found)
        for instances in found:
            assert len(instances) <= 1 and instances.pred_masks.shape[1:] == bgr[0].shape[:2]
    assert counts[False] <= len(bgr) - 3 and counts[True] >= len(bgr) - 1, counts


def test_a_frames_crops_run_in_the_chunks_asked_and_give_the_same_tracks(cache, frames_dir):
    """PHALP hands its HMAR every crop of a frame at once; with crop_chunk=1 the HMR2-as-HMAR adapter
    runs them one at a time (phalp_build.forward_in_chunks) and the tracks are those of one batch."""
    batches: list[int] = []

    def count_batches(engine) -> None:
        hmar = engine._phalp.HMAR
        forward_crops = hmar.forward_crops

        def counted(x):
            batches.append(int(x.shape[0]))
            return forward_crops(x)
        hmar.forward_crops = counted

    options = cache.options(hmr2_cpu_runtime="torch")
    whole, _ = run_on_frames(options, frames_dir, 4, prepare=count_batches)
    crowd = max(batches)
    assert crowd >= 2, "the random detector gives several persons a frame: the test needs a crowd"
    batches.clear()
    chunked, _ = run_on_frames({**options, "crop_chunk": 1}, frames_dir, 4, prepare=count_batches)
    assert batches and max(batches) == 1 and len(batches) >= crowd
    assert [f.index for f in chunked] == [f.index for f in whole]
    for got, want in zip(chunked, whole):
        assert [p["track_id"] for p in got.persons] == [p["track_id"] for p in want.persons]
        for person, expected in zip(got.persons, want.persons):
            np.testing.assert_allclose(person["keypoints_3d"], expected["keypoints_3d"], atol=1e-4)
