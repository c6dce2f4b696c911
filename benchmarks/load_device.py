"""Time to ready from a per-expert MoE checkpoint on disk: hpi's slice-wise reader against transformers' own
``from_pretrained``, side by side on the same files, the page cache emptied before each.

    python benchmarks/load_device.py --out DIR [--layers 6] [--work /tmp/hpi-load]

The model is Mixtral-8x7B's shape cut to ``--layers`` decoder layers (full width: 8 experts of 14336), random
bf16 weights drawn on the GPU and written as Mixtral stores them (``block_sparse_moe.experts.<e>.w1``, 5 GB
shards). Each loader then builds the model on the GPU from those files:

- hpi, one rank (``build_stage(..., checkpoint=...)``): every parameter read with safetensors' ``get_slice``;
- hpi, TP rank 0 of 2 (the same, on one GPU): the rank reads half of every split tensor, never the rest;
- transformers ``from_pretrained(..., device_map="cuda")``, which fuses the experts into its 3-D tensors.

The page cache is emptied before each load with ``posix_fadvise(DONTNEED)`` after an fsync (no root needed), so
every load reads from the disk; ``/proc/self/io`` read_bytes says how much each load read. Writes DIR/load.json.
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


def _timed(name: str, folder: Path, load, device: str) -> dict:
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
           "disk_read_bytes_s": read / seconds if seconds else None}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--work", default="/tmp/hpi-load")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the script")
    args = parser.parse_args()

    import torch
    import transformers

    from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config
    from hpi.executor.weights import full_state_dict, write_checkpoint

    config = load_hf_config("mixtral-8x7b")
    config.num_hidden_layers = args.layers
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
    rows = [
        _timed("hpi one rank", folder, lambda: build_stage(config, ShardSpec.whole(n), dtype=torch.bfloat16,
                                                             device=dev, checkpoint=str(folder)), dev),
        _timed("hpi tp rank 0 of 2", folder, lambda: build_stage(config, ShardSpec.whole(n, 0, 2),
                                                                   dtype=torch.bfloat16, device=dev,
                                                                   checkpoint=str(folder)), dev),
        _timed("transformers from_pretrained", folder, lambda: transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.bfloat16, device_map=dev), dev),
    ]
    one, hf = rows[0]["seconds"], rows[2]["seconds"]
    doc = {"model": f"mixtral-8x7b shape, {n} layers", "checkpoint_bytes": size, "files": len(files),
           "draw_and_write_s": written_s, "loads": rows, "hpi_over_from_pretrained": one / hf,
           "software": {"torch": torch.__version__, "transformers": transformers.__version__}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "load.json").write_text(json.dumps(doc, indent=2))
    print(f"hpi {one:.1f} s, transformers {hf:.1f} s: ratio {one / hf:.2f}", flush=True)


if __name__ == "__main__":
    main()
