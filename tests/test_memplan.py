"""The GPU memory plan with injected NVML facts (8, 12, 24 GB cards, no NVML): which rung the
supervisor starts on, when a step-up probe may run beside the worker, and `models plan`."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from pose_common import memplan

from support import REPO

GB = 1024
LADDER = [  # configs/gpu.yaml's ladder
    {"engine": "hmr2_phalp", "device": "cuda", "options": {"detector": "vitdet"}},
    {"engine": "hmr2_phalp", "device": "cuda", "options": {"detector": "regnety"}},
    {"engine": "hmr2_phalp", "device": "cpu", "options": {"detector": "mediapipe"}},
    {"engine": "mediapipe", "device": "cpu"},
]


class FakeNvml:
    """pynvml's calls the plan makes, answering with one card's recorded facts."""

    def __init__(self, total_mb: float, used_mb: float = 0.0, name: str = "NVIDIA GeForce RTX 4060 Laptop GPU"):
        self.total, self.used, self.name, self.asked = total_mb * memplan.MB, used_mb * memplan.MB, name, []

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        self.asked.append(index)
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=self.total, free=self.total - self.used, used=self.used)

    def nvmlDeviceGetName(self, handle):
        return self.name.encode()


def facts(total_gb: float, used_mb: float = 0.0) -> memplan.GpuFacts:
    return memplan.read_gpu_facts("cuda", nvml=FakeNvml(total_gb * GB, used_mb))


def test_an_8_gb_laptop_card_does_not_start_on_vitdet_in_fp32():
    choice = memplan.start_rung(LADDER, facts(8, used_mb=400))  # the desktop holds some
    assert (choice.rung, choice.precision) != (0, "fp32")
    assert LADDER[choice.rung]["device"] == "cuda"  # but it stays on the GPU
    assert "rung 0 needs" in choice.reason and "MB free of" in choice.reason


def test_a_24_gb_card_starts_on_vitdet_in_fp32():
    choice = memplan.start_rung(LADDER, facts(24))
    assert (choice.rung, choice.precision) == (0, "fp32")


def test_a_12_gb_card_gets_the_best_rung_whose_need_fits():
    card = facts(12)
    choice = memplan.start_rung(LADDER, card)
    budget = card.free_mb - memplan.START_MARGIN_MB
    need = memplan.rung_need_mb(LADDER[choice.rung])[choice.precision]
    assert need <= budget
    for higher in LADDER[:choice.rung]:  # nothing above it fits in any precision
        assert min(memplan.rung_need_mb(higher).values()) > budget


def test_precision_auto_falls_to_fp16_only_where_fp32_does_not_fit():
    rung = {**LADDER[0], "options": {"detector": "vitdet", "precision": "auto"}}
    needs = memplan.rung_need_mb(rung)
    assert needs["fp16"] < needs["fp32"]
    between = (needs["fp16"] + needs["fp32"]) / 2
    assert memplan.fitting_precision(rung, needs["fp32"]) == "fp32"
    assert memplan.fitting_precision(rung, between) == "fp16"
    assert memplan.fitting_precision({**rung, "options": {"precision": "fp32"}}, between) is None


def test_without_nvml_the_ladder_starts_at_the_top_and_says_why():
    def no_driver():
        raise ImportError("No module named 'pynvml'")

    assert memplan.read_gpu_facts("cuda", load=no_driver) is None
    broken = FakeNvml(8 * GB)
    broken.nvmlInit = lambda: (_ for _ in ()).throw(RuntimeError("NVML Shared Library Not Found"))
    assert memplan.read_gpu_facts("cuda", nvml=broken) is None
    choice = memplan.start_rung(LADDER, None)
    assert choice.rung == 0 and "no NVML" in choice.reason


def test_nvml_is_asked_about_the_physical_card_behind_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    nvml = FakeNvml(24 * GB)
    memplan.read_gpu_facts("cuda:1", nvml=nvml)
    assert nvml.asked == [3]


def test_step_up_probe_waits_until_it_fits_beside_the_worker():
    worker_mb = memplan.rung_need_mb(LADDER[1])["fp32"]  # the RegNetY worker holds this
    probe_mb = memplan.probe_need_mb(LADDER[0])
    card_mb = worker_mb + probe_mb + memplan.START_MARGIN_MB
    card_mb = max(card_mb, memplan.rung_need_mb(LADDER[0])["fp16"] + memplan.START_MARGIN_MB + 1)
    crowded = memplan.GpuFacts(total_mb=card_mb, free_mb=probe_mb - 1)
    ok, why = memplan.step_up_gate(LADDER[0], crowded)
    assert not ok and why.startswith("waiting") and f"{probe_mb:.0f} MB" in why
    roomy = memplan.GpuFacts(total_mb=card_mb, free_mb=probe_mb + memplan.START_MARGIN_MB)
    assert memplan.step_up_gate(LADDER[0], roomy)[0]


def test_no_step_up_to_a_rung_the_card_can_never_hold():
    ok, why = memplan.step_up_gate(LADDER[0], facts(8, used_mb=4000))
    assert not ok and "more than this" in why
    assert memplan.step_up_gate(LADDER[0], facts(24, used_mb=5000))[0]
    assert memplan.step_up_gate(LADDER[2], facts(8, used_mb=7000)) == (True, "the target rung runs on the CPU")


def test_the_planner_imports_without_torch():
    code = "import sys, pose_common.memplan, pose_service.verbs.models_plan; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.parametrize("gpu_mb,vitdet_fp32", [(8192, False), (24576, True)])
def test_models_plan_cli(gpu_mb, vitdet_fp32, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pose_service.cli", "--config-name", "gpu", "models", "plan",
                           "--gpu-mb", str(gpu_mb), "--json", f"state_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["detector"] for r in out["rungs"]] == ["vitdet", "regnety", "mediapipe", None]
    assert all(set(r["need_mb"]) == {"fp32", "fp16"} for r in out["rungs"])
    start = out["start"]
    assert set(start) >= {"rung", "detector", "precision"}
    assert ((start["detector"], start["precision"]) == ("vitdet", "fp32")) is vitdet_fp32
