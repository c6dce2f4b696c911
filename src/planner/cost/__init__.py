"""The cost model: one module per term; ``estimate`` says how they overlap and add up."""

from hpi.planner.cost.estimate import Evaluation, evaluate
from hpi.planner.cost.inputs import Knobs, Layout, make_layout

__all__ = ["Evaluation", "Knobs", "Layout", "evaluate", "make_layout"]
