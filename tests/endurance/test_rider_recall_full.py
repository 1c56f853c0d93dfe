"""Issue 30, the full generated set (bench/recall_set.py FULL: every clip over all 122 source frames, a
seed the core test does not use): recall of the visible rider and no person on the empty frames.
Minutes on 2 cores; the same numbers as `python -m bench.recall_bench --size full --no-cost`."""
from __future__ import annotations

import pytest

from bench.recall_set import FULL, generated

from support import PHOTO, needs_shared_data

# The goal, measured 0.988 on this set (bench/RESULTS.md, parts thirteen to fifteen: 0.971 while the
# set's pines were drawn over the rider's head; 0.961 in part nine, 0.890 without the person detector). The
# pinned OpenCV and LiteRT give the same figure run after run; under another OpenCV the rounding alone moved
# this set by 2.7 points, so a library upgrade must be measured again (bench.recall_bench --noise).
MIN_RECALL = 0.98
# The goal: nobody on the 179 empty frames, as measured now (and on draws 32, 33 and 35; draw 34 gets
# one, RESULTS part fifteen).
MAX_FALSE_PERSONS = 0


@needs_shared_data()
@pytest.mark.timeout(1800)
def test_the_full_generated_set_finds_the_rider_and_nobody_on_its_backgrounds():
    from bench.recall_bench import loaded_engine, score, shared_source

    if not PHOTO.exists():
        pytest.skip(f"{PHOTO.name} not found in the shared data")
    engine = loaded_engine()
    try:
        tally = score(engine, *generated(shared_source(), FULL))
    finally:
        engine.close()
    summary = tally.summary()
    print(f"recall {tally.recall():.3f} of {summary['visible']}, false persons {summary['false_persons']} "
          f"on {summary['empty']} empty frames")
    assert summary["false_persons"] <= MAX_FALSE_PERSONS, \
        [row["false"] for row in summary["groups"].values()]
    assert tally.recall() >= MIN_RECALL, {name: (row["found"], row["visible"]) for name, row in summary["groups"].items()}


# Three copies of the core set with every pixel moved by up to 2 grey levels (recall_set.with_noise): as
# the set itself, nobody on the empty frames; the rider in 0.993 / 0.993 / 0.985 of the frames with the
# person detector (0.971 / 0.971 / 0.985 without; bench/RESULTS.md), against the set's own 1.0, held with
# room for a pixel's turn of a detector's answer.
NOISY_COPIES, MIN_NOISY_RECALL = (1, 2, 3), 0.96


@needs_shared_data()
@pytest.mark.timeout(900)
def test_noisy_copies_of_the_core_set_find_the_rider_and_nobody_on_its_backgrounds():
    """A tile right after a cut to an empty shot took a body in the snow on copy 1 before a tile's find had
    to be found again closer; the set's own draw did not show it."""
    from bench.recall_bench import loaded_engine, score, shared_source
    from bench.recall_set import CORE, with_noise

    if not PHOTO.exists():
        pytest.skip(f"{PHOTO.name} not found in the shared data")
    engine = loaded_engine()
    clips, stills = generated(shared_source(), CORE)
    try:
        for copy in NOISY_COPIES:
            tally = score(engine, *with_noise(clips, stills, seed=copy))
            summary = tally.summary()
            assert summary["false_persons"] == 0, (copy, [row["false"] for row in summary["groups"].values()])
            assert tally.recall() >= MIN_NOISY_RECALL, (copy, {name: row["missed"] for name, row in summary["groups"].items()})
    finally:
        engine.close()
