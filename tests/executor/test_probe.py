"""``hpi probe``: topology parsing on real-format fixtures, the profile built from measurements, and the real
command on this machine (CPU-only in CI: it must still write a profile the planner loads)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpi.executor.probe import (
    ProbeSettings,
    build_profile,
    classify_path,
    default_profile_name,
    detect_os,
    gpu_layout,
    measure_disk,
    mount_fs_type,
    nvlink_link_bytes_s,
    parse_lscpu,
    parse_smi_query,
    parse_topo,
    write_profile,
)
from hpi.cli import main
from hpi.planner.specs.hardware import Efficiency
from hpi.planner.profiles import load_profile
from hpi.planner.topology import build_topology

DATA = Path(__file__).parent / "data" / "topo"
SRC = Path(__file__).resolve().parents[2] / "src"


def topo(name: str):
    return parse_topo((DATA / name).read_text())


# ---- nvidia-smi topo -m ---------------------------------------------------------------------------------


def test_two_h200_joined_by_nv18():
    t = topo("h200x2.txt")
    assert t.gpus == ("GPU0", "GPU1")
    assert t.code("GPU0", "GPU1") == "NV18" and t.code("GPU0", "GPU0") == "X"
    assert t.affinity["GPU1"]["CPU Affinity"] == "0-31" and t.numa_node("GPU1") == 0
    layout = gpu_layout(t, 2, gpu_name="NVIDIA H200")
    assert layout.nvlink_pairs == ((0, 1, 18),) and layout.nvswitch_links == 0 and layout.switch_groups == ()


def test_nv18_among_four_gpus_is_an_nvswitch_and_numa_gives_the_socket():
    layout = gpu_layout(topo("h200x4_nvswitch.txt"), 4, sockets=2, numa_nodes=2, gpu_name="NVIDIA H200")
    assert layout.nvswitch_links == 18 and layout.nvlink_pairs == ()  # 18 * 3 links > 18 per GPU
    assert layout.gpu_socket == (0, 0, 1, 1)


def test_dgx_with_nic_columns():
    t = topo("dgx_h100_8gpu.txt")
    assert t.gpus == tuple(f"GPU{i}" for i in range(8)) and "NIC1" in t.devices
    assert t.code("GPU0", "NIC0") == "PXB" and t.code("NIC1", "GPU7") == "PXB"
    layout = gpu_layout(t, 8, sockets=2, numa_nodes=2, gpu_name="NVIDIA H100 80GB HBM3")
    assert layout.nvswitch_links == 18 and layout.gpu_socket == (0, 0, 0, 0, 1, 1, 1, 1)


def test_pcie_only_machine_groups_gpus_behind_a_switch():
    layout = gpu_layout(topo("pcie_4gpu.txt"), 4, sockets=2, numa_nodes=2)
    assert layout.switch_groups == ((0, 1),)  # PIX; PHB and SYS go through the host
    assert not layout.has_nvlink and layout.gpu_socket == (0, 0, 1, 1)


def test_nvlink_bridged_pairs_stay_pairs():
    layout = gpu_layout(topo("a100_pcie_nvlink_pairs_4gpu.txt"), 4, gpu_name="NVIDIA A100-PCIE-40GB")
    assert layout.nvlink_pairs == ((0, 1, 4), (2, 3, 4)) and layout.nvswitch_links == 0


def test_topology_that_disagrees_with_the_gpu_count_is_ignored():
    layout = gpu_layout(topo("h200x2.txt"), 3)
    assert layout.nvlink_pairs == () and layout.gpu_socket == (0, 0, 0)


def test_garbage_topology_names_the_problem():
    with pytest.raises(ValueError, match="no header"):
        parse_topo("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver")
    with pytest.raises(ValueError, match="unknown link code"):
        parse_topo("\tGPU0\tGPU1\nGPU0\t X \tFOO\nGPU1\tFOO\t X \n")


def test_nvlink_generations():
    assert nvlink_link_bytes_s("NVIDIA H200") == 25e9 and nvlink_link_bytes_s("NVIDIA B200") == 50e9


# ---- host and OS helpers ---------------------------------------------------------------------------------


def test_lscpu_and_nvidia_smi_query():
    assert parse_lscpu("CPU(s):   64\nSocket(s):  2\nNUMA node(s):   4\nModel name: X\n") == {
        "cpus": 64, "sockets": 2, "numa_nodes": 4}
    gpus = parse_smi_query("0, NVIDIA H200, 143771, 570.86.15\n1, NVIDIA H200, 143771, 570.86.15\n")
    assert [g["name"] for g in gpus] == ["NVIDIA H200"] * 2 and gpus[1]["memory_bytes"] == 143771 * 2**20


@pytest.mark.parametrize("system, version, kind", [
    ("Linux", "Linux version 6.8.0-49-generic (buildd@lcy02)", "linux"),
    ("Linux", "Linux version 5.15.153.1-microsoft-standard-WSL2 (root@941d701f84f1)", "wsl2"),
    ("Windows", "", "windows"),
])
def test_detect_os(system, version, kind):
    assert detect_os(system, version) == kind


def test_offload_path_conventions():
    assert classify_path("/mnt/c/offload", "wsl2").kind == "wsl2-windows-drive"
    assert classify_path("/home/me/offload", "wsl2", "ext4").ok_for_nvme_offload
    assert classify_path(r"\\server\share\offload", "windows").kind == "unc"
    assert "--offload cpu" in classify_path(r"D:\offload", "windows").message
    assert classify_path("/dev/shm/x", "linux", "tmpfs").kind == "tmpfs"
    mounts = "/dev/nvme0n1p1 / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\nC:\\134 /mnt/c 9p rw 0 0\n"
    assert mount_fs_type("/dev/shm/a", mounts) == "tmpfs" and mount_fs_type("/mnt/c/x", mounts) == "9p"
    assert mount_fs_type("/home", mounts) == "ext4"


def test_default_profile_name():
    assert default_profile_name("gpu-node-7.cluster.local") == "probed-gpu-node-7"
    assert default_profile_name("My Box!") == "probed-my-box"


# ---- the profile from measurements -----------------------------------------------------------------------


def fake_doc(n_gpus: int, topo_file: str | None, *, together: float = 54.3e9, sockets: int = 1) -> dict:
    """A measurement document as run_probe writes it, with design.md's H200 figures."""
    doc = {
        "probe_version": 1, "date": "2026-11-22", "hostname": "h200box", "quick": False, "errors": {}, "notes": [],
        "os": {"kind": "linux"},
        "host": {"dram_bytes": 540e9, "cpu_cores": 64, "sockets": sockets, "numa_nodes": sockets,
                 "memlock_soft_bytes": None, "pin_trial": {"method": "torch pin_memory (cudaHostAlloc)",
                                                           "bytes": 8 << 30, "ok": True, "seconds": 2.1}},
        "gpus": [{"index": i, "name": "NVIDIA H200", "memory_bytes": 150109880320.0,
                  "memory_source": "torch total_memory"} for i in range(n_gpus)],
        "topo": {"text": (DATA / topo_file).read_text() if topo_file else None, "gpu_codes": ["NV18"]},
        "copies": {"buffer_bytes": 1 << 30, "repeats": 5,
                   "h2d_pinned": {"alone": [55.2e9] * n_gpus, "together": [together] * n_gpus},
                   "d2h_pinned": {"alone": [55.1e9] * n_gpus, "together": [50e9] * n_gpus},
                   "h2d_pageable": {"alone": [8.3e9] * n_gpus, "together": [4e9] * n_gpus},
                   "d2h_pageable": {"alone": [15e9] * n_gpus, "together": [7e9] * n_gpus}},
        "matmul": {"n": 8192, "iters": 20, "flops": {"bf16": 806e12, "fp16": 800e12, "tf32": 400e12, "int8": 1500e12}},
        "hbm": {"buffer_bytes": 1 << 30, "bytes_s": 4.26e12},
        "disk": {"path": "/data", "free_bytes": 137.4e9, "total_bytes": 200e9, "block_bytes": 4 << 20,
                 "file_bytes": 2 << 30, "fs_type": "ext4", "o_direct": True, "read_bytes_s": 1.28e9, "write_bytes_s": 1.0e9},
    }
    if n_gpus > 1:
        doc["nccl"] = {"seconds": {str(k): {"8192": 37e-6 + 3e-6 * k, "1048576": 55e-6, "16777216": 79e-6,
                                            "268435456": 896e-6} for k in range(2, n_gpus + 1)}}
    return doc


def load_built(tmp_path: Path, doc: dict, name: str = "probed-test"):
    path = tmp_path / f"{name}.yaml"
    write_profile(build_profile(doc, name), path, header="test")
    return load_profile(str(path))


def test_four_h200_on_nvswitch_becomes_a_loadable_profile(tmp_path, capsys):
    profile = load_built(tmp_path, fake_doc(4, "h200x4_nvswitch.txt", sockets=2))
    assert profile.n_gpus == 4 and profile.gpu.name == "NVIDIA H200" and profile.host.sockets == 2
    assert profile.gpu.bf16_flops == 806e12 and profile.gpu.int8_flops == 1500e12
    assert profile.host.h2d_pageable_bytes_s == 8.3e9 and profile.nvme.read_bytes_s == 1.28e9
    topology = build_topology(profile)
    assert len(topology.islands()) == 1  # one NVSwitch island
    assert topology.group_link(topology.gpus).kind == "nvswitch"
    assert topology.host_to_gpu_bytes_s(topology.gpus)["n0.gpu0"] == pytest.approx(55.2e9)
    assert topology.home_cpu("n0.gpu3") == "n0.cpu1"
    eff = profile.efficiency  # 256 MB in 896 us over 4 GPUs: 449 GB/s bus bandwidth of 450 GB/s per GPU
    assert eff.collective_bandwidth == pytest.approx(268435456 / 896e-6 * 1.5 / 450e9, rel=1e-3)
    assert eff.allreduce_latency_s == pytest.approx(49e-6)
    for path, prov in profile.provenance.items():
        assert prov.source in ("probed", "assumed", "datasheet"), path
        assert prov.note, path
    assert profile.provenance["gpu.bf16_flops"].source == "probed" and "2026-11-22" in profile.provenance["gpu.bf16_flops"].note
    code = main(["plan", "--model", "llama-3-70b", "--hardware", str(tmp_path / "probed-test.yaml"), "--top", "2"])
    assert code == 0, capsys.readouterr().err


def test_allreduce_alpha_is_the_least_latency_bound_time_not_a_disturbed_smallest_size(tmp_path):
    """The 4x H200 probe of 2026-11-22 timed 8 KB at 185 us and 1 MB at 37 us over 4 GPUs (its JSON is kept
    under benchmarks/results/2026-11-22-h200x4): alpha is the 1 MB figure, not the disturbed 8 KB one."""
    doc = fake_doc(4, "h200x4_nvswitch.txt", sockets=2)
    doc["nccl"]["seconds"]["4"].update({"8192": 184.75e-6, "1048576": 36.55e-6})
    profile = load_built(tmp_path, doc)
    assert profile.efficiency.allreduce_latency_s == pytest.approx(36.55e-6)
    assert "1 MB" in profile.provenance["efficiency.allreduce_latency_s"].note
    assert profile.efficiency.collective_host_overhead_s == Efficiency().collective_host_overhead_s  # no graph: prior


@pytest.mark.parametrize("eager_us, host_us", [(60.0, 60.0), (24.0, None)], ids=["host-bound", "device-bound"])
def test_graphed_allreduce_is_the_device_alpha_and_a_slower_eager_loop_the_host_cost(tmp_path, eager_us, host_us):
    doc = fake_doc(2, "h200x2.txt")
    doc["nccl"]["seconds"]["2"].update({"8192": eager_us * 1e-6, "1048576": (eager_us + 4) * 1e-6})
    doc["nccl"]["graphed_seconds"] = {"2": {"8192": 20e-6, "1048576": 23e-6}}
    doc["nccl"]["graphed_calls"] = 20
    profile = load_built(tmp_path, doc)
    assert profile.efficiency.allreduce_latency_s == pytest.approx(20e-6)
    assert "CUDA graph" in profile.provenance["efficiency.allreduce_latency_s"].note
    if host_us is None:  # 24 us eager against 20 us graphed: within HOST_BOUND_RATIO, nothing says the host bound it
        assert profile.efficiency.collective_host_overhead_s == Efficiency().collective_host_overhead_s
        assert "efficiency.collective_host_overhead_s" not in profile.provenance
    else:
        assert profile.efficiency.collective_host_overhead_s == pytest.approx(host_us * 1e-6)
        assert profile.provenance["efficiency.collective_host_overhead_s"].source == "probed"


def test_graphed_allreduce_on_two_gpus():
    if _cuda() < 2:
        pytest.skip("needs 2 GPUs (NCCL)")
    from dataclasses import replace

    from hpi.executor.probe import measure_allreduce

    settings = replace(ProbeSettings.small(), nccl_sizes_bytes=(8 << 10, 1 << 20, 16 << 20), nccl_iters=20)
    result = measure_allreduce(2, settings)
    graphed, eager = result["graphed_seconds"]["2"], result["seconds"]["2"]
    assert set(graphed) == {str(8 << 10), str(1 << 20)}  # latency-bound sizes only
    assert all(0 < graphed[s] < 1e-3 for s in graphed)
    assert min(graphed.values()) <= min(eager[s] for s in graphed) * 1.1  # a graph never adds host time


def test_decode_kernels_give_the_hbm_fraction_and_the_layers_fixed_device_time(tmp_path):
    doc = fake_doc(1, None)
    doc["kernels"] = {"gemv_shape": [28672, 8192], "gemv_bytes_s": 4.05e12, "tiny_kernels": 200, "tiny_kernel_s": 2.4e-6}
    profile = load_built(tmp_path, doc)
    assert profile.efficiency.hbm == pytest.approx(4.05e12 / 4.26e12, rel=1e-3)  # of the probed device copy
    assert profile.efficiency.layer_device_overhead_s == pytest.approx(40 * 2.4e-6)
    assert "CUDA graph" in profile.provenance["efficiency.layer_device_overhead_s"].note
    doc["kernels"]["gemv_bytes_s"] = 4.5e12  # faster than the copy: the fraction is clipped, the note says so
    clipped = load_built(tmp_path, doc, name="probed-clipped")
    assert clipped.efficiency.hbm == 1.0 and "clipped" in clipped.provenance["efficiency.hbm"].note
    bare = load_built(tmp_path, fake_doc(1, None), name="probed-bare")  # not measured: the defaults stay
    assert bare.efficiency.hbm == Efficiency().hbm
    assert bare.efficiency.layer_device_overhead_s == Efficiency().layer_device_overhead_s


def test_layer_fit_recovers_a_line_holds_the_ceiling_and_falls_back_to_the_given_rate():
    from hpi.executor.probe import fit_layer_cost

    line = [(b, 120e-6 + b / 4.0e12) for b in (436e6, 1711e6)]  # 8B and 70B layers, 120 us fixed, 4 TB/s
    fit = fit_layer_cost(line, ceiling_bytes_s=4.26e12)
    assert fit.how == "fit" and fit.fixed_s == pytest.approx(120e-6) and fit.read_bytes_s == pytest.approx(4.0e12)
    fast = fit_layer_cost(line, ceiling_bytes_s=3.5e12)  # faster than the copy ceiling: held there
    assert fast.how == "ceiling" and fast.read_bytes_s == 3.5e12
    assert fast.fixed_s == pytest.approx(np.mean([t - b / 3.5e12 for b, t in line]))
    one = fit_layer_cost(line[:1], ceiling_bytes_s=4.26e12, given_bytes_s=3.72e12)  # one shape: the GEMV's rate
    assert one.how == "given" and one.fixed_s == pytest.approx(120e-6 + 436e6 / 4.0e12 - 436e6 / 3.72e12)
    backwards = fit_layer_cost([(436e6, 300e-6), (1711e6, 250e-6)], ceiling_bytes_s=4.26e12)  # disturbed: no line
    assert backwards.how == "given" and backwards.read_bytes_s == 4.26e12
    assert fit_layer_cost([(1e9, 1e-4)], ceiling_bytes_s=4e12).fixed_s == 0.0  # never below zero
    with pytest.raises(ValueError):
        fit_layer_cost([], ceiling_bytes_s=4e12)


def test_timed_decoder_layers_give_hbm_fixed_layer_time_and_step_overhead(tmp_path):
    doc = fake_doc(1, None)
    shapes = []
    for model, layer_bytes, head_bytes in (("llama-3-8b", 436.2e6, 1050.7e6), ("llama-3-70b", 1711.3e6, 2101.3e6)):
        layer_s = 125e-6 + layer_bytes / 3.9e12
        step = {"2": 0.4e-3 + 2 * layer_s + head_bytes / 3.9e12}
        step["6"] = step["2"] + 4 * layer_s
        shapes.append({"model": model, "layer_bytes": layer_bytes, "head_bytes": head_bytes, "layer_s": layer_s, "step_s": step})
    doc["kernels"] = {"gemv_shape": [28672, 8192], "gemv_bytes_s": 3.72e12, "tiny_kernels": 200, "tiny_kernel_s": 1.06e-6,
                      "layers": {"counts": [2, 6], "prompt_len": 128, "gen_len": 32, "batch": 1, "shapes": shapes}}
    profile = load_built(tmp_path, doc)
    assert profile.efficiency.hbm == pytest.approx(3.9e12 / 4.26e12, rel=1e-3)  # the layers' rate, not the GEMV's
    assert profile.efficiency.layer_device_overhead_s == pytest.approx(125e-6, rel=1e-3)  # not 40 x 1.06 us
    assert profile.efficiency.graphed_step_overhead_s == pytest.approx(0.4e-3, rel=1e-3)
    assert profile.efficiency.step_overhead_s == Efficiency().step_overhead_s  # eager: not what a graph times
    note = profile.provenance["efficiency.layer_device_overhead_s"].note
    assert "llama-3-8b" in note and "graphed decode" in note and "a line through" in note
    doc["kernels"]["layers"]["shapes"] = shapes[:1]  # one shape: the GEMV's rate, the note says so
    one = load_built(tmp_path, doc, name="probed-one-shape")
    assert one.efficiency.hbm == pytest.approx(3.72e12 / 4.26e12, rel=1e-3)
    assert "the GEMV's read rate" in one.provenance["efficiency.hbm"].note


def test_a_layer_shape_that_does_not_fit_is_skipped_and_the_others_kept(monkeypatch):
    torch = pytest.importorskip("torch")
    import hpi.executor.probe as probe

    def fake_time(torch_, settings, config, model, dev, dtype):
        if model == "llama-3-70b":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"model": model, "layer_s": 2e-4}

    monkeypatch.setattr(probe, "time_layers", fake_time)
    out = probe.measure_decoder_layers(torch, ProbeSettings.full(), device="cpu")
    assert [s["model"] for s in out["shapes"]] == ["llama-3-8b"] and out["skipped"] == {"llama-3-70b": "out of GPU memory"}
    with pytest.raises(RuntimeError, match="no decoder layer shape fits"):
        probe.measure_decoder_layers(torch, dataclasses.replace(ProbeSettings.full(), layer_models=("llama-3-70b",)),
                                     device="cpu")


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.mark.parametrize("profile_name, probe_json", [
    ("h100-sxm-1gpu", "2026-11-22-h100/run13-probe/h100-sxm-1gpu.probe.json"),
    ("h200-2gpu", "2026-11-22-h200x4/run5-probe/h200-4gpu.probe.json"),  # the same H200 GPU
    ("h200-4gpu", "2026-11-22-h200x4/run5-probe/h200-4gpu.probe.json"),
])
def test_shipped_decode_figures_re_derive_from_the_kept_probe(profile_name, probe_json):
    """The profiles' hbm, layer_device_overhead_s and step_overhead_s are what the probe's layer timings give
    against each profile's own HBM ceiling (rounded as the profile writer rounds): traceable, not hand-tuned."""
    from hpi.executor.probe import _layer_figures

    doc = json.loads((RESULTS / probe_json).read_text())
    profile = load_profile(profile_name)
    derived = _layer_figures(doc["kernels"]["layers"], profile.gpu.hbm_bandwidth_bytes_s, doc["kernels"]["gemv_bytes_s"],
                             doc["date"])
    for name, figure in derived.items():
        assert getattr(profile.efficiency, name) == pytest.approx(figure["value"], rel=2e-3), name
        assert profile.provenance[f"efficiency.{name}"].source == "probed", name


@pytest.mark.filterwarnings("ignore")
def test_decoder_layers_are_timed_on_the_executors_graphed_path_on_cpu():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from dataclasses import replace

    from hpi.executor.probe import measure_decoder_layers

    settings = replace(ProbeSettings.small(), layer_models=("tiny-llama",), layer_counts=(1, 3), layer_prompt_len=8,
                       layer_gen_len=5, layer_reps=2)
    out = measure_decoder_layers(torch, settings, device="cpu")
    (shape,) = out["shapes"]
    # tiny-llama: hidden 64, 4 heads, 2 kv heads of 16, MLP 176, two norms; fp32 on the CPU
    assert shape["layer_bytes"] == 4 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 176 + 2 * 64)
    assert shape["head_bytes"] == 4 * 32000 * 64
    assert set(shape["step_s"]) == {"1", "3"} and all(t > 0 for t in shape["step_s"].values())
    assert shape["layer_s"] == pytest.approx((shape["step_s"]["3"] - shape["step_s"]["1"]) / 2)


def test_two_h200_profile_matches_the_hand_written_one(tmp_path):
    built = load_built(tmp_path, fake_doc(2, "h200x2.txt"))
    shipped = load_profile("h200-2gpu")
    assert built.gpu.memory_bytes == shipped.gpu.memory_bytes and built.gpu.bf16_flops == shipped.gpu.bf16_flops
    t_built, t_shipped = build_topology(built), build_topology(shipped)
    assert t_built.group_link(t_built.gpus).bandwidth_bytes_s == t_shipped.group_link(t_shipped.gpus).bandwidth_bytes_s
    assert built.efficiency.collective_bandwidth == pytest.approx(shipped.efficiency.collective_bandwidth, abs=0.01)


def test_shared_pcie_switch_gets_the_measured_uplink(tmp_path):
    profile = load_built(tmp_path, fake_doc(4, "pcie_4gpu.txt", together=20e9, sockets=2))
    topology = build_topology(profile)
    rates = topology.host_to_gpu_bytes_s(topology.gpus)
    assert rates["n0.gpu0"] == pytest.approx(20e9)  # the two GPUs behind pcie0 split its 40 GB/s uplink
    assert rates["n0.gpu2"] == pytest.approx(55.2e9)  # PHB: each on its own root port
    assert profile.raw["node"]["pcie_switches"] == 1


def test_failed_measurements_fall_back_to_assumed_figures_that_say_so(tmp_path):
    doc = fake_doc(1, None)
    del doc["matmul"], doc["hbm"], doc["copies"]
    doc["errors"] = {"matmul": "RuntimeError: CUDA error"}
    profile = load_built(tmp_path, doc)
    assert profile.provenance["gpu.bf16_flops"].source == "assumed"
    assert "CUDA error" in profile.provenance["gpu.bf16_flops"].note
    assert profile.efficiency.collective_bandwidth == 0.80  # no NCCL figure: the default


# ---- the real command on this machine -------------------------------------------------------------------


def test_disk_measurement(tmp_path):
    disk = measure_disk(str(tmp_path), 4 << 20, 1 << 20)
    assert disk["read_bytes_s"] > 0 and disk["write_bytes_s"] > 0 and disk["free_bytes"] > 0
    assert list(tmp_path.iterdir()) == []  # the test file is removed


def test_real_probe_quick_writes_a_profile_the_planner_loads(tmp_path):
    out = tmp_path / "profiles" / "here.yaml"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "hpi.cli", "probe", "--quick", "--json", "--out", str(out),
                           "--nvme-path", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["quick"] and doc["host"]["cpu_cores"] >= 1
    assert json.loads((out.parent / "here.probe.json").read_text())["date"] == doc["date"]
    profile = load_profile(str(out))
    assert profile.name == "here" and profile.gpus_per_node == len(doc["gpus"])
    assert profile.provenance["host.dram_bytes"].source == "probed"
    if profile.gpus_per_node == 0:  # this CPU-only machine: planning says so in one line, exit 2
        plan = subprocess.run([sys.executable, "-m", "hpi.cli", "plan", "--model", "llama-3-8b", "--hardware", str(out)],
                              capture_output=True, text=True, env=env)
        assert plan.returncode == 2 and "no GPU" in plan.stderr and len(plan.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--out", "x.txt"], "must end in .yaml"),
    (["--out", "a/b.yaml", "--name", "c"], "file name"),
    (["--name", "bad name!"], "letters, digits"),
    (["--nvme-path", "/no/such/dir"], "no such directory"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(["probe", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ---- GPU paths (skip without CUDA) ----------------------------------------------------------------------


def _cuda() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_cuda() == 0, reason="needs CUDA")
def test_gpu_measurements_on_this_machine():
    import torch

    from hpi.executor.probe import measure_copies, measure_decode_kernels, measure_hbm, measure_matmul

    settings = ProbeSettings.small()
    copies = measure_copies(torch, _cuda(), settings)
    assert all(r > 0 for r in copies["h2d_pinned"]["alone"] + copies["d2h_pageable"]["together"])
    assert measure_matmul(torch, settings)["flops"]["bf16"] > 1e12
    assert measure_hbm(torch, settings)["bytes_s"] > 1e11
    kernels = measure_decode_kernels(torch, settings)
    assert kernels["gemv_bytes_s"] > 1e11 and 0 < kernels["tiny_kernel_s"] < 50e-6
    from hpi.executor.probe import measure_decoder_layers

    (layer,) = measure_decoder_layers(torch, settings)["shapes"]  # an 8B layer, 436 MB in bf16
    assert layer["layer_bytes"] == pytest.approx(436.2e6, rel=1e-3)
    assert layer["layer_bytes"] / 5e12 < layer["layer_s"] < 2e-3  # slower than any HBM read, faster than eager


def test_allreduce_schedule_runs_on_cpu_with_gloo():
    """The spawned all-reduce job (group sizes 2..N, rank 0 reports) on gloo: the same code path as NCCL on GPUs."""
    pytest.importorskip("torch")
    from dataclasses import replace

    from hpi.executor.probe import measure_allreduce

    settings = replace(ProbeSettings.small(), nccl_sizes_bytes=(8 << 10, 64 << 10), nccl_iters=5, nccl_timeout_s=60)
    result = measure_allreduce(3, settings, backend="gloo")
    assert set(result["seconds"]) == {"2", "3"}
    assert all(t > 0 for sizes in result["seconds"].values() for t in sizes.values())
    assert set(result["seconds"]["3"]) == {str(8 << 10), str(64 << 10)}
    assert result["graphed_seconds"] == {}  # CUDA graphs only where the backend is NCCL


def test_trial_pin_without_cuda_stays_within_rlimit_memlock():
    from hpi.executor.probe import _memlock, _pin_trial

    soft, _ = _memlock()
    trial = _pin_trial(2 << 20, False, soft)
    assert trial["method"] == "mlock" and (soft is None or trial["bytes"] <= soft)
    assert trial["ok"] or trial["error"]  # a failure says why
    if soft is None or soft >= 4 << 20:
        assert trial["ok"], trial
