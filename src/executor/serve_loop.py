"""``hpi serve`` on the ranks: the built stage stays loaded and runs the steps rank 0 schedules.

Rank 0 connects back to the HTTP front (``hpi.serve.engine_client``) over a local authenticated socket
(``multiprocessing.connection``: the front's address is in the spec, its key in ``HPI_SERVE_AUTHKEY``) and
then loops: take the front's messages (add, cancel, stop), schedule a step per slot group, broadcast it, run
its own part, collect the last stage's outputs, and send the front one message of events per step. The
other ranks follow the broadcast (``hpi.executor.engine.follow``).

Messages, front -> rank 0: ``("add", request_id, prompt_ids, SamplingParams)``, ``("cancel", request_id)``,
``("stop", drain_s)``. Rank 0 -> front: ``("ready", info)``, ``("events", [Event], StepStats)``,
``("rejected", request_id, reason, message)``, ``("totals", (RankTotals, ...))`` (while idle),
``("stopped",)``, ``("error", message)``.

Metrics (``ServeSpec.metrics``, on unless ``hpi serve --no-metrics``): every rank counts its work in a
``hpi.executor.meter.RankMeter`` and publishes the totals to the c10d store; rank 0 reads them about once a second
and sends them with a step's ``StepStats`` (or, idle, on its own). Off: no busy span, no collective timing, no
store traffic.

With pipeline parallelism the slots are split into ``micro_batches`` groups and rank 0 keeps one step of
each group in the pipeline, so the stages work on different groups at once.
"""

from __future__ import annotations

import os
import time
from collections import deque
from multiprocessing.connection import Client

import torch

from hpi.executor.engine import IDLE, STOP, Control, Messenger, StepRunner, StepStats, follow, warm_up
from hpi.executor.meter import RankMeter, TotalsReader
from hpi.executor.scheduler import QueueFull, Scheduler, Sequence
from hpi.executor.slots import SlotKVCache
from hpi.executor.spans import COLLECTIVES, SpanTimer

AUTHKEY_ENV = "HPI_SERVE_AUTHKEY"
IDLE_BEAT_S = 2.0  # an idle rank 0 still broadcasts this often: a dead follower shows up while idle too


def serve(spec, built) -> None:
    """Every rank: build the slot cache and the step runner, warm up, then lead (rank 0) or follow."""
    g, opts = built.groups, spec.serve
    if g.dp > 1:
        raise ValueError(f"hpi serve runs dp 1 (each step's tokens go to one replica); the plan has dp {g.dp}")
    groups_n = spec.plan.micro_batches if g.pp > 1 else 1
    messenger = Messenger.create(g, opts.hang_timeout_s)
    runner = StepRunner(stage=built.stage, groups=g, cache=SlotKVCache(opts.n_slots, opts.max_model_len),
                        hidden_size=built.config.hidden_size, dtype=built.dtype, device=built.device,
                        slots_per_group=opts.n_slots // groups_n, graphs=spec.decode_graphs)
    warm_up(runner, groups_n)
    store = None
    if opts.metrics:
        store = torch.distributed.distributed_c10d._get_default_store()  # torchrun's TCPStore, every rank shares it
        runner.meter = RankMeter(store, g.rank, g.stage, g.tp_rank, built.transfer_bytes[0], COLLECTIVES, SpanTimer())
        COLLECTIVES.total(reset=True)  # the warm-up's collectives are not the server's
        runner.meter.publish(force=True)
    else:
        COLLECTIVES.enabled = False
    if g.rank != 0:
        follow(runner, messenger)
        return
    scheduler = Scheduler(opts.n_slots, opts.max_model_len, opts.step_tokens, policy=opts.policy, groups=groups_n,
                          max_queue=opts.max_queue)
    conn = Client(tuple(opts.address), authkey=bytes.fromhex(os.environ[AUTHKEY_ENV]))
    try:
        reporter = None if g.is_last_stage else g.last_stage_rank  # rank 0 is (tp 0, dp 0, stage 0)
        reader = TotalsReader(store, g.world_size) if store is not None else None
        Leader(runner, scheduler, conn, messenger, reporter, groups_n, reader).run()
    except BaseException as e:
        _say(conn, ("error", f"rank 0: {type(e).__name__}: {e}"))
        raise
    finally:
        conn.close()


def _say(conn, msg: tuple) -> None:
    try:
        conn.send(msg)
    except (OSError, EOFError):  # the front is gone: nothing to tell
        pass


class Leader:
    """Rank 0's loop (module docstring)."""

    def __init__(self, runner: StepRunner, scheduler: Scheduler, conn, messenger: Messenger,
                 results_from: int | None, groups_n: int, reader: TotalsReader | None = None) -> None:
        self.runner, self.scheduler, self.conn, self.messenger = runner, scheduler, conn, messenger
        self.results_from, self.groups_n, self.reader = results_from, groups_n, reader
        self.in_flight: deque = deque()
        self.next_group = 0
        self.stop_at: float | None = None
        self.engaged_s = 0.0  # wall seconds with a step in flight, up to the last time the pipeline emptied
        self.engaged_from: float | None = None  # when the pipeline last went from empty to busy

    def run(self) -> None:
        device = self.runner.device
        self.conn.send(("ready", {"n_slots": self.scheduler.n_slots, "max_model_len": self.scheduler.max_model_len,
                                  "step_tokens": self.scheduler.step_tokens, "policy": self.scheduler.policy,
                                  "groups": self.groups_n, "graphs": self.runner.graphs,
                                  "dtype": str(self.runner.dtype).removeprefix("torch."),  # lm-eval's hf spelling
                                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}))
        while True:
            busy = self.scheduler.has_work or bool(self.in_flight)
            if not self._take_messages(0.0 if busy else IDLE_BEAT_S) and not busy:
                self.messenger.pass_on(Control(IDLE))
                self._idle_totals()
            if self.stop_at is not None and (not busy or time.monotonic() >= self.stop_at):
                return self._stop()
            self._fill()
            if self.in_flight:
                self._collect()

    def _take_messages(self, timeout: float) -> bool:
        """Everything the front has sent; True when something came."""
        got = False
        while self.conn.poll(timeout):
            got, timeout = True, 0.0
            try:
                msg = self.conn.recv()
            except EOFError:  # the front died: stop now, nobody is listening
                self.stop_at = time.monotonic()
                return got
            self._handle(msg)
        return got

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, rid, prompt, params = msg
            try:
                self.scheduler.add(Sequence(rid, tuple(prompt), params))
            except QueueFull as e:
                self.conn.send(("rejected", rid, "queue_full", str(e)))
            except ValueError as e:
                self.conn.send(("rejected", rid, "invalid", str(e)))
        elif kind == "cancel":
            event = self.scheduler.cancel(msg[1])
            if event is not None:
                self.conn.send(("events", [event], None))
        elif kind == "stop":
            self.stop_at = time.monotonic() + float(msg[1])

    def _fill(self) -> None:
        """One step of each slot group that is not in the pipeline already."""
        for _ in range(self.groups_n):
            group = self.next_group
            self.next_group = (self.next_group + 1) % self.groups_n
            if any(flight[0].group == group for flight in self.in_flight):
                continue
            step = self.scheduler.schedule(group)
            if step is None:
                continue
            prompt_tokens = self.scheduler.prompt_tokens(step)
            started = time.perf_counter()
            if self.engaged_from is None:
                self.engaged_from = started
            self.messenger.pass_on(Control("step", step))
            self.in_flight.append((step, self.runner.run(step), started, prompt_tokens))

    def _collect(self) -> None:
        """The oldest step's outputs -> the scheduler -> one events message to the front."""
        step, outputs, started, prompt_tokens = self.in_flight.popleft()
        if outputs is None:  # a pipeline: the last stage sends them
            outputs = self.messenger.outputs(self.results_from)
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        ended = time.perf_counter()
        engaged = self.engaged_s + ended - self.engaged_from
        if not self.in_flight:
            self.engaged_s, self.engaged_from = engaged, None
        events = self.scheduler.postprocess(step, outputs)
        stats = StepStats(step.index, step.n_tokens, len(step.segments), step.decode_only, ended - started,
                          prompt_tokens, len(self.scheduler.running), engaged,
                          self.reader.maybe_read() if self.reader is not None else None)
        self.conn.send(("events", events, stats))

    def _idle_totals(self) -> None:
        """Idle: publish this rank's totals and send every rank's to the front (the last steps' figures)."""
        if self.reader is None:
            return
        self.runner.meter.publish()
        totals = self.reader.maybe_read()
        if totals is not None:
            self.conn.send(("totals", totals))

    def _stop(self) -> None:
        """Drain what is in the pipeline, cancel what is left, stop every rank, tell the front."""
        while self.in_flight:
            self._collect()
        for seq in list(self.scheduler.waiting) + list(self.scheduler.running.values()):
            event = self.scheduler.cancel(seq.request_id)
            if event is not None:
                self.conn.send(("events", [event], None))
        self.messenger.pass_on(Control(STOP))
        self.messenger.drain()
        _say(self.conn, ("stopped",))
