"""``hpi check``: every rule on fake facts, and the real command on this machine."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hpi.cli import main
from hpi.executor.check import (
    CheckFacts,
    has_errors,
    rule_gpus,
    rule_host_memory,
    rule_libaio,
    rule_nvme_path,
    rule_os,
    rule_pinned_memory,
    rule_plan,
    rule_versions,
    run_rules,
)

GOOD = CheckFacts(
    plan_label="cpu pinned tp2 pp1 dp1 w16 b1", offload="cpu", pin_memory=True, tp=2, world_size=2,
    pinned_needed_bytes=100e9, host_run_bytes=110e9, host_build_bytes=105e9, profile_name="h200-2gpu",
    profile_os="linux", profile_gpus_per_node=2,
    profile_pinnable_bytes=243e9, profile_nvme_read_bytes_s=1.28e9, machine_os="linux", machine_gpus=2,
    dram_bytes=270e9, memlock_soft_bytes=None, libaio="libaio.so.1",
    versions={"torch": "2.11.0", "deepspeed": "0.19.8", "transformers": "5.23.0", "driver": "570.86.15"},
)
NVME = replace(GOOD, plan_label="nvme tp1 pp1 dp1 w16 b1", offload="nvme", tp=1, world_size=1, nvme_path="/nvme",
               nvme_path_exists=True, nvme_path_writable=True, nvme_fs_type="ext4", nvme_free_bytes=1e12,
               nvme_needed_bytes=141e9, nvme_read_bytes_s=1.2e9, nvme_o_direct=True)


def kinds(findings, severity="error"):
    return [f.check for f in findings if f.severity == severity]


def test_a_good_machine_has_no_errors():
    findings = run_rules(GOOD)
    assert not has_errors(findings) and kinds(findings, "warning") == []
    assert run_rules(NVME) and not has_errors(run_rules(NVME))
    assert findings[0].severity in ("error", "warning", "info")


def test_infeasible_plan_is_an_error_with_the_planner_reason():
    [finding] = rule_plan(replace(GOOD, plan_problems=("GPU 0 needs 151.2 GB > 145.6 GB HBM",)))
    assert finding.severity == "error" and "151.2 GB" in finding.message and "hpi explain" in finding.fix


def test_gpu_count():
    assert kinds(rule_gpus(replace(GOOD, machine_gpus=1))) == ["gpus"]
    assert kinds(rule_gpus(replace(GOOD, machine_gpus=4)), "warning") == ["gpus"]  # profile says 2
    assert kinds(rule_gpus(replace(GOOD, machine_gpus=None)), "warning") == ["gpus"]


def test_pinned_memory_over_the_profile_dram_and_memlock():
    over_profile = rule_pinned_memory(replace(GOOD, pinned_needed_bytes=250e9, dram_bytes=1e12))
    assert kinds(over_profile) == ["pinned-memory"] and "250.0 GB > 243.0 GB" in over_profile[0].message
    assert "--no-pin-memory" in over_profile[0].fix
    over_dram = rule_pinned_memory(replace(GOOD, profile_pinnable_bytes=1e12, dram_bytes=64e9))
    assert kinds(over_dram) == ["pinned-memory"] and "DRAM" in over_dram[0].message
    memlock = rule_pinned_memory(replace(GOOD, memlock_soft_bytes=64 * 2**20))
    assert kinds(memlock, "warning") == ["memlock"] and "ulimit -l unlimited" in memlock[0].fix
    assert rule_pinned_memory(replace(GOOD, pin_memory=False, pinned_needed_bytes=1e15)) == []


def test_host_memory_against_this_machines_ram_names_the_moment():
    """A profile of a bigger machine (h200-2gpu: 251 GiB) run where the RAM is 125 GiB: the build's 140 GB do not
    fit in 90% of it, and the finding says it is the build that outgrows it."""
    building = replace(GOOD, host_run_bytes=100e9, host_build_bytes=140e9, dram_bytes=134.2e9)
    [finding] = rule_host_memory(building)
    assert finding.severity == "error" and "while building 140.0 GB > 90% of this machine's 134 GB" in finding.message
    assert "--quant-bits" in finding.fix
    running = rule_host_memory(replace(building, host_run_bytes=140e9, host_build_bytes=100e9))
    assert "while running 140.0 GB" in running[0].message
    assert rule_host_memory(GOOD) == [] and rule_host_memory(replace(building, dram_bytes=None)) == []


@pytest.mark.parametrize("change, check", [
    ({"nvme_path": None}, "nvme-path"),
    ({"nvme_path_exists": False}, "nvme-path"),
    ({"nvme_path_writable": False}, "nvme-path"),
    ({"nvme_fs_type": "tmpfs"}, "nvme-path"),
    ({"nvme_path": r"\\server\share\x"}, "nvme-path"),
    ({"nvme_free_bytes": 100e9}, "nvme-space"),
])
def test_nvme_path_errors(change, check):
    findings = rule_nvme_path(replace(NVME, **change))
    assert check in kinds(findings)


def test_nvme_warnings_slow_disk_wsl2_and_no_o_direct():
    slow = rule_nvme_path(replace(NVME, nvme_read_bytes_s=0.3e9))
    assert kinds(slow, "warning") == ["nvme-speed"]
    assert "0.30 GB/s" in slow[0].message and "1.28 GB/s" in slow[0].message
    wsl = rule_nvme_path(replace(NVME, machine_os="wsl2", profile_os="wsl2", nvme_path="/mnt/c/offload",
                                 nvme_fs_type="9p"))
    assert kinds(wsl, "warning") == ["nvme-path"] and "ext4" in wsl[0].message
    assert "nvme-path" in kinds(rule_nvme_path(replace(NVME, nvme_o_direct=False)), "warning")
    assert rule_nvme_path(GOOD) == []  # CPU offload: no NVMe checks


def test_libaio():
    missing = rule_libaio(replace(NVME, libaio=None))
    assert kinds(missing) == ["libaio"] and "apt install libaio-dev" in missing[0].fix and "libaio1" in missing[0].fix
    assert kinds(rule_libaio(replace(GOOD, libaio=None)), "info") == ["libaio"]
    assert rule_libaio(NVME) == []


def test_versions():
    old = rule_versions(replace(GOOD, versions={**GOOD.versions, "deepspeed": "0.18.2"}))
    assert kinds(old) == ["versions"] and "0.19.4" in old[0].message  # tp 2 needs AutoTP + ZeRO-3
    old_tp1 = rule_versions(replace(GOOD, tp=1, versions={**GOOD.versions, "deepspeed": "0.18.2"}))
    assert kinds(old_tp1) == [] and kinds(old_tp1, "warning") == ["versions"]
    missing = rule_versions(replace(GOOD, versions={"torch": "2.11.0"}))
    assert [f.message.split()[0] for f in missing if f.severity == "warning"][:2] == ["deepspeed", "transformers"]
    assert rule_versions(replace(GOOD, versions={**GOOD.versions, "deepspeed": "0.19.4+abc"}))[-1].severity == "info"


def test_os_rules():
    assert kinds(rule_os(replace(GOOD, machine_os="wsl2")), "warning") == ["os"]  # profile says linux
    windows_nvme = rule_os(replace(NVME, machine_os="windows", profile_os="windows"))
    assert kinds(windows_nvme) == ["os"] and "--offload cpu" in windows_nvme[0].fix and "WSL2" in windows_nvme[0].fix
    assert kinds(rule_os(replace(GOOD, machine_os="windows", profile_os="windows")), "info") == ["os"]
    assert has_errors(run_rules(replace(NVME, machine_os="windows", profile_os="windows", nvme_path="D:\\offload")))


# ---- the real command --------------------------------------------------------------------------------------


def test_check_command_json_and_exit_codes(capsys, tmp_path):
    code = main(["check", "--model", "llama-3-8b", "--hardware", "h200-2gpu", "--offload", "cpu", "--json"])
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == (1 if doc["errors"] else 0) and {f["check"] for f in doc["findings"]} >= {"plan", "versions"}
    code = main(["check", "--model", "llama-3-8b", "--hardware", "h200-2gpu", "--offload", "nvme",
                 "--nvme-path", str(tmp_path / "missing"), "--json"])
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and any(f["check"] == "nvme-path" and f["severity"] == "error" for f in doc["findings"])
    assert main(["check", "--model", "llama-3-8b", "--hardware", "no-such-profile"]) == 2
    assert "unknown hardware profile" in capsys.readouterr().err


def test_check_table(capsys, tmp_path):
    code = main(["check", "--model", "llama-3-8b", "--hardware", "h200-2gpu", "--offload", "nvme",
                 "--nvme-path", str(tmp_path)])
    out = capsys.readouterr().out
    assert "hpi check" in out and "severity" in out and code in (0, 1)
