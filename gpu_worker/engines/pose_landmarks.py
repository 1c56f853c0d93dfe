"""MediaPipe's pose landmark model run on a region the caller chooses, with no detector in front of it.

MediaPipe's video graph does this itself from one frame to the next: once it has the rider's landmarks,
it cuts the next frame around them and runs only the landmark model, whose pose flag says whether a
person is there. It loses him when that cut is wrong (he moved fast, or was lost for a frame) and then
needs its detector again, which misses a small or blurred rider. The second pass (roi.RiderSearch) uses
this class to cut where the rider's *track* says he is, and keeps the answer only when the model's own
flag and landmarks say a person is in this frame's pixels. It also runs the model on the square MediaPipe's
detector puts a person in (pose_detection.py), turned upright as the graph turns it.

The model is the file MediaPipe ships (modules/pose_landmark/pose_landmark_full.tflite), run by LiteRT
(the TFLite runtime on PyPI, with the same XNNPACK kernels as the graph: about 12 ms a call on 2 cores,
a third of OpenCV's TFLite importer). What the graph does around it, done here the same way: a square cut
(on the track unturned: a rider is upright enough in the frames the track follows), scaled to 256 px,
values in [0, 1]; landmarks in the cut's pixels, mapped back through the cut's turn; visibility as a logit
(sigmoid); the pose flag already a probability; world landmarks turned back into the camera's axes."""
from __future__ import annotations

import math

import numpy as np

from gpu_worker.engines.base import Person

INPUT_PX = 256
BODY_LANDMARKS = 33  # the model gives 39: the 33 named, then 6 the graph uses to place the next cut
LANDMARK_VALUES, WORLD_VALUES = 5, 3  # x, y, z, visibility, presence / x, y, z
DEFAULT_MIN_FLAG = 0.5  # as the graph's min_tracking_confidence
LANDMARKS, FLAG, WORLD = "Identity", "Identity_1", "Identity_4"  # the model's output tensors
THREADS = 2


class LandmarkModel:
    def __init__(self, path: str, min_flag: float = DEFAULT_MIN_FLAG, min_score: float = 0.0):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path, num_threads=THREADS)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.outputs = {o["name"]: o["index"] for o in self.interpreter.get_output_details()}
        self.min_flag = min_flag
        self.min_score = min_score

    def person_at(self, rgb: np.ndarray, box: list[float], grow: float, turn: float = 0.0) -> list[Person]:
        """The person the model finds in a square `grow` times the box's longer side, centred on it and
        turned by `turn` (see `upright`), if its flag and mean visibility reach their minimums; in frame
        pixels."""
        x0, y0, x1, y1 = box
        return self.person_in(rgb, ((x0 + x1) / 2, (y0 + y1) / 2), max(x1 - x0, y1 - y0) * grow, turn)

    def person_in(self, rgb: np.ndarray, centre: tuple[float, float], side: float, turn: float) -> list[Person]:
        """The person the model finds in the square of `side` px on `centre`, turned by `turn`, if its
        flag and mean visibility reach their minimums; in frame pixels."""
        if side < 1:
            return []
        matrix = to_cut(centre, side, turn)
        landmarks, flag, world = self.run(cut(rgb, matrix))
        if flag < self.min_flag:
            return []
        person = to_person(landmarks, turned(world, -turn), matrix, rgb.shape[1], rgb.shape[0])
        return [person] if person["score"] >= self.min_score else []

    def run(self, square: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """(39 x 5 landmarks in the cut's pixels, pose flag, 39 x 3 world landmarks in metres)."""
        self.interpreter.set_tensor(self.input, (square.astype(np.float32) / 255.0)[None])
        self.interpreter.invoke()
        landmarks, flag, world = (self.interpreter.get_tensor(self.outputs[name])
                                  for name in (LANDMARKS, FLAG, WORLD))
        return (landmarks.reshape(-1, LANDMARK_VALUES), float(flag.reshape(-1)[0]),
                world.reshape(-1, WORLD_VALUES))


def cut(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The square `matrix` (to_cut) maps to the model's input, INPUT_PX x INPUT_PX (black beyond the frame)."""
    import cv2

    return cv2.warpAffine(rgb, matrix, (INPUT_PX, INPUT_PX), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def to_cut(centre: tuple[float, float], side: float, turn: float) -> np.ndarray:
    """The 2x3 affine matrix from frame pixels to the model's input: the square of `side` px on `centre`,
    turned by `turn` radians (image coordinates, y down)."""
    scale = INPUT_PX / side
    cos, sin = scale * math.cos(turn), scale * math.sin(turn)
    return np.array([[cos, -sin, INPUT_PX / 2 - cos * centre[0] + sin * centre[1]],
                     [sin, cos, INPUT_PX / 2 - sin * centre[0] - cos * centre[1]]], dtype=np.float64)


def upright(bottom: np.ndarray, top: np.ndarray) -> float:
    """The turn (radians, as to_cut takes it) that puts `top` straight above `bottom` in the cut: the
    graph's rotation of its square, from two points of the person (image coordinates, y down)."""
    up = top - bottom
    return normalised(-math.pi / 2 - math.atan2(float(up[1]), float(up[0])))


def turned(world: np.ndarray, turn: float) -> np.ndarray:
    """World landmarks turned about the camera's axis (the cut's turn undone, as the graph does)."""
    if turn == 0.0:
        return world
    cos, sin = math.cos(turn), math.sin(turn)
    out = world.copy()
    out[:, 0], out[:, 1] = cos * world[:, 0] - sin * world[:, 1], sin * world[:, 0] + cos * world[:, 1]
    return out


def normalised(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def to_person(landmarks: np.ndarray, world: np.ndarray, matrix: np.ndarray, width: int, height: int) -> Person:
    """The model's output in the cut `matrix` made, as the engine's Person in frame pixels (the same
    fields as the graph's)."""
    import cv2

    body = landmarks[:BODY_LANDMARKS]
    frame_points = cv2.transform(body[None, :, :2].astype(np.float64), cv2.invertAffineTransform(matrix))[0]
    xs, ys = frame_points[:, 0], frame_points[:, 1]
    visibility = 1.0 / (1.0 + np.exp(-body[:, 3]))
    bbox = [max(0.0, float(xs.min())), max(0.0, float(ys.min())),
            min(float(width), float(xs.max())), min(float(height), float(ys.max()))]
    return {
        "track_id": 1,
        "score": round(float(visibility.mean()), 4),
        "bbox_xyxy": [round(v, 2) for v in bbox],
        "keypoints_2d": [[round(float(x), 2), round(float(y), 2), round(float(v), 4)]
                         for x, y, v in zip(xs, ys, visibility)],
        "keypoints_3d": [[round(float(x), 5), round(float(y), 5), round(float(z), 5)]
                         for x, y, z in world[:BODY_LANDMARKS]],
    }
