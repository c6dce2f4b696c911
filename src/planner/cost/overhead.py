"""Fixed framework time that no roofline sees: kernel launches, Python, ZeRO-3 hooks, the generate loop.

- ``layer_overhead_s`` per decoder layer per forward: eager PyTorch launches ~10-20 kernels a layer.
- ``offload_layer_overhead_s`` per decoder layer per forward when ZeRO-3 gathers parameters: its
  pre/post-forward hooks, partition bookkeeping and stream syncs run on the critical path.
- ``step_overhead_s`` per forward: embedding lookup launch, sampling, ``generate`` bookkeeping.
Defaults live in ``Efficiency``; calibration replaces them with measured values.
"""

from __future__ import annotations

import numpy as np

from planner.cost.inputs import Knobs, Layout
from planner.cost.streaming import fetches_weights


def module_overhead_time(layout: Layout, knobs: Knobs) -> np.ndarray:
    """(N, kinds) seconds of framework overhead per forward of one module."""
    eff = layout.hardware.efficiency
    per_layer = eff.layer_overhead_s + np.where(fetches_weights(layout, knobs), eff.offload_layer_overhead_s, 0.0)
    return layout.table.is_layer * per_layer[:, None]


def step_overhead_time(layout: Layout) -> float:
    return layout.hardware.efficiency.step_overhead_s
