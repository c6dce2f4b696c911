"""The cost model: one module per term; ``estimate`` says how they overlap and add up."""

from hpi.planner.cost.estimate import Evaluation, evaluate
from hpi.planner.cost.inputs import Arrangement, Knobs, make_arrangement

__all__ = ["Arrangement", "Evaluation", "Knobs", "evaluate", "make_arrangement"]
