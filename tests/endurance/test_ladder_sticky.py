"""The ladder under a sticky CUDA error (tests/test_ladder.py runs the same walk for a CUDA OOM):
three sticky errors while loading step down to the CPU rung, the probe steps back up."""
from __future__ import annotations

from test_ladder import clip, steps_down_and_back_up  # noqa: F401  (clip: the fixture)


def test_repeated_sticky_cuda_errors_step_down_then_probe_steps_back_up(tmp_path, clip):  # noqa: F811
    steps_down_and_back_up(tmp_path, clip, "cuda_sticky")
