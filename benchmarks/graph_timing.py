"""Timing a GPU call as a decode step meets it: captured once in a CUDA graph and replayed between two CUDA events
(no host launch cost, as in hpi's graphed decode); on a CPU, host wall time of the plain calls. Shared by the kernel
benchmarks (``decode_attention_bench.py``, ``skinny_gemm_bench.py``)."""

from __future__ import annotations

import time

import torch


def captured(fn) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph after three warm-up calls on a side stream (Triton compiles, sdpa and cuBLAS pick
    their kernels outside the capture), replayed once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    return graph


def time_us(fn, replays: int, device: torch.device) -> tuple[float, str]:
    """µs a call: CUDA-graph replays between events on a GPU, else host wall time of the plain calls."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(replays):
            fn()
        return (time.perf_counter() - start) / replays * 1e6, "perf_counter"
    return replay_us(captured(fn), replays), "cuda_graph_events"


def replay_us(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """µs a replay of ``graph``: ``replays`` replays between two CUDA events."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / replays * 1e3
