"""hpi.executor.dependent_launch: the switch and what a launch does with it where the GPU cannot (the CPU here; on
a Hopper GPU ``tests/executor/test_skinny_gemm.py``'s GPU test checks the launch's bits)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hpi.executor import dependent_launch  # noqa: E402


def test_switched_on_a_cpu_tensor_still_launches_plainly():
    cpu = torch.device("cpu")
    assert not dependent_launch.capable(cpu)
    try:
        dependent_launch.use(True)
        assert not dependent_launch.active(cpu)  # asked for, but no grid dependency control without a Hopper GPU
    finally:
        dependent_launch.use(False)
    assert not dependent_launch.active(cpu)
