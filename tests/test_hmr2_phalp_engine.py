"""hmr2_phalp engine logic on recorded shapes: hmr2, phalp and detectron2 are not installed here, so
the detector+HMR2 step is replaced by detections with PHALP's real field shapes, and the tracker
by a small deep_sort-like tracker with PHALP's confirmation rules (tentative until n_init hits,
tentative tracks die on a miss, confirmed tracks become ghosts). The engine's own code runs
unchanged on top: track_step, back-filling, frame lag, pruning, conversions, pickle writing."""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest

from gpu_worker.engines import hmr2_assets, person_detection
from gpu_worker.engines import hmr2_phalp as hp
from gpu_worker.engines.hmr2_phalp.detectors import person_the_search_kept
from gpu_worker.errors import WeightsMissing
from pose_common.phalp_pickle import write_phalp_pickle

from support import needs_shared_data

H, W = 360, 640
N_INIT = 5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# recorded shapes


def fake_detection_data(person: int, t: int, height: int = H, width: int = W) -> dict:
    """One PHALP detection record with the dtypes/shapes of PHALP.get_human_features."""
    rng = np.random.default_rng(person * 1000 + t)
    x0, y0 = 40.0 + 150 * person + t, 60.0
    side, left, top = max(height, width), (max(height, width) - width) // 2, (max(height, width) - height) // 2
    joints_px = np.stack([rng.uniform(x0, x0 + 80, 45), rng.uniform(y0, y0 + 200, 45)], axis=1)
    joints_norm = ((joints_px + np.array([left, top])) / side).reshape(-1).astype(np.float32)
    return {
        "bbox": np.array([x0, y0, 80.0, 200.0]),
        "conf": np.float32(0.9 + 0.001 * person),
        "smpl": {"global_orient": np.eye(3, dtype=np.float32)[None],
                 "body_pose": np.tile(np.eye(3, dtype=np.float32), (23, 1, 1)),
                 "betas": rng.normal(size=10).astype(np.float32)},
        "camera": np.array([0.1 * person, 0.2, 30.0], dtype=np.float32),
        "camera_bbox": np.array([0.9, 0.01, 0.02], dtype=np.float32),
        "3d_joints": rng.normal(size=(45, 3)).astype(np.float32),
        "2d_joints": joints_norm,
        "size": [height, width],
        "appe": np.zeros(4096, dtype=np.float32),
        "time": t,
        "ground_truth": person,  # what the fake tracker associates on
        "annotations": [],
        "extra_data": 0,
    }


class FakeDetection:
    def __init__(self, data: dict):
        self.detection_data = data


class FakeTrack:
    def __init__(self, track_id: int, det: dict, n_init: int, max_age: int, history_len: int = 7):
        self.track_id, self.hits, self.time_since_update, self.age = track_id, 1, 0, 1
        self.state, self.n_init, self.max_age = "tentative", n_init, max_age
        self.track_data = {"history": deque([det] * history_len, maxlen=history_len), "prediction": {}}
        self.key = det["ground_truth"]

    def is_confirmed(self) -> bool:
        return self.state == "confirmed"

    def update(self, det: dict) -> None:
        self.track_data["history"].append(dict(det))
        self.hits += 1
        self.time_since_update = 0
        if self.state == "tentative" and self.hits >= self.n_init:
            self.state = "confirmed"

    def mark_missed(self) -> None:
        if self.state == "tentative" or self.time_since_update > self.max_age:
            self.state = "deleted"


class FakeDeepSortTracker:
    """deep_sort's Tracker contract as PHALP uses it: predict(), update(dets, t, name, shot),
    .tracks, and a tracked_cost dict that grows by one entry per frame."""

    def __init__(self, n_init: int = N_INIT, max_age: int = 50):
        self.tracks: list[FakeTrack] = []
        self.tracked_cost: dict = {}
        self.n_init, self.max_age, self._next_id = n_init, max_age, 1

    def predict(self) -> None:
        for track in self.tracks:
            track.age += 1
            track.time_since_update += 1

    def update(self, detections, frame_t, image_name, shot) -> None:
        self.tracked_cost[frame_t] = [np.zeros((len(self.tracks), len(detections)))]
        by_key = {d.detection_data["ground_truth"]: d.detection_data for d in detections}
        for track in self.tracks:
            if track.key in by_key:
                track.update(by_key.pop(track.key))
            else:
                track.mark_missed()
        for det in by_key.values():
            self.tracks.append(FakeTrack(self._next_id, det, self.n_init, self.max_age))
            self._next_id += 1
        self.tracks = [t for t in self.tracks if t.state != "deleted"]


class FakePhalp:
    def __init__(self, n_init: int = N_INIT):
        self.n_init = n_init
        self.tracker = None
        self.setup_deepsort()

    def setup_deepsort(self) -> None:
        self.tracker = FakeDeepSortTracker(self.n_init)


def scripted_engine(script: dict[int, list[int]], options: dict | None = None) -> hp.HMR2PhalpEngine:
    """An engine whose detector+HMR2 step returns, for frame seq, detections of the persons in script[seq]."""
    engine = hp.HMR2PhalpEngine("cuda", {"n_init": N_INIT, **(options or {})})
    engine._phalp = FakePhalp(engine.settings.n_init)
    engine.describe_frame = lambda bgr, seq, name: [
        FakeDetection(fake_detection_data(p, seq, *bgr.shape[:2])) for p in script.get(seq, [])]
    return engine


def run_video(engine: hp.HMR2PhalpEngine, n_frames: int, first_index: int = 0,
              shape: tuple[int, int] = (H, W)) -> tuple[list, list[list]]:
    engine.begin_video(shape[1], shape[0], 30.0)
    frame = np.zeros((*shape, 3), dtype=np.uint8)
    emitted, per_push = [], []
    for seq in range(n_frames):
        out = engine.push(first_index + seq, seq / 30.0, frame)
        per_push.append(out)
        emitted.extend(out)
    emitted.extend(engine.end_video())
    return emitted, per_push


def scene() -> dict[int, list[int]]:
    """Person 0 in frames 0-19 except 12; person 1 in 5-7 only (never confirmed); person 2 in 10-29;
    frames 30-34 empty."""
    script: dict[int, list[int]] = {}
    for t in range(35):
        script[t] = ([0] if t < 20 and t != 12 else []) + ([1] if 5 <= t <= 7 else []) + \
                    ([2] if 10 <= t < 30 else [])
    return script


# ---------------------------------------------------------------------------------------------
# module surface


def test_module_imports_without_hmr2_phalp_detectron2_or_torch():
    code = ("import sys, gpu_worker.engines.hmr2_phalp, gpu_worker.engines.hmr2_assets, "
            "pose_common.phalp_pickle; "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('hmr2','phalp','detectron2','torch')]; "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_registry_points_at_this_engine():
    from gpu_worker.engines import ENGINES
    assert ENGINES["hmr2_phalp"] == ("gpu_worker.engines.hmr2_phalp", "HMR2PhalpEngine")
    assert hp.HMR2PhalpEngine.name == "hmr2_phalp"


def test_joint_names_follow_phalp_order():
    names = hp.HMR2PhalpEngine.joint_names
    assert len(names) == 45 and len(set(names)) == 45
    assert names[:2] == ["nose", "neck"] and names[8] == "mid_hip" and names[24] == "right_heel"
    assert names[25] == "right_ankle_j19" and names[39] == "pelvis_mpii" and names[44] == "smpl_origin"


def test_stage_names_and_probe_skips_main_model_and_tracker():
    engine = hp.HMR2PhalpEngine("cuda", {})
    assert [s.name for s in engine.stages()] == ["runtime", "weights", "main_model", "tracker", "detector"]
    assert [s.name for s in engine.probe_stages()] == ["runtime", "weights", "detector"]


def test_options_are_validated():
    with pytest.raises(ValueError):
        hp.HMR2PhalpEngine("cuda", {"detector": "yolo"})
    with pytest.raises(ValueError):
        hp.HMR2PhalpEngine("cuda", {"n_init": 9})  # history holds only 7
    assert hp.HMR2PhalpEngine("cuda", {"detector": "maskrcnn"}).settings.detector == "regnety"
    assert hp.HMR2PhalpEngine("cuda", {"detector": "regnety"}).settings.phalp_detector == "maskrcnn"


def test_mesh_faces_absent_before_loading():
    assert hp.HMR2PhalpEngine("cuda", {}).mesh_faces() is None


# ---------------------------------------------------------------------------------------------
# pure conversions


@pytest.mark.parametrize("height,width", [(360, 640), (640, 360), (480, 480), (361, 640)])
def test_2d_joints_unnormalise_over_centred_padded_square(height, width):
    side = max(height, width)
    left, top = (side - width) // 2, (side - height) // 2
    pixels = np.array([[0.0, 0.0], [width - 1.0, height - 1.0], [width / 2.0, height / 3.0]])
    normalised = ((pixels + [left, top]) / side).reshape(-1)
    back = hp.joints_2d_to_pixels(normalised, height, width)
    np.testing.assert_allclose(back, pixels, atol=1e-6)
    np.testing.assert_allclose(hp.pixels_to_joints_2d(back, height, width), normalised, atol=1e-6)


def test_landscape_example_by_hand():
    # 640x360: square side 640, 140 px of padding above; (0.5, 0.5) is the image centre
    np.testing.assert_allclose(hp.joints_2d_to_pixels(np.array([0.5, 0.5]), 360, 640), [[320.0, 180.0]])
    np.testing.assert_allclose(hp.joints_2d_to_pixels(np.array([0.0, 140 / 640]), 360, 640), [[0.0, 0.0]])


def test_bbox_and_focal_conversions():
    assert hp.xywh_to_xyxy(np.array([10.0, 20.0, 30.0, 40.0])) == [10.0, 20.0, 40.0, 60.0]
    assert hp.xyxy_to_xywh([10, 20, 40, 60]) == [10.0, 20.0, 30.0, 40.0]
    assert hp.full_frame_focal(360, 640) == pytest.approx(12500.0)
    assert hp.full_frame_focal(1080, 720) == pytest.approx(5000 / 256 * 1080)


def test_crop_camera_to_full_projects_origin_where_the_crop_camera_does():
    cam_crop = np.array([0.8, 0.05, -0.1])
    centre, box = np.array([400.0, 150.0]), 220.0
    translation = hp.crop_camera_to_full(cam_crop, centre, np.array([box]), H, W)[0]
    origin_px = hp.project_to_image(np.zeros((1, 3)), translation, H, W)[0]
    # weak perspective in the crop: the origin lands at centre + box * s * t / 2
    np.testing.assert_allclose(origin_px, centre + box * cam_crop[0] * cam_crop[1:] / 2, atol=1e-6)
    assert translation[2] == pytest.approx(2 * hp.full_frame_focal(H, W) / (box * cam_crop[0]))


def test_person_from_detection_has_service_fields():
    det = fake_detection_data(0, 3)
    person = hp.person_from_detection(7, det)
    assert person["track_id"] == 7 and person["score"] == pytest.approx(0.9, abs=1e-4)
    assert person["bbox_xyxy"] == [43.0, 60.0, 123.0, 260.0]
    assert np.asarray(person["keypoints_2d"]).shape == (45, 3)
    assert all(p[2] == 1.0 for p in person["keypoints_2d"])
    np.testing.assert_allclose(np.asarray(person["keypoints_2d"])[:, :2],
                               hp.joints_2d_to_pixels(det["2d_joints"], H, W), atol=0.01)
    assert np.asarray(person["keypoints_3d"]).shape == (45, 3)
    assert np.asarray(person["smpl"]["global_orient"]).shape == (1, 3, 3)
    assert np.asarray(person["smpl"]["body_pose"]).shape == (23, 3, 3)
    assert len(person["smpl"]["betas"]) == 10
    assert person["camera"]["focal_length"] == pytest.approx(12500.0)
    assert person["camera"]["tz"] == pytest.approx(30.0)
    assert person["camera_bbox"] == pytest.approx([0.9, 0.01, 0.02])
    assert "vertices" not in person
    det["vertices"] = np.zeros((6890, 3), dtype=np.float32)
    assert np.asarray(hp.person_from_detection(7, det)["vertices"]).shape == (6890, 3)


def test_rgb_to_bgr_flips_channels_and_rejects_other_layouts():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    bgr = hp.rgb_to_bgr(rgb)
    assert bgr[0, 0].tolist() == [0, 0, 255] and bgr.flags["C_CONTIGUOUS"]
    with pytest.raises(ValueError):
        hp.rgb_to_bgr(np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        hp.rgb_to_bgr(np.zeros((2, 3, 3), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# frame lag, back-filling, ghosts, empty frames


def test_every_frame_emitted_once_in_order_with_backfilled_tracks():
    engine = scripted_engine(scene())
    emitted, _ = run_video(engine, 35, first_index=100)
    assert [f.index for f in emitted] == list(range(100, 135))
    ids = {f.index - 100: [p["track_id"] for p in f.persons] for f in emitted}
    # person 0 is track 1: confirmed at frame 4, so frames 0-3 were back-filled
    for t in range(20):
        assert (1 in ids[t]) == (t != 12), t   # frame 12: a ghost, not observed, not reported
    # person 1 (track 2) was tentative for 3 frames and died: never reported
    assert all(2 not in v for v in ids.values())
    # person 2 (track 3) confirmed at frame 14, back-filled to 10
    assert [t for t, v in ids.items() if 3 in v] == list(range(10, 30))
    assert all(ids[t] == [] for t in range(30, 35))
    assert engine._pending.late_edits == 0


def test_frames_are_held_exactly_until_phalp_can_no_longer_edit_them():
    engine = scripted_engine(scene())
    _, per_push = run_video(engine, 35)
    window = N_INIT - 1
    for seq, out in enumerate(per_push):
        expected = [seq - window] if seq >= window else []
        assert [f.index for f in out] == expected
    # the first frame leaves when person 0 is confirmed, already carrying the back-filled entry
    first = per_push[window][0]
    assert first.index == 0 and [p["track_id"] for p in first.persons] == [1]
    # its contents are frame 0's own detection, not the confirming frame's
    expected_bbox = hp.xywh_to_xyxy(fake_detection_data(0, 0)["bbox"])
    assert first.persons[0]["bbox_xyxy"] == expected_bbox


def test_backfill_uses_each_frames_own_history_entry():
    engine = scripted_engine(scene())
    emitted, _ = run_video(engine, 35)
    for frame in emitted[:20]:
        for person in frame.persons:
            if person["track_id"] == 1:
                det = fake_detection_data(0, frame.index)
                assert person["bbox_xyxy"] == hp.xywh_to_xyxy(det["bbox"])
                np.testing.assert_allclose(person["keypoints_3d"], det["3d_joints"], atol=1e-4)


def test_video_shorter_than_the_lag_is_flushed_at_end():
    engine = scripted_engine({0: [0], 1: [0], 2: [0]})
    emitted, per_push = run_video(engine, 3)
    assert all(out == [] for out in per_push)
    assert [f.index for f in emitted] == [0, 1, 2]
    assert all(f.persons == [] for f in emitted)  # never confirmed within 3 frames


def test_begin_video_starts_a_fresh_tracker_and_buffer():
    engine = scripted_engine(scene())
    run_video(engine, 35)
    first_tracker = engine._phalp.tracker
    emitted, _ = run_video(engine, 10)
    assert engine._phalp.tracker is not first_tracker
    assert [f.index for f in emitted] == list(range(10))
    assert [p["track_id"] for p in emitted[0].persons] == [1]  # ids restart


def test_n_init_one_emits_immediately():
    # deep_sort creates tracks tentative and confirms them on their next hit, and PHALP back-fills
    # only at hits == n_init: with n_init=1 a track's first frame is not reported (PHALP does the same)
    engine = scripted_engine({0: [0], 1: [0]}, {"n_init": 1})
    _, per_push = run_video(engine, 2)
    assert [[f.index for f in out] for out in per_push] == [[0], [1]]
    assert per_push[0][0].persons == [] and per_push[1][0].persons[0]["track_id"] == 1


def test_memory_stays_bounded_over_a_long_video():
    engine = scripted_engine({t: [0, 1] for t in range(1000)})
    engine.begin_video(W, H, 30.0)
    frame = np.zeros((H, W, 3), dtype=np.uint8)
    tracker = engine._phalp.tracker
    count = 0
    for seq in range(1000):
        count += len(engine.push(seq, seq / 30, frame))
        assert len(tracker.tracked_cost) == 0
        assert len(engine._pending) <= N_INIT
        assert all(len(t.track_data["history"]) <= 7 for t in tracker.tracks)
    count += len(engine.end_video())
    assert count == 1000


def test_record_tracks_counts_edits_to_already_emitted_frames():
    pending = hp.PendingFrames(edit_window=1)
    pending.open(0, 0)
    pending.open(1, 1)
    assert [f.index for f in pending.pop_final(1)] == [0]
    view = hp.TrackView(track_id=4, hits=3, time_since_update=0,
                        history=[fake_detection_data(0, t) for t in range(3)])
    hp.record_tracks(pending, 1, [view], n_init=3)
    assert pending.late_edits == 1  # frame 0 already left; reported, not silently merged
    assert [p["track_id"] for p in pending.flush()[0].persons] == [4]


def engine_with_renderer(device: str, problem: str, options: dict | None = None) -> hp.HMR2PhalpEngine:
    engine = hp.HMR2PhalpEngine(device, options or {})
    engine.neural_renderer_problem = lambda: problem
    return engine


def test_appearance_follows_the_device_and_texture_is_refused_on_cpu():
    assert engine_with_renderer("cpu", "").appearance == "hmar"
    assert engine_with_renderer("cuda:1", "").appearance == "texture"
    with pytest.raises(ValueError, match="needs CUDA"):
        _ = engine_with_renderer("cpu", "", {"appearance": "texture"}).appearance


@pytest.mark.parametrize("options", [{}, {"appearance": "texture"}])
def test_without_neural_renderer_a_cuda_rung_runs_hmar_and_says_so(options):
    problem = "neural_renderer does not import (ImportError: undefined symbol: _ZN3c10)"
    engine = engine_with_renderer("cuda", problem, options)
    assert engine.appearance == "hmar"
    described = engine.describe()
    assert described["appearance"] == "hmar"
    assert problem in described["appearance_note"] and "appearance=hmar" in described["appearance_note"]
    assert "appearance_note" not in engine_with_renderer("cuda", "", options).describe()


def test_the_weights_stage_wants_the_uv_maps_only_when_the_texture_sampler_runs(tmp_path, monkeypatch):
    for var, value in cache_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    def missing(engine):
        with pytest.raises(WeightsMissing) as err:
            weights_stage(engine).run()
        return str(err.value)
    assert "bmap_256.npy" in missing(engine_with_renderer("cuda", ""))
    assert "bmap_256.npy" not in missing(engine_with_renderer("cuda", "neural_renderer does not import"))


def test_neural_renderer_problem_names_what_failed():
    def broken(name):
        raise OSError(f"{name}/cuda/rasterize_cuda.so: undefined symbol")
    assert hp.neural_renderer_problem(lambda name: None) == ""
    assert "OSError" in hp.neural_renderer_problem(broken) and "undefined symbol" in hp.neural_renderer_problem(broken)
    row = hp.neural_renderer_row(lambda: "neural_renderer does not import (ModuleNotFoundError)")
    assert row["status"] == "missing" and row["optional"] and "appearance=hmar" in row["source"]


def test_a_retried_frame_keeps_its_place_and_is_emitted_once():
    """The worker retries a frame once after a CUDA out-of-memory error: the retry must not advance
    the sequence (before the fix the frame was emitted twice and the back-fill shifted by one)."""
    engine = scripted_engine(scene())
    describe = engine.describe_frame
    failed = []

    def out_of_memory_once(bgr, seq, name):
        if seq == 6 and not failed:
            failed.append(seq)
            raise RuntimeError("CUDA out of memory (simulated)")
        return describe(bgr, seq, name)

    engine.describe_frame = out_of_memory_once
    engine.begin_video(W, H, 30.0)
    frame = np.zeros((H, W, 3), dtype=np.uint8)
    emitted = []
    for index in range(35):
        try:
            emitted += engine.push(index, index / 30, frame)
        except RuntimeError:
            emitted += engine.push(index, index / 30, frame)
    emitted += engine.end_video()
    assert failed == [6]
    assert [f.index for f in emitted] == list(range(35))
    reference, _ = run_video(scripted_engine(scene()), 35)
    assert [[p["bbox_xyxy"] for p in f.persons] for f in emitted] == \
        [[p["bbox_xyxy"] for p in f.persons] for f in reference]


def test_backfill_goes_to_the_frame_each_history_entry_was_seen_in():
    pending = hp.PendingFrames(edit_window=4)
    for seq in range(6):
        pending.open(seq, 100 + seq)
    history = [fake_detection_data(0, t) for t in (1, 2, 3, 4, 5)]
    hp.record_tracks(pending, 5, [hp.TrackView(1, 5, 0, history)], n_init=5)
    frames = {f.index: f.persons for f in pending.flush()}
    assert frames[100] == []
    for t in range(1, 6):
        assert frames[100 + t][0]["bbox_xyxy"] == hp.xywh_to_xyxy(fake_detection_data(0, t)["bbox"])


# ---------------------------------------------------------------------------------------------
# single image path (detector and HMR2 outputs recorded)


def test_infer_image_builds_45_joint_persons_with_mesh():
    torch = pytest.importorskip("torch")

    class Instances:
        pred_classes = torch.tensor([0, 0, 2])
        scores = torch.tensor([0.95, 0.3, 0.99])
        pred_boxes = SimpleNamespace(tensor=torch.tensor([[100.0, 50, 200, 300], [0, 0, 10, 10], [5, 5, 50, 50]]))

    engine = hp.HMR2PhalpEngine("cpu", {})
    engine._torch = torch
    engine._detector = lambda bgr: {"instances": Instances()}
    recorded = {"pred_cam": np.array([0.9, 0.02, 0.1], dtype=np.float32),
                "pred_smpl_params": {"global_orient": np.eye(3, dtype=np.float32)[None],
                                     "body_pose": np.tile(np.eye(3, dtype=np.float32), (23, 1, 1)),
                                     "betas": np.zeros(10, dtype=np.float32)},
                "pred_keypoints_3d": np.zeros((44, 3), dtype=np.float32),
                "pred_vertices": np.zeros((6890, 3), dtype=np.float32),
                "box_center": np.array([150.0, 175.0], dtype=np.float32),
                "box_size": np.array(250.0, dtype=np.float32)}
    calls = []
    engine._run_hmr2_on_boxes = lambda bgr, boxes: calls.append(boxes) or [recorded]
    persons = engine.infer_image(np.zeros((H, W, 3), dtype=np.uint8))
    assert len(persons) == 1 and calls[0].shape == (1, 4)  # low score and non-person dropped
    person = persons[0]
    assert len(person["keypoints_2d"]) == 45 and len(person["keypoints_3d"]) == 45
    assert np.asarray(person["vertices"]).shape == (6890, 3)
    origin = np.asarray(person["keypoints_2d"])[44, :2]
    np.testing.assert_allclose(origin, [150 + 250 * 0.9 * 0.02 / 2, 175 + 250 * 0.9 * 0.1 / 2], atol=0.01)
    assert person["camera"]["focal_length"] == pytest.approx(12500.0)


# ---------------------------------------------------------------------------------------------
# the CPU rung's detector hands PHALP the person the second pass kept


def landmarks_of(box: list[float], visibility: float, height: int = H, width: int = W):
    """MediaPipe Pose's answer shape: 33 landmarks spread over box (normalised) and their world
    coordinates, no segmentation."""
    x0, y0, x1, y1 = box
    xs, ys = np.linspace(x0, x1, 33) / width, np.linspace(y0, y1, 33) / height
    points = [SimpleNamespace(x=x, y=y, visibility=visibility) for x, y in zip(xs, ys)]
    world = [SimpleNamespace(x=x - 0.5, y=y - 0.5, z=0.0) for x, y in zip(xs, ys)]
    return SimpleNamespace(pose_landmarks=SimpleNamespace(landmark=points),
                           pose_world_landmarks=SimpleNamespace(landmark=world), segmentation_mask=None)


class GraphGiving:
    """MediaPipe Pose's graph as the detector calls it (`process`), giving a fixed answer."""

    def __init__(self, found):
        self.found = found

    def process(self, rgb):
        return self.found


def test_the_cpu_rungs_detector_drops_the_first_pass_person_the_second_pass_drops():
    """A first-pass person the model barely believes (landmark visibility 0.2) is dropped by the second
    pass; PHALP must not get his box. On a blank frame the search finds nobody else. One it believes (0.9)
    stands without the person detector; with it, a body on a blank frame that no closer look finds and the
    detector does not see is dropped too (roi.RiderSearch.unproven), as the mediapipe engine drops it."""
    pytest.importorskip("mediapipe")
    detector = hp.MediaPipePersonDetector({"person_detector": False})
    blank = np.zeros((H, W, 3), dtype=np.uint8)
    box, _, mask = detector.person_in(GraphGiving(landmarks_of([200, 60, 260, 300], 0.2)), blank, follow=True)
    assert box is None and not mask.any()
    box, score, mask = detector.person_in(GraphGiving(landmarks_of([200, 60, 260, 300], 0.9)), blank, follow=True)
    assert box is not None and score == pytest.approx(0.9) and mask.any()
    if person_detection.installed() is None:
        return
    with_persons = hp.MediaPipePersonDetector({})
    box, _, mask = with_persons.person_in(GraphGiving(landmarks_of([200, 60, 260, 300], 0.9)), blank, follow=True)
    assert box is None and not mask.any()


def loaded_mediapipe_engine():
    from gpu_worker.engines.mediapipe_engine import MediaPipeEngine

    engine = MediaPipeEngine("cpu", {})
    for stage in engine.stages():
        stage.run()
    return engine


def test_the_cpu_rung_finds_in_a_still_the_person_the_mediapipe_engine_finds():
    """One search for both engines (rider_models.py): on the photo, the CPU rung's box is the box over the
    landmarks the mediapipe engine's person shows, grown by the rung's margin."""
    pytest.importorskip("mediapipe")
    from skimage.data import astronaut

    rgb = np.ascontiguousarray(astronaut())
    engine = loaded_mediapipe_engine()
    try:
        expected = engine.infer_image(rgb)
    finally:
        engine.close()
    assert expected, "the mediapipe engine finds nobody in the photo: nothing to compare with"
    detector = hp.MediaPipePersonDetector({})
    box, score, mask = detector.person_in(detector._make(video=False), rgb[:, :, ::-1], follow=False)
    height, width = rgb.shape[:2]
    assert box == pytest.approx(hp.seen_box(expected[0], width, height, detector.BOX_MARGIN), abs=1.0)
    assert score == pytest.approx(expected[0]["score"], abs=0.02) and mask.shape == (height, width) and mask.any()


@needs_shared_data()
def test_the_cpu_rung_finds_the_rider_in_every_frame_the_mediapipe_engine_does():
    """Over the shared clip's lost stretch (frames 96-121: the first pass misses the small rider in 7),
    the CPU rung hands PHALP a box in the same frames as the mediapipe engine finds him, over the same
    person: both run the same second pass with the same models, the person detector included."""
    import av

    from support import CLIP

    with av.open(str(CLIP)) as container:
        rgb = [frame.to_ndarray(format="rgb24") for index, frame in enumerate(container.decode(video=0))
               if index >= 96]
    height, width = rgb[0].shape[:2]
    engine = loaded_mediapipe_engine()
    try:
        engine.begin_video(width, height, 30.0)
        expected = [engine.push(index, index / 30.0, frame)[0].persons for index, frame in enumerate(rgb)]
        engine_describes = engine.describe()["person_detector"]
    finally:
        engine.close()
    detector = hp.MediaPipePersonDetector({})
    assert detector.rider_models.describe_person_detector() == engine_describes
    detector.begin_video()
    found_by_search = 0
    for frame, persons in zip(rgb, expected):
        box, _, _ = detector.person_in(detector._video, frame[:, :, ::-1], follow=True)
        assert (box is None) == (not persons)
        if persons:
            assert box == pytest.approx(hp.seen_box(persons[0], width, height, detector.BOX_MARGIN), abs=1.0)
            found_by_search += str(persons[0].get("found_by", "")).startswith("second_pass")
    assert sum(bool(persons) for persons in expected) == len(rgb) and found_by_search >= 7


def test_the_person_the_second_pass_kept_keeps_his_mask_another_gets_his_own_box():
    first_mask = np.zeros((H, W), dtype=bool)
    first_mask[60:300, 200:260] = True
    first = [{"bbox_xyxy": [200.0, 60.0, 260.0, 300.0], "score": 0.9}]
    kept = person_the_search_kept(first, first_mask, [{"bbox_xyxy": [202.0, 62.0, 258.0, 296.0], "score": 0.8}])
    assert kept[0] == [202.0, 62.0, 258.0, 296.0] and kept[1] == 0.8 and kept[2] is first_mask
    box, score, mask = person_the_search_kept(first, first_mask, [{"bbox_xyxy": [400.0, 100.0, 440.0, 200.0], "score": 0.7}])
    assert box == [400.0, 100.0, 440.0, 200.0] and score == 0.7
    assert mask[150, 420] and not mask[150, 230] and mask.sum() == 41 * 101
    box, _, mask = person_the_search_kept(first, first_mask, [])
    assert box is None and not mask.any()


# ---------------------------------------------------------------------------------------------
# assets and the weights stage


def cache_env(tmp_path) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch"),
            "FVCORE_CACHE": str(tmp_path / "fvcore")}


def minimal_content(kind: str, path: str) -> None:
    """The smallest file of each kind that has the keys and shapes hmr2_assets checks."""
    import torch
    import yaml

    def dump_pickle(value):
        with open(path, "wb") as fh:
            pickle.dump(value, fh)

    def zeros(*shape):
        return np.zeros(shape, dtype=np.uint8)

    def tensor(*shape):
        return torch.zeros(shape, dtype=torch.uint8)

    if kind == "smpl":
        dump_pickle({**{k: zeros(*shape) for k, shape in hmr2_assets.SMPL_SHAPES.items()},
                     "shapedirs": zeros(6890, 3, 10)})
    elif kind == "j19":
        dump_pickle(zeros(19, 6890))
    elif kind == "mean_params":
        with open(path, "wb") as fh:
            np.savez(fh, pose=zeros(144), shape=zeros(10), cam=zeros(3))
    elif kind == "texture":
        with open(path, "wb") as fh:
            np.savez(fh, smpl_faces=zeros(13776, 3), vt=zeros(10, 2), ft=zeros(13776, 3))
    elif kind in ("mean_std", "uv_bary", "uv_face"):
        shape = {"mean_std": (2, 1, 229), "uv_bary": (256, 256, 3), "uv_face": (256, 256)}[kind]
        with open(path, "wb") as fh:
            np.save(fh, zeros(*shape))
    elif kind == "hmr2_config":
        with open(path, "w") as fh:
            yaml.safe_dump({"MODEL": {"BACKBONE": {"TYPE": "vit"}, "SMPL_HEAD": {"TYPE": "transformer_decoder"}},
                            "SMPL": {"MODEL_PATH": "data/smpl", "MEAN_PARAMS": "data/m.npz"},
                            "EXTRA": {"FOCAL_LENGTH": 5000}}, fh)
    elif kind == "pose_predictor_config":
        with open(path, "w") as fh:
            yaml.safe_dump({"configs": {"in_feat": 8, "frame_length": 4, "transformer": {"depth": 1},
                                        "extra_feat": {"pose_shape": {"dim": 229}}, "num_smpl_heads": 1}}, fh)
    elif kind == "hmr2_checkpoint":
        torch.save({"state_dict": minimal_hmr2_weights()}, path)
    elif kind == "resnet50":
        torch.save({"conv1.weight": tensor(64, 3, 7, 7), "layer4.2.conv3.weight": tensor(2048, 512, 1, 1)}, path)
    elif kind == "hmar_weights":
        torch.save({"model": {f"hmar.{part}.w": tensor(1) for part in ("encoding_head", "texture_head", "backbone")}},
                   path)
    elif kind == "pose_predictor":
        torch.save({"state_dict": minimal_pose_predictor_weights()}, path)
    elif kind == "detectron2":
        dump_pickle({"model": {"backbone.net.w": zeros(1), "roi_heads.box_predictors.0.cls_score.weight": zeros(81, 4)}})
    else:
        raise AssertionError(kind)


def minimal_hmr2_weights(leave_out: str = "") -> dict:
    import torch

    weights = {"backbone.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16), "backbone.pos_embed": torch.zeros(1, 5, 8),
               "backbone.blocks.0.attn.qkv.weight": torch.zeros(24, 8), "backbone.last_norm.weight": torch.zeros(8),
               "smpl_head.transformer.layers.0.w": torch.zeros(1), "smpl_head.decpose.weight": torch.zeros(144, 4),
               "smpl_head.decshape.weight": torch.zeros(10, 4), "smpl_head.deccam.weight": torch.zeros(3, 4)}
    return {k: v for k, v in weights.items() if not k.startswith(leave_out or "-")}


def minimal_pose_predictor_weights(leave_out: str = "") -> dict:
    import torch

    names = ["encoder.pose_shape_encoder.0.weight", "encoder.transformer.layers.0.w", "encoder.transformer1.layers.0.w",
             "encoder.smpl_head.0.decpose.weight", "encoder.loca_head.0.0.weight"]
    return {name: torch.zeros(1) for name in names if not name.startswith(leave_out or "-")}


@pytest.mark.parametrize("kind, leave_out, named", [
    ("hmr2_checkpoint", "backbone.last_norm", "backbone.last_norm.weight"),
    ("hmr2_checkpoint", "smpl_head.transformer", "smpl_head.transformer"),
    ("hmr2_checkpoint", "backbone.blocks", "backbone.blocks.0"),
    ("pose_predictor", "encoder.transformer1", "transformer1"),
    ("pose_predictor", "encoder.loca_head", "loca_head.0"),
])
def test_verify_names_a_part_the_strict_false_loaders_would_leave_random(tmp_path, kind, leave_out, named):
    """HMR2 and PHALP's pose predictor load with strict=False: a checkpoint without a part loads
    without a word and runs that part at random init. verify reads the keys as each loader does."""
    import torch

    path = str(tmp_path / "weights.ckpt")
    weights = minimal_hmr2_weights(leave_out) if kind == "hmr2_checkpoint" else minimal_pose_predictor_weights(leave_out)
    torch.save({"state_dict": weights}, path)
    check = hmr2_assets.check_hmr2_checkpoint if kind == "hmr2_checkpoint" else hmr2_assets.check_pose_predictor
    with pytest.raises(hmr2_assets.ContentError, match=re.escape(named)):
        check(path)
    whole = minimal_hmr2_weights() if kind == "hmr2_checkpoint" else minimal_pose_predictor_weights()
    torch.save({"state_dict": whole}, path)
    check(path)


def test_the_pose_predictors_pose_shape_encoder_is_not_required_phalp_never_loads_it(tmp_path):
    import torch

    path = str(tmp_path / "pose_predictor.ckpt")
    torch.save({"state_dict": minimal_pose_predictor_weights("encoder.pose_shape_encoder")}, path)
    hmr2_assets.check_pose_predictor(path)


def seed(assets, shrink: str | None = None) -> None:
    """Valid minimal files; `shrink` names one to cut in half, as an interrupted download leaves it."""
    for asset in assets:
        os.makedirs(os.path.dirname(asset.path), exist_ok=True)
        minimal_content(asset.content, asset.path)
        if asset.name == shrink:
            with open(asset.path, "r+b") as fh:
                fh.truncate(os.path.getsize(asset.path) // 2)


def test_asset_paths_follow_each_projects_cache_rules(tmp_path):
    env = cache_env(tmp_path)
    paths = {a.name: a.path for a in hmr2_assets.required_assets("vitdet", env)}
    home = env["HOME"]
    assert paths["hmr2_checkpoint"] == os.path.join(
        home, ".cache/4DHumans/logs/train/multiruns/hmr2/0/checkpoints/epoch=35-step=1000000.ckpt")
    assert paths["phalp_hmar_weights"] == os.path.join(home, ".cache/phalp/weights/hmar_v2_weights.pth")
    assert paths["phalp_smpl_neutral"] == os.path.join(home, ".cache/phalp/3D/models/smpl/SMPL_NEUTRAL.pkl")
    assert paths["resnet50_imagenet"] == os.path.join(env["TORCH_HOME"], "hub/checkpoints/resnet50-19c8e357.pth")
    assert paths["vitdet_h_weights"] == os.path.join(
        env["FVCORE_CACHE"], "detectron2/ViTDet/COCO/cascade_mask_rcnn_vitdet_h/f328730692/model_final_f05665.pkl")
    assert "regnety_weights" not in paths
    bare = {"HOME": home}
    fallback = {a.name: a.path for a in hmr2_assets.required_assets("maskrcnn", bare)}
    assert fallback["regnety_weights"].startswith(os.path.join(home, ".torch/iopath_cache/detectron2/new_baselines/"))
    assert fallback["resnet50_imagenet"] == os.path.join(home, ".cache/torch/hub/checkpoints/resnet50-19c8e357.pth")
    assert all(os.path.isabs(p) for p in paths.values())
    assert all(a.source and a.min_size > 0 for a in hmr2_assets.required_assets("vitdet", env))


def test_verify_reports_missing_truncated_present(tmp_path):
    env = cache_env(tmp_path)
    assets = hmr2_assets.required_assets("vitdet", env)
    rows = hmr2_assets.verify(assets)
    assert {r["status"] for r in rows} == {"missing"}
    assert set(rows[0]) == {"name", "path", "status", "size", "min_size", "source", "problem"}
    seed(assets, shrink="phalp_pose_predictor")
    rows = {r["name"]: r for r in hmr2_assets.verify(assets)}
    assert rows["phalp_pose_predictor"]["status"] == "truncated"
    assert rows["hmr2_checkpoint"]["status"] == "present"  # small, but the keys and shapes are right
    assert [r["name"] for r in hmr2_assets.problems(list(rows.values()))] == ["phalp_pose_predictor"]


@pytest.mark.parametrize("name,wrong", [
    ("hmr2_smpl_neutral", "npz"),            # an npz renamed .pkl (before: passed on size alone)
    ("phalp_smpl_to_j19", "big_j19"),        # a regressor of another mesh
    ("hmr2_checkpoint", "resnet"),           # another model's checkpoint under HMR2's name
    ("vitdet_h_weights", "lvis"),            # a detector trained on other classes
])
def test_verify_reads_content_not_just_sizes(tmp_path, name, wrong):
    env = cache_env(tmp_path)
    assets = hmr2_assets.required_assets("vitdet", env)
    seed(assets)
    path = next(a.path for a in assets if a.name == name)
    if wrong == "npz":
        with open(path, "wb") as fh:
            np.savez(fh, v_template=np.zeros((6890, 3)))
        with open(path, "ab") as fh:  # as large as the real model: no size rule can tell
            fh.truncate(25 * hmr2_assets.MB)
    elif wrong == "big_j19":
        with open(path, "wb") as fh:
            pickle.dump(np.zeros((19, 10475), dtype=np.uint8), fh)
    elif wrong == "resnet":
        minimal_content("resnet50", path)
    else:
        with open(path, "wb") as fh:
            pickle.dump({"model": {"backbone.w": np.zeros(1), "roi_heads.box_predictor.cls_score.weight":
                                   np.zeros((1204, 4))}}, fh)
    row = next(r for r in hmr2_assets.verify(assets) if r["name"] == name)
    assert row["status"] in ("invalid", "truncated") and row["problem"], row
    assert [r["name"] for r in hmr2_assets.problems(hmr2_assets.verify(assets))] == [name]


def weights_stage(engine: hp.HMR2PhalpEngine, probe: bool = False):
    stages = engine.probe_stages() if probe else engine.stages()
    return next(s for s in stages if s.name == "weights")


def test_weights_stage_names_missing_file_and_where_to_get_it(tmp_path, monkeypatch):
    for var, value in cache_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    engine = hp.HMR2PhalpEngine("cuda", {})
    with pytest.raises(WeightsMissing) as err:
        weights_stage(engine).run()
    message = str(err.value)
    assert "epoch=35-step=1000000.ckpt" in message and "hmr2_data.tar.gz" in message
    assert "smplify.is.tue.mpg.de" in message and "model_final_f05665.pkl" in message


def test_weights_stage_passes_when_seeded_and_flags_truncation(tmp_path, monkeypatch):
    env = cache_env(tmp_path)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assets = hmr2_assets.required_assets("vitdet", env)
    seed(assets)
    weights_stage(hp.HMR2PhalpEngine("cuda", {})).run()
    seed(assets, shrink="hmr2_checkpoint")
    with pytest.raises(WeightsMissing, match="truncated .*epoch=35-step=1000000.ckpt"):
        weights_stage(hp.HMR2PhalpEngine("cuda", {})).run()


def test_probe_weights_stage_needs_only_the_detector(tmp_path, monkeypatch):
    env = cache_env(tmp_path)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    seed(hmr2_assets.probe_assets("regnety", env))
    weights_stage(hp.HMR2PhalpEngine("cuda", {"detector": "regnety"}), probe=True).run()
    with pytest.raises(WeightsMissing, match="model_final_f05665.pkl"):
        weights_stage(hp.HMR2PhalpEngine("cuda", {"detector": "vitdet"}), probe=True).run()


def test_cache_override_options_reach_the_weights_check(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("FVCORE_CACHE", raising=False)
    env = cache_env(tmp_path)
    seed(hmr2_assets.required_assets("vitdet", env))
    options = {"cache_home": env["HOME"], "torch_home": env["TORCH_HOME"], "fvcore_cache": env["FVCORE_CACHE"]}
    weights_stage(hp.HMR2PhalpEngine("cuda", options)).run()


# ---------------------------------------------------------------------------------------------
# PHALP-compatible pickle


def native_result(frames) -> dict:
    return {"job_id": "j1", "video": {"fps": 30.0, "frame_count": len(frames), "width": W, "height": H},
            "engine": {"name": "hmr2_phalp"}, "joint_names": hp.JOINT_NAMES,
            "frames": [{"frame_index": f.index, "pts_s": f.index / 30, "persons": f.persons} for f in frames]}


def test_pickle_round_trip_matches_phalp_layout(tmp_path):
    emitted, _ = run_video(scripted_engine(scene()), 35)
    path = write_phalp_pickle(native_result(emitted), tmp_path / "demo_clip.pkl")
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert list(data)[:3] == ["000001.jpg", "000002.jpg", "000003.jpg"] and len(data) == 35
    frame = data["000001.jpg"]
    assert frame["time"] == 0 and frame["shot"] == 0 and frame["frame_path"] == "000001.jpg"
    assert frame["tid"] == [1] and frame["tracked_ids"] == [1] and frame["tracked_time"] == [0]
    n = len(frame["tid"])
    for key in ("bbox", "smpl", "3d_joints", "2d_joints", "camera", "camera_bbox", "conf", "size",
                "class_name", "center", "scale", "tracked_bbox"):
        assert len(frame[key]) == n, key
    smpl = frame["smpl"][0]
    assert smpl["global_orient"].shape == (1, 3, 3) and smpl["global_orient"].dtype == np.float32
    assert smpl["body_pose"].shape == (23, 3, 3) and smpl["betas"].shape == (10,)
    assert frame["3d_joints"][0].shape == (45, 3) and frame["2d_joints"][0].shape == (90,)
    assert frame["size"][0] == [H, W] and frame["class_name"][0] == 0
    # back to PHALP's own numbers: the normalised joints and the [x0,y0,w,h] box of frame 0
    original = fake_detection_data(0, 0)
    np.testing.assert_allclose(frame["2d_joints"][0], original["2d_joints"], atol=0.02 / max(H, W))
    np.testing.assert_allclose(frame["bbox"][0], original["bbox"], atol=0.01)
    np.testing.assert_allclose(frame["camera"][0], original["camera"], atol=1e-5)
    assert data["000031.jpg"]["tid"] == [] and data["000031.jpg"]["smpl"] == []


def test_pickle_reads_like_a_pickle_parser_would(tmp_path):
    emitted, _ = run_video(scripted_engine(scene()), 35)
    path = write_phalp_pickle(native_result(emitted), tmp_path / "out.pkl")
    with open(path, "rb") as f:
        data = pickle.load(f)
    seen = {}
    for frame in data.values():
        for tid, conf, smpl, cam in zip(frame["tid"], frame["conf"], frame["smpl"], frame["camera"]):
            assert 0 < float(conf) <= 1 and cam.shape == (3,)
            assert {"global_orient", "body_pose", "betas"} <= set(smpl)
            seen[tid] = seen.get(tid, 0) + 1
    assert seen == {1: 19, 3: 20}


def test_pickle_appends_origin_for_44_joint_persons(tmp_path):
    person = hp.make_person(1, 0.9, [100, 50, 200, 300], np.full((44, 2), 10.0), np.zeros((44, 3)),
                            {"global_orient": np.eye(3)[None], "body_pose": np.tile(np.eye(3), (23, 1, 1)),
                             "betas": np.zeros(10)}, [0.0, 0.0, 50.0], [1.0, 0.0, 0.0], H, W)
    result = native_result([hp.FrameOut(0, [person])])
    with open(write_phalp_pickle(result, tmp_path / "img.pkl"), "rb") as f:
        frame = pickle.load(f)["000001.jpg"]
    assert frame["3d_joints"][0].shape == (45, 3) and frame["2d_joints"][0].shape == (90,)
    # the origin at zero translation offset projects to the image centre
    np.testing.assert_allclose(hp.joints_2d_to_pixels(frame["2d_joints"][0], H, W)[44], [W / 2, H / 2], atol=1e-3)


def test_pickle_refuses_results_without_smpl(tmp_path):
    landmark_only = {"track_id": 1, "score": 0.8, "bbox_xyxy": [0, 0, 10, 10],
                     "keypoints_2d": [[1, 1, 0.9]] * 33, "keypoints_3d": [[0, 0, 0]] * 33}
    result = native_result([hp.FrameOut(0, [landmark_only])])
    target = tmp_path / "mp.pkl"
    with pytest.raises(ValueError, match="no SMPL"):
        write_phalp_pickle(result, target)
    assert not target.exists()


def test_run_without_weights_prints_the_failing_stage_and_remedy(tmp_path):
    """Before: only `error: service fatal: load_failure: not retried (supervisor log: ...)`."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PYTHONPATH": REPO}
    env.pop("FVCORE_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "pose_service.cli", "run", "--demo", "--quiet",
                           "--out", str(tmp_path / "r.json"), "engine.name=hmr2_phalp", "engine.device=cpu",
                           f"state_dir={tmp_path / 'state'}"], env=env, capture_output=True, text=True,
                          timeout=240, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    assert "stage weights failed: load_failure" in proc.stderr
    assert "missing" in proc.stderr and "model_final_f05665.pkl" in proc.stderr
    assert "remedy:" in proc.stderr and "models verify" in proc.stderr


# ---------------------------------------------------------------------------------------------
# a CUDA out-of-memory inside the tracker step (PHALP's update edits the tracks before it fails)


class OutOfMemoryError(RuntimeError):
    """Named as torch.OutOfMemoryError: errors.is_cuda_oom goes by the class name."""


def retried_like_the_worker(engine: hp.HMR2PhalpEngine, index: int, frame: np.ndarray) -> list:
    """gpu_worker.main's infer_frame: a CUDA OOM retries the frame once; anything else ends the worker."""
    from gpu_worker.errors import is_cuda_oom

    try:
        return engine.push(index, index / 30, frame)
    except Exception as exc:
        if not is_cuda_oom(exc):
            raise
    return engine.push(index, index / 30, frame)


def test_an_oom_after_the_tracker_updated_is_never_applied_twice():
    """Before: the retry ran PHALP's update again on the already-updated tracker (hits jumped past
    n_init, so the back-fill of that person's earlier frames was skipped). Now the retry refuses the
    tracker, the worker dies as for a CUDA OOM and the replacement resumes from the stored frames."""
    from gpu_worker.errors import TrackerStateLost, classify

    engine = scripted_engine(scene())
    updates: list[int] = []
    real_update = FakeDeepSortTracker.update

    def update_then_oom(tracker, detections, frame_t, name, shot):
        updates.append(frame_t)
        real_update(tracker, detections, frame_t, name, shot)
        if frame_t == 3 and updates.count(3) == 1:
            raise OutOfMemoryError("CUDA out of memory (after the update)")

    engine.begin_video(W, H, 30.0)
    engine._phalp.tracker.update = lambda *a: update_then_oom(engine._phalp.tracker, *a)
    frame = np.zeros((H, W, 3), dtype=np.uint8)
    emitted = []
    for index in range(3):
        emitted += retried_like_the_worker(engine, index, frame)
    with pytest.raises(TrackerStateLost) as lost:
        retried_like_the_worker(engine, 3, frame)
    assert updates.count(3) == 1, "the tracker was updated twice for one frame"
    assert classify(lost.value, during_load=False)[0] == "cuda_oom"
    assert "frame 3" in str(lost.value)


def test_an_oom_before_the_tracker_is_retried_and_the_video_matches_an_uninterrupted_one():
    engine = scripted_engine(scene())
    describe, failed = engine.describe_frame, []

    def oom_once(bgr, seq, name):
        if seq == 3 and not failed:
            failed.append(seq)
            raise OutOfMemoryError("CUDA out of memory (in HMR2)")
        return describe(bgr, seq, name)

    engine.describe_frame = oom_once
    engine.begin_video(W, H, 30.0)
    frame = np.zeros((H, W, 3), dtype=np.uint8)
    emitted = []
    for index in range(35):
        emitted += retried_like_the_worker(engine, index, frame)
    emitted += engine.end_video()
    reference, _ = run_video(scripted_engine(scene()), 35)
    assert failed == [3]
    assert [[p["bbox_xyxy"] for p in f.persons] for f in emitted] == \
        [[p["bbox_xyxy"] for p in f.persons] for f in reference]


def test_a_new_video_trusts_a_fresh_tracker_again():
    engine = scripted_engine(scene())
    engine.begin_video(W, H, 30.0)
    engine._tracker_lost = "lost in the previous video"
    run_video(engine, 6)  # begin_video inside: a fresh tracker


@pytest.mark.parametrize("precision,device,facts_mb,expected", [
    ("auto", "cpu", None, "fp32"), ("bf16", "cpu", None, "bf16"), ("auto", "cuda", None, "fp32"),
    ("auto", "cuda", 24576, "fp32"), ("auto", "cuda", 8192, "fp16"), ("fp16", "cuda:1", 24576, "fp16"),
])
def test_precision_auto_is_fp16_only_on_a_card_too_small_for_fp32(precision, device, facts_mb, expected):
    from pose_common import memplan

    settings = hp.Settings.from_options({"precision": precision, "detector": "vitdet"})
    facts = None if facts_mb is None else memplan.card_facts(facts_mb)
    assert hp.resolve_precision(settings, device, read_facts=lambda d: facts) == expected
    with pytest.raises(ValueError, match="precision"):
        hp.Settings.from_options({"precision": "int8"})


# --- the texture sampler proves itself at load ---------------------------------------------------------
class RenderedNothing:
    """neural_renderer whose CUDA kernels never ran (built for another architecture): NMR prints and
    returns the depth map it started with, the far plane everywhere."""
    FAR = 100.0

    class Renderer:
        def __init__(self, **kwargs):
            self.size = kwargs["image_size"]

        def __call__(self, vertices, faces, mode, K, R, t):
            import torch
            return torch.full((vertices.shape[0], self.size, self.size), RenderedNothing.FAR)


class Rasterizes(RenderedNothing):
    """A renderer that does its job: projects with K and fills each covered pixel with its depth."""

    class Renderer(RenderedNothing.Renderer):
        def __call__(self, vertices, faces, mode, K, R, t):
            import torch
            depth = torch.full((1, self.size, self.size), RenderedNothing.FAR)
            corners = vertices[0, faces[0, 0].long()]
            pixels = (K[0] @ corners.T).T
            pixels = pixels[:, :2] / pixels[:, 2:3]
            ys, xs = torch.meshgrid(torch.arange(self.size) + 0.5, torch.arange(self.size) + 0.5, indexing="ij")
            inside = torch.ones_like(xs, dtype=torch.bool)
            for i in range(3):
                a, b = pixels[i], pixels[(i + 1) % 3]
                side = (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])
                inside &= side >= 0
            if not inside.any():  # the other winding
                inside = torch.ones_like(inside)
                for i in range(3):
                    a, b = pixels[i], pixels[(i + 1) % 3]
                    inside &= (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0]) <= 0
            depth[0][inside] = corners[:, 2].mean()
            return depth


def importing(module):
    return lambda name: module if name == "neural_renderer" else __import__(name)


def test_the_render_test_passes_a_renderer_that_draws_and_fails_one_whose_kernels_never_ran():
    torch = pytest.importorskip("torch")
    assert hp.texture_sampler_problem(torch.device("cpu"), importing(Rasterizes)) == ""
    why = hp.texture_sampler_problem(torch.device("cpu"), importing(RenderedNothing))
    assert "render test" in why and "depth 100" in why
    assert hp.texture_sampler_problem(None, importing(RenderedNothing)) == "", "no device yet: the import only"
    assert "in front of the triangle" in hp.depth_verdict(10.0, 10.0)


def test_a_cuda_rung_whose_renderer_draws_nothing_runs_hmar_and_says_so(monkeypatch):
    pytest.importorskip("torch")
    from cuda_shim import cuda_shim
    monkeypatch.setitem(sys.modules, "neural_renderer", RenderedNothing)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with cuda_shim(physical=1):
        engine = hp.HMR2PhalpEngine("cuda", {})
        next(stage for stage in engine.stages() if stage.name == "runtime").run()
        assert engine.appearance == "hmar"
        note = engine.describe()["appearance_note"]
    assert "render test" in note and "appearance=hmar" in note
    monkeypatch.setitem(sys.modules, "neural_renderer", Rasterizes)
    with cuda_shim(physical=1):
        engine = hp.HMR2PhalpEngine("cuda", {})
        next(stage for stage in engine.stages() if stage.name == "runtime").run()
        assert engine.appearance == "texture" and "appearance_note" not in engine.describe()
