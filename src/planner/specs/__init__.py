"""Plain frozen records that cross every boundary: model, hardware, workload, plan."""

from planner.specs.model import ModelSpec
from planner.specs.plan import Plan
from planner.specs.workload import Workload

__all__ = ["ModelSpec", "Plan", "Workload"]
