"""``run_probe``: every measurement of this machine in turn, into one document (``build_profile`` reads it).

A step that fails is recorded under ``errors`` and the others go on; GPU steps run only where torch sees a
CUDA device, so ``hpi probe`` still writes a (CPU-only) profile on a machine without torch or GPU.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Callable, Iterator

from hpi.executor.probe.collectives import measure_allreduce
from hpi.executor.probe.disk import classify_path, measure_disk
from hpi.executor.probe.figures import copy_figure
from hpi.executor.probe.host import gather_host, gather_os, measure_copies
from hpi.executor.probe.kernels import measure_decode_kernels, measure_decoder_layers, measure_hbm, measure_matmul
from hpi.executor.probe.settings import PROBE_VERSION, ProbeSettings
from hpi.executor.probe.tools import gather_gpus, parse_topo, read_topo

__all__ = ["Step", "run_probe"]

Step = Callable[[str], Any]  # progress: step(name) -> context manager
_SHARED_PCIE_RATIO = 0.80  # together / alone below this: GPUs share an upstream PCIe link


def _torch_cuda() -> tuple[Any, int]:
    """(torch, visible CUDA devices) or (None, 0). GPU indices follow PCI bus order, as nvidia-smi's do."""
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        import torch
    except ImportError:
        return None, 0
    try:
        return torch, (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except RuntimeError:
        return torch, 0


@contextmanager
def _no_progress(name: str) -> Iterator[None]:
    yield


def run_probe(settings: ProbeSettings, nvme_path: str | None = None, step: Step = _no_progress) -> dict[str, Any]:
    """Measure this machine; every step that fails is recorded under ``errors`` instead of aborting the probe."""
    started = time.perf_counter()
    doc: dict[str, Any] = {"probe_version": PROBE_VERSION, "date": _dt.date.today().isoformat(),
                           "hostname": socket.gethostname(), "quick": settings.quick, "settings": asdict(settings),
                           "errors": {}, "notes": []}

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        with step(name):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - one failed measurement must not lose the others
                doc["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                return None

    doc["os"] = gather_os()
    torch, n_cuda = attempt("CUDA", _torch_cuda) or (None, 0)
    doc["torch_version"] = getattr(torch, "__version__", None)
    gpus, gpu_info = attempt("GPU inventory", lambda: gather_gpus(torch, n_cuda)) or ([], {})
    doc["gpu_info"] = gpu_info
    doc["gpus"] = gpus if n_cuda else []  # the profile plans on GPUs we could use
    if gpus and not n_cuda:
        doc["notes"].append(f"{len(gpus)} GPU(s) listed by {gpu_info.get('source')} but torch sees no CUDA device: "
                            "profile written without GPUs")
    doc["host"] = attempt("host memory, CPUs, pinning", lambda: gather_host(settings, n_cuda > 0))
    if doc["host"] is None:
        raise RuntimeError(f"hpi probe: cannot read the host's memory and CPUs: {doc['errors']}")
    if n_cuda:
        text = attempt("topology (nvidia-smi topo -m)", read_topo)
        codes = []
        if text:
            try:
                topo = parse_topo(text)
                codes = sorted({topo.code(a, b) for a in topo.gpus for b in topo.gpus if a != b})
            except ValueError as exc:
                doc["errors"]["topology"] = str(exc)
        doc["topo"] = {"text": text, "gpu_codes": codes}
        doc["copies"] = attempt("host<->device copies", lambda: measure_copies(torch, n_cuda, settings))
        doc["matmul"] = attempt("matmul", lambda: measure_matmul(torch, settings))
        doc["hbm"] = attempt("HBM copy", lambda: measure_hbm(torch, settings))
        doc["kernels"] = attempt("decode kernels", lambda: measure_decode_kernels(torch, settings))
        layers = attempt("decoder layers, graphed", lambda: measure_decoder_layers(torch, settings))
        if doc["kernels"] is not None and layers is not None:
            doc["kernels"]["layers"] = layers
        torch.cuda.empty_cache()  # give the copy and matmul buffers back before the NCCL ranks start
        if n_cuda > 1:
            doc["nccl"] = attempt(f"NCCL all-reduce, 2..{n_cuda} GPUs", lambda: measure_allreduce(n_cuda, settings))
        _note_shared_pcie(doc)
    directory = nvme_path or tempfile.gettempdir()
    doc["disk"] = attempt(f"disk at {directory}",
                          lambda: measure_disk(directory, settings.disk_file_bytes, settings.disk_block_bytes,
                                               settings.disk_read_grid))
    if doc["disk"] and doc["disk"].get("fs_type"):
        advice = classify_path(directory, doc["os"]["kind"], doc["disk"]["fs_type"])
        if not advice.ok_for_nvme_offload:
            doc["notes"].append(f"disk figures: {advice.message}")
    doc["seconds"] = time.perf_counter() - started
    return doc


def _note_shared_pcie(doc: dict[str, Any]) -> None:
    alone, together = copy_figure(doc, "h2d_pinned"), copy_figure(doc, "h2d_pinned", "together")
    if alone and together and len(doc["gpus"]) > 1 and together < _SHARED_PCIE_RATIO * alone:
        doc["notes"].append(f"pinned host->device: {together / 1e9:.1f} GB/s per GPU with all GPUs at once vs "
                            f"{alone / 1e9:.1f} GB/s alone: the GPUs share an upstream PCIe/host link; model it with "
                            "node.pcie_switches if nvidia-smi topo -m did not show it")
