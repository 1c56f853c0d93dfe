"""Which appearance encoder a rung really runs. track.py's texture sampler needs neural_renderer, a
CUDA extension compiled per GPU architecture: when it does not import, the rung runs with PHALP's
HMAR appearance head instead of dying, and says so (the engine's description reaches diagnostics)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

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
