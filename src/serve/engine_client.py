"""The HTTP front's side of the serving runtime: one connection to rank 0, one event queue per request.

The front listens on a local authenticated socket (``multiprocessing.connection``), rank 0 connects after
its model is built (``hpi.executor.serve_loop``), says ``ready`` once warmed up, and then sends one message
of events per step. A reader thread routes each event to its request's ``asyncio.Queue``; request handlers
``submit`` and iterate. Anything that ends the runtime (a rank died, rank 0 reported an error, a step stalled
past the hang timeout) marks the client ``dead`` with a message naming what failed: every waiting request
and every later one gets it (HTTP 500).

Why the front is not rank 0's own thread (vLLM V1 splits its API server from its engine core the same way):
a rank that dies cannot answer for itself, and the front must still answer 500 with the rank's name, stop the
other ranks and exit non-zero. The front also owns the tokenizer, so the ranks' loop handles token ids only.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from typing import Any, AsyncIterator

from hpi.executor.scheduler import Event, SamplingParams

STARTING, READY, STOPPING, STOPPED, DEAD = "starting", "ready", "stopping", "stopped", "dead"
LIVE = (STARTING, READY, STOPPING)  # the reader keeps reading rank 0's messages
DIAGNOSIS_GRACE_S = 20.0  # how long rank 0's own error waits for the launcher's diagnosis


class EngineUnavailable(Exception):
    """The runtime cannot take requests: ``status`` 503 (not ready yet, stopping) or 500 (it died)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Rejected(Exception):
    """Rank 0 refused the request: ``reason`` queue_full (429) or invalid (400)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Counters:
    """What the front saw, for /health and the metrics."""

    steps: int = 0
    step_seconds: float = 0.0
    step_tokens: int = 0
    last_step_s: float = 0.0  # monotonic time of the last step's events
    last_stats: Any = None
    finished: dict[str, int] = field(default_factory=dict)


class EngineClient:
    """``EngineClient(hang_timeout_s)``: ``address`` / ``authkey_hex`` go to rank 0 (spec and environment);
    ``attach(loop)`` before ``start()``; then ``submit`` / ``cancel`` from the event loop, ``stop`` from any
    thread, ``fail`` when the launcher learns that a rank died."""

    def __init__(self, hang_timeout_s: float = 600.0, host: str = "127.0.0.1") -> None:
        self.authkey = secrets.token_bytes(32)
        self.listener = Listener((host, 0), authkey=self.authkey)
        self.hang_timeout_s = hang_timeout_s
        self.state, self.message = STARTING, "the model is loading"
        self.info: dict[str, Any] = {}
        self.counters = Counters()
        self.conn = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: dict[str, asyncio.Queue] = {}
        self.waiting: set[str] = set()  # submitted, no event yet (the front's view of rank 0's queue)
        self._send_lock = threading.Lock()
        self._ready = threading.Event()
        self.on_dead: list = []  # callbacks(message), e.g. stop the HTTP server
        self.metrics = None  # hpi.serve.metrics.Metrics, or None (hpi serve --no-metrics)
        self.events = None  # hpi.serve.events.EventHub (with the metrics)

    def observe(self, metrics, events) -> None:
        """Count requests and steps in ``metrics`` and stream each step to ``events``' subscribers."""
        self.metrics, self.events = metrics, events
        metrics.watch(lambda: len(self.queues) - len(self.waiting), lambda: len(self.waiting))

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.address

    @property
    def authkey_hex(self) -> str:
        return self.authkey.hex()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        if self.events is not None:
            self.events.attach(loop)

    def start(self) -> None:
        threading.Thread(target=self._serve_connection, name="hpi-engine-client", daemon=True).start()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        return self._ready.wait(timeout_s)

    # ---- the reader thread ----------------------------------------------------------------------------
    def _serve_connection(self) -> None:
        try:
            self.conn = self.listener.accept()
        except OSError as e:
            if self.state == STARTING:
                self.fail(f"rank 0 never connected: {e}")
            return
        finally:
            self.listener.close()
        try:
            while self.state in LIVE:
                if not self.conn.poll(1.0):
                    self._check_hang()
                    continue
                self._on_message(self.conn.recv())
        except (EOFError, OSError):
            if self.state in LIVE:
                self.fail_soon("rank 0 closed its connection to the front without saying why (see the rank logs)")

    def _check_hang(self) -> None:
        busy = self.queues and self.state in (READY, STOPPING)
        if busy and time.monotonic() - self.counters.last_step_s > self.hang_timeout_s:
            self.fail(f"no step finished for {self.hang_timeout_s:g} s while {len(self.queues)} request(s) wait: "
                      "a rank is stuck (see the rank logs); stopping")

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            self.info = dict(msg[1])
            if self.state == STARTING:
                self.state, self.message = READY, "ready"
            self.counters.last_step_s = time.monotonic()
            self._ready.set()
        elif kind == "events":
            events, stats = msg[1], msg[2]
            if stats is not None:
                c = self.counters
                c.steps += 1
                c.step_seconds += stats.seconds
                c.step_tokens += stats.n_tokens
                c.last_step_s, c.last_stats = time.monotonic(), stats
            for event in events:
                if event.finish_reason is not None:  # counted even when its client has left (a cancel)
                    c = self.counters.finished
                    c[event.finish_reason] = c.get(event.finish_reason, 0) + 1
                if self.metrics is not None:
                    self.metrics.on_event(event)
                self._deliver(event.request_id, event)
            if stats is not None and self.metrics is not None:
                self._observe_step(stats)
        elif kind == "totals":
            if self.metrics is not None:
                self.metrics.on_totals(msg[1])
        elif kind == "rejected":
            self._deliver(msg[1], Rejected(msg[2], msg[3]))
        elif kind == "error":  # usually a symptom (a peer died): the launcher's diagnosis names the cause
            self.fail_soon(msg[1])
        elif kind == "stopped":
            self.state, self.message = STOPPED, "stopped"
            self._deliver_all(EngineUnavailable("the server is stopping", 503))

    def _observe_step(self, stats) -> None:
        from hpi.serve.events import step_event

        self.metrics.on_step(stats)
        if self.events is not None and self.events.subscribers:
            ranks = self.metrics.ranks
            window = ranks.window
            self.events.publish(step_event(stats, ranks.totals, window.bubble_ratio if window else None))

    def _deliver(self, request_id: str, item: Any) -> None:
        queue = self.queues.get(request_id)
        if queue is not None and self.loop is not None:
            self.waiting.discard(request_id)
            self.loop.call_soon_threadsafe(queue.put_nowait, item)

    def _deliver_all(self, item: Any) -> None:
        for rid in list(self.queues):
            self._deliver(rid, item)

    # ---- from the handlers -------------------------------------------------------------------------------
    def check_available(self) -> None:
        if self.state == READY:
            return
        raise EngineUnavailable(self.message, 500 if self.state == DEAD else 503)

    def fail(self, message: str) -> None:
        """The runtime is gone: every request waiting now or later gets ``message`` (HTTP 500)."""
        if self.state == DEAD:
            return
        self.state, self.message = DEAD, message
        self._ready.set()
        self._deliver_all(EngineUnavailable(message, 500))
        for callback in self.on_dead:
            callback(message)

    def fail_soon(self, message: str, grace_s: float = DIAGNOSIS_GRACE_S) -> None:
        """Fail with ``message`` unless a better one (the launcher's, naming the rank that died first) arrives
        within ``grace_s``: rank 0's own error is often only the echo of a peer's death."""
        timer = threading.Timer(grace_s, lambda: self.fail(message) if self.state in LIVE else None)
        timer.daemon = True
        timer.start()

    def _send(self, msg: tuple) -> None:
        if self.conn is None:
            raise EngineUnavailable(self.message, 503)
        with self._send_lock:
            try:
                self.conn.send(msg)
            except (OSError, ValueError) as e:
                self.fail(f"the connection to rank 0 broke: {e}")
                raise EngineUnavailable(self.message, 500) from None

    async def submit(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """The request's events until its last (the one with a finish_reason). Raises ``EngineUnavailable``
        or ``Rejected``. Leaving the iteration early cancels the request on the ranks."""
        self.check_available()
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = queue
        self.waiting.add(request_id)
        if self.metrics is not None:
            self.metrics.on_submit(request_id)
        finished = False
        try:
            self._send(("add", request_id, tuple(prompt), params))
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            self.queues.pop(request_id, None)
            self.waiting.discard(request_id)
            if self.metrics is not None:
                self.metrics.forget(request_id)
            if not finished:
                self.cancel(request_id)

    def cancel(self, request_id: str) -> None:
        """Free the request's slot at the next step (a disconnected client, a stop string)."""
        if self.conn is not None and self.state in (READY, STOPPING):
            try:
                self._send(("cancel", request_id))
            except EngineUnavailable:
                pass

    def stop(self, drain_s: float = 0.0) -> None:
        """Ask rank 0 to finish what runs (up to ``drain_s``), cancel the rest and stop every rank. New
        requests get 503 from now on."""
        if self.state not in (STARTING, READY):
            return
        self.state, self.message = STOPPING, "the server is stopping"
        if self.conn is None:  # rank 0 never connected: stop waiting for it
            self.listener.close()
            return
        with self._send_lock:
            try:
                self.conn.send(("stop", drain_s))
            except (OSError, ValueError):
                pass
