"""Issue: drop-in, item 6 (find the rider). When the CPU engine finds nobody, a second pass looks where
the rider was and then in enlarged tiles. Tested two ways: the region logic with a detector simple
enough to know the right answer (a bright square found by thresholding), and the real MediaPipe
engine on the shared clip, whose first pass misses 7 of 122 frames."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_worker.engines.roi import (
    FOLLOW_FRAMES,
    FOLLOW_GROWS,
    PROVEN_MIN_SCORE,
    WHOLE_LOOK_GROWS,
    CutDetector,
    Region,
    RiderSearch,
    around,
    centre_crops,
    closer,
    tiles,
    wide,
)

from support import CLIP, needs_shared_data


def bright_square_detector(rgb: np.ndarray, min_px: int = 12) -> list[dict]:
    """A 'person' is the bounding box of the white pixels, seen only when at least `min_px` tall in the
    image it is given (as a small rider is too small for a detector until enlarged)."""
    ys, xs = np.nonzero(rgb[:, :, 0] > 200)
    if len(ys) == 0 or ys.max() - ys.min() + 1 < min_px:
        return []
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    return [{"track_id": 1, "score": 0.9, "bbox_xyxy": box,
             "keypoints_2d": [[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 1.0]]}]


def frame_with_square(x: int, y: int, side: int, width: int = 640, height: int = 360) -> np.ndarray:
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[y:y + side, x:x + side] = 255
    return rgb


def test_tiles_cover_the_frame_and_hold_any_rider_up_to_half_a_tile_whole():
    width, height = 640, 360
    regions = tiles(width, height)
    covered = np.zeros((height, width), dtype=bool)
    for region in regions:
        covered[region.y0:region.y1, region.x0:region.x1] = True
    assert covered.all()
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = rng.integers(4, 150), rng.integers(4, 110)  # tiles are 320 x 240: half is 160 x 120
        x0, y0 = rng.integers(0, width - w), rng.integers(0, height - h)
        box = [float(x0), float(y0), float(x0 + w), float(y0 + h)]
        inside = [r for r in regions if r.x0 <= box[0] and r.y0 <= box[1] and box[2] <= r.x1 and box[3] <= r.y1]
        assert any(r.holds_whole(box, width, height) for r in inside), box


def test_around_is_a_square_on_the_box_clipped_to_the_frame():
    region = around([100, 100, 140, 200], 2.0, 1, 640, 360)
    assert (region.x1 - region.x0, region.y1 - region.y0) == (200, 200)
    assert (region.x0 + region.x1) / 2 == 120 and (region.y0 + region.y1) / 2 == 150
    edge = around([600, 300, 640, 360], 3.0, 2, 640, 360)
    assert edge.x1 == 640 and edge.y1 == 360 and edge.scale == 2
    assert around([10, 10, 12, 12], 2.0, 1, 640, 360) is None  # too small to search in


def test_a_person_found_in_an_enlarged_cut_out_is_mapped_back_to_frame_pixels():
    region = Region(200, 100, 400, 300, 2, "last_box")
    rgb = frame_with_square(250, 140, 30)
    found = bright_square_detector(region.cut(rgb))
    assert found[0]["bbox_xyxy"] == [100.0, 80.0, 160.0, 140.0]  # in the 2x cut-out
    person = region.to_frame(found[0])
    assert person["bbox_xyxy"] == [250.0, 140.0, 280.0, 170.0]
    assert person["keypoints_2d"] == [[265.0, 155.0, 1.0]] and person["found_by"] == "second_pass:last_box"


def test_the_second_pass_finds_a_small_rider_near_the_last_box_then_in_tiles_and_never_invents_one():
    search = RiderSearch(bright_square_detector, {})
    big = frame_with_square(300, 150, 20)
    assert search.fill(bright_square_detector(big), big) == bright_square_detector(big)  # first pass: untouched
    assert search.tried == 0
    small = frame_with_square(305, 152, 8)  # too small for the detector on the whole frame
    assert bright_square_detector(small) == []
    persons = search.fill([], small)
    assert persons[0]["bbox_xyxy"] == pytest.approx([305, 152, 313, 160], abs=1)  # cubic enlarging blurs the edge
    assert persons[0]["found_by"] == "second_pass:track"
    search.forget()  # a new video: no last box, so the wide search finds it (enlarged 2x, 16 px tall)
    elsewhere = frame_with_square(50, 300, 8)
    assert search.fill([], elsewhere)[0]["bbox_xyxy"] == pytest.approx([50, 300, 58, 308], abs=1)
    assert search.fill([], frame_with_square(0, 0, 0)) == []  # nobody there: nobody returned
    assert search.fill([], frame_with_square(50, 300, 8), follow=False)[0]["found_by"].startswith("second_pass")


def test_a_rider_cut_by_a_tile_edge_inside_the_frame_is_not_taken_from_that_tile():
    rgb = frame_with_square(300, 100, 40)
    tile = Region(320, 0, 640, 240, 1, "tile")  # holds only the right half of the square
    cut = tile.to_frame(bright_square_detector(tile.cut(rgb))[0])
    assert cut["bbox_xyxy"][0] == 320.0 and not tile.holds_whole(cut["bbox_xyxy"], 640, 360)
    whole = RiderSearch(bright_square_detector, {}).search(rgb, [tile, *wide(640, 360)])
    assert whole[0]["bbox_xyxy"] == pytest.approx([300, 100, 340, 140], abs=1)


def test_a_long_empty_stretch_costs_a_few_wide_searches_not_one_every_few_frames():
    """Issue 30 item 4: wide searches 5, 10, 20, then 30 empty frames apart (second_pass_memory_frames),
    not every 6th frame (10 in 60 frames before)."""
    search = RiderSearch(bright_square_detector, {"second_pass_retry_frames": 5})
    empty = frame_with_square(0, 0, 0)
    for _ in range(60):
        search.fill([], empty)
    assert search.wide_searches == 4 and search.tried == len(wide(640, 360)) * 4
    off = RiderSearch(bright_square_detector, {"second_pass": False})
    assert off.fill([], frame_with_square(305, 152, 8)) == [] and off.tried == 0


def test_a_fast_rider_is_followed_by_his_track_not_searched_for_in_the_whole_frame():
    """The first pass sees a rider twice, moving 40 px a frame (3 times his size); then he is too small
    for it. The regions around where his motion puts him find him in every frame, a few regions each
    and no wide search (the regions around his last box alone lose him)."""
    search = RiderSearch(bright_square_detector, {})
    for t in range(2):
        big = frame_with_square(20 + 40 * t, 150, 14)
        search.fill(bright_square_detector(big, min_px=14), big)  # the first pass
    found = [search.fill([], frame_with_square(20 + 40 * t, 150, 11)) for t in range(2, 14)]
    assert all(persons for persons in found)
    assert [p[0]["bbox_xyxy"][0] for p in found] == pytest.approx([20 + 40 * t for t in range(2, 14)], abs=1)
    assert search.wide_searches == 0 and search.tried <= 5 * 12


def test_after_a_cut_the_old_track_is_no_guide_and_the_new_shot_is_searched_at_once():
    search = RiderSearch(bright_square_detector, {})
    shot_a = frame_with_square(100, 100, 8)
    shot_a[200:, :, 1] = 90  # a different scene below the rider
    assert search.fill([], shot_a)
    shot_b = frame_with_square(500, 300, 8)
    shot_b[:, :, 1] = 220  # another scene: brighter everywhere
    persons = search.fill([], shot_b)  # the track's regions are around (100, 100): only a wide search finds him
    assert persons and persons[0]["bbox_xyxy"] == pytest.approx([500, 300, 508, 308], abs=1)
    assert search.wide_searches == 2


def test_a_cut_that_leaves_the_rider_where_he_was_is_searched_around_his_last_box_first():
    """Issue 30: the light changes at once (the backlit clip: a frame the cut detector reads as a new shot)
    but the rider stands where he was; the wide search's tiles miss him (seed 32, frame 114) and the
    regions around his last box, tried first on the cut's frame, find him. A cut to another shot still
    gets its wide search."""
    search = RiderSearch(bright_square_detector, {})
    rider_on_a_track(search)
    flash = frame_with_square(312, 150, 24)
    flash[:, :, 1] = 220  # every pixel brighter but the rider's
    calls_before = search.tried
    persons = search.fill([], flash)
    assert persons and persons[0]["found_by"] == "second_pass:cut"
    assert persons[0]["bbox_xyxy"] == pytest.approx([312, 150, 336, 174], abs=1)
    assert search.tried - calls_before <= 3  # a region around his last box, and closer looks at him
    elsewhere = frame_with_square(500, 40, 24)
    elsewhere[:, :, 1] = 20
    persons = search.fill([], elsewhere)
    assert persons and persons[0]["bbox_xyxy"] == pytest.approx([500, 40, 524, 64], abs=1)
    assert persons[0]["found_by"] == "second_pass:tile"


def test_a_body_of_snow_where_the_rider_stood_before_a_cut_is_held_to_the_tiles_rules():
    """Issue 30: a cut to an empty shot, with a body in the snow where the rider had stood (a noisy copy of
    the core set: a false person). The squares around his box before the cut are no track's: their find
    is kept only when a closer look finds it again, as a tile's, and a body seen only from afar is not."""
    search = RiderSearch(seen_only_from_afar, {})
    for t in range(3):
        rider = frame_with_square(280 + 5 * t, 100, 80)
        search.fill(first_pass(rider), rider)
    snow_body = frame_with_square(290, 100, 80)
    snow_body[:, :, 1] = 220
    assert search.fill([], snow_body) == []


def test_a_single_image_is_searched_closer_too_and_a_video_frame_never_pays_for_the_centre_crops():
    """Issue 22 item 3: a rider too small for the whole frame (a 5 px square) is found in an enlarged
    tile or centre crop; a video's frame gets the tiles but never the centre crops."""
    centred, off_centre = frame_with_square(318, 178, 5), frame_with_square(60, 40, 5)
    after = RiderSearch(bright_square_detector, {})
    found = after.fill([], centred, follow=False)
    assert found[0]["bbox_xyxy"] == pytest.approx([318, 178, 323, 183], abs=1)  # cubic enlarging blurs the edge
    assert found[0]["found_by"].startswith("second_pass:")
    found = after.fill([], off_centre, follow=False)
    assert found[0]["bbox_xyxy"] == pytest.approx([60, 40, 65, 45], abs=1)
    assert found[0]["found_by"] == "second_pass:tile"
    video = RiderSearch(bright_square_detector, {})
    assert video.fill([], frame_with_square(0, 0, 0)) == [] and video.tried == len(wide(640, 360))
    for region in centre_crops(640, 360):
        assert region.x1 - region.x0 == region.y1 - region.y0  # square, as the detector's input
        assert (region.x0 + region.x1) / 2 == pytest.approx(320, abs=1) and (region.y0 + region.y1) / 2 == 180


def test_a_single_images_search_stops_at_its_time_budget():
    search = RiderSearch(bright_square_detector, {"second_pass_image_budget_s": 0})
    assert search.fill([], frame_with_square(0, 0, 0), follow=False) == []
    assert search.tried <= 1 < len(wide(640, 360) + closer(640, 360))


class SquareFollower:
    """The pose model alone, as the second pass uses it: on a square `grow` times the box's side, centred
    on it, the bright square if it lies whole inside (any size: the model needs no detector). Counts its
    calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, rgb: np.ndarray, box: list[float], grow: float) -> list[dict]:
        self.calls += 1
        half, cx, cy = max(box[2] - box[0], box[3] - box[1]) * grow / 2, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        region = Region(int(max(0, cx - half)), int(max(0, cy - half)), int(min(rgb.shape[1], cx + half)),
                        int(min(rgb.shape[0], cy + half)), 1, "follow")
        found = bright_square_detector(region.cut(rgb), min_px=1)
        if not found:
            return []
        person = region.to_frame(found[0])
        return [person] if region.holds_whole(person["bbox_xyxy"], rgb.shape[1], rgb.shape[0]) else []


class CountingDetector:
    """The bright-square detector, or (blind) one that finds nobody in any region (a rider too small or
    blurred for it); counts calls."""

    def __init__(self, blind: bool = False) -> None:
        self.calls, self.blind = 0, blind

    def __call__(self, rgb: np.ndarray) -> list[dict]:
        self.calls += 1
        return [] if self.blind else bright_square_detector(rgb)


def first_pass(rgb: np.ndarray) -> list[dict]:
    return bright_square_detector(rgb, min_px=24)


def test_a_rider_no_region_finds_is_followed_by_the_pose_model_where_his_track_puts_him():
    """Issue 30: the rider moves 30 px a frame and becomes too blurred for the detector in any region;
    the pose model alone, placed where his track's motion puts him, finds him in every frame, and the
    track it keeps fresh spares the wide search."""
    detector, follower = CountingDetector(blind=True), SquareFollower()
    search = RiderSearch(detector, {}, follow=follower)
    for t in range(2):
        big = frame_with_square(20 + 30 * t, 150, 24)
        search.fill(first_pass(big), big)
    found = [search.fill([], frame_with_square(20 + 30 * t, 150, 20)) for t in range(2, 14)]
    assert [p[0]["bbox_xyxy"][0] for p in found] == pytest.approx([20 + 30 * t for t in range(2, 14)], abs=1)
    assert all(p[0]["found_by"] == "second_pass:follow" for p in found)
    assert search.wide_searches == 0
    off = RiderSearch(CountingDetector(blind=True), {"second_pass_follow": False}, follow=follower)
    calls = follower.calls
    off.fill(first_pass(frame_with_square(20, 150, 24)), frame_with_square(20, 150, 24))
    assert off.fill([], frame_with_square(50, 150, 20)) == []
    assert follower.calls == calls  # engine.options.second_pass_follow: false turns it off


class CallCounter:
    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, *args):
        self.calls += 1
        return self.inner(*args)


def rider_grown_past_his_track_regions() -> tuple[RiderSearch, np.ndarray, CallCounter]:
    """A small rider (24 px) on a track, then a frame where he stands 100 px tall on the same spot (he came
    closer, or opened up; not so much that the frame reads as a cut): every region around his track (at
    most 4x his old size, 96 px) cuts him. The first pass found nobody, as for a blurred rider."""
    follower = CallCounter(SquareFollower())
    search = RiderSearch(bright_square_detector, {}, follow=follower)
    small = frame_with_square(300, 150, 24)
    search.fill(first_pass(small), small)
    return search, frame_with_square(262, 112, 100), follower


def test_a_rider_a_track_region_cuts_is_looked_at_whole_by_the_pose_model_alone():
    """Issue 30: a track's region that cuts the rider by its own edge does not give him up to the next
    region (each a detector and a model call): the pose model alone looks at him whole, in the frame."""
    search, grown, follower = rider_grown_past_his_track_regions()
    persons = search.fill([], grown)
    assert persons and persons[0]["bbox_xyxy"] == pytest.approx([262, 112, 362, 212], abs=1)
    assert persons[0]["found_by"] == "second_pass:track" and follower.calls == 1


def test_cut_off_persons_are_looked_at_whole_a_few_times_a_frame_and_never_in_a_single_image():
    search, grown, follower = rider_grown_past_his_track_regions()
    follower.inner = lambda rgb, box, grow: []  # the model alone sees nobody there
    assert len(search.track_regions(search.track.predicted(1), 640, 360)) > len(WHOLE_LOOK_GROWS)
    assert search.fill([], grown) == []
    # the first cut-offs' looks, then following the track; not one look for each region that cut him
    assert follower.calls == sum(len(grows) for grows in WHOLE_LOOK_GROWS) + len(FOLLOW_GROWS)
    still = RiderSearch(bright_square_detector, {}, follow=CallCounter(SquareFollower()))
    region = Region(300, 150, 340, 190, 1, "track")
    assert still.fill([], np.zeros((360, 640, 3), dtype=np.uint8), follow=False) == []
    assert still.whole_person_in(region, grown, 640, 360) == [] and still.follow.calls == 0


def test_the_regions_around_the_track_come_before_the_pose_model_alone():
    """A rider the detector finds in a region around his track is not looked for by the model alone (the
    regions' answers are the ones measured on the shared clip)."""
    detector, follower = CountingDetector(), SquareFollower()
    search = RiderSearch(detector, {}, follow=follower)
    big = frame_with_square(300, 150, 24)
    search.fill(first_pass(big), big)
    persons = search.fill([], frame_with_square(302, 150, 20))
    assert persons[0]["found_by"] == "second_pass:track" and follower.calls == 0


def test_regions_no_track_placed_go_to_the_engines_stricter_detector():
    """Issue 30: a tile of the wide search has no track behind what it finds, so it goes to the engine's
    stricter detector (MediaPipe's at the first pass's confidence: the weaker one found bodies in the
    scenery of the generated set's empty frames); the track's own regions go to the second pass's, as
    does the closer look that keeps a tile's find (a square the find placed)."""
    guided, unguided = CountingDetector(), CountingDetector()
    search = RiderSearch(guided, {}, detect_unguided=unguided)
    big = frame_with_square(300, 150, 24)
    search.fill(first_pass(big), big)
    assert search.fill([], frame_with_square(302, 150, 20))[0]["found_by"] == "second_pass:track"
    assert guided.calls >= 1 and unguided.calls == 0
    search.forget()  # a new video: no track
    guided_calls = guided.calls
    found = search.fill([], frame_with_square(100, 60, 90))  # large in its tile: one closer look keeps him
    assert found and found[0]["found_by"] == "second_pass:tile"
    assert unguided.calls >= 1 and guided.calls == guided_calls + 1
    unguided_calls = unguided.calls
    assert search.fill([], frame_with_square(100, 60, 90), follow=False)  # a still: tiles too
    assert unguided.calls > unguided_calls and guided.calls == guided_calls + 2


def test_a_videos_tile_the_stricter_detector_misses_is_tried_with_the_fainter_one():
    """Issue 30: a blurred, small rider with no track yet scores under the stricter detector's minimum;
    in a video, each tile it finds nobody in goes to the fainter detector, whose person then starts the
    track. A single image never uses it (it has its own weaker search, checked closer), nor does a tile
    the stricter detector found someone in."""
    strict, faint = CountingDetector(blind=True), CountingDetector()
    search = RiderSearch(bright_square_detector, {}, detect_unguided=strict, detect_faint=faint)
    found = search.fill([], frame_with_square(100, 60, 40))
    assert found and found[0]["found_by"] == "second_pass:tile"
    assert found[0]["bbox_xyxy"] == pytest.approx([100, 60, 140, 100], abs=1)
    assert faint.calls == strict.calls  # tile by tile: the stricter first, then the fainter
    before = faint.calls
    still = RiderSearch(bright_square_detector, {}, detect_unguided=strict, detect_faint=faint)
    still.fill([], frame_with_square(100, 60, 40), follow=False)
    assert faint.calls == before
    sure = CountingDetector()
    seen = RiderSearch(bright_square_detector, {}, detect_unguided=sure, detect_faint=faint)
    assert seen.fill([], frame_with_square(100, 60, 40))
    assert faint.calls - before == sure.calls - 1  # not on the tile where the stricter found him


def test_a_faint_find_must_not_lie_wider_than_twice_its_height():
    """A faint find as wide as a crouched body behind a mound (1.7 times its height) is taken; one 2.3
    times, which the stricter detector's find may be, is not (the faint finds in scenery lay wider)."""
    def body(width: int, height: int) -> np.ndarray:
        rgb = np.zeros((360, 640, 3), dtype=np.uint8)
        rgb[100:100 + height, 100:100 + width] = 255
        return rgb

    def faint_only() -> RiderSearch:
        return RiderSearch(bright_square_detector, {}, detect_unguided=CountingDetector(blind=True),
                           detect_faint=CountingDetector())

    assert faint_only().fill([], body(51, 30))
    assert faint_only().fill([], body(69, 30)) == []
    assert RiderSearch(bright_square_detector, {}).fill([], body(69, 30))


def test_a_person_a_tile_finds_at_the_frames_edge_is_not_taken():
    """Issue 30: tiles found bodies in scenery cut by the frame's edge (the generated stills' lower
    edge); a tile's find must stand inside the frame. The same person a few pixels in is taken."""
    for follow in (True, False):
        assert RiderSearch(bright_square_detector, {}).fill([], frame_with_square(200, 320, 40), follow=follow) == []
        assert RiderSearch(bright_square_detector, {}).fill([], frame_with_square(200, 310, 40), follow=follow)


def test_nobody_as_narrow_as_a_pole_is_taken_from_either_pass():
    """MediaPipe's graph took a pine, 0.13 times as wide as tall, for a person (and a closer look agreed);
    no person narrower than a fifth of his height is kept, from the first pass or the second, in a video
    or a still; a rider standing sideways, a third as wide as tall, is."""
    def bar(width: int) -> np.ndarray:
        rgb = np.zeros((360, 640, 3), dtype=np.uint8)
        rgb[100:160, 300:300 + width] = 255
        return rgb

    for follow in (True, False):
        pole = bar(8)
        assert first_pass(pole) and RiderSearch(bright_square_detector, {}).fill(first_pass(pole), pole, follow) == []
        assert RiderSearch(bright_square_detector, {}).fill([], pole, follow) == []
        rider = bar(20)
        assert RiderSearch(bright_square_detector, {}).fill(first_pass(rider), rider, follow)


def test_a_first_pass_person_the_model_barely_believes_is_not_taken():
    """On a noisy copy of the generated set's empty photo the graph returned a 21 x 48 person at the
    frame's corner whose landmarks it gave a mean visibility of 0.19 (its riders: 0.62 and up): the
    second pass's floor (MIN_PERSON_SCORE) holds for the first pass's person too, in a video or a still."""
    empty = frame_with_square(0, 0, 0)
    for follow in (True, False):
        faint = {"track_id": 1, "score": 0.19, "bbox_xyxy": [0.0, 0.0, 21.0, 48.0], "keypoints_2d": []}
        assert RiderSearch(bright_square_detector, {}).fill([faint], empty, follow) == []
        sure = {**faint, "score": 0.62}
        assert RiderSearch(bright_square_detector, {}).fill([sure], empty, follow) == [sure]


def test_a_cut_between_two_shots_of_snow_is_told_from_a_fast_pan():
    """The generated set's cuts between two snowy shots changed the thumbnail by 19-66 grey levels, its
    fastest pan (26 px a frame, blurred) by at most 10.5, and the shared clip's frames within a shot by
    at most 7. Here: rolling snow of the same brightness, panned 26 px (about 9 levels), then another
    shot of it (about 27)."""
    import cv2

    rng = np.random.default_rng(3)

    def snow() -> np.ndarray:
        hills = cv2.resize(rng.uniform(150, 250, (4, 8)), (700, 360), interpolation=cv2.INTER_CUBIC)
        return np.repeat(np.clip(hills, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)

    scene, other = snow(), snow()
    cuts = CutDetector()
    assert not cuts.is_cut(np.ascontiguousarray(scene[:, :640]))
    assert not cuts.is_cut(np.ascontiguousarray(scene[:, 26:666]))
    assert cuts.is_cut(np.ascontiguousarray(other[:, :640]))


def only_from_afar(rgb: np.ndarray) -> list[dict]:
    """A detector that sees a 'body' only in a cut much larger than it, as a body made of scenery (a car
    in grass, a tree line) seen from afar vanishes when the cut closes in."""
    found = bright_square_detector(rgb)
    if found:
        x0, y0, x1, y1 = found[0]["bbox_xyxy"]
        if 4 * max(x1 - x0, y1 - y0) > min(rgb.shape[:2]):
            return []
    return found


def test_a_single_images_weaker_find_is_kept_only_when_found_again_closer():
    """Issue 30: a single image the stricter detector finds nobody in is searched with the second pass's
    own; its person is kept when a square cut closer around him finds him again (the rider), not when
    the closer look loses him (a body made of scenery)."""
    strict = CountingDetector(blind=True)
    rider = RiderSearch(bright_square_detector, {}, detect_unguided=strict)
    found = rider.fill([], frame_with_square(100, 60, 40), follow=False)
    assert found and found[0]["found_by"] == "second_pass:tile" and strict.calls > 0
    scenery = RiderSearch(only_from_afar, {}, detect_unguided=strict)
    assert scenery.fill([], frame_with_square(100, 60, 40), follow=False) == []
    assert scenery.tried > len(wide(640, 360) + closer(640, 360))  # both searches ran, and the closer looks
    assert any(only_from_afar(tile.cut(frame_with_square(100, 60, 40))) for tile in wide(640, 360))  # it was seen


def seen_only_from_afar(rgb: np.ndarray) -> list[dict]:
    """A detector that sees a 'body' only while it is at most 0.4 of the cut's shorter side: a large
    tile shows it, a square cut closer around it does not (a body made of snow, seen from afar)."""
    found = bright_square_detector(rgb)
    if found:
        x0, y0, x1, y1 = found[0]["bbox_xyxy"]
        if max(x1 - x0, y1 - y0) > 0.4 * min(rgb.shape[:2]):
            return []
    return found


def test_a_person_a_tile_finds_is_kept_only_when_a_closer_look_finds_him_again():
    """Issue 30: right after a cut to an empty shot, a tile took a body in the snow that no closer look
    found again, and a track followed it into the next frame. A tile's find, not small in it (that one
    was always looked at closer), is kept in a video and in a still only when a closer look finds him."""
    body = frame_with_square(100, 60, 90)
    assert any(seen_only_from_afar(tile.cut(body)) for tile in wide(640, 360))
    for follow in (True, False):
        assert RiderSearch(seen_only_from_afar, {}).fill([], body, follow=follow) == []
        found = RiderSearch(bright_square_detector, {}).fill([], body, follow=follow)
        assert found and found[0]["found_by"] == "second_pass:tile"


def test_a_large_riders_track_regions_are_each_cut_once():
    """Two entries of the region list can be the same square (a large rider's 3x square needs no
    enlargement): it is searched once, not twice."""
    from gpu_worker.engines.roi import LARGE_RIDER_REGIONS

    search = RiderSearch(CountingDetector(blind=True), {})
    box = [280.0, 100.0, 360.0, 220.0]  # 120 px tall: a large rider; 3x his size is 360 px
    search.track.add(0, box)
    search.frame = 1
    regions = search.track_regions(search.track.predicted(1), 640, 360)
    assert len(regions) == len(set(regions)) == len(LARGE_RIDER_REGIONS) - 1
    search.fill([], np.zeros((360, 640, 3), dtype=np.uint8))
    assert search.tried == len(regions)


def test_an_old_track_is_not_followed():
    follower = SquareFollower()
    search = RiderSearch(bright_square_detector, {}, follow=follower)
    rider = frame_with_square(300, 150, 24)
    search.fill(first_pass(rider), rider)
    empty = frame_with_square(0, 0, 0)
    for _ in range(FOLLOW_FRAMES + 3):
        search.fill([], empty)
    calls = follower.calls
    assert search.fill([], frame_with_square(300, 150, 20)) and follower.calls == calls  # found by a region


def test_a_first_pass_person_away_from_the_track_gives_way_to_the_rider_where_the_track_puts_him():
    """The video graph settles on a body drawn into the scenery while the rider goes on beside it: the
    person where the rider's track says he is wins, found by the model in this frame."""
    search = RiderSearch(bright_square_detector, {}, follow=SquareFollower())
    for t in range(3):
        rider = frame_with_square(300 + 5 * t, 150, 24)
        assert search.fill(first_pass(rider), rider)[0].get("found_by") is None  # the first pass's, confirmed
    scenery = {"track_id": 1, "score": 0.7, "bbox_xyxy": [20.0, 40.0, 200.0, 90.0], "keypoints_2d": []}
    rider = frame_with_square(315, 150, 20)
    persons = search.fill([scenery], rider)
    assert persons[0]["bbox_xyxy"] == pytest.approx([315, 150, 335, 170], abs=1)
    assert persons[0]["found_by"] == "second_pass:follow"
    nobody_there = frame_with_square(0, 0, 0)
    assert search.fill([scenery], nobody_there) == [scenery]  # nobody on the track: the first pass stands


def rider_on_a_track(search: RiderSearch, frames: int = 3) -> None:
    """The first pass finds a 24-px rider moving 5 px a frame: a track that knows his motion."""
    for t in range(frames):
        rider = frame_with_square(300 + 5 * t, 150, 24)
        search.fill(first_pass(rider), rider)


def test_a_body_lying_across_away_from_the_track_gives_way_to_the_rider_in_the_tracks_regions():
    """Issue 30: the video graph stretched a body across the scenery beside a blurred rider whom the pose
    model alone, on his track, did not see; the track's regions find him (seed 31: his track was lost
    for 8 frames after it)."""
    search = RiderSearch(bright_square_detector, {})
    rider_on_a_track(search)
    across = {"track_id": 1, "score": 0.7, "bbox_xyxy": [20.0, 40.0, 200.0, 90.0], "keypoints_2d": []}
    persons = search.fill([across], frame_with_square(315, 150, 20))
    assert persons[0]["bbox_xyxy"] == pytest.approx([315, 150, 335, 170], abs=1)
    assert persons[0]["found_by"] == "second_pass:track"


def test_a_first_pass_person_no_look_agrees_with_is_returned_but_leaves_the_riders_track_where_it_was():
    """Issue 30: an upright body the graph drew into the pines, away from the rider's track, that neither a
    closer look nor a look on the track replaces, is what the first pass found and is returned; but the
    track stays on the rider, who is found on it in the next frame (moved onto the body, it led the search
    into the pines). A track that has seen the rider once knows no motion: a fast rider takes it along."""
    search = RiderSearch(bright_square_detector, {})
    rider_on_a_track(search)
    body = {"track_id": 1, "score": 0.7, "bbox_xyxy": [20.0, 40.0, 80.0, 200.0], "keypoints_2d": []}
    assert search.fill([body], frame_with_square(315, 150, 24)) == [body]
    persons = search.fill([], frame_with_square(320, 150, 20))
    assert persons and persons[0]["bbox_xyxy"] == pytest.approx([320, 150, 340, 170], abs=1)
    assert persons[0]["found_by"] == "second_pass:track"
    young = RiderSearch(bright_square_detector, {})
    rider_on_a_track(young, frames=1)
    young.fill([body], frame_with_square(305, 150, 24))
    assert young.track.seen[-1][1] == body["bbox_xyxy"]


def test_a_small_riders_track_regions_the_detector_misses_are_tried_with_the_fainter_one():
    """Issue 30: a small, blurred rider scores under the second pass's minimum in the regions around his
    own track too; in a video the fainter detector tries them, and its find is taken if sized like him
    (a smear beside him, 2.8 times his width, broke his track). A large rider's regions never go to it."""
    faint = CountingDetector()
    search = RiderSearch(CountingDetector(blind=True), {}, detect_faint=faint)
    rider_on_a_track(search)
    persons = search.fill([], frame_with_square(315, 150, 22))
    assert persons and persons[0]["found_by"] == "second_pass:track"
    assert persons[0]["bbox_xyxy"] == pytest.approx([315, 150, 337, 172], abs=1)
    smear = np.zeros((360, 640, 3), dtype=np.uint8)
    smear[150:180, 292:348] = 255  # 56 x 30, whole in his track's regions: 2.6 times his last box's width
    assert search.fill([], smear) == []
    large = RiderSearch(CountingDetector(blind=True), {}, detect_faint=faint)
    big = frame_with_square(300, 100, 100)
    large.fill(first_pass(big), big)
    calls = faint.calls
    assert large.fill([], frame_with_square(305, 100, 96)) == [] and faint.calls == calls


def test_a_new_track_is_looked_at_closer_and_a_stretched_body_gives_way_to_the_person_it_hides():
    """A first-pass person that starts a track is looked at again in a region around him: a wide body
    across the scenery is replaced by the person the closer look finds; a person the closer look agrees
    with is confirmed once and costs nothing more."""
    detector = CountingDetector()
    search = RiderSearch(detector, {}, follow=SquareFollower())
    rider = frame_with_square(250, 120, 14)
    stretched = {"track_id": 1, "score": 0.7, "bbox_xyxy": [150.0, 100.0, 330.0, 150.0], "keypoints_2d": []}
    persons = search.fill([stretched], rider)
    assert persons[0]["bbox_xyxy"] == pytest.approx([250, 120, 264, 134], abs=1)
    assert persons[0]["found_by"] == "second_pass:second_look"
    agreed = RiderSearch(detector, {}, follow=SquareFollower())
    calls = detector.calls
    for t in range(6):
        big = frame_with_square(300 + 2 * t, 150, 24)
        assert agreed.fill(first_pass(big), big) == first_pass(big)
    assert detector.calls == calls + 1


def test_the_second_pass_takes_nobody_lying_across_the_picture():
    """A body more than MAX_WIDTH_PER_HEIGHT times as wide as tall, found in a region, is the model
    stretching a pose over scenery: refused; an upright one in the same place is taken."""
    search = RiderSearch(bright_square_detector, {})
    lying = np.zeros((360, 640, 3), dtype=np.uint8)
    lying[150:164, 280:340] = 255  # 60 x 14
    assert search.fill([], lying) == []
    standing = np.zeros((360, 640, 3), dtype=np.uint8)
    standing[150:180, 300:314] = 255
    assert RiderSearch(bright_square_detector, {}).fill([], standing)


def test_a_still_whose_person_a_closer_look_puts_elsewhere_gets_the_closer_looks_person():
    search = RiderSearch(bright_square_detector, {})
    rider = frame_with_square(250, 120, 14)
    stretched = {"track_id": 1, "score": 0.7, "bbox_xyxy": [150.0, 100.0, 330.0, 150.0], "keypoints_2d": []}
    persons = search.fill([stretched], rider, follow=False)
    assert persons[0]["bbox_xyxy"] == pytest.approx([250, 120, 264, 134], abs=1)
    same = bright_square_detector(rider)  # a person the closer look agrees with stands as he was
    assert search.fill(same, rider, follow=False) == same


@pytest.fixture(scope="module")
def clip_frames():
    from pose_common.video import frames
    return [(index, pts, rgb) for _, index, pts, rgb in frames(str(CLIP))]


def run_engine(clip_frames, options: dict, replace: dict | None = None) -> tuple[list, object]:
    from gpu_worker.engines.mediapipe_engine import MediaPipeEngine

    engine = MediaPipeEngine("cpu", options)
    for stage in engine.stages():
        stage.run()
    height, width = clip_frames[0][2].shape[:2]
    engine.begin_video(width, height, 30.0)
    out = []
    for index, pts, rgb in clip_frames:
        out += engine.push(index, pts, (replace or {}).get(index, rgb))
    engine.close()
    return [frame.persons for frame in out], engine


def person_validator():
    import jsonschema
    import yaml

    from support import REPO
    document = yaml.safe_load((REPO / "gateway" / "openapi.yaml").read_text())
    return jsonschema.Draft4Validator(document["components"]["schemas"]["Person"]).validate


@needs_shared_data()
def test_the_rider_is_found_in_all_122_frames_of_the_shared_clip(clip_frames):
    first, _ = run_engine(clip_frames, {"second_pass": False})
    both, engine = run_engine(clip_frames, {})
    assert len(both) == 122 and sum(1 for p in first if p) <= 118  # the first pass alone misses some
    assert sum(1 for p in both if p) == 122  # issue 30: 122 of 122 (at least 120 before the person detector)
    doubted = [i for i, persons in enumerate(first) if persons and both[i] != persons]
    for i in doubted:  # frames the first pass finds: what it found, unless the second pass doubted it
        assert both[i][0]["found_by"] in ("second_pass:second_look", "second_pass:follow")
    assert len(doubted) <= 2
    rescued = [i for i, persons in enumerate(both) if persons and not first[i]]
    assert rescued and all(both[i][0]["found_by"].startswith("second_pass:") for i in rescued)
    assert engine.second_pass.tried <= 6 * len(rescued) + 20  # bounded: a few regions per rescued frame
    for i in rescued:  # the model's own answer on this frame, not a neighbour's copied or interpolated
        neighbours = [both[j][0] for j in (i - 1, i + 1) if 0 <= j < len(both) and both[j]]
        assert all(n["keypoints_2d"] != both[i][0]["keypoints_2d"] for n in neighbours)
        x0, y0, x1, y1 = both[i][0]["bbox_xyxy"]
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 360
    validate = person_validator()
    for persons in both:  # first-pass and second-pass persons alike are what the API document says
        for person in persons:
            validate(person)
    grey = {i: np.full_like(clip_frames[i][2], 128) for i in rescued}  # the same frames with no rider in them
    blanked, _ = run_engine(clip_frames, {}, replace=grey)
    assert all(blanked[i] == [] for i in rescued)


@needs_shared_data()
def test_a_single_image_of_a_small_rider_is_searched_too(clip_frames):
    from gpu_worker.engines.mediapipe_engine import MediaPipeEngine

    engine = MediaPipeEngine("cpu", {})
    for stage in engine.stages():
        stage.run()
    missed = [rgb for _, _, rgb in clip_frames if not engine._find_in_image(rgb)]
    assert missed, "the first pass misses some frames of the clip as stills"
    found = [engine.infer_image(rgb) for rgb in missed]
    assert sum(1 for persons in found if persons) >= len(missed) - 2
    assert all(persons[0]["found_by"].startswith("second_pass:") for persons in found if persons)
    assert engine.infer_image(np.full_like(missed[0], 128)) == []


def square_boxes(score: float = 0.6, min_px: int = 1):
    """A person detector (roi.DetectPersons) that sees the bright square at `score`, when at least `min_px`
    tall (any size by default; a scrap of a body the pose model found is not a person to it): the box the
    pose model alone is then placed on."""
    def detect(rgb: np.ndarray, min_score: float) -> list[tuple[float, list[float]]]:
        found = bright_square_detector(rgb, min_px=min_px)
        return [(score, found[0]["bbox_xyxy"])] if found and score >= min_score else []
    return detect


def test_a_rider_the_pose_detector_misses_is_found_on_the_person_detectors_box():
    """Issue 30: a blurred rider the pose detector misses in every region, beyond the pose model's squares
    on his track, is found where the person detector puts a box in his track's regions, by the pose model
    alone on it; with no track, in a coarse tile (kept when found again closer). A weak box, or one where
    the pose model finds nobody, gives nobody."""
    search = RiderSearch(CountingDetector(blind=True), {}, follow=SquareFollower(), detect_persons=square_boxes())
    rider_on_a_track(search)
    persons = search.fill([], frame_with_square(350, 150, 22))  # 40 px past where his track puts him
    assert persons and persons[0]["found_by"] == "second_pass:track_person_detector"
    assert persons[0]["bbox_xyxy"] == pytest.approx([350, 150, 372, 172], abs=1)
    fresh = RiderSearch(CountingDetector(blind=True), {}, follow=SquareFollower(), detect_persons=square_boxes())
    persons = fresh.fill([], frame_with_square(300, 150, 22))
    assert persons and persons[0]["found_by"] == "second_pass:tile_person_detector"
    weak = RiderSearch(CountingDetector(blind=True), {}, follow=SquareFollower(), detect_persons=square_boxes(0.3))
    assert weak.fill([], frame_with_square(300, 150, 22)) == []
    no_model = RiderSearch(CountingDetector(blind=True), {}, detect_persons=square_boxes())
    assert no_model.fill([], frame_with_square(300, 150, 22)) == []  # no pose model to find him on the box


def test_a_tiles_find_on_the_person_detectors_box_is_kept_only_when_it_sees_him_surely_around_him():
    """Issue 30: on the first frame of an empty shot the last resort (the pose model alone on the person
    detector's box in a tile, 0.47) took a pine as a 228 x 285 body, and the track followed it for 16
    frames (seed 35). Asked again in a square around the body the model found, the detector scored it
    0.36; the blurred riders so found 0.51-0.63. Such a find is kept only when the detector, asked again
    around him, puts a box at PROVEN_MIN_SCORE or more on him."""
    def boxes_from_afar(near_score: float):
        sure = square_boxes()

        def detect(rgb: np.ndarray, min_score: float) -> list[tuple[float, list[float]]]:
            score = 0.6 if rgb.shape[0] >= 200 else near_score  # a tile, or the square around the find
            return [(score, box) for _, box in sure(rgb, 0.0)] if score >= min_score else []
        return detect

    for near_score, kept in ((0.36, False), (PROVEN_MIN_SCORE + 0.05, True)):
        search = RiderSearch(CountingDetector(blind=True), {}, follow=SquareFollower(),
                             detect_persons=boxes_from_afar(near_score))
        persons = search.fill([], frame_with_square(300, 150, 22))
        assert bool(persons) is kept, near_score
        if kept:
            assert persons[0]["found_by"] == "second_pass:tile_person_detector"


def test_a_first_pass_body_the_person_detector_does_not_see_gives_way_to_the_rider_it_sees():
    """Issue 30: the video graph's body five times the rider's size over drawn pines, from a video's first
    frame: the person detector sees no one on it, so the frame is searched and the rider it does see is
    returned and tracked. Without the person detector the body stands, as before."""
    ghost = {"track_id": 1, "score": 0.7, "bbox_xyxy": [40.0, 20.0, 200.0, 340.0], "keypoints_2d": []}
    rider = frame_with_square(420, 150, 22)
    search = RiderSearch(CountingDetector(blind=True), {}, follow=SquareFollower(), detect_persons=square_boxes())
    persons = search.fill([ghost], rider)
    assert persons[0]["bbox_xyxy"] == pytest.approx([420, 150, 442, 172], abs=1)
    assert search.track.seen[-1][1] == persons[0]["bbox_xyxy"]
    plain = RiderSearch(CountingDetector(blind=True), {}, follow=SquareFollower())
    assert plain.fill([ghost], rider) == [ghost]


def test_a_body_the_person_detector_does_not_see_is_returned_only_beside_a_confirmed_track():
    """With nobody else to find, an unseen body no look agrees with is not returned where no confirmed track
    is near (the next test). Beside a track that has seen the rider, it is what the first pass found and is
    returned; it moves the track only when sized like the rider's last box (a rider the detector misses for
    a frame keeps his track)."""
    ghost = {"track_id": 1, "score": 0.7, "bbox_xyxy": [40.0, 20.0, 200.0, 340.0], "keypoints_2d": []}
    rider_30px_on = {"track_id": 1, "score": 0.7, "bbox_xyxy": [330.0, 150.0, 354.0, 174.0], "keypoints_2d": []}
    nobody = frame_with_square(0, 0, 0)
    blind_boxes = square_boxes(0.1)  # sees nothing at the minimum scores
    search = RiderSearch(CountingDetector(blind=True), {}, detect_persons=blind_boxes)
    assert search.fill([ghost], nobody) == [] and search.track.seen == []
    for person, moves_the_track in ((ghost, False), (rider_30px_on, True)):
        young = RiderSearch(bright_square_detector, {}, detect_persons=square_boxes())
        rider_on_a_track(young, frames=1)  # a track that has seen the rider once: a person off it may move it
        young.detect_persons = blind_boxes
        assert young.fill([person], nobody) == [person]
        assert (young.track.seen[-1][1] == person["bbox_xyxy"]) is moves_the_track


def test_a_first_pass_body_no_look_agrees_with_and_no_track_holds_needs_the_person_detectors_sure_box():
    """Issue 30: after a cut to an empty shot, the video graph drew a body lying across tilted pines (seed 34,
    8 frames): it started a track that no closer look agreed with, and the person detector saw it only
    faintly (0.31-0.40, where the riders so found scored 0.42 and up). A first-pass person no look agrees
    with, on no confirmed track, is returned only when the person detector sees him at PROVEN_MIN_SCORE;
    else nobody is, and no track starts on him, frame after frame. Beside a confirmed track the weaker
    "seen" holds, as before."""
    body = [200, 100, 260, 220]
    person = {"track_id": 1, "score": 0.7, "bbox_xyxy": [float(v) for v in body], "keypoints_2d": []}
    for score, kept in ((0.35, False), (PROVEN_MIN_SCORE + 0.05, True)):
        search = RiderSearch(CountingDetector(blind=True), {}, detect_persons=square_boxes(score))
        for _ in range(4):  # the graph finds the body again in each frame
            assert search.fill([person], frame_with_body(body)) == ([person] if kept else []), score
        assert bool(search.track.seen) is kept, score
    confirmed = RiderSearch(bright_square_detector, {}, detect_persons=square_boxes())
    rider_on_a_track(confirmed)
    confirmed.detect = CountingDetector(blind=True)  # no closer look agrees with the next frame's person
    confirmed.detect_persons = square_boxes(0.35)
    rider = {"track_id": 1, "score": 0.7, "bbox_xyxy": [315.0, 150.0, 339.0, 174.0], "keypoints_2d": []}
    assert confirmed.fill([rider], frame_with_body([315, 150, 339, 174])) == [rider]


def frame_with_body(box: list[int], width: int = 640, height: int = 360) -> np.ndarray:
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[box[1]:box[3], box[0]:box[2]] = 255
    return rgb


def test_a_tracks_region_passes_over_a_body_not_sized_like_the_rider_unless_the_person_detector_sees_him():
    """Issue 30: beside a small rider the pose model drew a body into the pines, four times his height,
    and a track's region took it (seed 32: the video graph then followed it for 7 frames). A person a
    track's region finds, not sized like the rider, is kept only when the person detector sees him; without
    a person detector, as before."""
    body = [315, 130, 339, 190]  # 2.5 times the 24-px rider's height, where his track puts him
    for boxes, kept in ((square_boxes(0.1), False), (square_boxes(), True), (None, True)):
        search = RiderSearch(bright_square_detector, {}, detect_persons=square_boxes())
        rider_on_a_track(search)
        search.detect_persons = boxes
        persons = search.fill([], frame_with_body(body))
        assert bool(persons) is kept
        if kept:
            assert persons[0]["bbox_xyxy"] == pytest.approx(body, abs=1) and persons[0]["found_by"] == "second_pass:track"


def test_the_riders_size_is_his_last_boxes_median_so_one_box_on_a_part_of_him_does_not_shrink_it():
    """Issue 30: the pose model alone found a 24-px-wide part of a 41-px blurred rider, and in the next frame
    his track's first region found him whole (53 px wide) but took him for a body not sized like the rider,
    beside the part's last box; the next region's scrap was taken, and the track followed scraps for nine
    frames (seed 35). Sized against the median of the track's last boxes, the rider is kept."""
    search = RiderSearch(bright_square_detector, {}, detect_persons=square_boxes())
    rider_on_a_track(search)
    search.detect_persons = square_boxes(0.1)  # from now on it sees nobody
    search.frame += 1
    search.track.add(search.frame, [315.0, 150.0, 325.0, 174.0])  # a 10-px-wide part of the 24-px rider
    assert search.track.size() == (24.0, 24.0)
    persons = search.fill([], frame_with_square(320, 150, 24))
    assert persons and persons[0]["bbox_xyxy"] == pytest.approx([320, 150, 344, 174], abs=1)
    assert persons[0]["found_by"] == "second_pass:track"


def test_a_first_pass_body_not_sized_like_the_rider_is_doubted_where_the_person_detector_can_say():
    """Issue 30: the video graph's body on the rider's track but twice his height is looked at again when
    the engine has a person detector: unseen by it and with nobody else found, he is returned but does not
    move the track. Without a person detector he moves it, as before."""
    body = [315.0, 140.0, 339.0, 190.0]  # over where the track puts the 24-px rider (IoU 0.48), 50 px tall
    person = {"track_id": 1, "score": 0.7, "bbox_xyxy": body, "keypoints_2d": []}
    for boxes, moves_the_track in ((square_boxes(0.1), False), (None, True)):
        search = RiderSearch(bright_square_detector, {}, detect_persons=square_boxes())
        rider_on_a_track(search)
        search.detect_persons = boxes
        assert search.fill([person], frame_with_body([315, 140, 339, 190])) == [person]
        assert (search.track.seen[-1][1] == body) is moves_the_track


def test_a_first_pass_smear_the_looks_leave_unsettled_gives_way_to_the_pose_model_on_the_person_detectors_box():
    """Issue 30: a blurred rider turned back while his track's motion went on the other way, and the video
    graph stretched a pose over him (seed 31: five frames reported beside him, then a frame with nobody).
    A first-pass person the looks leave unsettled (off the track, unseen by the person detector, or lying
    across the picture) gives way to the pose model alone on the person detector's box in the square
    around him, and the rider it finds there leads the track. Without the detector the smear stands, as
    before."""
    def smear(box: list[float]) -> dict:
        return {"track_id": 1, "score": 0.7, "bbox_xyxy": box, "keypoints_2d": []}

    cases = {  # (the track's frames, the smear, where the rider is)
        "off the track, seen": (3, smear([238.0, 146.0, 288.0, 176.0]), 240),
        "unseen, on a young track": (1, smear([200.0, 100.0, 300.0, 200.0]), 240),
        "lying across, on the track, seen": (3, smear([290.0, 150.0, 360.0, 176.0]), 300),
    }
    for case, (frames, person, x) in cases.items():
        rider = frame_with_square(x, 150, 24)
        search = RiderSearch(CountingDetector(blind=True), {}, follow=SquareFollower(), detect_persons=square_boxes())
        rider_on_a_track(search, frames)
        persons = search.fill([person], rider)
        assert persons[0]["bbox_xyxy"] == pytest.approx([x, 150, x + 24, 174], abs=1), case
        assert persons[0]["found_by"] == "second_pass:seen_person_detector", case
        assert search.track.seen[-1][1] == persons[0]["bbox_xyxy"], case
        plain = RiderSearch(CountingDetector(blind=True), {}, follow=SquareFollower())
        rider_on_a_track(plain, frames)
        assert plain.fill([person], rider) == [person], case


def test_a_scrap_a_look_put_in_the_riders_place_gives_way_to_the_first_pass_rider_the_person_detector_sees():
    """Issue 30: the blurred rider turned back; where his track's motion went on, the pose model alone found
    a flat scrap of a body and the second look put it in place of the rider the first pass had found (seed
    32, frame 36: the track then followed scraps). The person detector does not see the scrap and sees the
    first pass's rider, so he stands and leads the track."""
    frame = frame_with_square(240, 150, 24)
    frame[158:168, 318:340] = 255  # a 22 x 10 scrap where the track puts the rider, away from the rider
    first = {"track_id": 1, "score": 0.7, "bbox_xyxy": [240.0, 150.0, 264.0, 174.0], "keypoints_2d": []}
    search = RiderSearch(CountingDetector(blind=True), {}, follow=SquareFollower(),
                         detect_persons=square_boxes(min_px=16))
    rider_on_a_track(search)
    assert search.fill([first], frame) == [first]
    assert search.track.seen[-1][1] == first["bbox_xyxy"]


def test_a_person_too_small_for_the_person_detectors_square_is_looked_at_in_one_the_riders_size():
    """Issue 30: the video graph found an 8-px scrap on a 24-px blurred rider; a square 1.5 times the scrap
    is too small for the person detector, and it was believed unseen (seed 31, frame 54; seed 32's cut clip,
    frame 162, where a track's region found an 11-px scrap and the track shrank onto it). Looked at in a
    square the rider's size, the detector sees the rider and not the scrap, and the pose model alone on its
    box gives the rider."""
    rider = frame_with_square(290, 150, 24)  # 25 px behind where his track puts him: its squares miss him
    scrap = {"track_id": 1, "score": 0.7, "bbox_xyxy": [298.0, 158.0, 306.0, 166.0], "keypoints_2d": []}
    search = RiderSearch(CountingDetector(blind=True), {}, follow=SquareFollower(), detect_persons=square_boxes())
    rider_on_a_track(search)
    persons = search.fill([scrap], rider)
    assert persons[0]["bbox_xyxy"] == pytest.approx([290, 150, 314, 174], abs=1)
    assert persons[0]["found_by"] == "second_pass:seen_person_detector"
