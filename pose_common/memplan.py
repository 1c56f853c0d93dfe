"""The GPU memory plan: what each rung of the ladder needs, what the card has (NVML), which rung to
start on and whether a step-up probe fits beside the worker. Pure planning plus one NVML read; no
torch, so the supervisor and the CLI can use it (the supervisor must never import torch).

Each model's need comes from bench/memory_plan.py: the real upstream architectures built and run on
the CPU under torch's FakeTensorMode, parameter bytes exact, the activation peak of one no-grad
forward measured by torch's MemTracker at the real input size (docs/hmr2-phalp.md, memory table).
What was not measured is added as stated constants: the CUDA context with cuBLAS/cuDNN workspaces,
and a share for the caching allocator's fragmentation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

MB = 2 ** 20
PRECISIONS = ("fp32", "fp16", "bf16", "auto")

# MB per model, from bench/results/memory_plan.json (1920x1080 frame, 4 persons). weights = parameters
# + buffers (fp32); activations = peak live bytes of one forward, fp32 and under fp16 autocast
MODEL_MB: dict[str, dict[str, float]] = {
    "hmr2": {"weights": 2576.9, "fp32": 44.2, "fp16": 36.1},  # ViT-H + head + SMPL; activations: 4 crops
    "hmar": {"weights": 141.5, "fp32": 103.0, "fp16": 60.0},   # PHALP's appearance network, 4 crops
    # PHALP's pose transformer: its checkpoint's size (not traced); its activations are a few MB
    "pose_predictor": {"weights": 140.0, "fp32": 8.0, "fp16": 4.0},
    "vitdet": {"weights": 2637.7, "fp32": 3218.5, "fp16": 1636.5},  # backbone + pyramid at 1024x1024
    "regnety": {"weights": 160.0, "fp32": 402.9, "fp16": 207.3},    # backbone + FPN at 768x1344
}
CUDA_CONTEXT_MB = 600.0   # CUDA context + cuBLAS/cuDNN workspaces: not measurable on the CPU; stated
FRAGMENTATION = 0.15      # the caching allocator's reserve beyond live bytes
START_MARGIN_MB = 512.0   # what the plan leaves free on the card (the desktop, the driver, spikes)


def bf16_as_fp16(precision: str) -> str:
    return "fp16" if precision == "bf16" else precision


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
    return ["hmr2", "hmar", "pose_predictor"] + ([detector] if detector in MODEL_MB else [])


def need_mb(models: Sequence[str], precision: str) -> float:
    """All weights resident, the largest single forward's activations at a time (detector, HMR2 and
    HMAR run one after another), the context, and the allocator's share."""
    if not models:
        return 0.0
    key = bf16_as_fp16(precision)
    weights = sum(MODEL_MB[m]["weights"] for m in models)
    activations = max(MODEL_MB[m][key] for m in models)
    return round(CUDA_CONTEXT_MB + (weights + activations) * (1 + FRAGMENTATION))


def rung_need_mb(rung: Mapping[str, Any]) -> dict[str, float]:
    models = rung_models(rung)
    return {"fp32": need_mb(models, "fp32"), "fp16": need_mb(models, "fp16")}


def probe_need_mb(rung: Mapping[str, Any]) -> float:
    """The detector probe loads only the detector (engine.probe_stages), in its own CUDA context."""
    models = [m for m in rung_models(rung) if m in ("vitdet", "regnety")]
    precision = rung_precision_option(rung, "fp32")
    return need_mb(models, "fp32" if precision == "auto" else precision) if models else 0.0  # auto: the worst case


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
    needs = rung_need_mb(rung)
    wanted = rung_precision_option(rung)
    candidates = ["fp32", "fp16"] if wanted == "auto" else [wanted]
    for precision in candidates:
        if needs[bf16_as_fp16(precision)] <= budget_mb:
            return precision
    return None


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
                why = f"needs {rung_need_mb(rung)[bf16_as_fp16(precision)]:.0f} MB in {precision}, " + why
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
