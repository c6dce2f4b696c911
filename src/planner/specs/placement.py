"""Where a plan's ranks sit on the hardware graph, reduced to the figures the cost model needs.

``hpi.planner.ranks.place(plan, topology)`` produces it; the cost model reads only this record, so cost terms
can be tested with hand-made placements and the graph stays the single place that knows about links.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Link:
    """The bottleneck a group's traffic goes through: one-way bandwidth and one-hop latency."""

    bandwidth_bytes_s: float
    latency_s: float
    kind: str  # "local" (no traffic), "nvlink", "nvswitch", "pcie", "pcie-host", "ib", ...
    path: str = ""  # human description, e.g. "gpu0 -> pcie-sw0 -> cpu0 -> pcie-sw1 -> gpu2"

    @classmethod
    def local(cls) -> "Link":
        return cls(bandwidth_bytes_s=math.inf, latency_s=0.0, kind="local", path="same GPU")

    def to_dict(self) -> dict[str, Any]:
        bw = None if math.isinf(self.bandwidth_bytes_s) else self.bandwidth_bytes_s
        return {"bandwidth_bytes_s": bw, "latency_s": self.latency_s, "kind": self.kind, "path": self.path}


@dataclass(frozen=True)
class Placement:
    tp: int
    pp: int
    dp: int
    rank_gpus: tuple[str, ...]  # graph node name of each rank's GPU, in rank order (tp innermost, dp, pp)
    tp_link: Link  # slowest link inside any TP group (all-reduce)
    dp_link: Link  # slowest link inside any ZeRO-3 partition (dp) group (parameter all-gather)
    pp_link: Link  # slowest link between consecutive pipeline stages (send/recv)
    h2d_pinned_bytes_s: float  # per GPU host->device ceiling, pinned, while every rank streams at once
    h2d_pageable_bytes_s: float  # the same, pageable
    nvme_read_bytes_s: float  # per GPU share of NVMe read while every rank reads at once (0: no NVMe)
    nodes_used: int
    notes: tuple[str, ...] = ()  # e.g. "TP group spans 2 NVLink islands: all-reduce over PCIe"
    # The same three per GPU while only the first k pipeline stages stream (index k - 1; the last entry is
    # the all-stages figure above): a pipeline with fewer micro-batches than stages has only that many
    # stages working at once, and they share the host links among fewer GPUs. Empty: the figures above.
    h2d_pinned_by_stages: tuple[float, ...] = ()
    h2d_pageable_by_stages: tuple[float, ...] = ()
    nvme_read_by_stages: tuple[float, ...] = ()

    @property
    def world_size(self) -> int:
        return len(self.rank_gpus)

    def rates_with_stages(self, name: str) -> tuple[float, ...]:
        """Per-GPU ``name`` (h2d_pinned, h2d_pageable, nvme_read) with 1..pp stages streaming at once."""
        by_stages = getattr(self, f"{name}_by_stages")
        everyone = getattr(self, f"{name}_bytes_s")
        return tuple(by_stages) if by_stages else (everyone,) * self.pp

    def to_dict(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "pp": self.pp,
            "dp": self.dp,
            "rank_gpus": list(self.rank_gpus),
            "tp_link": self.tp_link.to_dict(),
            "dp_link": self.dp_link.to_dict(),
            "pp_link": self.pp_link.to_dict(),
            "h2d_pinned_bytes_s": self.h2d_pinned_bytes_s,
            "h2d_pageable_bytes_s": self.h2d_pageable_bytes_s,
            "nvme_read_bytes_s": self.nvme_read_bytes_s,
            "h2d_pinned_by_stages": list(self.rates_with_stages("h2d_pinned")),
            "h2d_pageable_by_stages": list(self.rates_with_stages("h2d_pageable")),
            "nvme_read_by_stages": list(self.rates_with_stages("nvme_read")),
            "nodes_used": self.nodes_used,
            "notes": list(self.notes),
        }
