"""The prefetch queue's lag: a layer's compute waits behind the copies queued for the layers after it.

DeepSpeed's ``fetch_sub_module`` (deepspeed/runtime/zero/partitioned_param_coordinator.py), once the module about to
run is gathered, makes the compute stream wait for its whole all-gather stream (``current_stream().wait_stream(
allgather_stream)``, on accelerators that do not resolve data dependencies themselves: CUDA's), and only after that
queues the next prefetch. So a module's compute waits for every copy queued up to the hook before its own: with
``I`` elements gathered or in flight in the steady state of a forward (``LayerPrefetch.in_flight``, the module in use
included) and leaf modules of ``S`` elements on average, behind ``lag = max(I - 2 S, 0)`` elements beyond its own.
hpi's stream-ordered wait (``hpi.executor.zero3``) replaces DeepSpeed's host wait, not this stream wait; with the host
wait the host blocks on the same queue. hpi's copy-ordered wait (``Workload.fetch_wait`` event) waits for each
parameter's own copy instead: no lag.

A pipeline whose stage i waits for copy i + k (k = lag in layers) exposes more than one that waits for its own copy
only. Copy-bound (a layer's copy c longer than its compute b): the last k layers compute after the last copy lands,
k b. Compute-bound: the queue fills as the forward starts, by g = bucket / (mean fetch) - 1 layers a layer (each hook
prefetches a bucket, each leaf releases its own), and layer j's compute waits for copy j + min(k, j g), which lands
min(k, j g) c - j (b - c) after the compute could have started; the largest of that over j (at j = 1 or where the
queue is full, j = k / g) is what it exposes. A layer's compute side b is what keeps the device busy once its
copies are in: its compute stream's work (the host has queued it long before: the 2x H200 8B step did not move
with the bucket, cost.estimate), and the host's time too for a routed-expert layer, whose host reads the router's
counts mid-layer before it launches the experts (``hpi.executor.experts``).

Measured (Mixtral-8x22B 4-bit, CPU pinned, layer leaves, one H100; benchmarks/results/2026-12-06-prefetch-lag):
a 3e9 / 6e9 bucket / max live (8.5 layers in flight) against one layer / two (0 lag), same run: 1.645 / 1.630 /
1.721 s against 1.584 / 1.596 / 1.633 s a step (DeepSpeed's dequantization bs 1, hpi's fused bs 1 and 16); the
profiler saw the copy engine idle 78-282 ms at each step boundary with the deep queue and 21-24 ms with the shallow
one, the rest of the step the same. It over-prices two 8B 16-bit prefills at batch 16 with deep queues (+12% /
+15% uncalibrated, were +3% / -5%: README, Accuracy), whose runs show less of the drain than k b.

NVMe plans are left out: DeepSpeed's swapper reads each parameter into one of a few staging buffers and waits for the
read on the host (``cost.aio``), so what is queued is bounded by the buffers, not by max live.
"""

from __future__ import annotations

import numpy as np

from hpi.planner.cost.inputs import Arrangement, Knobs
from hpi.planner.cost.memory import LayerPrefetch, layer_prefetch
from hpi.planner.cost.streaming import copy_ordered, fetches_weights


def lag_layers(arrangement: Arrangement, knobs: Knobs, fetched: np.ndarray) -> np.ndarray:
    """(N, pp) layers of copies a decoder layer's compute waits behind beyond its own, in the steady state of a
    forward; ``fetched``: (N, kinds) elements one module of each kind gathers per TP rank."""
    return _lag_layers(arrangement, knobs, layer_prefetch(arrangement, knobs, fetched))


def _lag_layers(arrangement: Arrangement, knobs: Knobs, q: LayerPrefetch) -> np.ndarray:
    layers = _layer_counts(arrangement).sum(axis=1)[None, :]  # (1, pp)
    mean_layer = np.divide(q.layer_total, layers, out=np.zeros_like(q.layer_total), where=layers > 0)
    lag = np.maximum(q.in_flight - 2.0 * q.mean_gather, 0.0)
    in_layers = np.divide(lag, mean_layer, out=np.zeros_like(lag), where=mean_layer > 0)
    return np.where(_queued(arrangement, knobs)[:, None], in_layers, 0.0)


def _queued(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N,) the plans whose reads wait behind a queue: they gather, not from NVMe, without the copy-ordered wait."""
    return fetches_weights(arrangement, knobs) & ~knobs.offload_nvme & ~copy_ordered(arrangement, knobs)


def _layer_counts(arrangement: Arrangement) -> np.ndarray:
    """(pp, kinds) decoder layers of each kind on each stage."""
    return arrangement.stage_counts * (arrangement.table.is_layer > 0)[None, :]


def lag_time(arrangement: Arrangement, knobs: Knobs, fetched: np.ndarray, fetch: np.ndarray, busy: np.ndarray,
             host: np.ndarray) -> np.ndarray:
    """(N, pp) seconds per forward the lag exposes on each stage (module docstring); ``fetch``, ``busy`` and
    ``host``: (N, kinds) a module's copies, compute-stream time and host time."""
    if not _queued(arrangement, knobs).any():  # the default copy-ordered wait: no lag, and no prefetch to read
        return np.zeros((knobs.n, arrangement.pp))
    counts = _layer_counts(arrangement)
    layers = np.maximum(counts.sum(axis=1), 1.0)[None, :]
    routed = arrangement.table.routed[None, :]
    compute_side = np.where(routed, busy + host, busy)
    c = fetch @ counts.T / layers  # (N, pp) a mean layer's copies
    b = compute_side @ counts.T / layers
    q = layer_prefetch(arrangement, knobs, fetched)
    k = _lag_layers(arrangement, knobs, q)
    g = np.maximum(q.bucket / np.maximum(q.mean_gather, 1.0) - 1.0, 0.0)  # layers the queue grows a layer
    full = np.divide(k, g, out=np.zeros_like(k), where=g > 0)  # the layer whose compute first waits behind k
    first = np.minimum(k, g) * c - (b - c)
    at_full = np.where(full >= 1.0, k * c - full * (b - c), 0.0)
    return np.where(c >= b, k * b, np.maximum(np.maximum(first, at_full), 0.0))
