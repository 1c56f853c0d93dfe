"""MediaPipe's pose landmark model run on a region the caller chooses, with no detector in front of it.

MediaPipe's video graph does this itself from one frame to the next: once it has the rider's landmarks,
it cuts the next frame around them and runs only the landmark model, whose pose flag says whether a
person is there. It loses him when that cut is wrong (he moved fast, or was lost for a frame) and then
needs its detector again, which misses a small or blurred rider. The second pass (roi.RiderSearch) uses
this class to cut where the rider's *track* says he is, and keeps the answer only when the model's own
flag and landmarks say a person is in this frame's pixels.

The model is the file MediaPipe ships (modules/pose_landmark/pose_landmark_full.tflite), read by
OpenCV's TFLite importer. What the graph does around it, done here the same way: a square cut, no
rotation (the graph turns the cut upright by the hips and shoulders; a rider is upright enough in the
frames the track follows), scaled to 256 px, values in [0, 1]; landmarks in the cut's pixels; visibility
as a logit (sigmoid); the pose flag already a probability."""
from __future__ import annotations

import numpy as np

from gpu_worker.engines.base import Person

INPUT_PX = 256
BODY_LANDMARKS = 33  # the model gives 39: the 33 named, then 6 the graph uses to place the next cut
LANDMARK_VALUES, WORLD_VALUES = 5, 3  # x, y, z, visibility, presence / x, y, z
DEFAULT_MIN_FLAG = 0.5  # as the graph's min_tracking_confidence


class LandmarkModel:
    def __init__(self, path: str, min_flag: float = DEFAULT_MIN_FLAG, min_score: float = 0.0):
        import cv2

        self.net = cv2.dnn.readNetFromTFLite(path)
        self.outputs = self.net.getUnconnectedOutLayersNames()
        self.min_flag = min_flag
        self.min_score = min_score

    def person_at(self, rgb: np.ndarray, box: list[float], grow: float) -> list[Person]:
        """The person the model finds in a square `grow` times the box's longer side, centred on it, if
        its flag and mean visibility reach their minimums; in frame pixels."""
        x0, y0, x1, y1 = box
        side = max(x1 - x0, y1 - y0) * grow
        if side < 1:
            return []
        centre = ((x0 + x1) / 2, (y0 + y1) / 2)
        landmarks, flag, world = self.run(cut_square(rgb, centre, side))
        if flag < self.min_flag:
            return []
        person = to_person(landmarks, world, centre, side, rgb.shape[1], rgb.shape[0])
        return [person] if person["score"] >= self.min_score else []

    def run(self, square: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """(39 x 5 landmarks in the cut's pixels, pose flag, 39 x 3 world landmarks in metres)."""
        blob = square.astype(np.float32).transpose(2, 0, 1)[None] / 255.0
        self.net.setInput(blob)
        landmarks, flag, _segmentation, _heatmap, world = self.net.forward(self.outputs)
        return (landmarks.reshape(-1, LANDMARK_VALUES), float(flag.reshape(-1)[0]),
                world.reshape(-1, WORLD_VALUES))


def cut_square(rgb: np.ndarray, centre: tuple[float, float], side: float) -> np.ndarray:
    """The square of `side` px centred on `centre`, as INPUT_PX x INPUT_PX (black beyond the frame)."""
    import cv2

    scale = INPUT_PX / side
    shift_x, shift_y = INPUT_PX / 2 - scale * centre[0], INPUT_PX / 2 - scale * centre[1]
    matrix = np.array([[scale, 0.0, shift_x], [0.0, scale, shift_y]], dtype=np.float32)
    return cv2.warpAffine(rgb, matrix, (INPUT_PX, INPUT_PX), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def to_person(landmarks: np.ndarray, world: np.ndarray, centre: tuple[float, float], side: float,
              width: int, height: int) -> Person:
    """The model's output as the engine's Person, in frame pixels (the same fields as the graph's)."""
    back = side / INPUT_PX
    body = landmarks[:BODY_LANDMARKS]
    xs = (body[:, 0] - INPUT_PX / 2) * back + centre[0]
    ys = (body[:, 1] - INPUT_PX / 2) * back + centre[1]
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
