"""Hardware profiles: every shipped profile loads, every number has provenance, errors name file and field."""

from __future__ import annotations

import copy
import os
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from hpi.planner.profiles import PROFILES_ENV, ProfileError, clear_cache, load_profile, profile_names
from hpi.planner.specs.hardware import OS_KINDS, PROVENANCE_KINDS, Efficiency, GpuSpec, HostSpec, NvmeSpec
from hpi.planner.topology import build_topology
from hpi.planner.wiring import parse_wiring

SHIPPED = {  # name -> (nodes, GPUs per node)
    "a6000-workstation": (1, 1),
    "h100-sxm-1gpu": (1, 1),
    "h200-2gpu": (1, 2),
    "dgx-h100": (1, 8),
    "dgx-h100-x4-ib": (4, 8),
    "a100-pcie-4gpu": (1, 4),
    "rtx4090-wsl2": (1, 1),
}
COUNT_PATHS = {"node.gpus", "node.cpus", "node.pcie_switches", "node.nvme", "node.nics", "cluster.nodes",
               "nvme.devices"}


def q(value, source="assumed", note="test"):
    return {"value": value, "source": source, "note": note}


def link(kind, bandwidth, pairs, latency=1e-6):
    return {"kind": kind, "bandwidth_bytes_s": q(bandwidth), "latency_s": q(latency), "pairs": pairs}


def minimal(name="tiny") -> dict:
    """A valid one-GPU profile as parsed YAML."""
    return {
        "name": name,
        "description": "a test machine",
        "os": "linux",
        "gpu": {"name": "Test GPU", "memory_bytes": q(48e9), "bf16_flops": q(100e12), "hbm_bandwidth_bytes_s": q(1e12)},
        "host": {
            "dram_bytes": q(256e9),
            "pinnable_bytes": q(128e9),
            "cpu_cores": q(16),
            "h2d_pageable_bytes_s": q(8e9),
            "d2h_pageable_bytes_s": q(10e9),
        },
        "node": {
            "gpus": 1,
            "cpus": 1,
            "links": {"gpu_host": link("pcie", 26e9, [["gpu0", "cpu0"]])},
        },
    }


def write(tmp_path: Path, data: dict, name: str | None = None) -> Path:
    path = tmp_path / f"{name or data.get('name', 'tiny')}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(tmp_path: Path, data: dict) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message, message
    return message


# ---- the shipped profiles -----------------------------------------------------------------------------


def test_shipped_profiles_are_listed():
    assert set(SHIPPED) <= set(profile_names())
    assert profile_names() == sorted(profile_names())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_profile_loads_with_sane_numbers(name):
    profile = load_profile(name)
    nodes, per_node = SHIPPED[name]
    assert ((profile.name, profile.n_nodes, profile.gpus_per_node, profile.n_gpus)
            == (name, nodes, per_node, nodes * per_node))
    assert profile.os in OS_KINDS and profile.description
    assert 0 < profile.host.pinnable_bytes <= profile.host.dram_bytes
    assert profile.gpu.memory_bytes > 1e9 and profile.gpu.bf16_flops > 1e13 and profile.gpu.hbm_bandwidth_bytes_s > 1e11
    assert 0 < profile.host.h2d_pageable_bytes_s < 20e9  # pageable is a slow staged copy everywhere
    assert profile.host.sockets >= 1 and profile.host.cpu_cores >= 1


def _numbers(data, path=""):
    """(dotted path, value, is_provenance_form) for every number in parsed YAML."""
    if isinstance(data, dict):
        if "value" in data and "source" in data:
            yield path, data["value"], True
            return
        for key, value in data.items():
            yield from _numbers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _numbers(value, f"{path}[{i}]")
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        yield path, data, False


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_number_has_provenance(name):
    profile = load_profile(name)
    numbers = list(_numbers(profile.raw))
    bare = [path for path, _, with_source in numbers if not with_source and path not in COUNT_PATHS]
    assert bare == [], f"numbers without provenance in {name}: {bare}"
    quantities = [path for path, _, with_source in numbers if with_source]
    assert quantities and set(quantities) == set(profile.provenance)
    for path, provenance in profile.provenance.items():
        assert provenance.source in PROVENANCE_KINDS, path
        assert provenance.note, f"{name}: {path} has no note saying where it comes from"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_spec_figure_has_a_provenance_entry(name):
    profile = load_profile(name)
    sections = [("gpu", GpuSpec, profile.gpu), ("host", HostSpec, profile.host), ("nvme", NvmeSpec, profile.nvme)]
    for section, spec, value in sections:
        if value is None:
            continue
        for f in fields(spec):
            if f.name in ("name", "sockets", "devices") or (f.name == "int8_flops" and value.int8_flops == 0.0):
                continue
            if f.name == "read_grid" and not value.read_grid:  # a profile from before the probe measured it
                continue
            assert f"{section}.{f.name}" in profile.provenance, f"{name}: {section}.{f.name}"
    for key in profile.raw.get("efficiency", {}):
        assert profile.provenance[f"efficiency.{key}"].source in PROVENANCE_KINDS


def test_h100_uses_the_measured_and_probed_ceilings():
    profile = load_profile("h100-sxm-1gpu")
    assert profile.gpu.bf16_flops == 775e12 and profile.gpu.hbm_bandwidth_bytes_s == 3.0e12
    assert profile.host.h2d_pageable_bytes_s == 7.463e9 and profile.nvme.read_bytes_s == 2.682e9
    for path, source in (("gpu.bf16_flops", "measured"), ("gpu.hbm_bandwidth_bytes_s", "measured"),
                         ("host.h2d_pageable_bytes_s", "probed"), ("nvme.read_bytes_s", "probed"),
                         ("node.links.gpu_host.bandwidth_bytes_s", "probed"),
                         ("efficiency.offload_layer_overhead_s", "measured")):
        assert profile.provenance[path].source == source, path
        assert "2026-11-22" in profile.provenance[path].note, path
    # the 0.483 s host-waited 8B step (docs/measured-facts.md): 0.312 s of copies, the rest 32 layers of host time,
    # 5.35 ms a layer: the eager layer's (probed 2026-12-05 without cuDNN) and ZeRO-3's hooks
    eff = profile.efficiency
    assert eff.layer_overhead_s == 1.026e-3 and eff.step_overhead_s == 1.22e-3
    assert eff.layer_overhead_s + eff.offload_layer_overhead_s == pytest.approx(5.346e-3)
    for name in ("layer_overhead_s", "step_overhead_s"):
        assert profile.provenance[f"efficiency.{name}"].source == "probed"
        assert "2026-12-05" in profile.provenance[f"efficiency.{name}"].note
    assert profile.efficiency.h2d_stream_pinned == Efficiency().h2d_stream_pinned  # not measured: the default
    assert profile.efficiency.matmul_decode == Efficiency().matmul_decode


def test_h200_efficiency_and_links():
    profile = load_profile("h200-2gpu")
    # hpi probe's CUDA-graphed all-reduce (the GPU's time) and its host-bound eager loop (the host's cost per call)
    assert profile.efficiency.allreduce_latency_s == 11.5e-6
    assert profile.efficiency.collective_host_overhead_s == 47.5e-6
    # real decoder layers in graphed decode, probed on the 4x H200 (same GPU): held at this profile's copy ceiling
    assert profile.efficiency.layer_device_overhead_s == 1.107e-4 and profile.efficiency.hbm == 1.0
    assert profile.efficiency.graphed_step_overhead_s == 1.514e-4
    for name in ("allreduce_latency_s", "collective_host_overhead_s", "layer_device_overhead_s", "hbm",
                 "graphed_step_overhead_s"):
        assert profile.provenance[f"efficiency.{name}"].source == "probed", name
    node, _ = parse_wiring(profile.raw)
    kinds = {group.name: group.kind for group in node.links}
    assert kinds["nv18"] == "nvlink"


def test_wsl2_profile_notes_its_limits():
    profile = load_profile("rtx4090-wsl2")
    assert profile.os == "wsl2"
    assert profile.host.pinnable_bytes <= profile.host.dram_bytes / 2
    assert "pinned" in profile.provenance["host.pinnable_bytes"].note.lower()
    assert any("pinned" in note.lower() for note in profile.raw["notes"])
    assert profile.nvme.read_bytes_s < 7e9  # the vhdx, not the drive


def test_cluster_extends_its_node_profile():
    node, cluster = load_profile("dgx-h100"), load_profile("dgx-h100-x4-ib")
    assert cluster.gpu == node.gpu and cluster.host == node.host and cluster.nvme == node.nvme
    assert cluster.raw["extends"] == "dgx-h100" and cluster.n_nodes == 4
    assert cluster.provenance["cluster.fabric.bandwidth_bytes_s"].source == "datasheet"
    assert cluster.provenance["gpu.bf16_flops"] == node.provenance["gpu.bf16_flops"]


def test_a6000_reproduces_the_published_machine():
    profile = load_profile("a6000-workstation")
    assert profile.host.dram_bytes == 252e9 and profile.nvme.read_bytes_s == 5.6e9
    assert profile.provenance["nvme.read_bytes_s"].source == "published"


# ---- lookup and cache ---------------------------------------------------------------------------------


def test_unknown_name_lists_known_names_on_one_line():
    with pytest.raises(ProfileError) as info:
        load_profile("dgx-h1000")
    message = str(info.value)
    assert "\n" not in message and "'dgx-h1000'" in message
    assert all(name in message for name in SHIPPED)


def test_load_is_cached_and_reloads_an_edited_file(tmp_path):
    path = write(tmp_path, minimal())
    first = load_profile(str(path))
    assert load_profile(str(path)) is first
    data = minimal()
    data["gpu"]["memory_bytes"] = q(80e9)
    write(tmp_path, data)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert load_profile(str(path)).gpu.memory_bytes == 80e9
    clear_cache()


def test_profiles_dir_env_override(tmp_path, monkeypatch):
    write(tmp_path, minimal("elsewhere"))
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    assert profile_names() == ["elsewhere"]
    assert load_profile("elsewhere").name == "elsewhere"
    with pytest.raises(ProfileError, match="known: elsewhere"):
        load_profile("dgx-h100")


def test_cpu_only_profile_loads(tmp_path):
    data = minimal("cpu-box")
    del data["gpu"]
    del data["host"]["h2d_pageable_bytes_s"], data["host"]["d2h_pageable_bytes_s"]
    data["node"] = {"gpus": 0, "cpus": 2, "nvme": 1, "links": {
        "upi": link("socket", 60e9, [["cpu0", "cpu1"]], latency=2e-7),
        "disk": link("pcie", 6e9, [["nvme0", "cpu0"]])}}
    data["nvme"] = {"capacity_bytes": q(2e12), "read_bytes_s": q(6e9), "write_bytes_s": q(4e9)}
    profile = load_profile(str(write(tmp_path, data)))
    assert profile.n_gpus == 0 and profile.gpu.memory_bytes == 0.0 and profile.host.sockets == 2
    topology = build_topology(profile)
    assert topology.gpus == () and topology.graph.number_of_nodes() == 3


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    # PyYAML reads 48.0e9 (no sign in the exponent) as a string; the loader accepts it as a number
    text = write(tmp_path, minimal()).read_text().replace("48000000000.0", "48.0e9")
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    assert "48.0e9" in text and load_profile(str(path)).gpu.memory_bytes == 48e9


# ---- errors name the file and the field ---------------------------------------------------------------


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ngpu:\n  memory_bytes: {value: 1.0e9, source: datasheet\nhost: {}\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert f"{path}:4" in message and "malformed YAML" in message


def test_duplicate_keys_are_rejected_with_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\nos: linux\nos: wsl2\n")
    with pytest.raises(ProfileError, match=r"dup.yaml:3: malformed YAML: duplicate key 'os' \(first at line 2\)"):
        load_profile(str(path))


def test_plain_number_is_rejected(tmp_path):
    data = minimal()
    data["gpu"]["memory_bytes"] = 48e9
    message = error_of(tmp_path, data)
    assert "gpu.memory_bytes" in message and "no provenance" in message and "source" in message


def test_unknown_provenance_kind(tmp_path):
    data = minimal()
    data["gpu"]["bf16_flops"]["source"] = "guess"
    message = error_of(tmp_path, data)
    assert "gpu.bf16_flops.source" in message and "'guess'" in message
    assert all(kind in message for kind in PROVENANCE_KINDS)


def test_missing_field(tmp_path):
    data = minimal()
    del data["host"]["dram_bytes"]
    assert "host.dram_bytes: missing" in error_of(tmp_path, data)


def test_missing_section(tmp_path):
    data = minimal()
    del data["gpu"]
    assert "gpu: missing section" in error_of(tmp_path, data)


def test_wrong_value_type(tmp_path):
    data = minimal()
    data["gpu"]["memory_bytes"]["value"] = "lots"
    assert "gpu.memory_bytes.value: expected a number, got 'lots'" in error_of(tmp_path, data)


def test_negative_value(tmp_path):
    data = minimal()
    data["node"]["links"]["gpu_host"]["bandwidth_bytes_s"]["value"] = -1
    assert "node.links.gpu_host.bandwidth_bytes_s.value" in error_of(tmp_path, data)


def test_unknown_field_is_a_typo(tmp_path):
    data = minimal()
    data["host"]["dram_byte"] = q(1e9)
    message = error_of(tmp_path, data)
    assert "host.dram_byte: unknown field" in message and "dram_bytes" in message


def test_efficiency_fraction_above_one(tmp_path):
    data = minimal()
    data["efficiency"] = {"hbm": q(1.2, "measured")}
    assert "efficiency.hbm.value" in error_of(tmp_path, data)


def test_unknown_efficiency_field(tmp_path):
    data = minimal()
    data["efficiency"] = {"pcie_magic": q(0.5)}
    assert "efficiency.pcie_magic: unknown field" in error_of(tmp_path, data)


def test_unknown_component_in_link(tmp_path):
    data = minimal()
    data["node"]["links"]["gpu_host"]["pairs"] = [["gpu0", "cpu1"]]
    message = error_of(tmp_path, data)
    assert "node.links.gpu_host.pairs[0]" in message and "'cpu1'" in message


def test_unlinked_component(tmp_path):
    data = minimal()
    data["node"]["gpus"] = 2
    message = error_of(tmp_path, data)
    assert "node.links" in message and "gpu1 not linked" in message


def test_bad_link_kind(tmp_path):
    data = minimal()
    data["node"]["links"]["gpu_host"]["kind"] = "pci"
    assert "node.links.gpu_host.kind: 'pci' is not one of" in error_of(tmp_path, data)


def test_bad_os(tmp_path):
    data = minimal()
    data["os"] = "macos"
    assert "os: 'macos' is not one of linux, windows, wsl2" in error_of(tmp_path, data)


def test_name_must_match_file(tmp_path):
    data = minimal("tiny")
    path = write(tmp_path, data, name="other")
    with pytest.raises(ProfileError, match="name: 'tiny' must equal the file name 'other'"):
        load_profile(str(path))


def test_pinnable_above_dram(tmp_path):
    data = minimal()
    data["host"]["pinnable_bytes"] = q(512e9)
    assert "host.pinnable_bytes.value" in error_of(tmp_path, data)


def test_nvme_component_needs_nvme_section(tmp_path):
    data = minimal()
    data["node"]["nvme"] = 1
    data["node"]["links"]["disk"] = link("pcie", 6e9, [["nvme0", "cpu0"]])
    assert "node.nvme" in error_of(tmp_path, data)


def test_multi_node_needs_a_fabric(tmp_path):
    data = minimal()
    data["cluster"] = {"nodes": 2}
    assert "cluster.fabric: missing section" in error_of(tmp_path, data)


def test_fabric_nics_must_exist(tmp_path):
    data = minimal()
    fabric = {"kind": "ib", "bandwidth_bytes_s": q(50e9), "latency_s": q(1e-6), "nics": ["nic0"]}
    data["cluster"] = {"nodes": 2, "fabric": fabric}
    assert "cluster.fabric.nics: unknown NIC 'nic0'" in error_of(tmp_path, data)


def test_extends_merges_and_reports_missing_base(tmp_path):
    write(tmp_path, minimal("base"))
    derived = {"extends": "base", "description": "two of them", "cluster": {"nodes": 2, "fabric": {
        "kind": "roce", "bandwidth_bytes_s": q(25e9), "latency_s": q(3e-6)}}}
    base_nics = minimal("base")
    base_nics["node"]["nics"] = 1
    base_nics["node"]["links"]["nic"] = link("pcie", 26e9, [["nic0", "cpu0"]])
    write(tmp_path, base_nics)
    profile = load_profile(str(write(tmp_path, derived, name="pair")))
    assert profile.name == "pair" and profile.n_gpus == 2 and profile.description == "two of them"
    missing = {"extends": "nowhere", "description": "x"}
    with pytest.raises(ProfileError, match="extends: no profile 'nowhere'"):
        load_profile(str(write(tmp_path, missing, name="orphan")))


def test_extends_cycle(tmp_path):
    write(tmp_path, {"extends": "b"}, name="a")
    write(tmp_path, {"extends": "a"}, name="b")
    with pytest.raises(ProfileError, match="cycle a.yaml -> b.yaml -> a.yaml"):
        load_profile(str(tmp_path / "a.yaml"))


def test_raw_is_the_parsed_yaml(tmp_path):
    data = minimal()
    profile = load_profile(str(write(tmp_path, copy.deepcopy(data))))
    assert profile.raw == data


def test_nvme_read_grid_loads_and_an_older_profile_has_none(tmp_path):
    data = minimal()
    data["nvme"] = {"devices": 1, "capacity_bytes": q(1e12), "read_bytes_s": q(2e9), "write_bytes_s": q(1e9)}
    assert load_profile(str(write(tmp_path, data))).nvme.read_grid == ()  # written before the probe measured it
    data["nvme"]["read_grid"] = {"source": "probed", "note": "measure_read_grid",
                                 "points": [[1048576, 1, 1.0e9], [1048576, 32, 3.5e9]]}
    data["name"] = "gridded"
    profile = load_profile(str(write(tmp_path, data)))
    assert [(p.request_bytes, p.in_flight, p.read_bytes_s) for p in profile.nvme.read_grid] == [
        (1048576.0, 1.0, 1.0e9), (1048576.0, 32.0, 3.5e9)]
    assert profile.provenance["nvme.read_grid"].source == "probed"


@pytest.mark.parametrize("grid, says", [
    ({"source": "probed", "points": [[1048576, 0, 1e9]]}, "nvme.read_grid.points[0]: expected [request_bytes"),
    ({"source": "probed", "points": [[1048576, 1]]}, "nvme.read_grid.points[0]"),
    ({"source": "probed", "points": []}, "nvme.read_grid.points: expected a list"),
    ({"source": "guessed", "points": [[1048576, 1, 1e9]]}, "nvme.read_grid.source"),
    ({"source": "probed", "points": [[1048576, 1, 1e9]], "unit": "x"}, "nvme.read_grid.unit: unknown field"),
])
def test_bad_nvme_read_grid_names_the_field(tmp_path, grid, says):
    data = minimal()
    data["nvme"] = {"capacity_bytes": q(1e12), "read_bytes_s": q(2e9), "write_bytes_s": q(1e9), "read_grid": grid}
    assert says in error_of(tmp_path, data)
