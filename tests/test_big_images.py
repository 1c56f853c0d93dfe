"""Issue 18 item 4, big images cost little: an image inside the pixel limit is reduced to the engine's
working size (engine.image_max_side) before the engine and its second pass see it, and the persons come
back in the original image's pixels. A 7000x7000 JPEG to /pose/hybrid answers 200 with the person where
it is in the big image, the worker's peak RSS rises by less than 300 MB over a small image's, and the
worker does not die."""
from __future__ import annotations

import base64
import tracemalloc

import numpy as np
import pytest

from gpu_worker.images import EngineImage, decode_for_engine, jpeg_reduction, to_original

from support import PHOTO, Served, http, needs_shared_data

BIG = 7000
SCALE, OFFSET = 4, (1200, 300)  # the photo, 4x, at this place in the big image
MAX_RSS_RISE = 300 << 20


def jpeg(bgr: np.ndarray, quality: int = 90) -> bytes:
    import cv2
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def big_image_with_the_photo() -> bytes:
    import cv2
    photo = cv2.imread(str(PHOTO))
    canvas = np.full((BIG, BIG, 3), 128, dtype=np.uint8)
    scaled = cv2.resize(photo, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_LINEAR)
    x, y = OFFSET
    canvas[y:y + scaled.shape[0], x:x + scaled.shape[1]] = scaled
    return jpeg(canvas)


def test_a_big_jpeg_is_decoded_reduced_without_the_full_image_in_memory():
    data = jpeg(np.random.default_rng(0).integers(0, 255, (BIG, BIG // 2, 3), dtype=np.uint8), quality=50)
    assert jpeg_reduction(data, BIG // 2, BIG, 1920) == 2
    tracemalloc.start()
    image = decode_for_engine(data, 50_000_000, 1920)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (image.width, image.height) == (BIG // 2, BIG) and max(image.rgb.shape[:2]) == 1920
    assert peak < 60 << 20  # the whole image as RGB would be 73 MB; half of it decoded is 18 MB


def test_small_images_and_other_formats_keep_their_size_or_are_shrunk():
    import cv2
    small = decode_for_engine(jpeg(np.zeros((360, 640, 3), np.uint8)), 50_000_000, 1920)
    assert small.rgb.shape == (360, 640, 3) and small.scale == 1.0
    ok, png = cv2.imencode(".png", np.zeros((3000, 4000, 3), np.uint8))
    shrunk = decode_for_engine(png.tobytes(), 50_000_000, 1000)
    assert shrunk.rgb.shape == (750, 1000, 3) and (shrunk.width, shrunk.height) == (4000, 3000)
    with pytest.raises(ValueError):
        decode_for_engine(b"not an image", 50_000_000, 1920)


def test_a_photo_turned_by_its_exif_orientation_keeps_the_turned_size_reduced_or_not():
    import io

    from PIL import Image
    picture = Image.fromarray(np.zeros((3000, 5000, 3), np.uint8))
    exif = picture.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display", as phones write it
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", exif=exif.tobytes())
    reduced = decode_for_engine(buffer.getvalue(), 50_000_000, 1920)
    whole = decode_for_engine(buffer.getvalue(), 50_000_000, 8000)
    assert (reduced.width, reduced.height) == (whole.width, whole.height) == (3000, 5000)
    assert reduced.rgb.shape == (1920, 1152, 3) and whole.rgb.shape == (5000, 3000, 3)


def nobody_image() -> bytes:
    """7000x7000 with nobody in it: the first look finds nobody, so the second pass searches it all."""
    import cv2
    noise = np.random.default_rng(0).integers(90, 160, (BIG // 8, BIG // 8, 3), dtype=np.uint8)
    return jpeg(cv2.resize(noise, (BIG, BIG), interpolation=cv2.INTER_LINEAR))


def test_persons_found_in_the_reduced_image_are_mapped_to_the_original_pixels():
    image = EngineImage(np.zeros((500, 1000, 3), np.uint8), 4000, 2000)
    person = {"score": 0.9, "bbox_xyxy": [10, 20, 110, 220], "keypoints_2d": [[50.0, 60.0, 0.8], [None, 5.0, 0.1]],
              "keypoints_3d": [[0.1, 0.2, 0.3]]}
    [mapped] = to_original([person], image)
    assert mapped["bbox_xyxy"] == [40, 80, 440, 880]
    assert mapped["keypoints_2d"] == [[200.0, 240.0, 0.8], [None, 20.0, 0.1]]
    assert mapped["keypoints_3d"] == person["keypoints_3d"] and person["bbox_xyxy"] == [10, 20, 110, 220]


def peak_rss_after(pid: int, request) -> tuple[int, object]:
    """VmHWM of the worker over one request, from a reset peak (Linux: clear_refs 5)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the worker's peak RSS through /proc/{pid}/clear_refs: {exc}")
    answer = request()
    with open(f"/proc/{pid}/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return hwm << 10, answer


def hybrid(url: str, image: bytes):
    return http("POST", url + "/pose/hybrid", {"image_base64": base64.b64encode(image).decode(), "frame_number": 1},
                timeout=120)


@needs_shared_data()
def test_a_7000_pixel_jpeg_answers_in_original_pixels_at_little_memory_cost(tmp_path):
    big = big_image_with_the_photo()
    served = Served(tmp_path, ["engine.name=mediapipe", "probe.enabled=false"])
    try:
        served.wait_ready()
        pid = served.diagnostics()["worker"]["pid"]
        small_peak, (status, small) = peak_rss_after(pid, lambda: hybrid(served.url, PHOTO.read_bytes()))
        assert status == 200 and small["keypoints"], small
        big_peak, (status, answer) = peak_rss_after(pid, lambda: hybrid(served.url, big))
        assert status == 200 and answer["keypoints"], answer
        assert (answer["frame_width"], answer["frame_height"]) == (BIG, BIG)
        expected = np.array([[kp["x"] * SCALE + OFFSET[0], kp["y"] * SCALE + OFFSET[1]] for kp in small["keypoints"]])
        found = np.array([[kp["x"], kp["y"]] for kp in answer["keypoints"]])
        seen = np.array([kp["confidence"] > 0.8 for kp in small["keypoints"]])
        error = np.linalg.norm(found[seen] - expected[seen], axis=1)
        assert np.median(error) < 0.01 * 1600 * SCALE, error  # within 1% of the person's height
        x0, y0, x1, y1 = answer["bbox"]
        assert OFFSET[0] <= x0 < x1 <= OFFSET[0] + 1068 * SCALE and OFFSET[1] <= y0 < y1 <= OFFSET[1] + 1600 * SCALE
        print(f"worker peak RSS: small image {small_peak >> 20} MB, 7000x7000 JPEG {big_peak >> 20} MB")
        assert big_peak - small_peak < MAX_RSS_RISE, (small_peak >> 20, big_peak >> 20)
        # the costliest case before: nobody found, so the second pass enlarged regions of the whole image
        empty_peak, (status, empty) = peak_rss_after(pid, lambda: hybrid(served.url, nobody_image()))
        print(f"worker peak RSS: 7000x7000 JPEG with nobody in it {empty_peak >> 20} MB")
        assert status == 200 and empty["keypoints"] == [] and empty["frame_width"] == BIG
        assert empty_peak - small_peak < MAX_RSS_RISE, (small_peak >> 20, empty_peak >> 20)
        diagnostics = served.diagnostics()
        assert diagnostics["worker"]["pid"] == pid and not diagnostics.get("crashes"), diagnostics.get("crashes")
    finally:
        served.stop()
