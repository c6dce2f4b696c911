"""Host (CPU) time that no roofline sees: kernel launches, Python, ZeRO-3 hooks, the generate loop.

- ``layer_overhead_s`` per decoder layer per forward: eager PyTorch issues ~40 kernels a layer.
- ``offload_layer_overhead_s`` per decoder layer per forward when ZeRO-3 gathers parameters: its
  pre/post-forward hooks and partition bookkeeping; ``offload_layer_leaf_share`` of it where each decoder layer is
  one ZeRO-3 leaf (``Plan.zero3_leaf`` layer: one hook pair a layer).
- ``step_overhead_s`` per forward of each pipeline stage: the executor's lock-step loop synchronizes
  the device after every stage forward (``hpi.executor.generate``), then samples or sends.
The layer terms are host time that the GPU's work can hide (``cost.estimate`` takes the larger of the
two per module); the step term follows a synchronization and adds. Defaults live in ``Efficiency``;
calibration replaces them with measured values.

Device time no roofline sees: ``layer_device_overhead_s`` per decoder layer per forward, the fixed cost of
its ~40 kernels (launch gap, ramp and tail; the small kernels are nothing else), on the GPU's stream in
series with the layer's roofline time (``layer_device_time``; ``cost.estimate`` adds it to compute). It is
what a graphed decode step of a small model is made of beyond its weight reads: an 8B step on an H100 read
16 GB in 9.3 ms, 1.7 TB/s, where a 70B step on an H200 streamed at 0.70 of the copy ceiling with the same code.

Compiled (``Workload.decode_compile``): a graphed decode step compiled by torch.compile before capture runs fused
kernels, and its fixed device time per layer is ``compiled_layer_device_overhead_s`` instead.

Stacked few-row products (``Workload.skinny_gemm``, ``hpi.executor.skinny_gemm``): a graphed step that runs a layer's
q/k/v and gate/up as one product each, and its products of 2 to ``SKINNY_MAX_ROWS`` rows in hpi's split-K kernel, takes
less fixed device time a layer (``skinny_saving``). At one row only the stacking acts, against products that differ
by mode (cuBLAS's matrix-vector kernels in an eager graph, inductor's tuned reductions in a compiled one):
``stacked_layer_device_saving_s`` / ``compiled_stacked_layer_device_saving_s``. At ``SKINNY_MAX_ROWS`` both modes run
the same kernel against the same cuBLAS products: ``skinny_layer_device_saving_s``. In between the saving moves
linearly in the doublings of the rows, as the layer's growth does (``decode_row_growth``: the kernel reads W once for
up to 16 rows, where cuBLAS's time grows with them); past 16 rows torch's products run again, stacked.

A decode step replayed as a CUDA graph (``Workload.decode_graphs``, ``hpi.executor.graphs``) launches all of a
stage's kernels and collectives with one call: the per-layer host time and TP's rank drift at each
collective leave it (``graphed_forwards`` says where that holds), and the step term becomes
``graphed_step_overhead_s`` (the executor still replays, synchronizes, samples and sends after each stage
forward, but launches nothing else).
"""

from __future__ import annotations

import numpy as np

from hpi.planner.cost.inputs import Arrangement, Knobs
from hpi.planner.cost.phase import Phase
from hpi.planner.cost.streaming import fetches_weights
from hpi.planner.specs.plan import decode_graph_blockers, model_graph_blocker


def module_overhead_time(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N, kinds) host seconds of framework overhead per forward of one module."""
    eff = arrangement.hardware.efficiency
    layer_leaf = knobs.zero3_leaf_layer
    zero3 = eff.offload_layer_overhead_s * np.where(layer_leaf, eff.offload_layer_leaf_share, 1.0)
    per_layer = eff.layer_overhead_s + np.where(fetches_weights(arrangement, knobs), zero3, 0.0)
    return arrangement.table.is_layer * per_layer[:, None]


# The most rows hpi's few-row kernel runs (hpi.executor.skinny_gemm.MAX_ROWS; a test holds the two equal): the
# planner does not import the executor.
SKINNY_MAX_ROWS = 16


def layer_device_time(arrangement: Arrangement, compiled: np.ndarray, phase: Phase,
                      skinny: np.ndarray | None = None) -> np.ndarray:
    """(N, kinds) device seconds per forward of one module beyond its roofline: the layer's kernels' fixed cost,
    ``compiled_layer_device_overhead_s`` where the forward replays a compiled graph (``compiled``, from
    ``compiled_forwards``), else ``layer_device_overhead_s``; in decode, plus ``layer_device_s_per_row_doubling``
    for each doubling of the forward's rows (``decode_row_growth``); less ``skinny_saving`` where it runs hpi's
    stacked few-row products (``skinny``, from ``skinny_forwards``; None: nowhere)."""
    eff = arrangement.hardware.efficiency
    per_layer = np.where(compiled, eff.compiled_layer_device_overhead_s, eff.layer_device_overhead_s)
    per_layer = per_layer + decode_row_growth(phase) * eff.layer_device_s_per_row_doubling
    if skinny is not None:
        per_layer = per_layer - np.where(skinny, skinny_saving(arrangement, compiled, phase), 0.0)
    return per_layer[:, None] * arrangement.table.is_layer[None, :]


def skinny_saving(arrangement: Arrangement, compiled: np.ndarray, phase: Phase) -> np.ndarray:
    """(N,) device seconds a layer saves with hpi's stacked few-row products (module docstring): the mode's stacking
    saving at one row, moving linearly in the doublings of the rows to ``skinny_layer_device_saving_s`` at
    ``SKINNY_MAX_ROWS``; past that the stacking alone (torch's products again)."""
    eff = arrangement.hardware.efficiency
    stacked = np.where(compiled, eff.compiled_stacked_layer_device_saving_s, eff.stacked_layer_device_saving_s)
    doublings, full = decode_row_growth(phase), np.log2(SKINNY_MAX_ROWS)
    in_kernel = stacked + (eff.skinny_layer_device_saving_s - stacked) * doublings / full
    return np.where(doublings <= full, in_kernel, stacked)


def decode_row_growth(phase: Phase) -> np.ndarray:
    """(N,) doublings of a decode forward's rows over one (log2 of its tokens; 0 in prefill).

    Why: a decode layer's device time grows with its rows beyond what its roofline adds (the KV cache it reads,
    FLOPs far below the HBM side): the GEMM kernels for a few rows and the attention and element-wise kernels take
    longer per extra row. Graphed steps measured it at every batch on every machine we ran (validation/
    fidelity_set.yaml; ``Efficiency.layer_device_s_per_row_doubling`` has the records). Prefill's GEMMs are
    FLOP-bound and priced by ``matmul_prefill`` instead."""
    if phase.is_prefill:
        return np.zeros_like(phase.tokens, dtype=float)
    return np.log2(np.maximum(phase.tokens, 1.0))


def compiled_forwards(arrangement: Arrangement, knobs: Knobs, phase: Phase) -> np.ndarray:
    """(N,) whether this phase's forwards replay a compiled graph: graphed ones (``graphed_forwards``) when the
    workload compiles the decode step (``Workload.decode_compile``; the executor compiles only what it graphs)."""
    return graphed_forwards(arrangement, knobs, phase) & arrangement.workload.decode_compile


def skinny_forwards(arrangement: Arrangement, knobs: Knobs, phase: Phase) -> np.ndarray:
    """(N,) whether this phase's forwards run hpi's stacked few-row products: graphed ones (``graphed_forwards``)
    when the workload asks for them (``Workload.skinny_gemm``; the executor installs them only where it graphs)."""
    return graphed_forwards(arrangement, knobs, phase) & arrangement.workload.skinny_gemm


def step_overhead_time(arrangement: Arrangement, graphed: np.ndarray) -> np.ndarray:
    """(N,) seconds per forward of each stage, after its device synchronization (not hidden by anything):
    ``graphed_step_overhead_s`` where the forward replays a CUDA graph (``graphed``, from
    ``graphed_forwards``), else ``step_overhead_s``, which also pays the eager launches of the embedding,
    final norm and head."""
    eff = arrangement.hardware.efficiency
    return np.where(graphed, eff.graphed_step_overhead_s, eff.step_overhead_s)


def graphed_forwards(arrangement: Arrangement, knobs: Knobs, phase: Phase) -> np.ndarray:
    """(N,) whether this phase's forwards replay as CUDA graphs: decode steps, when the workload asks for
    graphs, of plans that nothing blocks (``hpi.planner.specs.plan.decode_graph_blockers``: no ZeRO-3, so
    no offload, 16-bit, dp 1; the KV cache on the GPU) of a model that does not (``model_graph_blocker``:
    the executor cannot capture expert routing, which reads back to the host)."""
    none = np.zeros(knobs.n, dtype=bool)
    if phase.is_prefill or not arrangement.workload.decode_graphs or model_graph_blocker(arrangement.model):
        return none
    blockers = decode_graph_blockers(knobs.offloaded, arrangement.dp, knobs.weight_bits, knobs.kv_offload)
    return ~np.logical_or.reduce([none | holds for _, holds in blockers])
