"""The host: its OS, memory, CPUs and pinning limits, and how fast it copies to and from each GPU.

``gather_os`` / ``gather_host`` read facts (``platform``, psutil or ``/proc/meminfo``, ``lscpu``,
``RLIMIT_MEMLOCK``, a trial pin); ``measure_copies`` times pinned and pageable host<->device copies per GPU
alone and all GPUs at once (torch, imported by the caller).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from hpi.executor.probe.settings import ProbeSettings
from hpi.executor.probe.tools import parse_lscpu, parse_meminfo_total, run_command

__all__ = ["detect_os", "gather_os", "gather_host", "memlock_limits", "pin_trial", "measure_copies"]


def detect_os(system: str, proc_version: str = "") -> str:
    """``platform.system()`` and ``/proc/version`` -> one of planner OS_KINDS (linux, windows, wsl2).

    WSL2's kernel says "microsoft" in /proc/version (e.g. ``...-microsoft-standard-WSL2``). Other POSIX
    systems (macOS) are reported as linux: the same path and O_DIRECT conventions are the closest fit.
    """
    if system.lower().startswith(("windows", "cygwin", "msys")):
        return "windows"
    if "microsoft" in proc_version.lower():
        return "wsl2"
    return "linux"


def gather_os() -> dict[str, Any]:
    proc_version = ""
    try:
        proc_version = Path("/proc/version").read_text()
    except OSError:
        pass
    return {"kind": detect_os(platform.system(), proc_version or platform.release()), "system": platform.system(),
            "release": platform.release(), "proc_version": proc_version.strip(), "python": sys.version.split()[0]}


def gather_host(settings: ProbeSettings, cuda_ok: bool) -> dict[str, Any]:
    host: dict[str, Any] = {"cpu_cores": os.cpu_count() or 1}
    try:
        import psutil

        host["dram_bytes"], host["dram_source"] = float(psutil.virtual_memory().total), "psutil.virtual_memory()"
    except ImportError:
        total = None
        try:
            total = parse_meminfo_total(Path("/proc/meminfo").read_text())
        except OSError:
            pass
        host["dram_bytes"], host["dram_source"] = (total, "/proc/meminfo MemTotal") if total else (
            float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "sysconf")
    lscpu = parse_lscpu(run_command(["lscpu"]) or "")
    host["sockets"] = lscpu.get("sockets", 1)
    host["numa_nodes"] = lscpu.get("numa_nodes", 1)
    host["lscpu"] = lscpu
    host["memlock_soft_bytes"], host["memlock_hard_bytes"] = memlock_limits()
    host["pin_trial"] = pin_trial(min(settings.pin_trial_bytes, int(host["dram_bytes"] * 0.10)), cuda_ok,
                                  host["memlock_soft_bytes"])
    host["libaio"] = ctypes.util.find_library("aio")
    return host


def memlock_limits() -> tuple[float | None, float | None]:
    """(soft, hard) RLIMIT_MEMLOCK in bytes; None where unlimited (or on Windows, which has no such limit)."""
    try:
        import resource
    except ImportError:  # Windows
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    as_bytes = lambda v: None if v == resource.RLIM_INFINITY else float(v)  # noqa: E731
    return as_bytes(soft), as_bytes(hard)


def pin_trial(nbytes: int, cuda_ok: bool, memlock_soft: float | None) -> dict[str, Any]:
    """Prove pinning works: cudaHostAlloc through torch with CUDA, else mlock() within RLIMIT_MEMLOCK."""
    start = time.perf_counter()
    if cuda_ok:
        try:
            import torch

            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            buf.fill_(1)
            ok = bool(buf.is_pinned())
            del buf
            return {"method": "torch pin_memory (cudaHostAlloc)", "bytes": nbytes, "ok": ok,
                    "seconds": time.perf_counter() - start, "error": None if ok else "not pinned"}
        except (RuntimeError, MemoryError) as exc:
            return {"method": "torch pin_memory (cudaHostAlloc)", "bytes": nbytes, "ok": False,
                    "seconds": time.perf_counter() - start, "error": str(exc).splitlines()[0]}
    if memlock_soft is not None:  # half the limit: the process may already hold locked pages
        nbytes = int(min(nbytes, memlock_soft // 2)) // mmap.PAGESIZE * mmap.PAGESIZE
    libc_name = ctypes.util.find_library("c")
    if os.name != "posix" or not libc_name or nbytes <= 0:
        return {"method": "mlock", "bytes": 0, "ok": False, "seconds": 0.0,
                "error": "no mlock here" if nbytes > 0 else "RLIMIT_MEMLOCK is 0"}
    libc = ctypes.CDLL(libc_name, use_errno=True)
    buf = mmap.mmap(-1, nbytes)
    view = (ctypes.c_char * nbytes).from_buffer(buf)
    try:
        address = ctypes.c_void_p(ctypes.addressof(view))  # a bare int would be passed as a 32-bit C int
        rc = libc.mlock(address, ctypes.c_size_t(nbytes))
        error = None if rc == 0 else os.strerror(ctypes.get_errno())
        if rc == 0:
            libc.munlock(address, ctypes.c_size_t(nbytes))
    finally:
        del view
        buf.close()
    return {"method": "mlock", "bytes": nbytes, "ok": error is None, "seconds": time.perf_counter() - start,
            "error": error}


# ---- host<->device copies (torch) -----------------------------------------------------------------------


def _median_time(fn: Callable[[], float], repeats: int) -> float:
    fn()  # warm-up: first-touch, allocator, lazy CUDA init
    return statistics.median(fn() for _ in range(repeats))


def measure_copies(torch: Any, n_gpus: int, settings: ProbeSettings) -> dict[str, Any]:
    """Host<->device rates, pinned and pageable, per GPU alone and all GPUs at once (one thread and stream each)."""
    size = settings.copy_bytes
    out: dict[str, Any] = {"buffer_bytes": size, "repeats": settings.copy_repeats,
                           "method": "torch copy_ on one CUDA stream per GPU, wall time to synchronize; together: "
                                     "one thread per GPU released by a barrier"}
    devs = [torch.empty(size, dtype=torch.uint8, device=f"cuda:{i}") for i in range(n_gpus)]
    for pinned in (True, False):
        out.update(_copy_rates(torch, devs, pinned, settings))
    return out


def _copy_rates(torch: Any, devs: list[Any], pinned: bool, settings: ProbeSettings) -> dict[str, Any]:
    """Both directions through pinned or pageable host buffers; the buffers are freed on return, before the
    other kind is allocated."""
    size, n_gpus = settings.copy_bytes, len(devs)
    hosts = [torch.ones(size, dtype=torch.uint8, pin_memory=pinned) for _ in range(n_gpus)]  # ones: pages touched
    streams = [torch.cuda.Stream(device=i) for i in range(n_gpus)]
    rates: dict[str, Any] = {}
    for direction in ("h2d", "d2h"):
        dsts, srcs = (devs, hosts) if direction == "h2d" else (hosts, devs)

        def one(i: int, dsts: list[Any] = dsts, srcs: list[Any] = srcs) -> float:
            dst, src = dsts[i], srcs[i]
            with torch.cuda.device(i), torch.cuda.stream(streams[i]):
                start = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                streams[i].synchronize()
                return time.perf_counter() - start

        key = f"{direction}_{'pinned' if pinned else 'pageable'}"
        alone = [size / _median_time(lambda i=i: one(i), settings.copy_repeats) for i in range(n_gpus)]
        together = _together(one, n_gpus, settings.copy_repeats, size) if n_gpus > 1 else list(alone)
        rates[key] = {"alone": alone, "together": together}
    return rates


def _together(one: Callable[[int], float], n: int, repeats: int, size: int) -> list[float]:
    barrier = threading.Barrier(n)

    def run(i: int) -> list[float]:
        times = []
        for _ in range(repeats + 1):
            barrier.wait()
            times.append(one(i))
        return times[1:]  # the first round warms up

    with ThreadPoolExecutor(max_workers=n) as pool:
        per_gpu = list(pool.map(run, range(n)))
    return [size / statistics.median(t) for t in per_gpu]
