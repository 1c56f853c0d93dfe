"""The house has floors: configs, then pose_common (what every process shares), then the three
processes (gateway, supervisor, gpu_worker, none importing another), then pose_service (CLI and
service manager) and bench on top. Imports only point down, and no module imports itself back
through a circle. Every import counts, also those inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"configs": 0, "pose_common": 1, "gateway": 2, "supervisor": 2, "gpu_worker": 2, "pose_service": 3,
          "bench": 4}


def modules() -> dict[str, Path]:
    found = {}
    for package in FLOORS:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules that `path` imports (resolving `from pkg import module` to the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_imports_only_point_down():
    upward = sorted(f"{src} -> {dst}" for src, dsts in graph().items() for dst in dsts
                    if src.split(".")[0] != dst.split(".")[0] and floor(dst) >= floor(src))
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("src,dst", [("gateway.app", "supervisor.arbiter"), ("pose_common.video", "gateway.app")])
def test_the_check_catches_a_bad_edge(src, dst, monkeypatch):
    """The walker must see an upward or sideways edge when there is one (guards the test itself)."""
    real = graph()
    real[src].add(dst)
    monkeypatch.setattr(__import__(__name__), "graph", lambda: real)
    with pytest.raises(AssertionError):
        test_imports_only_point_down()


def test_the_check_catches_a_cycle(monkeypatch):
    real = graph()
    real["pose_common.video"].add("pose_common.protocol")
    real["pose_common.protocol"].add("pose_common.video")
    monkeypatch.setattr(__import__(__name__), "graph", lambda: real)
    with pytest.raises(AssertionError):
        test_no_import_cycles()
