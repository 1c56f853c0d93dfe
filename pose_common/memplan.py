"""The GPU memory plan: what each rung of the ladder needs, what the card has (NVML), which rung to
start on, how many person crops one HMR2/HMAR forward may take, and whether a step-up probe fits
beside the worker. Pure planning plus one NVML read; no torch, so the supervisor and the CLI can use
it (the supervisor must never import torch).

Each model's need is read from memory_plan.json beside this file, written by bench/memory_plan.py:
the real upstream architectures traced without a GPU on fake CUDA tensors under torch's
FakeTensorMode, under CUDA autocast's own op policy, with the engine's half-precision weights
(parameter bytes exact, the activation peak of one no-grad forward by torch's MemTracker at the real
input size; the file records the conditions). What was not traced is added as stated constants: the
CUDA context with cuBLAS/cuDNN workspaces, a share for the caching allocator's fragmentation and
PHALP's pose transformer (docs/hmr2-phalp.md, memory section)."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

MB = 2 ** 20
PRECISIONS = ("fp32", "fp16", "bf16", "auto")
TRACED_FILE = Path(__file__).with_name("memory_plan.json")


@functools.lru_cache(maxsize=None)
def traced() -> dict[str, Any]:
    """The traced numbers, read once at first use (bench/memory_plan.py writes them, and imports the
    engine, which imports this module, so the file may be missing while it runs)."""
    try:
        numbers: dict[str, Any] = json.loads(TRACED_FILE.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"the memory plan's traced numbers are unreadable ({TRACED_FILE.name}: {exc}); "
                           "write them with bench/memory_plan.py") from exc
    return numbers


CROP_MODELS = ("hmr2", "hmar")          # run on every person crop, one after the other
DETECTORS = ("vitdet", "regnety")
# PHALP's pose transformer: its checkpoint's size (not traced; no half weights); activations a few MB
POSE_PREDICTOR_MB = {"weights": 140.0, "activations": 8.0}
CUDA_CONTEXT_MB = 600.0   # CUDA context + cuBLAS/cuDNN workspaces: not measurable without a card; stated
FRAGMENTATION = 0.15      # the caching allocator's reserve beyond live bytes
START_MARGIN_MB = 512.0   # what the plan leaves free on the card (the desktop, the driver, spikes)


def traced_as(precision: str) -> str:
    """The traced precision a run's precision is planned by: auto at its worst, fp32."""
    return "fp32" if precision == "auto" else precision


def traced_model(model: str) -> Mapping[str, Any]:
    entry: Mapping[str, Any] = traced()["models"][model]
    return entry


def weights_mb(model: str, precision: str) -> float:
    if model == "pose_predictor":
        return POSE_PREDICTOR_MB["weights"]
    return float(traced_model(model)["weights_mb"][traced_as(precision)])


def detections_per_image(detector: str) -> int:
    return int(traced_model(detector)["detections_per_image"])


def max_crops() -> int:
    """A frame never has more person crops than its detector has detections."""
    return max(detections_per_image(d) for d in DETECTORS)


def detector_peak_mb(detector: str, precision: str) -> float:
    """The detector's largest moment: its backbone's forward, or pasting every detection's mask at the
    full frame while the input and the feature pyramid are still held (detectron2's postprocess on
    CUDA), as one trace measured it."""
    return float(traced_model(detector)["forward_mb"][traced_as(precision)])


def crop_forward_mb(precision: str, crops: int) -> float:
    """HMR2 then HMAR on `crops` person crops: the larger of the two forwards."""
    key = traced_as(precision)
    return max(float(traced_model(m)["fixed_mb"][key]) + float(traced_model(m)["per_crop_mb"][key]) * crops
               for m in CROP_MODELS)


def detector_of(rung: Mapping[str, Any]) -> str:
    detector = str((rung.get("options") or {}).get("detector", "vitdet")).lower()
    return "regnety" if detector == "maskrcnn" else detector


def on_gpu(rung: Mapping[str, Any]) -> bool:
    return str(rung.get("device", "cpu")).startswith("cuda")


def rung_models(rung: Mapping[str, Any]) -> list[str]:
    """The models a rung holds on the GPU (none for a CPU rung, or an engine without GPU models)."""
    if not on_gpu(rung) or rung.get("engine") != "hmr2_phalp":
        return []
    detector = detector_of(rung)
    return [*CROP_MODELS, "pose_predictor"] + ([detector] if detector in DETECTORS else [])


def activations_mb(models: Sequence[str], precision: str, crops: int) -> float:
    """The largest single forward: the detector, HMR2 and HMAR run one after another, and the caching
    allocator hands each the blocks the previous one freed."""
    peaks = [detector_peak_mb(m, precision) for m in models if m in DETECTORS]
    if any(m in CROP_MODELS for m in models):
        peaks.append(crop_forward_mb(precision, crops))
    if "pose_predictor" in models:
        peaks.append(POSE_PREDICTOR_MB["activations"])
    return max(peaks, default=0.0)


def need_mb(models: Sequence[str], precision: str, crops: Optional[int] = None) -> float:
    """All weights resident, the largest single forward's activations at a time (HMR2 and HMAR on
    `crops` crops; default: the plan's chunk), the context, and the allocator's share."""
    if not models:
        return 0.0
    crops = planned_chunk(models, precision) if crops is None else crops
    weights = sum(weights_mb(m, precision) for m in models)
    return round(CUDA_CONTEXT_MB + (weights + activations_mb(models, precision, crops)) * (1 + FRAGMENTATION))


def planned_chunk(models: Sequence[str], precision: str) -> int:
    """The most crops one HMR2/HMAR forward may take within the activations the rung holds anyway
    (its detector's peak): with it, no crowd makes the crop forwards the rung's largest moment."""
    held = max([detector_peak_mb(m, precision) for m in models if m in DETECTORS], default=0.0)
    return largest_chunk(lambda crops: crop_forward_mb(precision, crops) <= held)


def largest_chunk(fits: Callable[[int], bool]) -> int:
    """The largest crop count in 1..max_crops() that fits (1 when none does: a crop at a time)."""
    return max((crops for crops in range(1, max_crops() + 1) if fits(crops)), default=1)


def crop_chunk(rung: Mapping[str, Any], precision: str, budget_mb: Optional[float] = None) -> int:
    """How many person crops one HMR2/HMAR forward takes on this rung in this precision. Without a
    budget: the plan's chunk, inside the need the plan reports. With a card's budget (MB): the most
    crops whose need still fits it. A CPU rung has no GPU plan: every crop at once, as PHALP does."""
    models = rung_models(rung)
    if not models:
        return max_crops()
    if budget_mb is None:
        return planned_chunk(models, precision)
    return largest_chunk(lambda crops: need_mb(models, precision, crops) <= budget_mb)


def rung_need_mb(rung: Mapping[str, Any]) -> dict[str, float]:
    models = rung_models(rung)
    return {"fp32": need_mb(models, "fp32"), "fp16": need_mb(models, "fp16")}


def precision_need_mb(rung: Mapping[str, Any], precision: str) -> float:
    """The rung's need in one precision (bf16 has its own: softmax copies a bf16 input to fp32)."""
    return need_mb(rung_models(rung), precision)


def probe_need_mb(rung: Mapping[str, Any]) -> float:
    """The detector probe loads only the detector (engine.probe_stages), in its own CUDA context."""
    models = [m for m in rung_models(rung) if m in DETECTORS]
    precision = rung_precision_option(rung, "fp32")
    return need_mb(models, precision) if models else 0.0  # auto: planned at its worst


def rung_precision_option(rung: Mapping[str, Any], default: str = "auto") -> str:
    precision = str((rung.get("options") or {}).get("precision", default)).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def fitting_precision(rung: Mapping[str, Any], budget_mb: float) -> Optional[str]:
    """The precision this rung runs in within budget_mb, or None when it does not fit.
    auto: fp32 when it fits, else fp16; a fixed precision fits or not."""
    if not on_gpu(rung):
        return "fp32"
    wanted = rung_precision_option(rung)
    candidates = ["fp32", "fp16"] if wanted == "auto" else [wanted]
    return next((p for p in candidates if precision_need_mb(rung, p) <= budget_mb), None)


@dataclass(frozen=True)
class GpuFacts:
    total_mb: float
    free_mb: float
    name: str = ""
    index: int = 0


@dataclass(frozen=True)
class StartChoice:
    rung: int
    precision: str
    reason: str


def start_rung(ladder: Sequence[Mapping[str, Any]], facts: Optional[GpuFacts],
               margin_mb: float = START_MARGIN_MB) -> StartChoice:
    """The best (highest) rung that fits in the card's free memory less the margin. Without NVML
    facts nothing is known: the ladder starts at its top, as before, and says so."""
    if facts is None:
        return StartChoice(0, fitting_precision(ladder[0], float("inf")) or "fp32",
                           "no NVML facts (no NVIDIA driver or pynvml): starting at the top rung unplanned")
    budget = facts.free_mb - margin_mb
    skipped: list[str] = []
    for index, rung in enumerate(ladder):
        precision = fitting_precision(rung, budget)
        if precision is not None:
            why = f"fits {budget:.0f} MB ({facts.free_mb:.0f} MB free of {facts.total_mb:.0f} less {margin_mb:.0f})"
            if on_gpu(rung):
                why = f"needs {precision_need_mb(rung, precision):.0f} MB in {precision}, " + why
            return StartChoice(index, precision, "; ".join([*skipped, f"rung {index} {why}"]))
        skipped.append(f"rung {index} needs {min(rung_need_mb(rung).values()):.0f} MB > {budget:.0f} MB")
    return StartChoice(len(ladder) - 1, "fp32", "; ".join([*skipped, "nothing fits: the last rung"]))


def step_up_gate(target: Mapping[str, Any], facts: Optional[GpuFacts],
                 margin_mb: float = START_MARGIN_MB) -> tuple[bool, str]:
    """Whether a step-up probe of `target` may run now, beside the worker that holds its memory:
    the target must fit the whole card at all, and its probe must fit in what is free now."""
    if not on_gpu(target):
        return True, "the target rung runs on the CPU"
    if facts is None:
        return True, "no NVML facts: probing unplanned"
    if fitting_precision(target, facts.total_mb - margin_mb) is None:
        return False, (f"the rung needs {min(rung_need_mb(target).values()):.0f} MB, more than this "
                       f"{facts.total_mb:.0f} MB card can give (margin {margin_mb:.0f}): not stepping up")
    probe = probe_need_mb(target)
    if probe > facts.free_mb - margin_mb:
        return False, (f"waiting: the probe needs {probe:.0f} MB beside the worker, "
                       f"{facts.free_mb:.0f} MB free (margin {margin_mb:.0f})")
    return True, f"the probe needs {probe:.0f} MB, {facts.free_mb:.0f} MB free"


def nvml_index(device: str) -> int:
    """NVML numbers physical cards; CUDA_VISIBLE_DEVICES renumbers them for CUDA. The rung's
    device index is CUDA's; with a plain numeric CUDA_VISIBLE_DEVICES it maps back."""
    import os

    _, _, index = str(device).partition(":")
    cuda_index = int(index) if index.isdigit() else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible) and cuda_index < len(visible):
        return int(visible[cuda_index])
    return cuda_index


def read_gpu_facts(device: str = "cuda", nvml: Optional[Any] = None,
                   load: Callable[[], Any] = lambda: __import__("pynvml")) -> Optional[GpuFacts]:
    """Total and free memory of the rung's card through NVML (pynvml), or None when there is no
    driver or no pynvml. `nvml` is injectable (tests give recorded facts)."""
    try:
        nvml = nvml or load()
        nvml.nvmlInit()
    except Exception:
        return None
    try:
        index = nvml_index(device)
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        return GpuFacts(total_mb=memory.total / MB, free_mb=memory.free / MB,
                        name=name.decode() if isinstance(name, bytes) else str(name), index=index)
    except Exception:
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def card_facts(total_mb: float, used_mb: float = 0.0, name: str = "") -> GpuFacts:
    """Facts for a card of `total_mb` (models plan --gpu-mb): free is what the plan may use."""
    return GpuFacts(total_mb=float(total_mb), free_mb=float(total_mb) - float(used_mb), name=name)
