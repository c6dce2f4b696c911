"""Programmatic dependent launch (Hopper's grid dependency control) for hpi's own decode kernels: one switch and
one capability test that the few-row products (``hpi.executor.skinny_gemm``) and the split-KV attention
(``hpi.executor.decode_attention``) both read.

Why: a decode step is a chain of kernels a few µs to a few tens of µs long, each launched only once the one before
has finished, so each pays its launch, the first loads' latency and its tail with the GPU part idle. Launched as a
programmatic dependent launch (``launch_pdl``), a kernel may start once every program of the kernel before has
signalled (``gdc_launch_dependents``), run what needs nothing that kernel writes (a product warms L2 with its
first weight tiles), then wait (``gdc_wait``: the kernel before is done and its writes are visible) before reading
its input. A kernel that signals but is launched plainly, or whose successor is a plain launch, behaves as before:
the signal is then a no-op (PTX ``griddepcontrol``). Inductor's own kernels take part under its option
``triton.enable_pdl`` (``benchmarks/inductor_option_sets.py``, ``cdt-all-pdl``).

Off by default: measured on one H100 neither form shortens the 8B's decode step. The first (the first weight tile
loaded into registers before the wait) made the 16-row products 2% slower and the compiled batch-16 step 4% slower
(benchmarks/results/2026-12-06-pdl); the second (today's: L2 warm-up, then the plain loop) left the products as they
were (5.565 against 5.563 ms a step) and the batch-16 step about 1% slower (benchmarks/results/2026-12-06-pdl-l2).
A CUDA graph keeps the launches it captured: capture again after switching.
"""

from __future__ import annotations

import functools

import torch

from hpi.executor.triton_env import INTERPRETED

_ON = [False]


def use(enabled: bool) -> None:
    """Launch hpi's decode kernels as dependent launches where the GPU has them (``capable``), or not."""
    _ON[0] = enabled


def capable(device: torch.device) -> bool:
    """Whether a kernel on ``device`` can be a dependent launch: a CUDA GPU of compute capability 9 or more and a
    Triton with ``gdc_wait``; never in Triton's interpreter."""
    if INTERPRETED or device.type != "cuda":
        return False
    return _gdc_on(torch.cuda.current_device() if device.index is None else device.index)


def active(device: torch.device) -> bool:
    """Switched on and possible on ``device``: what a launch on it does."""
    return _ON[0] and capable(device)


@functools.cache
def _gdc_on(index: int) -> bool:
    try:
        import triton.language as tl
    except ImportError:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")
