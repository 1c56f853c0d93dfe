"""Shared helpers live in tests/support.py; pyproject.toml puts tests/ on the import path."""

import pytest


@pytest.fixture(scope="module")
def mediapipe_first_pass():
    """The MediaPipe engine loaded, its second pass off: its graph and its two models to call directly."""
    from gpu_worker.engines.mediapipe_engine import MediaPipeEngine

    engine = MediaPipeEngine("cpu", {"second_pass": False})
    for stage in engine.stages():
        stage.run()
    yield engine
    engine.close()
