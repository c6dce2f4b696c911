"""Fixtures shared by the planner's tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def without_prefetch_lag(monkeypatch):
    """The cost model without ``cost.prefetch_lag``'s once-a-forward term (set to 0), for tests of the module rule and
    of what uses it: their plans' deep queues (a toy's whole forward fits DeepSpeed's default max live) would add it.
    tests/planner/cost/test_prefetch_lag.py holds that term."""
    from hpi.planner.cost import estimate

    monkeypatch.setattr(estimate, "lag_time", lambda arrangement, knobs, *rest: np.zeros((knobs.n, arrangement.pp)))
