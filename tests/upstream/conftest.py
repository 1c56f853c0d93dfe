"""The upstream tier: the hmr2_phalp engine against the real 4D-Humans, PHALP and detectron2 code,
on the CPU, with the synthetic cache of tests/upstream/synthetic.py. `make test-upstream` builds
its venv (.venv-upstream) from ../shared/upstream. Without ../shared every test here skips."""
from __future__ import annotations

from pathlib import Path

import pytest

from support import REPO

HERE = Path(__file__).resolve().parent

SHARED = REPO.parent / "shared"
CLIP = SHARED / "data" / "snowboard_k0z18lmds.mp4"
CUT_FRAMES = 24
# both sides of the comparison with PHALP's track(): a track unseen for 4 frames is deleted (50 by
# default, longer than the cut), so deletions and re-identifications happen within it
COMPARED = {"max_age_track": 4}
# without ../shared there is no upstream venv either: its modules (joblib, hmr2, phalp) cannot even be
# imported, so the tier is not collected at all (make test-upstream says why)
collect_ignore_glob = [] if SHARED.is_dir() else ["test_*.py"]


def pytest_collection_modifyitems(config, items):
    if SHARED.is_dir():
        return
    skip = pytest.mark.skip(reason=f"{SHARED} not found: the upstream tier needs ../shared "
                                   "(the pinned upstream sources and the test clip); a user's clone has none")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The synthetic cache; made first, because hmr2 and PHALP read $HOME when imported."""
    from synthetic import make_cache
    return make_cache(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def frames_dir(tmp_path_factory):
    """The first CUT_FRAMES frames of the shared clip as JPEGs (000001.jpg ...), as PHALP reads a folder."""
    import av
    import cv2

    folder = tmp_path_factory.mktemp("frames") / "snowboard"
    folder.mkdir()
    with av.open(str(CLIP)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= CUT_FRAMES:
                break
            cv2.imwrite(str(folder / f"{index + 1:06d}.jpg"), frame.to_ndarray(format="bgr24"))
    return folder


@pytest.fixture(scope="session")
def cut_clip(tmp_path_factory, frames_dir):
    """Those frames as a video file, for the service."""
    import av
    import cv2

    path = tmp_path_factory.mktemp("clips") / "snowboard_cut.mp4"
    images = sorted(frames_dir.glob("*.jpg"))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        first = cv2.imread(str(images[0]))
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for image in images:
            frame = av.VideoFrame.from_ndarray(cv2.imread(str(image)), format="bgr24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


POSE_PREDICTOR_SEED = 4321


@pytest.fixture(scope="session")
def seeded_pose_predictor(cache):
    """PHALP's Pose_transformer_v2.load_weights renames every "encoder." away, so its pose_shape_*
    layers keep their random initialisation (load_state_dict strict=False), in PHALP's own track() as
    in the engine. Both sides draw that initialisation with the same seed, whatever ran before."""
    import torch
    from phalp.models.predictor.pose_transformer_v2 import Pose_transformer_v2

    original = Pose_transformer_v2.__init__

    def seeded(self, *args, **kwargs):
        torch.manual_seed(POSE_PREDICTOR_SEED)
        original(self, *args, **kwargs)

    Pose_transformer_v2.__init__ = seeded
    yield
    Pose_transformer_v2.__init__ = original


@pytest.fixture(scope="session")
def reference_pickle(cache, frames_dir, tmp_path_factory, seeded_pose_predictor):
    """PHALP's own track() over the frames (tests/upstream/reference.py)."""
    from reference import run_track

    from gpu_worker.engines.hmr2_phalp import Settings
    return run_track(frames_dir, tmp_path_factory.mktemp("phalp_out"),
                     Settings.from_options(cache.options(**COMPARED)), cache.home)


def option_overrides(options: dict, prefix: str = "engine.options") -> list[str]:
    """Engine options as Hydra command-line overrides."""
    import json
    return [f"+{prefix}.{key}={json.dumps(value)}" for key, value in options.items()]


def run_on_frames(options: dict, frames_dir, count: int | None = None, device: str = "cpu",
                  prepare=None) -> tuple[list, object]:
    """An HMR2PhalpEngine (on the CPU unless a test's CUDA shim stands in for a GPU) fed the JPEGs PHALP
    reads (decoded the same way, cv2.imread), one at a time: (its frames out, the engine)."""
    import cv2

    from gpu_worker.engines.hmr2_phalp import HMR2PhalpEngine

    engine = HMR2PhalpEngine(device, options)
    for stage in engine.stages():
        stage.run()
    if prepare is not None:
        prepare(engine)  # a test's change to the loaded engine
    images = sorted(frames_dir.glob("*.jpg"))[:count]
    first = cv2.imread(str(images[0]))
    engine.begin_video(first.shape[1], first.shape[0], 30.0)
    out = []
    for index, image in enumerate(images):
        out += engine.push(index, index / 30.0, cv2.imread(str(image))[:, :, ::-1])
    out += engine.end_video()
    return out, engine
