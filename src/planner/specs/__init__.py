"""Plain frozen records that cross every boundary: model, hardware, workload, plan."""

from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

__all__ = ["ModelSpec", "Plan", "Workload"]
