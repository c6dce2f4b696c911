"""What each rank of ``hpi serve`` has done so far, brought to rank 0 without a collective.

Every rank counts its own work (``RankMeter``): forwards run, seconds its stage was busy (a span per step:
device events on CUDA, host clock on the CPU, ``hpi.executor.spans``), bytes ZeRO-3 copied host->device (the
bytes per forward ``hpi run`` counts, ``hpi.executor.zero3.zero3_transfer_bytes``, times the forwards), and the
seconds and count of each collective (``hpi.executor.spans.COLLECTIVES``). At most once per ``PUBLISH_EVERY_S``
it writes these running totals to the c10d store every rank already shares (``torch.distributed``'s default
store, the TCPStore torchrun set up: a host-side ``set``, no collective, no device synchronization). Rank 0
reads every rank's totals at most once per ``READ_EVERY_S`` (one ``multi_get``) and sends them to the HTTP
front with its step events. Totals are cumulative, so a lost or late read loses nothing: the next one carries it.

Each total also names the last step the rank finished, so the front can pair a rank's busy seconds with rank
0's wall time up to that same step (``hpi.serve.metrics``: the pipeline bubble and the H2D rate).
No torch import here: the front unpickles ``RankTotals``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

PUBLISH_EVERY_S = 0.5  # a rank writes its totals to the store at most this often
READ_EVERY_S = 1.0  # rank 0 reads every rank's totals at most this often
KEY = "hpi/serve/totals/{rank}"


@dataclass(frozen=True)
class RankTotals:
    """One rank's running totals (module docstring). ``collectives``: ((op, group), count, seconds) each."""

    rank: int
    stage: int
    tp_rank: int
    last_step: int  # index of the last step this rank finished (-1: none yet)
    forwards: int
    busy_s: float
    h2d_bytes: int
    collectives: tuple[tuple[tuple[str, str], int, float], ...] = ()

    def to_json(self) -> str:
        return json.dumps([self.rank, self.stage, self.tp_rank, self.last_step, self.forwards, self.busy_s,
                           self.h2d_bytes, [[list(k), n, s] for k, n, s in self.collectives]])

    @classmethod
    def from_json(cls, text: str | bytes) -> "RankTotals":
        rank, stage, tp_rank, last, forwards, busy, h2d, coll = json.loads(text)
        return cls(rank, stage, tp_rank, last, forwards, busy, h2d, tuple((tuple(k), n, s) for k, n, s in coll))


class RankMeter:
    """This rank's counting: ``begin(like)`` / ``end(token, step_index)`` around each step's stage work;
    ``publish`` writes the totals (forced, or when ``PUBLISH_EVERY_S`` has passed)."""

    def __init__(self, store, rank: int, stage: int, tp_rank: int, h2d_bytes_per_forward: int, collectives,
                 busy) -> None:
        self.store, self.rank, self.stage, self.tp_rank = store, rank, stage, tp_rank
        self.h2d_bytes_per_forward = h2d_bytes_per_forward
        self.collectives, self.busy = collectives, busy  # hpi.executor.spans.SpanTimer each
        self.forwards, self.last_step = 0, -1
        self.published_at = float("-inf")

    def begin(self, like):
        return self.busy.start(like)

    def end(self, token, step_index: int) -> None:
        self.busy.stop(token, ("stage", "busy"))
        self.forwards += 1
        self.last_step = step_index
        self.publish()

    def totals(self) -> RankTotals:
        spans = self.collectives.snapshot()
        busy = self.busy.snapshot().get(("stage", "busy"), (0, 0.0))[1]
        return RankTotals(self.rank, self.stage, self.tp_rank, self.last_step, self.forwards, busy,
                          self.forwards * self.h2d_bytes_per_forward,
                          tuple((k, n, s) for k, (n, s) in sorted(spans.items())))

    def publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.published_at >= PUBLISH_EVERY_S:
            self.store.set(KEY.format(rank=self.rank), self.totals().to_json())
            self.published_at = now


class TotalsReader:
    """Rank 0: every rank's latest totals, read at most once per ``READ_EVERY_S`` (None between reads)."""

    def __init__(self, store, world_size: int) -> None:
        self.store, self.keys = store, [KEY.format(rank=r) for r in range(world_size)]
        self.read_at = float("-inf")

    def maybe_read(self) -> tuple[RankTotals, ...] | None:
        now = time.monotonic()
        if now - self.read_at < READ_EVERY_S or not self.store.check(self.keys):
            return None
        self.read_at = now
        return tuple(RankTotals.from_json(v) for v in self.store.multi_get(self.keys))
