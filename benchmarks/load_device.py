"""Time to ready from a per-expert MoE checkpoint on disk: hpi's readers against transformers' own
``from_pretrained``, side by side on the same files, the page cache emptied before each.

    python benchmarks/load_device.py --out DIR [--layers 6] [--work /tmp/hpi-load] [--ffn N] [--device cpu]

The model is Mixtral-8x7B's shape cut to ``--layers`` decoder layers (full width: 8 experts of 14336, or
``--ffn`` for a smoke run), random bf16 weights drawn on the device and written as Mixtral stores them
(``block_sparse_moe.experts.<e>.w1``, 5 GB shards). Each loader then builds the model on the device from
those files, one rank and TP rank 0 of 2 (on one device) each:

- hpi, planned reader (``hpi.executor.checkpoint.CheckpointReader``, the default of ``build_stage``): each file
  read once in large chunks through pinned staging buffers, slices cut on the GPU; buffered, and O_DIRECT;
- hpi, slice reader (``hpi.executor.weights.SliceReader``, the first one): safetensors' ``get_slice`` per
  parameter on a memory-mapped file;
- transformers ``from_pretrained(..., device_map=device)``, which fuses the experts into its 3-D tensors.

The page cache is emptied before each load with ``posix_fadvise(DONTNEED)`` after an fsync (no root needed), so
every load reads from the disk; ``/proc/self/io`` read_bytes says how much each load read (all threads), and
the planned reader's own counter what it asked for. Writes DIR/load.json.

The row-parallel rule (``hpi.executor.readplan``: read a row-parallel slice whole, then cut) is measured here
too (``row_rule`` in load.json): layer 0's expert 0 w2 [4096, 14336] bf16 (117 MB), tp 2 rank 0's half, read
whole and cut vs its 4096 rows' halves (14 KiB each) read one by one, page cache emptied before each. On the
CPU dev box (ext4 on a virtio disk, read_ahead_kb 128; /tmp/rowrule.py, not kept): whole 0.20 s and 117.4 MB
from the disk; rows 0.23 s and still 110.2 MB from the disk (read-ahead reads the gaps); from the page cache
0.14 s vs 0.17 s. Skipping gaps of 14 KiB saves no disk bytes and costs a read each.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _evict(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _timed(name: str, folder: Path, load, device: str, reader=None) -> dict:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    _evict(folder)
    sync()
    before, t0 = _read_bytes(), time.perf_counter()
    model = load()
    sync()
    seconds, read = time.perf_counter() - t0, _read_bytes() - before
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    row = {"loader": name, "seconds": seconds, "disk_read_bytes": read, "param_bytes_on_gpu": params,
           "disk_read_bytes_s": read / seconds if seconds else None,
           "reader_bytes_read": getattr(reader, "bytes_read", None)}
    print(json.dumps(row), flush=True)
    return row


def _row_rule(folder: Path, config) -> list[dict]:
    """One tp-2 row-parallel slice read whole and cut, then row by row (``skip_gap_bytes=0``), each from the disk."""
    from hpi.executor.checkpoint import CheckpointReader
    from hpi.executor.tp import Slice

    name = "model.layers.0.block_sparse_moe.experts.0.w2.weight"
    half = config.intermediate_size // 2
    out = []
    for label, gap in (("whole, then cut", 2**20), ("row by row", 0)):
        reader = CheckpointReader(folder, config, skip_gap_bytes=gap)
        reader.read(name, Slice(1, 0, half, half))  # staging buffers allocated outside the timing
        reader.bytes_read = 0
        _evict(folder)
        before, t0 = _read_bytes(), time.perf_counter()
        reader.read(name, Slice(1, 0, half, half))
        row = {"rule": label, "seconds": time.perf_counter() - t0, "disk_read_bytes": _read_bytes() - before,
               "reader_bytes_read": reader.bytes_read}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--work", default="/tmp/hpi-load")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the script")
    parser.add_argument("--ffn", type=int, default=None, help="experts' intermediate size (smoke runs: smaller)")
    args = parser.parse_args()

    import torch
    import transformers

    from hpi.executor.checkpoint import CheckpointReader
    from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config
    from hpi.executor.weights import SliceReader, full_state_dict, write_checkpoint

    config = load_hf_config("mixtral-8x7b")
    config.num_hidden_layers = args.layers
    if args.ffn:
        config.intermediate_size = args.ffn
    folder = Path(args.work)
    t0 = time.perf_counter()
    dev = args.device
    state = full_state_dict(config, seed=0, dtype=torch.bfloat16, device=dev)
    write_checkpoint(state, config, folder)
    del state
    written_s = time.perf_counter() - t0
    files = sorted(folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(json.dumps({"checkpoint_bytes": size, "files": len(files), "draw_and_write_s": written_s}), flush=True)

    n = config.num_hidden_layers
    readers = {"planned": lambda: CheckpointReader(folder, config),
               "planned O_DIRECT": lambda: CheckpointReader(folder, config, direct=True),
               "slice": lambda: SliceReader(folder, config)}
    rows = []
    for label, make in readers.items():
        for shard, where in ((ShardSpec.whole(n), "one rank"), (ShardSpec.whole(n, 0, 2), "tp rank 0 of 2")):
            reader = make()
            rows.append(_timed(f"hpi {label} reader, {where}", folder, lambda: build_stage(
                config, shard, dtype=torch.bfloat16, device=dev, checkpoint=reader), dev, reader))
    auto = transformers.AutoModelForCausalLM
    rows.append(_timed("transformers from_pretrained", folder,
                       lambda: auto.from_pretrained(str(folder), dtype=torch.bfloat16, device_map=dev), dev))
    one, hf = rows[0]["seconds"], rows[-1]["seconds"]
    doc = {"model": f"mixtral-8x7b shape, {n} layers, ffn {config.intermediate_size}", "checkpoint_bytes": size,
           "files": len(files), "draw_and_write_s": written_s, "loads": rows, "hpi_over_from_pretrained": one / hf,
           "row_rule": _row_rule(folder, config),
           "software": {"torch": torch.__version__, "transformers": transformers.__version__}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "load.json").write_text(json.dumps(doc, indent=2))
    print(f"hpi (planned, one rank) {one:.1f} s, transformers {hf:.1f} s: ratio {one / hf:.2f}", flush=True)


if __name__ == "__main__":
    main()
