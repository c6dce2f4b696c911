"""Shared by the probe's tests: a measurement document as ``run_probe`` writes it, the profile built from one,
and how many CUDA GPUs this machine has."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpi.executor.probe import build_profile, write_profile
from hpi.planner.profiles import load_profile

TOPO = Path(__file__).resolve().parents[1] / "data" / "topo"


def make_doc(n_gpus: int, topo_file: str | None, *, together: float = 54.3e9, sockets: int = 1) -> dict:
    """A measurement document as run_probe writes it, with the 2x H200's figures of docs/measured-facts.md."""
    doc = {
        "probe_version": 1, "date": "2026-11-22", "hostname": "h200box", "quick": False, "errors": {}, "notes": [],
        "os": {"kind": "linux"},
        "host": {"dram_bytes": 540e9, "cpu_cores": 64, "sockets": sockets, "numa_nodes": sockets,
                 "memlock_soft_bytes": None, "pin_trial": {"method": "torch pin_memory (cudaHostAlloc)",
                                                           "bytes": 8 << 30, "ok": True, "seconds": 2.1}},
        "gpus": [{"index": i, "name": "NVIDIA H200", "memory_bytes": 150109880320.0,
                  "memory_source": "torch total_memory"} for i in range(n_gpus)],
        "topo": {"text": (TOPO / topo_file).read_text() if topo_file else None, "gpu_codes": ["NV18"]},
        "copies": {"buffer_bytes": 1 << 30, "repeats": 5,
                   "h2d_pinned": {"alone": [55.2e9] * n_gpus, "together": [together] * n_gpus},
                   "d2h_pinned": {"alone": [55.1e9] * n_gpus, "together": [50e9] * n_gpus},
                   "h2d_pageable": {"alone": [8.3e9] * n_gpus, "together": [4e9] * n_gpus},
                   "d2h_pageable": {"alone": [15e9] * n_gpus, "together": [7e9] * n_gpus}},
        "matmul": {"n": 8192, "iters": 20, "flops": {"bf16": 806e12, "fp16": 800e12, "tf32": 400e12, "int8": 1500e12}},
        "hbm": {"buffer_bytes": 1 << 30, "bytes_s": 4.26e12},
        "disk": {"path": "/data", "free_bytes": 137.4e9, "total_bytes": 200e9, "block_bytes": 4 << 20,
                 "file_bytes": 2 << 30, "fs_type": "ext4", "o_direct": True, "read_bytes_s": 1.28e9,
                 "write_bytes_s": 1.0e9},
    }
    if n_gpus > 1:
        doc["nccl"] = {"seconds": {str(k): {"8192": 37e-6 + 3e-6 * k, "1048576": 55e-6, "16777216": 79e-6,
                                            "268435456": 896e-6} for k in range(2, n_gpus + 1)}}
    return doc


@pytest.fixture
def fake_doc():
    """``fake_doc(n_gpus, topo_file, *, together=54.3e9, sockets=1)``: a measurement document."""
    return make_doc


@pytest.fixture
def load_built(tmp_path):
    """``load_built(doc, name="probed-test")``: the profile built from ``doc``, written under tmp_path and loaded."""

    def load(doc: dict, name: str = "probed-test"):
        path = tmp_path / f"{name}.yaml"
        write_profile(build_profile(doc, name), path, header="test")
        return load_profile(str(path))

    return load


@pytest.fixture(scope="session")
def cuda_gpus() -> int:
    """CUDA devices torch sees here (0 without torch or a GPU)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
