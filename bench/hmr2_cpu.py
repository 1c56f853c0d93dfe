"""HMR2 per person crop on this CPU: torch fp32 (the engine's current call) against the OpenVINO
fast path (gpu_worker/engines/hmr2_phalp/cpu_runtime.py), full-size model (ViT-H + the released
transformer head), random weights, in one run.

The runs are interleaved (torch, fast, torch, fast, ...) and the medians reported, so a noisy
neighbour on a small VM hits both sides alike. Also measured: batch 1 and a small batch (per crop),
the output differences on the same crops (SMPL pose and betas, 3D joints, camera, vertices), the
conversion time (fresh and from the cache), the IR's size, the first call, the process's memory, and
bf16 (an extra option, off by default) with its error.

Run with the upstream tier's venv: `.venv-upstream/bin/python -m bench.hmr2_cpu [--repeat 5]
[--batch 4]`; writes bench/results/hmr2_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "hmr2_cpu.json"
# the released model_config.yaml's SMPL head (4D-Humans' hmr_vit_transformer); vit(cfg) is ViT-H
FULL_HEAD = {"depth": 6, "heads": 8, "mlp_dim": 1024, "dim_head": 64, "dropout": 0.0, "emb_dropout": 0.0,
             "norm": "layer", "context_dim": 1280}
COMPARED = {"global_orient": ("pred_smpl_params", "global_orient"), "body_pose": ("pred_smpl_params", "body_pose"),
            "betas": ("pred_smpl_params", "betas"), "keypoints_3d": ("pred_keypoints_3d",),
            "pred_cam": ("pred_cam",), "vertices": ("pred_vertices",)}


def full_size_hmr2(cache: Any) -> Any:
    """hmr2's HMR2 at the released size (ViT-H backbone, 6-layer transformer head), randomly
    initialised (seeded), on the synthetic cache's SMPL model: the work of the real model."""
    import torch
    import yaml
    from hmr2.configs import get_config
    from hmr2.models import HMR2

    config_path = Path(cache.paths()["hmr2_model_config"])
    released = yaml.safe_load(config_path.read_text())
    released["MODEL"]["BACKBONE"] = {"TYPE": "vit"}
    released["MODEL"]["SMPL_HEAD"]["TRANSFORMER_DECODER"] = dict(FULL_HEAD)
    full = config_path.with_name("model_config_full.yaml")
    full.write_text(yaml.safe_dump(released))
    torch.manual_seed(0)
    return HMR2(get_config(str(full), update_cachedir=True), init_renderer=False).eval()


def crops(batch: int, seed: int = 7) -> dict:
    """HMR2's input as the engine gives it: normalised 256x256 crops and their masks."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {"img": torch.randn(batch, 3, 256, 256, generator=generator), "mask": torch.ones(batch, 256, 256)}


def as_engine_calls(model: Any) -> Callable[[dict], dict]:
    """The call the engine makes (phalp_build's HMR2AsHMAR.forward and infer_image), fp32, no_grad."""
    import torch

    from gpu_worker.engines.hmr2_phalp.patches import in_float32

    def call(batch: dict) -> dict:
        with torch.no_grad():
            return in_float32(model(batch))
    return call


def pick(out: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        out = out[key]
    return out


def differences(reference: dict, other: dict) -> dict[str, dict[str, float]]:
    """Max absolute error per output, and relative to the largest reference value."""
    rows = {}
    for name, path in COMPARED.items():
        ref, got = pick(reference, path).float(), pick(other, path).float()
        worst = float((ref - got).abs().max())
        rows[name] = {"max_abs": worst, "max_rel": worst / max(float(ref.abs().max()), 1e-12)}
    return rows


def interleaved(calls: dict[str, Callable[[], Any]], repeat: int) -> dict[str, list[float]]:
    """Seconds of each call, round-robin `repeat` times after one warm-up call each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


def backbone_gflop(model: Any) -> float:
    """The ViT's floating-point work per crop (2 x multiply-adds of its linear layers over the 192
    tokens, plus attention): with the CPU's fp32 GEMM rate below, the floor on its time."""
    import torch

    tokens = (256 // 16) * (192 // 16)
    linear = sum(m.weight.numel() for m in model.backbone.modules() if isinstance(m, torch.nn.Linear))
    blocks = len(model.backbone.blocks)
    attention = 2 * blocks * tokens * tokens * model.backbone.embed_dim
    return 2 * (tokens * linear + attention) / 1e9


def gemm_gflops(size: int = 2048, repeat: int = 8) -> float:
    """torch's (MKL) fp32 GEMM rate on this CPU with the process's threads, the best of `repeat`
    (a ceiling: what a noisy neighbour left is not the machine's rate). About the CPU's fp32 FMA
    rate, which no fp32 runtime can beat by much."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def file_backed_mb() -> float:
    """The part of the RSS that is mapped files (openvino maps the IR's weights: page cache the
    kernel can drop, unlike the compiled network's own copy)."""
    import psutil
    return psutil.Process().memory_info().shared / 2**20


def convert(model: Any, cache_dir: Path, precision: str) -> tuple[Any, dict]:
    """accelerate_hmr2 with its report, and the first call's time."""
    from gpu_worker.engines.hmr2_phalp.cpu_runtime import Conversion, accelerate_hmr2

    report = Conversion()
    fast = accelerate_hmr2(model, cache_dir, precision=precision, report=report)
    call = as_engine_calls(fast)
    started = time.perf_counter()
    call(crops(1))
    first = time.perf_counter() - started
    return call, {"seconds": report.seconds, "converted": report.converted, "ir_mb": report.ir_bytes / 2**20,
                  "first_call_s": first}


def measure(cache: Any, cache_dir: Path, repeat: int, batch: int, with_bf16: bool) -> dict:
    import torch

    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "cpu_count": os.cpu_count(), "repeat": repeat, "batch": batch}
    rss_start = rss_mb()
    model = full_size_hmr2(cache)
    results["rss_mb_torch_model"] = rss_mb() - rss_start
    torch_call = as_engine_calls(model)
    fast, results["convert_fresh"] = convert(model, cache_dir, "fp32")
    results["rss_mb_after_openvino"] = rss_mb() - rss_start
    results["file_backed_mb_after_openvino"] = file_backed_mb()
    _, results["convert_cached"] = convert(model, cache_dir, "fp32")  # the next load: the IR is on disk
    calls = {"torch_fp32": torch_call, "openvino_fp32": fast}
    if with_bf16:
        calls["openvino_bf16"], results["convert_bf16"] = convert(model, cache_dir, "bf16")
    one, many = crops(1), crops(batch)
    results["differences"] = {}
    reference = torch_call(many)
    for name, call in calls.items():
        if name != "torch_fp32":
            results["differences"][name] = differences(reference, call(many))
    timed: dict[str, Callable[[], Any]] = {}
    for name, call in calls.items():
        timed[f"{name} b1"] = lambda call=call: call(one)
        timed[f"{name} b{batch}"] = lambda call=call: call(many)
    results["gemm_fp32_gflops"] = gemm_gflops()
    times = interleaved(timed, repeat)
    results["seconds"] = times
    results["per_crop_median_s"] = {name: statistics.median(values) / (batch if name.endswith(f"b{batch}") else 1)
                                    for name, values in times.items()}
    results["backbone_gflop_per_crop"] = backbone_gflop(model)
    return results


def print_table(results: dict) -> None:
    per_crop, batch = results["per_crop_median_s"], results["batch"]
    base = {1: per_crop["torch_fp32 b1"], batch: per_crop[f"torch_fp32 b{batch}"]}
    print(f"HMR2 (ViT-H, random weights), {results['threads']} threads, median of {results['repeat']} interleaved")
    gflop = results["backbone_gflop_per_crop"]
    print(f"{'path':<24}{'s/crop':>9}{'speed-up':>10}{'ViT GFLOP/s':>13}")
    for name, seconds in per_crop.items():
        size = batch if name.endswith(f"b{batch}") else 1
        print(f"{name:<24}{seconds:>9.3f}{base[size] / seconds:>9.2f}x{gflop / seconds:>13.0f}")
    print(f"ViT-H: {gflop:.0f} GFLOP per crop; torch fp32 GEMM 2048^3 runs at {results['gemm_fp32_gflops']:.0f} "
          f"GFLOP/s here at best (fp32 floor about {gflop / results['gemm_fp32_gflops']:.2f} s/crop)")
    print(f"\n{'output differences':<24}" + "".join(f"{key:>14}" for key in COMPARED))
    for name, rows in results["differences"].items():
        print(f"{name + ' max abs':<24}" + "".join(f"{rows[key]['max_abs']:>14.2e}" for key in COMPARED))
        print(f"{name + ' max rel':<24}" + "".join(f"{rows[key]['max_rel']:>14.2e}" for key in COMPARED))
    for key in ("convert_fresh", "convert_cached", "convert_bf16"):
        if key in results:
            row = results[key]
            print(f"{key:<16} {row['seconds']:.1f}s (IR {row['ir_mb']:.0f} MB, first call {row['first_call_s']:.2f}s)")
    print(f"memory: torch model +{results['rss_mb_torch_model']:.0f} MB, "
          f"with the OpenVINO copy +{results['rss_mb_after_openvino']:.0f} MB (RSS; "
          f"{results['file_backed_mb_after_openvino']:.0f} MB of the process's RSS is mapped files)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 extra option")
    parser.add_argument("--cache-dir", help="keep the IR here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests" / "upstream"))
    with tempfile.TemporaryDirectory() as tmp:
        from synthetic import make_cache  # the upstream tier's synthetic SMPL model

        cache = make_cache(Path(tmp) / "synthetic")
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "ir"
        results = measure(cache, cache_dir, args.repeat, args.batch, not args.no_bf16)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
