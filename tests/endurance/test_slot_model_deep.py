"""The worker slot's model check, deeper than the core suite runs it: more examples, longer
sequences (see tests/test_slot_model.py for the rules and invariants)."""
from __future__ import annotations

from hypothesis import HealthCheck, settings

from test_slot_model import SlotModel

TestSlotModelDeep = SlotModel.TestCase
TestSlotModelDeep.settings = settings(max_examples=150, stateful_step_count=50, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
