"""The GPU memory plan with injected NVML facts (8, 12, 24 GB cards, no NVML): which rung the
supervisor starts on, when a step-up probe may run beside the worker, and `models plan`; the traced
numbers it reads (CUDA autocast's policy, half-precision weights, mask pasting), the crop chunk it
sizes and the chunking that keeps the engine to it; CUDA autocast on fake CUDA tensors."""
from __future__ import annotations

import copy
import json
import math
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
    ok, why = memplan.step_up_gate(LADDER[0], facts(6, used_mb=4000))  # ViTDet needs more than 6 GB in any precision
    assert not ok and "more than this" in why
    assert memplan.step_up_gate(LADDER[0], facts(24, used_mb=5000))[0]
    assert memplan.step_up_gate(LADDER[2], facts(8, used_mb=7000)) == (True, "the target rung runs on the CPU")


def test_the_planner_imports_without_torch():
    code = "import sys, pose_common.memplan, pose_service.verbs.models_plan; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.parametrize("gpu_mb,start", [(8192, ("vitdet", "fp16")), (24576, ("vitdet", "fp32"))])
def test_models_plan_cli(gpu_mb, start, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pose_service.cli", "--config-name", "gpu", "models", "plan",
                           "--gpu-mb", str(gpu_mb), "--json", f"state_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["detector"] for r in out["rungs"]] == ["vitdet", "regnety", "mediapipe", None]
    assert all(set(r["need_mb"]) == {"fp32", "fp16"} for r in out["rungs"])
    chosen = out["start"]
    assert set(chosen) >= {"rung", "detector", "precision"}
    assert (chosen["detector"], chosen["precision"]) == start, chosen["reason"]


# -- the traced numbers (pose_common/memory_plan.json, written by bench/memory_plan.py) --------------

FRAME_PX = 1080 * 1920
ATTENTION_MAP_MB = 16 * 4096 * 4096 * 2 / memplan.MB  # one of ViTDet-H's global-attention maps in 2 bytes
# the previous table's ViTDet activations in fp16, traced under CPU autocast with fp32 weights
CPU_POLICY_VITDET_FP16_MB = 1636.5


def test_the_plan_reads_numbers_traced_under_cuda_autocast_at_1080p():
    conditions = memplan.traced()["conditions"]
    assert conditions["policy"] == "cuda-autocast"
    assert conditions["frame"] == [1080, 1920]
    assert set(conditions["precisions"]) == {"fp32", "fp16", "bf16"}
    assert conditions["torch"] and conditions["half_weights"]


@pytest.mark.parametrize("used_mb", [0, 400, 1000], ids=["idle", "a desktop", "a busy desktop"])
def test_an_8_gb_card_starts_on_vitdet_in_fp16(used_mb):
    choice = memplan.start_rung(LADDER, facts(8, used_mb=used_mb))
    assert (choice.rung, choice.precision) == (0, "fp16"), choice.reason
    assert 6000 <= memplan.precision_need_mb(LADDER[0], "fp16") <= 6600  # both ViT-H in half: 6 - 6.5 GB


def test_half_precision_holds_the_two_vit_h_backbones_in_two_bytes():
    for model in ("hmr2", "vitdet"):  # about 630 M Linear/Conv parameters each: 2 bytes saved on each
        assert memplan.weights_mb(model, "fp32") - memplan.weights_mb(model, "fp16") > 1150
        assert memplan.weights_mb(model, "bf16") == memplan.weights_mb(model, "fp16")
    for model in ("hmar", "regnety", "pose_predictor"):  # no ViT-H: fp32 in every precision
        assert memplan.weights_mb(model, "fp16") == memplan.weights_mb(model, "fp32")


def test_vitdet_attention_is_counted_as_cuda_runs_its_softmax():
    backbone = memplan.traced()["models"]["vitdet"]["backbone_mb"]
    # fp16: one fused kernel reads the fp16 scores and writes fp32 probabilities, beside the scores
    # the relative-position terms were added to
    assert backbone["fp16"] >= 3 * ATTENTION_MAP_MB
    # bf16: the scores are first copied to fp32 (bf16 scores + fp32 copy + fp32 probabilities)
    assert backbone["bf16"] >= 5 * ATTENTION_MAP_MB


def test_the_vitdet_need_counts_every_detections_mask_pasted_at_the_full_frame_in_the_engines_chunks():
    from gpu_worker.engines.hmr2_phalp.detectors import MASK_PASTE_CHUNK_BYTES

    entry = memplan.traced()["models"]["vitdet"]
    detections = entry["detections_per_image"]
    assert detections == 100  # FastRCNNOutputLayers' test_topk_per_image: the engine's configs set none
    assert memplan.traced()["conditions"]["gpu_mem_limit"] == MASK_PASTE_CHUNK_BYTES  # traced as the engine pastes
    # detectron2 sizes a chunk by 4 bytes a pixel; in fp16 a chunk's detection holds the fp32 sampling
    # grid (8 B a pixel), its fp16 copy (4) and the sampled fp16 mask (2), beside every detection's
    # bool result (1)
    chunks = math.ceil(detections * FRAME_PX * 4 / MASK_PASTE_CHUNK_BYTES)
    per_chunk = math.ceil(detections / chunks)
    assert entry["mask_paste_mb"]["fp16"] >= (detections * 1 + per_chunk * 14) * FRAME_PX / memplan.MB
    assert entry["mask_paste_one_mb"]["fp16"] >= 15 * FRAME_PX / memplan.MB
    # detectron2's own 1 GiB chunk would paste all 100 at once: about 2.9 GB, more than the backbone
    assert detections * entry["mask_paste_one_mb"]["fp16"] > entry["backbone_mb"]["fp16"]
    assert memplan.detector_peak_mb("vitdet", "fp16") >= max(entry["backbone_mb"]["fp16"],
                                                             entry["mask_paste_mb"]["fp16"] + entry["features_mb"]["fp16"])


def test_bf16_pays_for_its_softmax_copy_where_the_cpu_trace_saw_none():
    weights = sum(memplan.weights_mb(m, "bf16") for m in memplan.rung_models(LADDER[0]))
    cpu_policy_need = memplan.CUDA_CONTEXT_MB + (weights + CPU_POLICY_VITDET_FP16_MB) * (1 + memplan.FRAGMENTATION)
    assert memplan.precision_need_mb(LADDER[0], "bf16") > cpu_policy_need + 1000


# -- the crop chunk -----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rung", LADDER[:2], ids=["vitdet", "regnety"])
def test_the_plans_crop_chunk_is_the_most_crops_within_the_need_it_reports(rung, precision):
    models = memplan.rung_models(rung)
    chunk = memplan.crop_chunk(rung, precision)
    held = memplan.detector_peak_mb(memplan.detector_of(rung), precision)
    assert 1 <= chunk <= memplan.max_crops()
    assert memplan.crop_forward_mb(precision, chunk) <= held
    assert chunk == memplan.max_crops() or memplan.crop_forward_mb(precision, chunk + 1) > held
    for crowd in (1, 4, 40, memplan.max_crops()):  # any crowd, run chunk crops at a time, stays inside
        assert memplan.need_mb(models, precision, crops=min(crowd, chunk)) <= memplan.precision_need_mb(rung, precision)


def test_a_card_budget_sizes_the_chunk_to_what_it_leaves():
    rung, models = LADDER[0], memplan.rung_models(LADDER[0])
    smallest = memplan.need_mb(models, "fp16", crops=1)
    for budget in (smallest, smallest + 500, 80 * GB):
        chunk = memplan.crop_chunk(rung, "fp16", budget_mb=budget)
        assert memplan.need_mb(models, "fp16", crops=chunk) <= budget
        assert chunk == memplan.max_crops() or memplan.need_mb(models, "fp16", crops=chunk + 1) > budget
    assert memplan.crop_chunk(LADDER[2], "fp32") == memplan.max_crops()  # the CPU rung: no GPU plan


def heavier_crops(per_crop_mb: float) -> dict:
    """The traced numbers with every crop of HMAR costing per_crop_mb: a crowd the detector's peak
    cannot cover."""
    heavy = copy.deepcopy(memplan.traced())
    heavy["models"]["hmar"]["per_crop_mb"] = {p: per_crop_mb for p in heavy["models"]["hmar"]["per_crop_mb"]}
    return heavy


def test_crops_costing_more_than_the_detector_holds_are_chunked(monkeypatch):
    heavy = heavier_crops(200.0)
    monkeypatch.setattr(memplan, "traced", lambda: heavy)
    models = memplan.rung_models(LADDER[0])
    chunk = memplan.crop_chunk(LADDER[0], "fp16")
    held = memplan.detector_peak_mb("vitdet", "fp16")
    assert 1 < chunk < 40
    assert memplan.crop_forward_mb("fp16", chunk) <= held < memplan.crop_forward_mb("fp16", chunk + 1)
    assert memplan.need_mb(models, "fp16", crops=chunk) == memplan.precision_need_mb(LADDER[0], "fp16")


def test_the_engine_takes_the_plans_chunk_unless_an_option_sets_one():
    pytest.importorskip("torch")
    from gpu_worker.engines.hmr2_phalp.phalp_build import crop_chunk_for
    from gpu_worker.engines.hmr2_phalp.settings import Settings

    planned = crop_chunk_for(Settings.from_options({"detector": "vitdet"}), "cuda:0", "fp16")
    assert planned == memplan.crop_chunk(LADDER[0], "fp16")
    assert crop_chunk_for(Settings.from_options({"crop_chunk": 8}), "cuda:0", "fp16") == 8
    with pytest.raises(ValueError, match="crop_chunk"):
        Settings.from_options({"crop_chunk": -1})


def counting_hmar(torch, chunk):
    """HMR2AsHMAR's shape for forward_in_chunks: forward_crops returns what PHALP reads plus the meshes,
    and records the batch sizes it was given."""
    class CountingHmar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Linear(12, 6)
            self.crop_chunk = chunk
            self.batches = []
            self.last_vertices = None

        def forward_crops(self, crops):
            self.batches.append(int(crops.shape[0]))
            flat = crops.flatten(1)
            pose = self.body(flat)
            return {"uv_vector": flat * 2, "pose_smpl": {"betas": pose[:, :2], "body_pose": pose[:, 2:].view(-1, 2, 2)},
                    "pred_cam": (pose[:, :3], pose[:, 3:]), "pred_vertices": crops[:, :1] + 1}
    return CountingHmar()


def same_structure(a, b, torch):
    """Same nesting, types and shapes; values equal but for float rounding (a matmul over fewer rows
    may sum in another order)."""
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_structure(a[k], b[k], torch) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_structure(x, y, torch) for x, y in zip(a, b))
    return a == b


def test_a_40_crop_frame_runs_in_chunks_no_larger_than_the_plans_with_the_unchunked_outputs(monkeypatch):
    torch = pytest.importorskip("torch")
    from gpu_worker.engines.hmr2_phalp.phalp_build import crop_chunk_for, forward_in_chunks
    from gpu_worker.engines.hmr2_phalp.settings import Settings

    crops = torch.randn(40, 3, 2, 2)
    whole = counting_hmar(torch, chunk=40)
    expected = forward_in_chunks(whole, crops)
    assert whole.batches == [40]
    heavy = heavier_crops(200.0)
    monkeypatch.setattr(memplan, "traced", lambda: heavy)  # a plan whose chunk bites
    planned = crop_chunk_for(Settings.from_options({"detector": "vitdet"}), "cuda:0", "fp16")
    assert planned < 40
    for chunk in (planned, 7, 1):
        hmar = counting_hmar(torch, chunk)
        out = forward_in_chunks(hmar, crops)
        assert max(hmar.batches) <= chunk and sum(hmar.batches) == 40
        assert same_structure(out, expected, torch) and "pred_vertices" not in out
        assert torch.equal(hmar.last_vertices, whole.last_vertices)  # no arithmetic: exact


def test_chunking_keeps_batch_independent_values_and_refuses_a_zero_chunk():
    torch = pytest.importorskip("torch")
    from gpu_worker.engines.hmr2_phalp.chunking import chunked, run_in_chunks

    def forward(batch):
        return {"rows": batch * 2, "scale": 3, "total": batch.new_tensor(1.0)}

    out = chunked(forward, 3)(torch.arange(10.0))
    assert torch.equal(out["rows"], torch.arange(10.0) * 2) and out["scale"] == 3 and out["total"].dim() == 0
    with pytest.raises(ValueError):
        run_in_chunks(forward, torch.arange(4.0), 0)


# -- CUDA autocast without a GPU (bench/memory_plan.py traces under it) -------------------------------

def test_cuda_autocast_on_fake_cuda_tensors_runs_softmax_in_fp32_and_linear_in_fp16():
    torch = pytest.importorskip("torch")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.memory_plan import cuda_autocast

    functional = torch.nn.functional
    with FakeTensorMode():
        x, w = torch.zeros(2, 8, device="cuda"), torch.zeros(8, 8, device="cuda")
        with cuda_autocast(torch.float16):
            y = functional.linear(x, w)
            dtypes = {"linear": y.dtype, "matmul": (y @ w).dtype, "softmax": torch.softmax(y, -1).dtype,
                      "layer_norm": functional.layer_norm(y, (8,)).dtype, "sum": y.sum().dtype,
                      "add": (y + y).dtype, "add fp32": (y + x).dtype}
        after = functional.linear(x, w).dtype
    half, single = torch.float16, torch.float32
    assert dtypes == {"linear": half, "matmul": half, "softmax": single, "layer_norm": single, "sum": single,
                      "add": half, "add fp32": single}
    assert after == single  # switched off on leaving


def test_torch_autocast_cuda_turns_itself_off_without_a_card_which_is_why_the_switches_are_set_directly():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: torch.autocast('cuda') works here")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.zeros(2, 8, device="cuda")
        with pytest.warns(UserWarning, match="Disabling autocast"), torch.autocast("cuda", dtype=torch.float16):
            assert torch.nn.functional.linear(x, x).dtype == torch.float32
