"""How a worker ended and what happens next, as pure logic with a fake clock: the restart policy,
exit decoding (and the worker's own error classes), the state machine's legal moves."""
from __future__ import annotations

import signal

import pytest

from gpu_worker.engines.fault import sticky_cuda_error
from gpu_worker.errors import STICKY_CUDA_ERRORS, classify
from pose_common import exitcodes
from supervisor.causes import Death, decode_exit
from supervisor.policy import RestartPolicy
from supervisor.states import IllegalTransition, WorkerLifecycle
from supervisor.states import WorkerState as S


# --- restart policy -------------------------------------------------------------------------------
def test_backoff_is_immediate_then_doubles_to_the_cap():
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=4, intensity=100, period_s=60)
    delays = []
    for t in range(7):
        policy.record(float(t), "segfault", counts=True)
        delays.append(policy.decide(float(t), "segfault", retry=True, has_lower_rung=False).delay_s)
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_intensity_steps_down_then_goes_fatal_on_the_last_rung():
    policy = RestartPolicy(intensity=3, period_s=60)
    decisions = []
    for t in (0.0, 10.0, 20.0):
        policy.record(t, "cuda_oom", counts=True)
        decisions.append(policy.decide(t, "cuda_oom", retry=True, has_lower_rung=True).action)
    assert decisions == ["restart", "restart", "step_down"]
    policy.reset()
    for t in (100.0, 101.0, 102.0):
        policy.record(t, "cuda_sticky", counts=True)
        last = policy.decide(t, "cuda_sticky", retry=True, has_lower_rung=False)
    assert last.action == "fatal" and "3 deaths in 60s" in last.reason


def test_deaths_outside_the_window_do_not_count():
    policy = RestartPolicy(intensity=3, period_s=60)
    for t in (0.0, 50.0, 120.0, 180.0):
        policy.record(t, "segfault", counts=True)
        assert policy.decide(t, "segfault", retry=True, has_lower_rung=False).action == "restart"


def test_load_failure_never_loops():
    policy = RestartPolicy()
    policy.record(0.0, "load_failure", counts=False)
    assert policy.decide(0.0, "load_failure", retry=False, has_lower_rung=False).action == "fatal"
    assert policy.decide(0.0, "load_failure", retry=False, has_lower_rung=True).action == "step_down"


def test_ready_worker_resets_backoff():
    policy = RestartPolicy(backoff_initial_s=1)
    for t in range(3):
        policy.record(float(t), "abort", counts=False)
    policy.healthy()
    policy.record(10.0, "abort", counts=False)
    assert policy.decide(10.0, "abort", retry=True, has_lower_rung=False).delay_s == 0.0


# --- exit decoding --------------------------------------------------------------------------------
@pytest.mark.parametrize("returncode,expected", [
    (-signal.SIGSEGV, "segfault"), (-signal.SIGABRT, "abort"), (-signal.SIGBUS, "bus_error"),
    (-signal.SIGKILL, "oom_killed"), (255, "wsl_vm_exit"), (4294967295, "wsl_vm_exit"),
    (exitcodes.EX_CUDA_STICKY, "cuda_sticky"), (exitcodes.EX_LOAD_FAILED, "load_failure"), (0, "clean_exit"),
    (17, "exit"),
])
def test_decode_exit_status(returncode, expected):
    assert decode_exit(Death(returncode=returncode)).kind == expected


def test_our_own_kill_is_a_hang_not_an_oom():
    cause = decode_exit(Death(returncode=-signal.SIGKILL, killed_by_us="hang: no heartbeat for 3.1s"))
    assert cause.kind == "hang" and "heartbeat" in cause.summary


def test_oom_kill_names_memory_and_remedy():
    cause = decode_exit(Death(returncode=-9, rss=3 << 30, system_memory={"percent": 97.5}))
    assert "OOM killer" in cause.summary and "97.5%" in cause.summary and "3072 MiB" in cause.summary
    assert ".wslconfig" in cause.remedy


def test_reported_cause_wins_over_exit_status():
    death = Death(returncode=exitcodes.EX_EXCEPTION, reported={"cause": "cuda_oom", "exc_type": "OutOfMemoryError",
                                                              "message": "CUDA out of memory"})
    cause = decode_exit(death)
    assert cause.kind == "cuda_oom" and "OutOfMemoryError" in cause.summary and cause.counts_toward_intensity


def test_worker_classifies_torch_errors_by_type_and_code():
    torch = pytest.importorskip("torch")
    sticky = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    sticky.error_code = 700
    assert classify(sticky, during_load=False) == ("cuda_sticky", exitcodes.EX_CUDA_STICKY)
    assert classify(torch.cuda.OutOfMemoryError("oom"), during_load=True) == ("cuda_oom", exitcodes.EX_CUDA_OOM)
    assert classify(RuntimeError("CUDA something"), during_load=False)[0] == "python_exception"
    assert classify(ImportError("no hmr2"), during_load=True)[0] == "load_failure"
    assert classify(ImportError("late"), during_load=False)[0] == "python_exception"


@pytest.mark.parametrize("status", ["CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                                    "CUDNN_STATUS_ALLOC_FAILED", "CUSOLVER_STATUS_ALLOC_FAILED"])
def test_the_cuda_libraries_allocation_failures_are_out_of_memory(status):
    """cuBLAS and cuDNN run out of memory as a RuntimeError naming their status, on every torch."""
    assert classify(RuntimeError(f"CUDA error: {status}"), during_load=False)[0] == "cuda_oom"
    assert classify(RuntimeError("CUDA error: out of memory"), during_load=False)[0] == "cuda_oom"
    assert classify(RuntimeError(f"a log line that quotes CUDA error: {status[:8]}"), False)[0] == "python_exception"


@pytest.mark.parametrize("code,text", sorted(STICKY_CUDA_ERRORS.items()))
def test_sticky_errors_are_named_on_every_supported_torch(code, text):
    """torch before 2.8 raises a RuntimeError with CUDA's text; from 2.8 an AcceleratorError with the code."""
    before_2_8 = RuntimeError(f"CUDA error: {text}\nCUDA kernel errors might be asynchronously reported")
    assert classify(before_2_8, during_load=False)[0] == "cuda_sticky"
    torch = pytest.importorskip("torch")
    since_2_8 = torch.AcceleratorError(f"CUDA error: {text}")
    since_2_8.error_code = code
    assert classify(since_2_8, during_load=False)[0] == "cuda_sticky"
    recoverable = torch.AcceleratorError("CUDA error: invalid argument")
    recoverable.error_code = 1
    assert classify(recoverable, during_load=False)[0] == "python_exception"


def test_the_sticky_drill_raises_what_the_installed_torch_would(monkeypatch):
    torch = pytest.importorskip("torch")
    assert type(sticky_cuda_error("frame:3")).__name__ == "AcceleratorError"
    monkeypatch.delattr(torch, "AcceleratorError")  # torch 2.1 to 2.7
    older = sticky_cuda_error("frame:3")
    assert type(older) is RuntimeError
    assert classify(older, during_load=False) == ("cuda_sticky", exitcodes.EX_CUDA_STICKY)


# --- state machine --------------------------------------------------------------------------------
def test_lifecycle_happy_path_and_history():
    life = WorkerLifecycle()
    for dst, stage in ((S.PROBING, "detector"), (S.SPAWNING, None), (S.LOADING, "runtime"), (S.LOADING, "model"),
                       (S.READY, None), (S.BUSY, None), (S.READY, None), (S.EXITED, None), (S.BACKOFF, None)):
        life.move(dst, "test", stage=stage)
    assert [t.dst for t in life.history][:3] == ["probing", "spawning", "loading"]
    assert life.state is S.BACKOFF


def test_lifecycle_refuses_impossible_moves():
    life = WorkerLifecycle()
    with pytest.raises(IllegalTransition):
        life.move(S.BUSY, "no worker yet")


