"""``hpi check``: will this plan launch on this machine? Warnings before a run, not after an hour of it.

    facts = gather_facts(est, profile, nvme_path="/mnt/nvme")   # effectful: versions, limits, a quick disk read
    findings = run_rules(facts)                                  # pure: every rule is a function of the facts

Each rule is a small pure function ``rule(facts) -> list[Finding]`` so it is unit-tested with fake facts;
gathering the facts is the only side effect (importlib.metadata, nvidia-smi, getrlimit, a 64 MiB O_DIRECT
read of a temporary file). Nothing here imports torch: ``hpi check`` answers in about a second.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from hpi.executor.probe import classify_path, gather_os, measure_disk, memlock_limits, mount_fs_type, run_command
from hpi.planner.profiles import DRAM_OS_SHARE

__all__ = ["SEVERITIES", "Finding", "CheckFacts", "RULES", "run_rules", "gather_facts", "has_errors",
           "DEEPSPEED_MIN_AUTOTP_ZERO3"]

SEVERITIES = ("error", "warning", "info")
# DeepSpeed >= 0.19.4 lets deepspeed.initialize combine tensor_parallel.autotp_size with ZeRO stage 3
# (docs/measured-facts.md, "Facts about the libraries"); older versions refuse the combination.
DEEPSPEED_MIN_AUTOTP_ZERO3 = (0, 19, 4)
_SLOW_DISK_RATIO = 0.5  # measured read below half of the profile's: the plan's NVMe timings will not hold
GB = 1e9


@dataclass(frozen=True)
class Finding:
    severity: str  # one of SEVERITIES
    check: str  # short id, e.g. "libaio"
    message: str  # what is wrong (or fine), with the numbers
    fix: str = ""  # one line: what to do


@dataclass(frozen=True)
class CheckFacts:
    """Everything the rules look at: the plan and profile (from the planner) and this machine (gathered)."""

    # the plan, as the planner sees it
    plan_label: str = "none tp1 pp1 dp1 w16 b1"
    offload: str = "none"  # none | cpu | nvme
    pin_memory: bool = True
    tp: int = 1
    world_size: int = 1
    plan_problems: tuple[str, ...] = ()  # the planner's infeasibility reasons (or why it cannot be placed)
    pinned_needed_bytes: float = 0.0  # per node, hpi.planner.predict's estimate
    host_run_bytes: float = 0.0  # per node, while running (hpi.planner.predict's cpu_bytes)
    host_build_bytes: float = 0.0  # per node, while building (hpi.planner.cost.build)
    # the profile the plan was made for
    profile_name: str = "profile"
    profile_os: str = "linux"
    profile_gpus_per_node: int = 1
    profile_pinnable_bytes: float = 0.0
    profile_nvme_read_bytes_s: float | None = None
    # this machine
    machine_os: str = "linux"
    machine_gpus: int | None = None  # None: unknown (no nvidia-smi)
    dram_bytes: float | None = None
    memlock_soft_bytes: float | None = None  # None: unlimited (or not a POSIX system)
    libaio: str | None = None  # the library found, or None
    nvme_path: str | None = None
    nvme_path_exists: bool = False
    nvme_path_writable: bool = False
    nvme_fs_type: str | None = None
    nvme_free_bytes: float | None = None
    nvme_needed_bytes: float = 0.0
    nvme_read_bytes_s: float | None = None  # quick O_DIRECT read here
    nvme_o_direct: bool | None = None
    versions: Mapping[str, str | None] = field(default_factory=dict)  # torch, deepspeed, transformers, driver, cuda


Rule = Callable[[CheckFacts], list[Finding]]


def _version(text: str | None) -> tuple[int, ...] | None:
    """'0.19.8+cu128' -> (0, 19, 8); None when absent or unreadable."""
    if not text:
        return None
    numbers = re.findall(r"\d+", text.split("+")[0])[:3]
    return tuple(int(n) for n in numbers) if numbers else None


# ---- rules (pure) ---------------------------------------------------------------------------------------


def rule_plan(f: CheckFacts) -> list[Finding]:
    if not f.plan_problems:
        return [Finding("info", "plan", f"{f.plan_label} fits {f.profile_name} by the planner's estimate")]
    return [Finding("error", "plan", f"{f.plan_label} on {f.profile_name}: {'; '.join(f.plan_problems)}",
                    f"hpi explain with the same flags shows the fix; hpi plan --hardware {f.profile_name} lists plans "
                    "that fit")]


def rule_gpus(f: CheckFacts) -> list[Finding]:
    if f.machine_gpus is None:
        return [Finding("warning", "gpus", "nvidia-smi not found: cannot count this machine's GPUs",
                        "install the NVIDIA driver (nvidia-smi comes with it), or run on the GPU machine")]
    if f.machine_gpus < f.world_size:
        return [Finding("error", "gpus", f"the plan needs {f.world_size} GPU(s) per launch ({f.plan_label}); this "
                        f"machine has {f.machine_gpus}",
                        "lower tp/pp/dp, or run on a machine with more GPUs (multi-node: one hpi run per node)")]
    if f.machine_gpus != f.profile_gpus_per_node:
        return [Finding("warning", "gpus", f"profile {f.profile_name} describes {f.profile_gpus_per_node} GPU(s) per "
                        f"node; this machine has {f.machine_gpus}",
                        "probe this machine (hpi probe) and plan on its profile")]
    return []


def rule_pinned_memory(f: CheckFacts) -> list[Finding]:
    if not f.pin_memory or f.pinned_needed_bytes <= 0:
        return []
    need = f.pinned_needed_bytes
    out = []
    if need > f.profile_pinnable_bytes:
        out.append(Finding("error", "pinned-memory", f"pinned {need / GB:.1f} GB > "
                           f"{f.profile_pinnable_bytes / GB:.1f} GB pinnable in profile {f.profile_name}",
                           "--no-pin-memory (pageable, slower), fewer bits (--quant-bits 8/4), or --offload nvme"))
    if f.dram_bytes is not None and need > f.dram_bytes * (1 - DRAM_OS_SHARE):
        out.append(Finding("error", "pinned-memory", f"pinned {need / GB:.1f} GB > {1 - DRAM_OS_SHARE:.0%} of this "
                           f"machine's {f.dram_bytes / GB:.0f} GB DRAM (pinned pages cannot be swapped)",
                           "--no-pin-memory, fewer bits, or a machine with more RAM"))
    if f.memlock_soft_bytes is not None and need > f.memlock_soft_bytes:
        out.append(Finding("warning", "memlock", f"pinned {need / GB:.1f} GB > RLIMIT_MEMLOCK "
                           f"{f.memlock_soft_bytes / 2**20:,.0f} MiB: mlock-based pinning and RDMA registration fail "
                           "at this limit (CUDA's cudaHostAlloc pins through its driver and usually passes)",
                           "ulimit -l unlimited (docker: --ulimit memlock=-1; systemd: LimitMEMLOCK=infinity)"))
    return out


def rule_host_memory(f: CheckFacts) -> list[Finding]:
    """The plan's host memory (the larger of its build and its run) against this machine's RAM: the profile may
    describe a bigger machine, and the kernel's OOM killer ends a build that outgrows it."""
    usable = f.dram_bytes * (1 - DRAM_OS_SHARE) if f.dram_bytes is not None else None
    need = max(f.host_run_bytes, f.host_build_bytes)
    if usable is None or need <= usable:
        return []
    moment = "while building" if f.host_build_bytes >= f.host_run_bytes else "while running"
    return [Finding("error", "host-memory", f"host memory {moment} {need / GB:.1f} GB > "
                    f"{1 - DRAM_OS_SHARE:.0%} of this machine's {f.dram_bytes / GB:.0f} GB DRAM",
                    "fewer bits (--quant-bits 8/4: built module by module on the GPU), --offload nvme, more GPUs "
                    "(--tp/--pp), or plan on this machine's profile (hpi probe)")]


def rule_nvme_path(f: CheckFacts) -> list[Finding]:
    if f.offload != "nvme":
        return []
    if not f.nvme_path:
        return [Finding("error", "nvme-path", "--offload nvme needs a directory for the offloaded weights",
                        "pass --nvme-path DIR on a local NVMe filesystem")]
    if not f.nvme_path_exists:
        return [Finding("error", "nvme-path", f"{f.nvme_path} does not exist",
                        f"mkdir -p {f.nvme_path}, or pass another --nvme-path")]
    if not f.nvme_path_writable:
        return [Finding("error", "nvme-path", f"{f.nvme_path} is not writable by this user",
                        f"chown/chmod {f.nvme_path}, or pass a directory you own")]
    out = []
    advice = classify_path(f.nvme_path, f.machine_os, f.nvme_fs_type)
    if not advice.ok_for_nvme_offload:
        out.append(Finding("error" if advice.kind in ("unc", "tmpfs", "windows-drive") else "warning", "nvme-path",
                           advice.message, "see the message: a local NVMe ext4/xfs directory"))
    if f.nvme_free_bytes is not None and f.nvme_needed_bytes > f.nvme_free_bytes:
        out.append(Finding("error", "nvme-space", f"the plan offloads {f.nvme_needed_bytes / GB:.1f} GB > "
                           f"{f.nvme_free_bytes / GB:.1f} GB free at {f.nvme_path}",
                           "free space, or fewer bits (--quant-bits 8/4)"))
    if f.nvme_o_direct is False:
        out.append(Finding("warning", "nvme-path", f"{f.nvme_path} refuses O_DIRECT, which DeepSpeed's aio uses",
                           "a local ext4/xfs filesystem (not tmpfs/overlay)"))
    want = f.profile_nvme_read_bytes_s
    got = f.nvme_read_bytes_s
    if want and got and got < _SLOW_DISK_RATIO * want:
        out.append(Finding("warning", "nvme-speed", f"quick O_DIRECT read {got / GB:.2f} GB/s at {f.nvme_path} < "
                           f"half of profile {f.profile_name}'s {want / GB:.2f} GB/s: "
                           "the plan's NVMe timings will not hold",
                           "use the faster drive, or re-probe (hpi probe --nvme-path DIR) and plan on that profile"))
    elif got:
        out.append(Finding("info", "nvme-speed", f"quick O_DIRECT read {got / GB:.2f} GB/s at {f.nvme_path}"
                           + (f" (profile: {want / GB:.2f} GB/s)" if want else "")))
    return out


def rule_libaio(f: CheckFacts) -> list[Finding]:
    if f.libaio:
        return []
    if f.offload == "nvme":
        if f.machine_os == "windows":
            return []  # rule_os says what to do instead
        return [Finding("error", "libaio", "--offload nvme needs libaio (DeepSpeed's async_io op); it is not installed",
                        "apt install libaio-dev (or carry libaio1 and put it on LD_LIBRARY_PATH)")]
    return [Finding("info", "libaio", "libaio not installed: fine for this plan; NVMe offload would need it",
                    "apt install libaio-dev before planning --offload nvme")]


def rule_versions(f: CheckFacts) -> list[Finding]:
    v = f.versions
    out = []
    for package in ("torch", "deepspeed", "transformers"):
        if not v.get(package):
            out.append(Finding("warning", "versions", f"{package} is not installed: hpi run cannot start ranks here",
                               f"pip install {package} (torch first: the CUDA build matching the driver)"))
    deepspeed = _version(v.get("deepspeed"))
    if deepspeed is not None and deepspeed < DEEPSPEED_MIN_AUTOTP_ZERO3:
        need = ".".join(map(str, DEEPSPEED_MIN_AUTOTP_ZERO3))
        severity = "error" if f.tp > 1 else "warning"
        out.append(Finding(severity, "versions", f"DeepSpeed {v['deepspeed']} < {need}: AutoTP with ZeRO-3 is refused"
                           + (f" and this plan has tp {f.tp}" if f.tp > 1 else ""), f"pip install 'deepspeed>={need}'"))
    if f.machine_gpus and not v.get("driver"):
        out.append(Finding("warning", "versions", "NVIDIA driver version unknown (nvidia-smi gave none)",
                           "check nvidia-smi"))
    present = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    if present:
        out.append(Finding("info", "versions", present))
    return out


def rule_os(f: CheckFacts) -> list[Finding]:
    out = []
    if f.profile_os != f.machine_os:
        out.append(Finding("warning", "os",
                           f"profile {f.profile_name} is for {f.profile_os}; this machine runs {f.machine_os}",
                           "probe this machine (hpi probe) so copy speeds and paths match"))
    if f.machine_os == "windows":
        if f.offload == "nvme":
            out.append(Finding("error", "os", "native Windows has no libaio: DeepSpeed NVMe offload does not run",
                               "--offload cpu here, or run under WSL2 with --nvme-path on the distro's ext4"))
        elif f.offload == "cpu":
            out.append(Finding("info", "os", "native Windows: CPU offload is the supported path (our design advice)"))
    return out


RULES: tuple[Rule, ...] = (rule_plan, rule_gpus, rule_pinned_memory, rule_host_memory, rule_nvme_path, rule_libaio,
                          rule_versions, rule_os)
_ORDER = {s: i for i, s in enumerate(SEVERITIES)}


def run_rules(facts: CheckFacts, rules: Sequence[Rule] = RULES) -> list[Finding]:
    """Every rule's findings, errors first (stable within a severity)."""
    findings = [finding for rule in rules for finding in rule(facts)]
    bad = [x for x in findings if x.severity not in SEVERITIES]
    if bad:
        raise ValueError(f"finding {bad[0].check}: severity {bad[0].severity!r} not in {SEVERITIES}")
    return sorted(findings, key=lambda x: _ORDER[x.severity])


def has_errors(findings: Sequence[Finding]) -> bool:
    return any(x.severity == "error" for x in findings)


def findings_doc(findings: Sequence[Finding]) -> dict[str, Any]:
    return {"ok": not has_errors(findings), "errors": sum(x.severity == "error" for x in findings),
            "warnings": sum(x.severity == "warning" for x in findings), "findings": [asdict(x) for x in findings]}


# ---- gathering the facts (effectful) --------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia() -> tuple[int | None, str | None, str | None]:
    """(GPU count, driver version, CUDA version the driver supports) from nvidia-smi; (None, None, None) without it."""
    if shutil.which("nvidia-smi") is None:
        return None, None, None
    query = run_command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or ""
    drivers = [line.strip() for line in query.splitlines() if line.strip()]
    banner = run_command(["nvidia-smi"]) or ""
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return len(drivers), (drivers[0] if drivers else None), (cuda.group(1) if cuda else None)


def gather_facts(est: Any, profile: Any, *, plan_problems: Sequence[str] = (), nvme_path: str | None = None,
                 quick_read_bytes: int = 64 << 20) -> CheckFacts:
    """This machine's facts for a planner Estimate (``est`` may be None when the plan could not be placed)."""
    plan = est.plan if est is not None else None
    machine_os = gather_os()["kind"]
    gpus, driver, cuda = _nvidia()
    memlock, _ = memlock_limits()
    try:
        import psutil

        dram = float(psutil.virtual_memory().total)
    except ImportError:
        dram = None
    exists = bool(nvme_path) and os.path.isdir(nvme_path)
    writable = exists and os.access(nvme_path, os.W_OK)
    fs_type = free = read = o_direct = None
    if exists:
        free = float(shutil.disk_usage(nvme_path).free)
        try:
            with open("/proc/mounts") as mounts:
                fs_type = mount_fs_type(nvme_path, mounts.read())
        except OSError:
            pass
    if writable and plan is not None and plan.offload == "nvme" and os.name == "posix":
        disk = measure_disk(nvme_path, quick_read_bytes, 1 << 20)
        read, o_direct = disk.get("read_bytes_s"), disk.get("o_direct")
    versions = {"torch": _package_version("torch"), "deepspeed": _package_version("deepspeed"),
                "transformers": _package_version("transformers"), "driver": driver, "cuda (driver)": cuda}
    return CheckFacts(
        plan_label=plan.label if plan is not None else "(unplaceable plan)",
        offload=plan.offload if plan is not None else "none",
        pin_memory=bool(plan.pin_memory) if plan is not None else False,
        tp=plan.tp if plan is not None else 1,
        world_size=plan.world_size if plan is not None else 1,
        plan_problems=tuple(plan_problems) or (tuple(r.message for r in est.reasons) if est is not None else ()),
        pinned_needed_bytes=float(est.pinned_bytes) if est is not None else 0.0,
        host_run_bytes=float(est.cpu_bytes) if est is not None else 0.0,
        host_build_bytes=float(est.build_bytes) if est is not None else 0.0,
        profile_name=profile.name, profile_os=profile.os, profile_gpus_per_node=profile.gpus_per_node,
        profile_pinnable_bytes=profile.host.pinnable_bytes,
        profile_nvme_read_bytes_s=profile.nvme.read_bytes_s if profile.has_nvme else None,
        machine_os=machine_os, machine_gpus=gpus, dram_bytes=dram, memlock_soft_bytes=memlock,
        libaio=ctypes.util.find_library("aio"), nvme_path=nvme_path, nvme_path_exists=exists,
        nvme_path_writable=writable, nvme_fs_type=fs_type, nvme_free_bytes=free,
        nvme_needed_bytes=float(est.nvme_bytes) if est is not None else 0.0,
        nvme_read_bytes_s=read, nvme_o_direct=o_direct, versions=versions,
    )
