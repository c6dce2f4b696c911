"""Decode steps replayed as CUDA graphs, over a KV cache whose tensors never move.

Why: eager decode of a GPU-resident model is bound by the host. Each decoder layer issues a few dozen
kernels from Python, and at batch 1 the GPU runs each one faster than the host can launch the next: the
2x and 4x H200 records show a 70B step of 53 ms on one GPU whose HBM needs about 30 ms, and 130-136 ms
under TP 2/4, where every all-reduce also waits for the slowest rank's Python (SUMMARY.md, 2026-11-22).
A CUDA graph records the step's kernels once and replays them with one launch, so the GPU runs them back
to back and the TP ranks meet at each all-reduce without host jitter. This is what vLLM and TensorRT-LLM
do for decode, and what transformers' ``torch.compile(mode="reduce-overhead")`` path needs a static cache
for.

What a graph needs, and how each is met:
- Fixed addresses for every tensor the step reads or writes. ``StaticKVCache`` allocates each layer's
  keys and values for the whole generation at the prefill and writes new entries in place at the slots in
  a device tensor (``index_copy_``); ``DecodeGraph`` keeps the step's inputs (ids or hidden states, cache
  slots, and the padding mask / positions when rows are padded) in its own buffers, and each replay copies
  the new values into them.
- No host synchronization inside the step. The attention mask is built on the device from the cache slots
  (``masks.static_causal_mask``): no Python int read back from the GPU. The prefill, which is not
  captured, reads only the slots it wrote and keeps the dynamic cache's masks (none for unpadded prompts,
  so sdpa's fused causal kernel): over all slots behind a mask the 8B's bs-1 prefill took 2.1x as long on
  the H100 (benchmarks/results/2026-11-22-h100, runs 8-9).
- Collectives captured like kernels: NCCL all-reduces and all-gathers over the TP group are recorded into
  the graph (PyTorch supports NCCL in graph capture); the executor's all-reduce timer is skipped while
  capturing (events cannot be timed inside a graph), so graphed steps report no TP all-reduce time.

Only plans without ZeRO-3 can be graphed: DeepSpeed gathers and releases parameters from Python hooks
around every module, which a replay would skip. ``RunSpec`` refuses the combination. The prefill runs
eagerly (its shapes differ per run); each micro-batch's decode step is captured at its first decode forward,
after one eager warm-up on a side stream (which cuBLAS and NCCL need before capture), and replayed by later
generations of the same shapes over the same, rewound cache (``KeptSteps``). Writing a cache slot is idempotent,
so the warm-up, the capture and the first replay may all compute the first decode step.

On a CPU there is nothing to capture: ``DecodeGraph`` runs the same static-buffer path eagerly, so the CPU
tests check every token of the graphed path except the capture itself.

Compiled (``RunSpec.decode_compile``, ``compiled_step``): a graph removes the host from the step, not the
kernels' own fixed cost. The eager 8B step on one H200 was 7.68 ms where its 15 GB of weights take 3.6 ms at
the probed HBM rate: ~110 us of fixed device time per layer across ~40 small kernels (norms, rotary, activation,
residuals, cache writes; ``cost.overhead``, issue 20's record). ``torch.compile`` (inductor) fuses those
element-wise chains into a few kernels, and with ``coordinate_descent_tuning`` it turns a matrix product with
one row (batch-1 decode) into a tuned reduction that reads the weight at close to the HBM rate
(``torch/_inductor/decomposition.py``, ``mm``). The compiled forward is what the graph captures: the compile
happens in ``capture``'s warm-up, once per input shape (dynamo's cache keeps it for later generations of the
same shape), and ``DecodeGraph.capture_s`` reports what the first capture cost.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Callable

import torch

# Inductor options of the compiled decode step: tuned matrix-vector reductions (see the module docstring), and
# when the one-field-at-a-time walk stops, every combination of the fields' neighbour values timed too
# (``coordinate_descent_check_all_directions``, torch/_inductor/runtime/coordinate_descent_tuner.py). Llama-3-8B
# shape, batch 1, one H200, each compile from scratch (benchmarks/compile_decode.py): with the walk alone the step
# was 4.51, 5.31, 4.87 ms in three compiles (and 5.18, 5.26 in hpi run), with the wider search 4.45 and 4.67 ms,
# for a compile of 153-164 s instead of 82 s (benchmarks/results/2026-12-05-h200-issue20, calls 1 and 4).
# ``combo_kernels``: inductor's scheduler joins kernels of the graph that share no data into one launch
# (torch/_inductor/codegen/triton_combo_kernel.py): a layer's two rotary kernels, its cache write and its mask become
# one kernel, 91 fewer launches a step. One H100, each compile from scratch beside the same compile without it: batch 1
# 5.638 / 5.619 ms against 5.738 / 5.665 in two calls, batch 16 6.508 against 6.507, for a batch-1 compile of 106-126 s
# instead of 80-97 s (benchmarks/results/2026-12-07-fewer-kernels call 2, 2026-12-08-combo).
COMPILE_OPTIONS = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True,
                   "combo_kernels": True}
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, Callable[..., torch.Tensor]]" = weakref.WeakKeyDictionary()


def compiled_step(stage: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``stage``'s forward compiled by ``torch.compile`` for fixed shapes, one wrapper per stage, so that every
    generation of the run (warm-ups, measured run, variants) reuses the compiled code of a shape."""
    if stage not in _COMPILED:
        _COMPILED[stage] = torch.compile(stage, dynamic=False, options=COMPILE_OPTIONS)
    return _COMPILED[stage]


def capture(fn: Callable[[], Any], warmups: int = 1) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, what ``fn`` returned while captured): ``fn`` run ``warmups`` times on a side stream first
    (cuBLAS workspaces, NCCL's first use on a stream must happen outside a capture), then recorded once.
    The decode step, and the probe's graphed all-reduces and kernels, are captured this one way."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class StaticKVCache:
    """Each layer's keys and values for ``max_len`` slots, allocated at the first write and updated in place.

    Duck-types the one method of transformers' ``Cache`` that decoder layers call, ``update(keys, values,
    layer_idx, ...)``, which writes at the slots of the tensor last ``bind``-ed (the stage binds its
    ``cache_position`` before each forward) and returns the full [b, heads, max_len, d] tensors: unwritten
    slots hold zeros and the mask hides them.
    """

    def __init__(self, max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"max_len({max_len}) < 1: the cache needs a slot for every token of the generation")
        self.max_len = max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.position: torch.Tensor | None = None
        self.visible: int | None = None  # slots update() hands back; None: all max_len (the graphed steps)
        self.written = False  # a token was written since the cache was made or rewound

    def bind(self, cache_position: torch.Tensor, visible: int | None = None) -> None:
        """The slots the next forward writes (a device tensor; a graph captures its address), and how many
        leading slots its attention reads (None: all of them, behind a device-built mask)."""
        self.position = cache_position
        self.visible = visible

    @property
    def is_empty(self) -> bool:
        """Nothing written since the cache was made or rewound: the next forward may be a prompt, from slot 0."""
        return not self.written

    def rewind(self) -> None:
        """Start a new generation in the same tensors (a graph keeps their addresses). The slots the last one
        wrote stay until this one overwrites them; until then the mask hides them (``static_causal_mask``: a step
        at position p reads slots 0..p, and a prompt reads only the slots it writes)."""
        self.written = False
        self.position = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.position is None:
            raise RuntimeError("StaticKVCache.update before bind(cache_position): the stage must bind the slots")
        if layer_idx == len(self.keys):
            b, heads, _, _ = key_states.shape
            self.keys.append(key_states.new_zeros(b, heads, self.max_len, key_states.shape[-1]))
            self.values.append(value_states.new_zeros(b, heads, self.max_len, value_states.shape[-1]))
        elif layer_idx > len(self.keys):
            raise RuntimeError(f"layer {layer_idx} wrote before layer {len(self.keys)}: layers must run in order")
        self.written = True
        self.keys[layer_idx].index_copy_(2, self.position, key_states)
        self.values[layer_idx].index_copy_(2, self.position, value_states)
        if self.visible is not None:
            return self.keys[layer_idx][:, :, : self.visible], self.values[layer_idx][:, :, : self.visible]
        return self.keys[layer_idx], self.values[layer_idx]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class DecodeGraph:
    """One micro-batch's decode forward of a stage: captured at its first call (on CUDA), replayed after.

    ``stage(x, cache, cache_position, **masks)`` as ``StageModule.forward``. The inputs of every call must
    have the shapes of the first (one decode token per row); the returned tensor is the graph's own output
    buffer, valid until the next call.
    """

    def __init__(self, stage: Callable[..., torch.Tensor], capture: bool) -> None:
        self.stage = stage
        self.capture = capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, torch.Tensor] | None = None
        self.cache = None
        self.output: torch.Tensor | None = None
        self.capture_s: float | None = None  # the first call: the capture (and a compiled stage's compile)

    def __call__(self, x: torch.Tensor, cache, cache_position: torch.Tensor, **masks: torch.Tensor) -> torch.Tensor:
        given = {"x": x, "cache_position": cache_position, **masks}
        if self.inputs is None:
            self.inputs = {k: v.clone() for k, v in given.items()}
            self.cache = cache
            start = time.perf_counter()
            out = self._first_step()
            self.capture_s = time.perf_counter() - start
            return out
        if cache is not self.cache or set(given) != set(self.inputs):
            raise RuntimeError("a DecodeGraph replays one micro-batch's step: same cache, same inputs")
        for k, v in given.items():
            self.inputs[k].copy_(v, non_blocking=True)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.output

    def _first_step(self) -> torch.Tensor:
        """Capture the step (CUDA) and run it once; on a CPU just run it. A compiled stage compiles here."""
        if not self.capture:
            return self._forward()
        self._capture()
        self.graph.replay()
        torch.cuda.synchronize()
        return self.output

    def _forward(self) -> torch.Tensor:
        i = self.inputs
        masks = {k: v for k, v in i.items() if k not in ("x", "cache_position")}
        with torch.no_grad():
            return self.stage(i["x"], self.cache, i["cache_position"], **masks)

    def _capture(self) -> None:
        try:
            self.graph, self.output = capture(self._forward)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"capturing the decode step as a CUDA graph failed ({first}): run without "
                               f"--cuda-graphs") from e


class KeptSteps:
    """The static caches and decode graphs of the last graphed generation, kept for the next one of the same shapes.

    Why: a graph is bound to the addresses of its cache, so a new cache is a new capture. After a warm-up had
    compiled the 8B's step, ``hpi run``'s measured first decode step still took 23 ms at batch 1 and 41 ms at 16
    against 5.9 / 6.8 ms medians on one H100: the capture, once per generation
    (benchmarks/results/2026-12-07-warmup, call 1). A generation whose micro-batch has the key of a kept one (its
    index, rows, cache slots, whether it is padded, and the step's compile and stacking switches: everything the
    capture fixed) rewinds the kept cache and replays the kept graph. Only the last generation's are kept, and the
    ones a generation does not reuse are dropped before it allocates its own, so memory never holds more than one
    generation's caches, the KV memory the planner prices."""

    def __init__(self) -> None:
        self._kept: dict[tuple, tuple[Any, DecodeGraph]] = {}

    def take(self, keys: list[tuple]) -> dict[tuple, tuple[Any, DecodeGraph]]:
        """The kept (cache, graph) of each key that has one, each cache rewound; the rest are let go. Nothing
        stays kept until ``keep``: a generation that fails leaves no half-used graph behind."""
        kept, self._kept = self._kept, {}
        reused = {key: kept[key] for key in keys if key in kept}
        for cache, _ in reused.values():
            cache.rewind()
        return reused

    def keep(self, steps: dict[tuple, tuple[Any, DecodeGraph]]) -> None:
        self._kept = dict(steps)

    @property
    def steps(self) -> dict[tuple, tuple[Any, DecodeGraph]]:
        """What is kept now, by key (a copy)."""
        return dict(self._kept)
