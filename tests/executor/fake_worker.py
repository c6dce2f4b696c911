"""A stand-in for ``hpi.executor.worker`` in launcher tests: ``python fake_worker.py <spec.json>`` under torchrun.

It honours the worker's contract with the launcher: read the spec, join the process group (gloo, from
torchrun's environment, when there is more than one rank), and on success let global rank 0 write
``<out_dir>/record.json`` (a RunRecord with made-up figures) and print the same JSON as its LAST stdout line.

Behaviour, from ``spec.extra["fake"]`` or else the environment variable ``HPI_FAKE_WORKER``:

- ``succeed`` (default): every rank prints a few lines, meets the others at a barrier, rank 0 reports;
- ``exit``: rank ``extra["rank"]`` (default 1; env ``HPI_FAKE_RANK``) prints 15 log lines and exits 3;
- ``oom``: that rank raises ``MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")``;
- ``sleep``: every rank prints "sleeping" and sleeps forever (timeout and interrupt tests);
- ``beat``: every rank prints a heartbeat line (``hpi.executor.watchdog``) every 0.2 s forever, except rank
  ``extra["rank"]`` when ``extra["silent"]`` is set: it beats once and then sleeps without a word (watchdog tests).

Each rank writes its pid to ``<out_dir>/pids/rank<r>`` first, so tests can check none is left running.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from hpi.executor.spec import RunSpec, write_json_atomic
    from hpi.records import DecodeSteps, ModelInfo, RunRecord, Timings

    spec = RunSpec.read(argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(spec.out_dir)
    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / f"rank{rank}").write_text(str(os.getpid()))
    mode = spec.extra.get("fake") or os.environ.get("HPI_FAKE_WORKER", "succeed")
    bad = int(spec.extra.get("rank", os.environ.get("HPI_FAKE_RANK", 1 if world > 1 else 0)))

    dist = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    print(f"rank {rank} of {world} ready (local rank {os.environ['LOCAL_RANK']})", flush=True)

    if mode == "exit" and rank == bad:
        for i in range(15):
            print(f"rank {rank} log line {i}", flush=True)
        print(f"rank {rank} cannot go on", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "oom" and rank == bad:
        print("allocating the KV cache", flush=True)
        raise MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if mode == "beat":
        from hpi.executor.watchdog import heartbeat_line

        forward = 0
        while True:
            forward += 1
            print(heartbeat_line(rank, f"measured forward {forward}/1000000 after {forward * 0.2:.2f} s"), flush=True)
            if spec.extra.get("silent") and rank == bad:
                while True:
                    time.sleep(1)
            time.sleep(0.2)
    if mode == "sleep":
        print("sleeping", flush=True)
        while True:
            time.sleep(1)

    if dist is not None:
        dist.barrier()
    if rank == 0:
        record = RunRecord(spec=spec.to_dict(), plan=spec.plan.to_dict(), model=ModelInfo(spec.model),
                           device=spec.device, world_size=world,
                           timings=Timings(ttft_s=1.25, decode_step_s=DecodeSteps(0.5, 0.5, 0.5),
                                           throughput_tok_s=2.0)).to_json()
        if spec.mode == "chat":
            print("Hello from the fake model.", flush=True)
        write_json_atomic(out / "record.json", record)
        print(json.dumps(record), flush=True)
    if dist is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from torch.distributed.elastic.multiprocessing.errors import record

        sys.exit(record(main)(sys.argv))
    sys.exit(main(sys.argv))
