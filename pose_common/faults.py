"""The vocabulary of fault drills, shared by whoever arms one (gateway, CLI, supervisor) and the
fault engine that fires it: the kinds, the grammar of `at`, and where firings are counted."""
from __future__ import annotations

import hashlib
import os
import re
from typing import Literal, Optional, get_args

FaultKind = Literal["segfault", "abort", "bus_error", "kill", "exit", "hang", "raise", "cuda_oom",
                    "cuda_sticky", "slow", "load_failure"]
KINDS: tuple[str, ...] = get_args(FaultKind)
AT_GRAMMAR = "start | image | stage:NAME | frame:N (N a non-negative integer) | supervisor (raise only)"
_AT = re.compile(r"(start|image|supervisor|stage:[A-Za-z_][A-Za-z0-9_]{0,63}|frame:(0|[1-9][0-9]{0,8}))")
SUPERVISOR = "supervisor"  # the supervisor's own loop: proves it restarts and resumes its jobs


class BadFault(ValueError):
    """A drill that cannot be armed; the message says why."""


def check_kind(kind: object) -> str:
    if not isinstance(kind, str) or kind not in KINDS:
        raise BadFault(f"fault kind must be one of {', '.join(KINDS)}")
    return kind


def check_at(at: object, stage_names: Optional[list[str]] = None) -> str:
    """`at` as a validated string. With `stage_names`, a stage must be one the engine has."""
    if not isinstance(at, str) or not _AT.fullmatch(at):
        raise BadFault(f"at must be {AT_GRAMMAR}")
    if at.startswith("stage:") and stage_names is not None and at[6:] not in stage_names:
        raise BadFault(f"the engine has no stage {at[6:]!r}; its stages are {', '.join(stage_names)}")
    return at


def check(kind: object, at: object, stage_names: Optional[list[str]] = None) -> tuple[str, str]:
    kind, at = check_kind(kind), check_at(at, stage_names)
    if at == SUPERVISOR and kind != "raise":
        raise BadFault("only the raise fault can be injected into the supervisor's loop")
    return kind, at


def counter_path(kind: str, at: str, counter_dir: str) -> str:
    key = hashlib.sha1(f"{kind}|{at}".encode()).hexdigest()[:12]
    return os.path.join(counter_dir, f"fault-{key}.count")
