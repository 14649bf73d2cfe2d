"""The block-manager state machines (prefix cache, forced collisions, transactions) for over
100,000 operations: `pytest -m slow --runslow tests/core` (skipped by default; about a minute)."""

import pytest
from hypothesis import settings
from hypothesis.stateful import invariant, run_state_machine_as_test
from test_prefix_cache import CollidingPrefixCacheMachine, PrefixCacheMachine

COUNT = {"steps": 0}


def _counting(machine):
    class Counting(machine):
        @invariant()
        def count(self):
            COUNT["steps"] += 1

    return Counting


@pytest.mark.slow
def test_block_manager_machines_hold_for_100k_operations():
    for machine in (PrefixCacheMachine, CollidingPrefixCacheMachine):
        run_state_machine_as_test(_counting(machine),
                                  settings=settings(max_examples=1500, stateful_step_count=50, deadline=None))
    print(f"block-manager operations checked: {COUNT['steps']}")
    assert COUNT["steps"] >= 100_000
