"""HMR2 on the CPU through OpenVINO: the same HMR2.forward, with its two networks run by OpenVINO.

Why: on the CPU rung HMR2's ViT-H backbone is almost all of a person crop's time (about 242
GFLOP), and torch's fp32 path (MKL GEMMs plus one unfused elementwise kernel per op) runs it well
below what the CPU can do. OpenVINO (a PyPI wheel, no protobuf/onnx dependency) fuses the layers
and runs its own GEMM kernels (MLAS, oneDNN brgemm) close to the CPU's fp32 FMA rate, which
bounds what any fp32 runtime can gain (bench/hmr2_cpu.py measures both). bf16 (avx512_bf16)
roughly doubles that rate, at about 1e-2 error: only when engine.options.precision=bf16.
Only the backbone (ViT) and the SMPL head (transformer decoder) are converted; the rest of
HMR2.forward_step (camera, SMPL body model, projection) stays upstream's torch code, so the outputs
keep every key, shape and dtype.

How: `accelerate_hmr2(model, cache_dir)` converts both networks from the loaded torch modules
(ov.convert_model traces them: the real hmr2 classes, no network, no downloads), saves the IR
under cache_dir keyed by a hash of the weights, compiles it in fp32 (OpenVINO would pick bf16 by
itself on a CPU with avx512_bf16: the hint is always explicit), and returns a shallow copy of the
HMR2 module whose `backbone` and `smpl_head` are the OpenVINO-backed stand-ins. Calling it is
calling HMR2: `fast({"img": ..., "mask": ...})` -> the same dict. Where openvino does not import,
`resolve_runtime` picks torch and says why (the engine then keeps the torch model).
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino")
# the ViT reads the 256x192 middle of HMR2's 256x256 crop (forward_step slices x[:, :, :, 32:-32])
BACKBONE_INPUT = (3, 256, 192)
# engine.options.precision -> OpenVINO's inference_precision_hint. fp16 has no fast CPU kernels
# without avx512_fp16 (not on Zen 4): it runs fp32. Reduced precision is never the default.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f32"}
HEAD_OUTPUTS = ("global_orient", "body_pose", "betas", "pred_cam", "list_body_pose", "list_betas", "list_cam")


@dataclass(frozen=True)
class RuntimeChoice:
    """What runs HMR2: the runtime used and, when it is not the one asked for, why."""
    runtime: str
    note: str = ""


def import_openvino() -> Any:
    """openvino, with its usage telemetry off. `import openvino` itself reports an event over the
    network, and so does every ov.convert_model, unless the user opted out with a file under
    ~/intel (which it creates): openvino_telemetry is opt-out for ovc. A service sends nothing and
    writes nothing in HOME: openvino_telemetry is hidden while openvino is first imported, so ovc
    takes its own no-op stub, and the stub replaces the real module in ovc's modules if openvino was
    imported before (for the rest of the process: it only ever turns the reporting off)."""
    hidden = "openvino_telemetry" not in sys.modules
    if hidden:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # `import` raises ImportError
    try:
        import openvino
    finally:
        if hidden and sys.modules.get("openvino_telemetry", False) is None:
            del sys.modules["openvino_telemetry"]
    stub = importlib.import_module("openvino.tools.ovc.telemetry_stub")
    for name in ("convert_impl", "telemetry_utils", "utils", "main"):
        module = sys.modules.get(f"openvino.tools.ovc.{name}")
        if module is not None and hasattr(module, "tm"):
            module.tm = stub  # type: ignore[attr-defined]
    return openvino


def openvino_problem() -> str:
    """'' when openvino imports, else why not (the engine falls back to torch and says so)."""
    try:
        import_openvino()
    except Exception as exc:  # an ImportError, or a broken wheel's OSError
        return f"openvino does not import ({type(exc).__name__}: {exc})"
    return ""


def resolve_runtime(choice: str, device_type: str, problem: Callable[[], str] | None = None) -> RuntimeChoice:
    """engine.options.hmr2_cpu_runtime for this device. A CUDA device always keeps torch (the GPU
    path is unchanged); on the CPU auto means openvino; openvino that does not import -> torch.
    `problem` says why openvino cannot run (default: openvino_problem, looked up when called)."""
    if choice not in RUNTIMES:
        raise ValueError(f"hmr2_cpu_runtime must be one of {', '.join(RUNTIMES)}")
    if device_type != "cpu" or choice == "torch":
        return RuntimeChoice("torch")
    why = (problem or openvino_problem)()
    if why:
        return RuntimeChoice("torch", f"hmr2_cpu_runtime={choice} runs torch: {why}")
    return RuntimeChoice("openvino")


def default_cache_dir(environment: dict[str, str]) -> Path:
    """Where the converted networks go unless engine.options.hmr2_cpu_cache says: beside the other
    model caches of the engine's HOME (its cache_home override included)."""
    home = environment.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".cache" / "pose-service" / "hmr2-openvino"


# --- the stand-ins ------------------------------------------------------------------------------

class _Compiled:
    """One compiled OpenVINO network and its infer request (the engine calls HMR2 from one thread)."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def __call__(self, *tensors: Any) -> list[Any]:
        import numpy as np
        import torch

        inputs = [np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()) for t in tensors]
        results = self.request.infer(inputs)
        return [torch.from_numpy(np.array(results[out], copy=True)) for out in self.compiled.outputs]


def _standin_classes() -> tuple[type, type]:
    """nn.Module stand-ins for HMR2.backbone and HMR2.smpl_head (defined late: torch imports here)."""
    import torch

    class OpenVINOBackbone(torch.nn.Module):
        """HMR2.backbone: (B, 3, 256, 192) -> (B, 1280, 16, 12) features."""

        def __init__(self, network: _Compiled):
            super().__init__()
            self.network = network

        def forward(self, x):
            return self.network(x)[0].to(x.device)

        def extra_repr(self) -> str:
            return "openvino"

    class OpenVINOSmplHead(torch.nn.Module):
        """HMR2.smpl_head: features -> (pred_smpl_params, pred_cam, pred_smpl_params_list)."""

        def __init__(self, network: _Compiled):
            super().__init__()
            self.network = network

        def forward(self, x, **kwargs):
            out = dict(zip(HEAD_OUTPUTS, (t.to(x.device) for t in self.network(x))))
            params = {key: out[key] for key in ("global_orient", "body_pose", "betas")}
            history = {"body_pose": out["list_body_pose"], "betas": out["list_betas"], "cam": out["list_cam"]}
            return params, out["pred_cam"], history

        def extra_repr(self) -> str:
            return "openvino"

    return OpenVINOBackbone, OpenVINOSmplHead


def _head_as_tuple(head: Any) -> Any:
    """The SMPL head with flat tuple outputs (what a converted network can return)."""
    import torch

    class HeadOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, x):
            params, cam, history = self.head(x)
            return (params["global_orient"], params["body_pose"], params["betas"], cam,
                    history["body_pose"], history["betas"], history["cam"])

    return HeadOutputs().eval()


# --- conversion, cache, compilation ---------------------------------------------------------------

def fingerprint(module: Any, example_shape: tuple[int, ...]) -> str:
    """A hash of everything the converted network depends on: the versions of torch and openvino,
    the source files of its classes (hmr2's, this file's), its input shape, and every weight's name,
    shape, dtype and bytes (a stale IR would silently give another model's outputs; hashing 2.5 GB
    costs a few seconds)."""
    import torch

    openvino = import_openvino()
    digest = hashlib.sha256()
    digest.update(f"{torch.__version__}|{openvino.__version__}|{type(module).__qualname__}|"
                  f"{example_shape}".encode())
    for source in sorted({inspect.getsourcefile(type(part)) or "" for part in module.modules()}):
        digest.update(source.encode() + (Path(source).read_bytes() if os.path.isfile(source) else b""))
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:24]


def convert(module: Any, example: Any, folder: Path) -> None:
    """ov.convert_model on the torch module (traced, batch left dynamic), saved as IR in fp32:
    save_model would otherwise store the weights in fp16."""
    import torch

    ov = import_openvino()
    shape = [-1, *example.shape[1:]]
    with torch.no_grad():
        network = ov.convert_model(module, example_input=example, input=[(shape, ov.Type.f32)])
    ov.save_model(network, str(folder / "model.xml"), compress_to_fp16=False)


def cached_ir(module: Any, example: Any, cache_dir: Path, name: str) -> tuple[Path, bool]:
    """The IR of `module` under cache_dir/<name>-<fingerprint>/model.xml, converted when missing:
    written in a temporary folder and renamed into place, so a crash never leaves half an IR, and
    other versions of `name` are removed (each is the size of the weights). -> (xml, converted now)"""
    key = fingerprint(module, tuple(example.shape[1:]))
    final = cache_dir / f"{name}-{key}"
    xml = final / "model.xml"
    if xml.is_file():
        return xml, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        convert(module, example, staging)
        os.replace(staging, final)
    except OSError:
        if not xml.is_file():  # another process may have renamed its own copy into place first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in cache_dir.glob(f"{name}-*"):
        if stale != final and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return xml, True


def compile_ir(xml: Path, precision: str, threads: int) -> _Compiled:
    """Compiled for the CPU: the precision always explicit (see the module's docstring), as many
    threads as torch runs with, tuned for one request at a time (latency)."""
    ov = import_openvino()
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY"}
    return _Compiled(ov.Core().compile_model(str(xml), "CPU", config))


@dataclass
class Conversion:
    """What accelerate_hmr2 did, for the log and the bench: seconds spent and the IR's size."""
    seconds: float = 0.0
    converted: bool = False
    ir_bytes: int = 0


def accelerate_hmr2(model: Any, cache_dir: Path, precision: str = "fp32", threads: int | None = None,
                    report: Conversion | None = None) -> Any:
    """HMR2 with its backbone and SMPL head on OpenVINO: a shallow copy of `model` (SMPL and every
    other part shared; `model` itself is left as it was) whose forward is upstream's HMR2.forward.
    `precision` is engine.options.precision (fp32 unless asked). The torch backbone and head are
    only referenced by `model`: drop it to free their memory."""
    import torch

    started = time.monotonic()
    threads = threads or torch.get_num_threads()
    example = torch.zeros(1, *BACKBONE_INPUT)
    with torch.no_grad():
        features = model.backbone(example)
    parts = {"hmr2-backbone": (model.backbone, example), "hmr2-smpl-head": (_head_as_tuple(model.smpl_head), features)}
    compiled, converted, size = {}, False, 0
    for name, (module, module_input) in parts.items():
        xml, fresh = cached_ir(module, module_input, Path(cache_dir), name)
        compiled[name] = compile_ir(xml, precision, threads)
        converted |= fresh
        size += sum(f.stat().st_size for f in xml.parent.iterdir())
    backbone_class, head_class = _standin_classes()
    fast = copy.copy(model)
    fast._modules = dict(model._modules)  # copy.copy shares the dict of submodules with `model`
    fast._modules["backbone"] = backbone_class(compiled["hmr2-backbone"])
    fast._modules["smpl_head"] = head_class(compiled["hmr2-smpl-head"])
    if report is not None:
        report.seconds, report.converted, report.ir_bytes = time.monotonic() - started, converted, size
    log.info("hmr2_openvino: %s in %.1fs (%s, %d threads, IR %.0f MB in %s)",
             "converted and compiled" if converted else "compiled from the cache", time.monotonic() - started,
             precision, threads, size / 1e6, cache_dir)
    return fast
