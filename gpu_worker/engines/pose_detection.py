"""MediaPipe's pose detector run by LiteRT, read as MediaPipe's graph reads it, for the second pass's
regions (roi.RiderSearch): the detector on a region, then the landmark model on the square the detection
puts the person in (pose_landmarks.LandmarkModel).

The graph does the same for each image, but each region through it cost about 40 ms on 2 cores, most
of it the graph's own work around two models that take 8 and 12 ms here; a region with nobody in it now
costs the detector alone.

What the graph does, done here the same way (mediapipe/modules/pose_detection and pose_landmark): the
image letterboxed to 224 px, values in [-1, 1]; 2254 SSD anchors of fixed size on grids of stride 8, 16
and 32 (2, 2 and 6 anchors a cell); each anchor's box and 4 keypoints as offsets scaled by 224, its score
a logit; detections above the minimum score merged by weighted non-maximum suppression (IoU 0.3). The
person's square: centred on keypoint 0 (the hips' centre), twice its distance to keypoint 1 (above the
head) times 1.25, turned so that keypoint 1 is straight above keypoint 0."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from gpu_worker.engines.pose_landmarks import upright

INPUT_PX = 224
STRIDES_AND_ANCHORS = ((8, 2), (16, 2), (32, 6))  # the graph's 5 layers: strides 8, 16, 32, 32, 32
RAW_SCORE_CLIP = 100.0
NMS_IOU = 0.3
ROI_SCALE = 1.25
HIPS, ABOVE_HEAD = 0, 1  # the detection's keypoints the person's square is placed by
THREADS = 2


# The model's raw boxes (anchors x 12) and scores (anchors), the letterbox's scale and padding (letterboxed).
Outputs = tuple[np.ndarray, np.ndarray, float, tuple[float, float]]


@dataclass(frozen=True)
class Detection:
    score: float
    keypoints: np.ndarray  # 4 x 2, image pixels

    def square(self) -> tuple[tuple[float, float], float, float]:
        """(centre, side, turn) of the square the graph runs the landmark model on, in image pixels; turn
        in radians, as pose_landmarks.to_cut takes it."""
        hips, above = self.keypoints[HIPS], self.keypoints[ABOVE_HEAD]
        side = 2 * float(np.hypot(*(above - hips))) * ROI_SCALE
        return (float(hips[0]), float(hips[1])), side, upright(hips, above)


@lru_cache(maxsize=1)
def anchor_centres() -> np.ndarray:
    """The 2254 anchors' centres, normalised, in the model's output order (row by row, each cell's
    anchors together); fixed-size anchors are 1 x 1."""
    centres = []
    for stride, per_cell in STRIDES_AND_ANCHORS:
        cells = INPUT_PX // stride
        ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


class PoseDetector:
    def __init__(self, path: str, min_score: float):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path, num_threads=THREADS)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        outputs = {o["name"]: o["index"] for o in self.interpreter.get_output_details()}
        self.boxes, self.scores = outputs["Identity"], outputs["Identity_1"]
        self.min_score = min_score
        self.last: tuple[np.ndarray, Outputs] | None = None

    def best(self, rgb: np.ndarray, min_score: float | None = None) -> Detection | None:
        """The most confident person in the image (merged with the detections that overlap him), or
        None when no anchor reaches the minimum score (`min_score`, else the detector's)."""
        raw, scores, scale, pad = self.outputs_for(rgb)
        keep = scores >= (self.min_score if min_score is None else min_score)
        if not keep.any():
            return None
        boxes, keypoints = decoded(raw[keep], anchor_centres()[keep])
        points, score = weighted_best(boxes, keypoints, scores[keep])
        in_image = (points * INPUT_PX - np.asarray(pad, dtype=np.float32)) / scale
        return Detection(score, in_image)

    def outputs_for(self, rgb: np.ndarray) -> Outputs:
        """The model's raw boxes and scores for the image, with the letterbox's scale and padding; the
        last image's again when it is given the same pixels (the second pass tries a region once more at a
        lower minimum score)."""
        if self.last is not None and np.array_equal(self.last[0], rgb):
            return self.last[1]
        tensor, scale, pad = letterboxed(rgb)
        self.interpreter.set_tensor(self.input, tensor[None])
        self.interpreter.invoke()
        raw = self.interpreter.get_tensor(self.boxes)[0]
        logits = self.interpreter.get_tensor(self.scores)[0, :, 0].astype(np.float64)
        scores = 1 / (1 + np.exp(-np.clip(logits, -RAW_SCORE_CLIP, RAW_SCORE_CLIP)))
        outputs = (raw, scores, scale, pad)
        self.last = (rgb.copy(), outputs)
        return outputs


def letterboxed(rgb: np.ndarray) -> tuple[np.ndarray, float, tuple[float, float]]:
    """The image scaled to fit 224 x 224 (its aspect kept, centred, black around it), in [-1, 1]; the
    scale, and the padding (left, top) in input pixels."""
    import cv2

    height, width = rgb.shape[:2]
    scale = INPUT_PX / max(width, height)
    pad = ((INPUT_PX - width * scale) / 2, (INPUT_PX - height * scale) / 2)
    matrix = np.array([[scale, 0, pad[0] - 0.5 + 0.5 * scale], [0, scale, pad[1] - 0.5 + 0.5 * scale]])
    square = cv2.warpAffine(rgb, matrix, (INPUT_PX, INPUT_PX), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return square.astype(np.float32) / 127.5 - 1.0, scale, pad


def decoded(raw: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw anchor outputs as (boxes N x 4 as x0, y0, x1, y1, keypoints N x 4 x 2), normalised to the input."""
    centre = raw[:, 0:2] / INPUT_PX + centres
    half = raw[:, 2:4] / INPUT_PX / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    keypoints = raw[:, 4:12].reshape(-1, 4, 2) / INPUT_PX + centres[:, None, :]
    return boxes, keypoints


def weighted_best(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, float]:
    """The top-scoring detection's keypoints averaged (by score) with those of the detections whose boxes
    overlap its box by more than NMS_IOU, as the graph's weighted suppression does; its own score."""
    top = int(np.argmax(scores))
    overlaps = iou(boxes[top], boxes) > NMS_IOU
    overlaps[top] = True
    weights = scores[overlaps] / scores[overlaps].sum()
    return (keypoints[overlaps] * weights[:, None, None]).sum(axis=0), float(scores[top])


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """roi.box_iou of one box against many at once (the detector's hundreds of anchors)."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
