"""Time spent in spans of a rank's work (a collective, a stage's forward), as the compute stream sees it, without
ever synchronizing for it.

CUDA: a ``torch.cuda.Event`` pair per span on the current stream, folded into the totals only once the end event
has completed (``query``), so a reader sees every span that finished and never waits for the others; the final
``total`` of ``hpi run`` waits once for what is left. Inside a CUDA graph capture events cannot be timed: such
spans are not counted (a graphed decode step's collectives are invisible here). CPU (gloo, synchronous): host
wall time (``time.perf_counter``), which is what the collective costs the calling thread there.
"""

from __future__ import annotations

import time
from collections import deque

import torch

FOLD_BACKLOG = 1024  # pending CUDA spans beyond this are folded as they complete (bounds the event backlog)


class SpanTimer:
    """Seconds and counts per key (e.g. ``("all_reduce", "tp")``); ``start(t)`` -> token, ``stop(token, key)``."""

    def __init__(self) -> None:
        self.enabled = True  # hpi serve --no-metrics switches collective timing off (the overhead benchmark)
        self.seconds: dict[tuple[str, str], float] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.pending: deque = deque()  # (key, begin event, end event), oldest first
        self.free: list = []  # events already read, recorded again instead of created (no cudaEventCreate a step)

    def start(self, t: torch.Tensor | None = None):
        """A token for ``stop``; ``t`` says where the work runs (a CUDA tensor: device events; else host clock)."""
        if not self.enabled:
            return None
        if t is not None and t.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                return None  # inside a CUDA graph (hpi.executor.graphs): events cannot be timed there
            ev = self._event()
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token, key: tuple[str, str]) -> None:
        if token is None:
            return
        self.counts[key] = self.counts.get(key, 0) + 1
        if isinstance(token, float):
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - token
            return
        end = self._event()
        end.record()
        self.pending.append((key, token, end))
        if len(self.pending) > FOLD_BACKLOG:
            self.fold(wait=False)

    def _event(self):
        return self.free.pop() if self.free else torch.cuda.Event(enable_timing=True)

    def fold(self, wait: bool) -> None:
        """Add the completed CUDA spans to ``seconds`` (all of them with ``wait``: one synchronization)."""
        while self.pending and (wait or self.pending[0][2].query()):
            key, begin, end = self.pending.popleft()
            end.synchronize()
            self.seconds[key] = self.seconds.get(key, 0.0) + begin.elapsed_time(end) / 1e3
            self.free += (begin, end)

    def snapshot(self) -> dict[tuple[str, str], tuple[int, float]]:
        """(count, seconds) per key of every span completed so far, without waiting: a CUDA span still running
        is counted but its seconds arrive with a later snapshot."""
        self.fold(wait=False)
        return {key: (n, self.seconds.get(key, 0.0)) for key, n in self.counts.items()}

    def total(self, reset: bool = False) -> float:
        """Seconds of every span so far, all keys together (waits for the pending ones)."""
        self.fold(wait=True)
        out = sum(self.seconds.values())
        if reset:
            self.seconds, self.counts = {}, {}
        return out


COLLECTIVES = SpanTimer()  # this process's collectives: TP all-reduce / all-gather, PP send / recv
