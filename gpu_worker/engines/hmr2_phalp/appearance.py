"""Which appearance encoder a rung really runs. track.py's texture sampler needs neural_renderer, a
CUDA extension compiled per GPU architecture: when it does not import, or imports but renders a
known triangle wrong, the rung runs with PHALP's HMAR appearance head instead, and says so (the
engine's description reaches diagnostics and selftest).

The render test exists because NMR's CUDA kernels print and return on a failed launch, raising
nothing: a build without kernels for the card (sm_89 for the RTX 4060) hands back the depth map it
started with, every texel then counts as visible, and identities degrade with no error anywhere."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from gpu_worker.engines.hmr2_phalp.geometry import HMR2_CROP_PX, HMR2_FOCAL_PX

TEST_DEPTH = 10.0         # the known triangle faces the camera at this depth (metres)
TEST_HALF_WIDTH = 0.1     # and spans +-50 px around the crop's centre at HMR2's focal length
DEPTH_TOLERANCE = 0.05

NEURAL_RENDERER_SOURCE = ("pip install 'neural-renderer-pytorch @ git+https://github.com/shubham-goel/NMR' "
                          "--no-build-isolation (compiled against the installed torch; nvcc must match "
                          "torch.version.cuda)")


def neural_renderer_problem(importer: Callable[[str], Any] = importlib.import_module) -> str:
    """"" when neural_renderer imports, else why not (a missing package, or a build for another
    torch/CUDA that fails to load its extension)."""
    try:
        importer("neural_renderer")
    except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError from its extension
        return f"neural_renderer does not import ({type(exc).__name__}: {str(exc)[:200]})"
    return ""


def texture_sampler_problem(device: Any, importer: Callable[[str], Any] = importlib.import_module) -> str:
    """"" when neural_renderer imports and, on `device` (once the runtime stage has chosen it),
    renders the depth of a known triangle right; else why not."""
    why = neural_renderer_problem(importer)
    if why or device is None:
        return why
    try:
        centre, corner = known_triangle_depth(importer("neural_renderer"), importer("torch"), device)
    except Exception as exc:
        return f"neural_renderer failed its render test ({type(exc).__name__}: {str(exc)[:200]})"
    return depth_verdict(centre, corner)


def known_triangle_depth(nr: Any, torch: Any, device: Any) -> tuple[float, float]:
    """Render, as the texture sampler does, one triangle at TEST_DEPTH facing the camera.
    -> (depth at the crop's centre, inside the triangle; depth at a corner, outside it)."""
    renderer = nr.Renderer(dist_coeffs=None, orig_size=HMR2_CROP_PX, image_size=HMR2_CROP_PX,
                           light_intensity_ambient=1, light_intensity_directional=0, anti_aliasing=False)
    w = TEST_HALF_WIDTH
    vertices = torch.tensor([[[-w, -w, TEST_DEPTH], [w, -w, TEST_DEPTH], [0.0, w, TEST_DEPTH]]],
                            dtype=torch.float, device=device)
    faces = torch.tensor([[[0, 1, 2]]], dtype=torch.int32, device=device)
    intrinsics = torch.tensor([[HMR2_FOCAL_PX, 0, HMR2_CROP_PX / 2], [0, HMR2_FOCAL_PX, HMR2_CROP_PX / 2],
                               [0, 0, 1]], dtype=torch.float, device=device)[None]
    depth = renderer(vertices, faces, mode="depth", K=intrinsics, R=torch.eye(3, device=device)[None],
                     t=torch.zeros(1, 3, device=device))[0]
    middle = HMR2_CROP_PX // 2
    return float(depth[middle, middle]), float(depth[0, 0])


def depth_verdict(centre: float, corner: float) -> str:
    if abs(centre - TEST_DEPTH) > DEPTH_TOLERANCE:
        return (f"neural_renderer failed its render test: a triangle at depth {TEST_DEPTH:g} came back at depth "
                f"{centre:.4g} (its CUDA kernels did not run on this card: built for another GPU architecture?)")
    if corner <= TEST_DEPTH + DEPTH_TOLERANCE:
        return (f"neural_renderer failed its render test: the empty corner came back at depth {corner:.4g}, "
                f"in front of the triangle")
    return ""


@dataclass(frozen=True)
class AppearanceChoice:
    appearance: str  # "texture" or "hmar"
    note: str = ""   # why it is not what the options asked for ("" when it is)


def choose_appearance(wanted: str, problem: Callable[[], str] = neural_renderer_problem) -> AppearanceChoice:
    """`wanted` is the appearance the options give on this device (Settings.appearance_on)."""
    if wanted != "texture":
        return AppearanceChoice(wanted)
    why = problem()
    if not why:
        return AppearanceChoice("texture")
    return AppearanceChoice("hmar", f"{why}: running with appearance=hmar (PHALP's HMAR head) instead of the "
                                    f"texture sampler; to get it back: {NEURAL_RENDERER_SOURCE}")


def neural_renderer_row(problem: Callable[[], str] = neural_renderer_problem) -> dict:
    """A `models verify` row for the package (optional: without it the rung falls back to hmar)."""
    why = problem()
    return {"name": "neural_renderer", "path": "(python package)", "status": "missing" if why else "present",
            "size": None, "min_size": 0, "optional": True,
            "source": NEURAL_RENDERER_SOURCE + "; without it the rung runs with appearance=hmar",
            "problem": why}
