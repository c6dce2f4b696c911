"""``hpi models`` and ``hpi hardware``: the model catalogue and the hardware profiles."""

from __future__ import annotations

import argparse

from hpi.cli import output


def register(sub) -> dict:
    p = sub.add_parser("models", help="the model catalogue")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("hardware", help="the hardware profiles")
    p.add_argument("--json", action="store_true")
    return {"models": cmd_models, "hardware": cmd_hardware}


def cmd_models(args: argparse.Namespace) -> int:
    from rich.table import Table

    from hpi.planner.catalog import load_model, model_names

    models = [load_model(n) for n in model_names()]
    if args.json:
        output.emit_json([{"name": m.name, "family": m.family, "params_total": m.params_total,
                           "params_active": m.params_active, "n_layers": m.n_layers, "hidden_size": m.hidden_size,
                           "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "n_experts": m.n_experts,
                           "source": m.source} for m in models])
        return 0
    table = Table(title="model catalogue (hpi plan --model NAME, or a path to a HF config.json)", title_justify="left")
    for col in ("name", "family", "params", "active", "layers", "hidden", "heads/kv", "experts"):
        table.add_column(col, justify="left" if col in ("name", "family") else "right")
    for m in models:
        experts = (f"{m.n_experts_active}/{m.n_experts}" + (f"+{m.n_shared_experts}" if m.n_shared_experts else "")
                   if m.is_moe else "-")
        table.add_row(m.name, m.family, f"{m.params_total / 1e9:,.2f}B", f"{m.params_active / 1e9:,.2f}B",
                      str(m.n_layers), str(m.hidden_size), f"{m.n_heads}/{m.n_kv_heads}", experts)
    output.console().print(table)
    return 0


def cmd_hardware(args: argparse.Namespace) -> int:
    from rich.table import Table

    from hpi.cli.errors import UsageError
    from hpi.planner.profiles import PROFILES_ENV, load_profile, profile_names, profiles_dir

    names = profile_names()
    if not names:
        raise UsageError(f"hpi hardware: no profiles (NAME.yaml) in {profiles_dir()}: point {PROFILES_ENV} at a folder "
                         "of profile YAMLs, or unset it for the profiles hpi ships")
    profiles = [load_profile(n) for n in names]
    if args.json:
        output.emit_json([{"name": p.name, "description": p.description, "os": p.os, "n_nodes": p.n_nodes,
                     "gpus_per_node": p.gpus_per_node, "gpu": p.gpu.name, "gpu_memory_bytes": p.gpu.memory_bytes,
                     "dram_bytes": p.host.dram_bytes, "has_nvme": p.has_nvme} for p in profiles])
        return 0
    table = Table(title="hardware profiles (hpi plan --hardware NAME, or a path to a profile YAML)",
                  title_justify="left")
    for col in ("name", "GPUs", "GPU memory", "DRAM/node", "NVMe read", "OS", "description"):
        table.add_column(col)
    for p in profiles:
        gpus = f"{p.n_nodes}x{p.gpus_per_node} {p.gpu.name}" if p.n_nodes > 1 else f"{p.gpus_per_node}x {p.gpu.name}"
        nvme = f"{p.nvme.read_bytes_s / 1e9:.1f} GB/s" if p.has_nvme else "-"
        table.add_row(p.name, gpus, f"{p.gpu.memory_bytes / 1e9:.0f} GB", f"{p.host.dram_bytes / 1e9:,.0f} GB", nvme,
                      p.os, p.description)
    output.console().print(table)
    return 0
