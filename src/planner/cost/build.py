"""Host memory while each rank builds its stage: the part of the build that is not the run's footprint.

The executor builds a stage the way the plan stores its weights (``hpi.executor.worker.run``):

- 8/4-bit weights, offloaded or not: inside DeepSpeed's ``zero.Init`` each module is constructed on the
  GPU, quantized and partitioned (to pinned host memory when offloaded) as soon as it exists
  (partition_parameters.py ``_post_init_method``), so the host never holds more than the packed partitions
  the run keeps: no transient.
- 16-bit and GPU-resident: the weights are drawn or read into the GPU directly: no transient.
- 16-bit, offloaded to CPU memory: the whole TP shard of the stage is built in host memory first, then
  ``deepspeed.initialize`` copies each parameter into its (1/dp) partition and frees it, one at a time:
  the transient is what is not kept (1 - 1/dp of the stage) plus the parameter in flight (the largest
  tensor).
- 16-bit, offloaded to NVMe: the whole TP shard of the stage is built in host memory, then swapped out
  parameter by parameter: the transient is the stage itself. Quantized weights (or more nodes, or pp) are
  the fix where that does not fit.

KV-cache offload is allocated at the first forward, after the build: not part of the build's moment.
"""

from __future__ import annotations

import numpy as np

from hpi.planner.cost.compute import stored_elems_per_rank
from hpi.planner.cost.inputs import COMPUTE_BYTES, Arrangement, Knobs
from hpi.planner.cost.shape import DENSE, HEAD, MOE, per_rank


def build_transient_bytes(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N, pp) host bytes one rank of each stage holds during its build beyond what the run keeps."""
    t = arrangement.table
    stage_16bit = (stored_elems_per_rank(arrangement) * COMPUTE_BYTES) @ arrangement.stage_counts.T  # (pp,)
    largest = per_rank(t, t.largest_tensor, arrangement.tp)[[DENSE, MOE, HEAD]].max() * COMPUTE_BYTES
    unkept = stage_16bit * (1.0 - 1.0 / arrangement.dp) + largest
    sixteen = (knobs.weight_bits == 16)[:, None]
    out = np.where(knobs.offload_cpu[:, None], unkept, 0.0)
    out = np.where(knobs.offload_nvme[:, None], stage_16bit, out)
    return np.where(sixteen, out, 0.0) * np.ones((knobs.n, arrangement.pp))
