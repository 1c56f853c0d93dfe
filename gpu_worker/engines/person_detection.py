"""A detector made for persons, for the second pass (roi.RiderSearch): the SSD MobileNetV2 that MediaPipe's
Objectron graph runs for its 2D boxes (trained on 23 Open Images V4 classes, "Person" among them), run by
LiteRT, its person class only.

Why a second detector: MediaPipe's pose detector finds a person by his face and upper body, and on the
generated set (bench/recall_set.py) it misses a rider blurred by his speed (the landmark model alone,
once placed on him, is sure of him) and lets the video graph draw a body five times the rider's size
over drawn pines. This one was trained on whole persons' boxes: in a region about four times the blurred
rider's size it scored him 0.45-0.63 on every frame the second pass had missed, and on a square 1.5
times the first pass's person it put a person on him (IoU >= 0.3) for 83-100% of the riders the graph
found and for 8% of the bodies over the pines.

The weights ship inside a registry package: `@mediapipe/objectron` on npm (Apache-2.0) packs them in
objectron_solution_packed_assets.data, with a table of where each file lies in its loader script.
`install` (run by `make install`: `python -m gpu_worker.engines.person_detection install`) takes the
package with npm, cuts the model and its label map out, checks the model's sha256 (the one MediaPipe's
own build pins) and writes both beside the Python that runs the service. Nothing downloads at run time;
without the file the second pass runs without this detector and says so (`describe()`).

What the graph does (mediapipe/modules/objectron/object_detection_oid_v4_cpu.pbtxt), done here the same
way: the image stretched to 300 x 300, values in [-1, 1]; 1917 SSD anchors over 6 layers (strides 16 to
512, scales 0.2 to 0.95, aspect ratios 1, 2, 1/2, 3, 1/3 and one between two scales; 3 anchors a cell on
the first layer); boxes as centre offsets scaled by 10 and log sizes scaled by 5; a sigmoid on each
class's logit; suppression at IoU 0.5."""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from gpu_worker.engines.roi import box_iou

NPM_PACKAGE = "@mediapipe/objectron@0.4.1675468480"
PACKED_DATA = "package/objectron_solution_packed_assets.data"
PACKED_TABLE = "package/objectron_solution_packed_assets_loader.js"
MODEL_FILE = "object_detection_ssd_mobilenetv2_oidv4_fp16.tflite"
LABELS_FILE = "object_detection_oidv4_labelmap.txt"
# as mediapipe's third_party/external_files.bzl pins it
MODEL_SHA256 = "d0a5255bf8c4f5a0bc4240741a76c41d5e939f7655078f945f50ab53a9375da6"
PERSON_LABEL = "Person"

INPUT_PX = 300
LAYERS, MIN_SCALE, MAX_SCALE = 6, 0.2, 0.95
STRIDES = (16, 32, 64, 128, 256, 512)
ASPECT_RATIOS = (1.0, 2.0, 0.5, 3.0, 0.3333)
FIRST_LAYER = ((1.0, 0.1), (2.0, None), (0.5, None))  # (aspect ratio, scale; None: the layer's)
CENTRE_SCALE, SIZE_SCALE = 10.0, 5.0
NMS_IOU = 0.5
THREADS = 2


def default_dir() -> Path:
    """Where `install` puts the model: beside the Python that runs the service (its venv)."""
    return Path(sys.prefix) / "share" / "pose-service"


@dataclass(frozen=True)
class PersonBox:
    score: float
    box: list[float]  # x0, y0, x1, y1 in the image's pixels


def layer_scale(layer: int) -> float:
    return MIN_SCALE + (MAX_SCALE - MIN_SCALE) * layer / (LAYERS - 1)


def layer_anchor_shapes(layer: int) -> list[tuple[float, float]]:
    """(width, height) of each anchor of a cell on `layer`, normalised, in the model's order."""
    if layer == 0:
        pairs = [(ratio, layer_scale(0) if scale is None else scale) for ratio, scale in FIRST_LAYER]
    else:
        following = 1.0 if layer == LAYERS - 1 else layer_scale(layer + 1)
        pairs = [(ratio, layer_scale(layer)) for ratio in ASPECT_RATIOS]
        pairs.append((1.0, math.sqrt(layer_scale(layer) * following)))
    return [(scale * math.sqrt(ratio), scale / math.sqrt(ratio)) for ratio, scale in pairs]


@lru_cache(maxsize=1)
def anchors() -> np.ndarray:
    """The 1917 anchors as (x centre, y centre, width, height), normalised, in the model's output order
    (layer by layer, row by row, each cell's anchors together)."""
    rows = []
    for layer, stride in enumerate(STRIDES):
        cells = math.ceil(INPUT_PX / stride)
        shapes = layer_anchor_shapes(layer)
        for y in range(cells):
            for x in range(cells):
                rows += [((x + 0.5) / cells, (y + 0.5) / cells, w, h) for w, h in shapes]
    return np.asarray(rows, dtype=np.float32)


class PersonDetector:
    def __init__(self, directory: Path):
        from ai_edge_litert.interpreter import Interpreter

        self.person_class = person_class(directory / LABELS_FILE)
        self.interpreter = Interpreter(model_path=str(directory / MODEL_FILE), num_threads=THREADS)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        outputs = {o["name"]: o["index"] for o in self.interpreter.get_output_details()}
        self.boxes, self.classes = outputs["raw_outputs/box_encodings"], outputs["raw_outputs/class_predictions"]

    def persons(self, rgb: np.ndarray, min_score: float) -> list[PersonBox]:
        """The persons in the image at `min_score` or more, surest first, none overlapping a surer one by
        more than NMS_IOU."""
        height, width = rgb.shape[:2]
        self.interpreter.set_tensor(self.input, model_input(rgb)[None])
        self.interpreter.invoke()
        logits = self.interpreter.get_tensor(self.classes)[0, :, self.person_class].astype(np.float64)
        scores = 1 / (1 + np.exp(-logits))
        keep = np.flatnonzero(scores >= min_score)
        if not len(keep):
            return []
        boxes = decoded(self.interpreter.get_tensor(self.boxes)[0][keep], anchors()[keep])
        boxes *= np.array([width, height, width, height], dtype=np.float32)
        return suppressed([PersonBox(float(scores[i]), [round(float(v), 2) for v in box])
                           for i, box in zip(keep, boxes)])


def model_input(rgb: np.ndarray) -> np.ndarray:
    import cv2

    resized = cv2.resize(rgb, (INPUT_PX, INPUT_PX), interpolation=cv2.INTER_LINEAR)
    return resized.astype(np.float32) / 127.5 - 1.0


def decoded(raw: np.ndarray, anchor_rows: np.ndarray) -> np.ndarray:
    """Raw box encodings (y, x, h, w) as boxes (x0, y0, x1, y1), normalised."""
    x = raw[:, 1] / CENTRE_SCALE * anchor_rows[:, 2] + anchor_rows[:, 0]
    y = raw[:, 0] / CENTRE_SCALE * anchor_rows[:, 3] + anchor_rows[:, 1]
    w = np.exp(raw[:, 3] / SIZE_SCALE) * anchor_rows[:, 2]
    h = np.exp(raw[:, 2] / SIZE_SCALE) * anchor_rows[:, 3]
    return np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], axis=1)


def suppressed(found: list[PersonBox]) -> list[PersonBox]:
    kept: list[PersonBox] = []
    for candidate in sorted(found, key=lambda person: -person.score):
        if all(box_iou(candidate.box, other.box) <= NMS_IOU for other in kept):
            kept.append(candidate)
    return kept


def person_class(labels: Path) -> int:
    names = labels.read_text().splitlines()
    if PERSON_LABEL not in names:
        raise ValueError(f"{labels} has no {PERSON_LABEL!r} class")
    return names.index(PERSON_LABEL)


def installed(directory: Optional[Path] = None) -> Optional[Path]:
    """The directory holding the model and its label map, or None where `install` has not run."""
    directory = directory or default_dir()
    return directory if (directory / MODEL_FILE).is_file() and (directory / LABELS_FILE).is_file() else None


def packed_files(table_js: str) -> dict[str, tuple[int, int]]:
    """The loader script's table: each packed file's name (its last path part) -> (start, end) bytes."""
    entries = re.findall(r'"filename":\s*"([^"]+)",\s*"start":\s*(\d+),\s*"end":\s*(\d+)', table_js)
    return {name.rsplit("/", 1)[-1]: (int(start), int(end)) for name, start, end in entries}


def unpacked(tarball: Path) -> dict[str, bytes]:
    """The model and its label map, cut from the npm package's packed data; the model's hash checked."""
    with tarfile.open(tarball) as archive:
        table, data = (archive.extractfile(name) for name in (PACKED_TABLE, PACKED_DATA))
        if table is None or data is None:
            raise ValueError(f"{tarball} lacks {PACKED_TABLE} or {PACKED_DATA}")
        where, packed = packed_files(table.read().decode()), data.read()
    files = {}
    for name in (MODEL_FILE, LABELS_FILE):
        if name not in where:
            raise ValueError(f"{name} is not in {tarball}'s packed data")
        start, end = where[name]
        files[name] = packed[start:end]
    digest = hashlib.sha256(files[MODEL_FILE]).hexdigest()
    if digest != MODEL_SHA256:
        raise ValueError(f"{MODEL_FILE} from {tarball} has sha256 {digest}, not {MODEL_SHA256}")
    return files


def install(directory: Path, tarball: Optional[Path] = None) -> Path:
    """Writes the model and its label map into `directory` (each through a temporary file), from
    `tarball` or from the package npm fetches from its registry."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = unpacked(tarball or npm_pack(Path(tmp)))
    for name, content in files.items():
        part = directory / (name + ".part")
        part.write_bytes(content)
        os.replace(part, directory / name)
    person_class(directory / LABELS_FILE)
    return directory


def npm_pack(into: Path) -> Path:
    try:
        done = subprocess.run(["npm", "pack", NPM_PACKAGE, "--pack-destination", str(into), "--silent"],
                              capture_output=True, text=True, timeout=600, check=False)
    except FileNotFoundError:
        raise SystemExit("npm not found: the person detector's weights come from the npm registry "
                         f"({NPM_PACKAGE}); install Node.js, or pass --tarball") from None
    if done.returncode != 0:
        raise SystemExit(f"npm pack {NPM_PACKAGE} failed: {done.stderr.strip()[-500:]}")
    return into / done.stdout.strip().splitlines()[-1]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_worker.engines.person_detection")
    parser.add_argument("verb", choices=("install",))
    parser.add_argument("--dir", type=Path, default=None, help="default: <sys.prefix>/share/pose-service")
    parser.add_argument("--tarball", type=Path, default=None, help=f"an `npm pack {NPM_PACKAGE}` already made")
    args = parser.parse_args(argv)
    directory = args.dir or default_dir()
    if args.tarball is None and installed(directory):
        print(f"person detector already in {directory}")
        return 0
    print(f"person detector installed in {install(directory, args.tarball)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
