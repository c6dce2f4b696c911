"""``GET /v1/events``: one JSON event per step for a GUI (Server-Sent Events, ``data: {json}\\n\\n``).

An event: ``step`` (rank 0's step index), ``kind`` (prefill / decode / mixed), ``tokens``, ``active_slots`` (slots
holding a request after the step), ``step_s`` (rank 0's wall time of the step), and from the ranks' latest
running totals (``hpi.executor.meter``, read about once a second, so several steps carry the same figures):
``stage_busy_s_total`` (per stage, its busiest TP rank's busy seconds so far), ``collective_s_total`` (per
"op/group", seconds summed over the ranks so far) and ``bubble_ratio`` (the last window's, or null).

A slow consumer never blocks the engine: the reader thread hands each event to the event loop, which puts it on
every subscriber's bounded queue; a full queue drops the event and counts it (``hpi_events_dropped_total``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

QUEUE_EVENTS = 256  # events a subscriber may lag behind before its new events are dropped


def step_event(stats, totals: dict[int, Any], bubble: float | None) -> dict[str, Any]:
    """The event of one ``StepStats`` with the ranks' latest ``RankTotals`` (by rank)."""
    busy: dict[str, float] = {}
    collective: dict[str, float] = {}
    for t in totals.values():
        busy[str(t.stage)] = max(busy.get(str(t.stage), 0.0), t.busy_s)
        for (op, group), _, seconds in t.collectives:
            collective[f"{op}/{group}"] = collective.get(f"{op}/{group}", 0.0) + seconds
    return {"step": stats.index, "kind": stats.kind, "tokens": stats.n_tokens, "active_slots": stats.slots_used,
            "step_s": stats.seconds, "stage_busy_s_total": busy, "collective_s_total": collective,
            "bubble_ratio": bubble}


class EventHub:
    """Subscribers' bounded queues; ``publish`` from any thread once ``attach(loop)`` was called."""

    def __init__(self, on_drop: Callable[[], None] = lambda: None, queue_events: int = QUEUE_EVENTS) -> None:
        self.subscribers: set[asyncio.Queue] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_drop, self.queue_events = on_drop, queue_events

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def publish(self, event: dict[str, Any]) -> None:
        if self.subscribers and self.loop is not None:
            self.loop.call_soon_threadsafe(self._fan_out, event)

    def _fan_out(self, event: dict[str, Any]) -> None:
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.on_drop()

    async def stream(self) -> AsyncIterator[str]:
        """SSE lines of every event from now on, until the client leaves (the response task is cancelled)."""
        queue: asyncio.Queue = asyncio.Queue(self.queue_events)
        self.subscribers.add(queue)
        try:
            while True:
                event = await queue.get()
                yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
        finally:
            self.subscribers.discard(queue)
