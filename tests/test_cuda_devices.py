"""engine.device=cuda, cuda:N and CUDA_VISIBLE_DEVICES, on a CUDA-shaped torch (tests/cuda_shim.py):
the runtime stage makes the configured device current, PHALP-style `.cuda()` calls and every
`device=` placement land on it, and a device that does not exist is named before anything loads.
Before the fix the runtime stage called torch.cuda.set_device(torch.device("cuda")), which torch
refuses (ValueError) and every GPU rung died at `runtime`."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_hmr2_phalp_engine import FakeDetection, FakePhalp, fake_detection_data, scene  # noqa: E402

from gpu_worker.engines import hmr2_phalp as hp  # noqa: E402

from cuda_shim import cuda_shim  # noqa: E402

H, W = 360, 640


def test_the_shim_refuses_an_unindexed_set_device_exactly_as_torch_does():
    from torch.cuda._utils import _get_device_index

    with pytest.raises(ValueError) as torch_says:
        _get_device_index(torch.device("cuda"))
    with cuda_shim(physical=1), pytest.raises(ValueError) as shim_says:
        torch.cuda.set_device(torch.device("cuda"))  # the call the runtime stage used to make
    assert str(shim_says.value) == str(torch_says.value)


def run_frames_like_phalp(engine: hp.HMR2PhalpEngine, frames: int) -> list:
    """Frames through the engine, the detector+HMR2 step placing tensors as PHALP does: `.cuda()`
    with no index (the current device) and `device=` the engine's device."""
    engine._phalp = FakePhalp(engine.settings.n_init)
    script = scene()

    def describe(bgr, seq, name):
        crops = torch.zeros(len(script.get(seq, [])), 4).cuda()  # PHALP's get_human_features
        torch.zeros(1, device=engine._torch_device)
        return [FakeDetection(fake_detection_data(p, seq, *bgr.shape[:2])) for p, _ in zip(script.get(seq, []), crops)]

    engine.describe_frame = describe
    engine.begin_video(W, H, 30.0)
    out = []
    for index in range(frames):
        out += engine.push(index, index / 30, np.zeros((H, W, 3), dtype=np.uint8))
    return out + engine.end_video()


@pytest.mark.parametrize("device,visible,index", [
    ("cuda", None, 0), ("cuda:1", None, 1), ("cuda:0", None, 0),
    ("cuda", "1", 0), ("cuda:0", "1", 0),  # CUDA_VISIBLE_DEVICES=1: the second card is the only one, as 0
])
def test_runtime_stage_makes_the_configured_device_current_and_frames_run_there(device, visible, index, monkeypatch):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with cuda_shim(physical=2) as shim:
        engine = hp.HMR2PhalpEngine(device, {"n_init": 5})
        next(stage for stage in engine.stages() if stage.name == "runtime").run()
        assert ("set_device", index) in shim.calls
        assert engine._torch_device == torch.device("cuda", index)
        frames = run_frames_like_phalp(engine, 35)
    assert shim.placements and shim.indices_used() == {index}
    assert [f.index for f in frames] == list(range(35))
    assert {p["track_id"] for f in frames for p in f.persons} == {1, 3}


@pytest.mark.parametrize("device,visible,words", [
    ("cuda:2", None, "sees 2 CUDA device"), ("cuda:1", "1", "CUDA_VISIBLE_DEVICES='1'"),
    ("cuda", "", "sees no CUDA device"),
])
def test_a_device_that_is_not_there_is_named_at_runtime(device, visible, words, monkeypatch):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with cuda_shim(physical=2) as shim, pytest.raises(RuntimeError, match=words):
        engine = hp.HMR2PhalpEngine(device, {})
        next(stage for stage in engine.stages() if stage.name == "runtime").run()
    assert not [call for call in shim.calls if call[0] == "set_device"]


@pytest.mark.parametrize("option,expected", [(None, True), ("false", False), ("on", True)])
def test_tf32_is_on_for_a_cuda_rung_unless_turned_off(option, expected, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    options = {} if option is None else {"tf32": option}
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        with cuda_shim(physical=1):
            engine = hp.HMR2PhalpEngine("cuda", options)
            next(stage for stage in engine.stages() if stage.name == "runtime").run()
        assert torch.backends.cuda.matmul.allow_tf32 is expected and torch.backends.cudnn.allow_tf32 is expected
        assert engine.describe()["tf32"] is expected
        cpu = hp.HMR2PhalpEngine("cpu", options)
        next(stage for stage in cpu.stages() if stage.name == "runtime").run()
        assert cpu.describe()["tf32"] is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_malformed_device_name_is_refused():
    with pytest.raises(ValueError, match="cuda, cuda:N or cpu"):
        hp.resolve_cuda_device(torch, "cuda:first")


def test_free_memory_is_read_before_the_worker_has_a_cuda_context(monkeypatch):
    """set_device creates the context (0.3-0.5 GB): NVML read after it would count that memory twice,
    against a plan whose need already includes it."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    seen_at_read: list = []
    real = hp.engine.resolve_precision

    def resolve(settings, device):
        seen_at_read.append([call for call in shim.calls if call[0] == "set_device"])
        return real(settings, device, read_facts=lambda device: None)
    monkeypatch.setattr(hp.engine, "resolve_precision", resolve)
    with cuda_shim(physical=1) as shim:
        engine = hp.HMR2PhalpEngine("cuda", {})
        next(stage for stage in engine.stages() if stage.name == "runtime").run()
        assert ("set_device", 0) in shim.calls
    assert seen_at_read == [[]], "NVML was read after the context existed"
