"""The supervisor's model check, deeper than the core suite runs it: more examples, longer sequences
(see tests/test_supervisor_model.py for the rules and invariants)."""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from test_supervisor_model import SupervisorModel

TestSupervisorModelDeep = SupervisorModel.TestCase
TestSupervisorModelDeep.settings = settings(max_examples=300, stateful_step_count=60, deadline=None,
                                            derandomize=True, database=None,
                                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
