"""Human-readable output: rich tables for plans, predictions and explanations."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from hpi.planner.explain import Binding, KnobEffect, bindings, memory_headroom
from hpi.planner.predict import Estimate

GB = 1e9


def gb(n: float) -> str:
    return f"{n / GB:,.1f} GB"


def ms(s: float) -> str:
    return f"{s * 1e3:,.1f} ms" if s < 10 else f"{s:,.1f} s"


def seconds(s: float) -> str:
    return f"{s:,.3f} s" if s < 100 else f"{s:,.0f} s"


def _binds(est: Estimate) -> str:
    b = bindings(est)[0]
    return f"{b.resource} {b.share:.0%}"


def plans_table(estimates: list[Estimate], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col, justify in (
        ("#", "right"), ("plan", "left"), ("decode step", "right"), ("TTFT", "right"),
        ("throughput", "right"), ("GPU peak", "right"), ("CPU", "right"), ("pinned", "right"), ("binds", "left"),
    ):
        table.add_column(col, justify=justify)
    for rank, est in enumerate(estimates, 1):
        table.add_row(
            str(rank), est.plan.label, ms(est.decode_step_s), seconds(est.ttft_s),
            f"{est.throughput_tok_s:,.2f} tok/s", gb(est.gpu_peak_bytes), gb(est.cpu_bytes),
            gb(est.pinned_bytes), _binds(est) if est.feasible else "[red]infeasible[/red]",
        )
    return table


def breakdown_table(est: Estimate) -> Table:
    table = Table(title="time breakdown (exposed seconds; they sum to the step)", title_justify="left")
    table.add_column("term")
    table.add_column("prefill", justify="right")
    table.add_column("decode step", justify="right")
    for term in est.decode_exposed:
        table.add_row(term.removesuffix("_s"), ms(est.prefill_exposed[term]), ms(est.decode_exposed[term]))
    table.add_row("[bold]total[/bold]", ms(est.prefill_s), ms(est.decode_step_s))
    return table


def memory_table(est: Estimate) -> Table:
    table = Table(title="memory (fullest GPU; fullest node)", title_justify="left")
    table.add_column("GPU part")
    table.add_column("bytes", justify="right")
    table.add_column("CPU part")
    table.add_column("bytes", justify="right")
    gpu = list(est.gpu_memory_parts.items()) + [("[bold]peak[/bold]", est.gpu_peak_bytes)]
    cpu = list(est.cpu_memory_parts.items()) + [("[bold]total[/bold]", est.cpu_bytes), ("pinned", est.pinned_bytes),
                                                ("NVMe", est.nvme_bytes), ("while building", est.build_bytes)]
    for i in range(max(len(gpu), len(cpu))):
        g = gpu[i] if i < len(gpu) else ("", None)
        c = cpu[i] if i < len(cpu) else ("", None)
        table.add_row(g[0].replace("_", " "), gb(g[1]) if g[1] is not None else "",
                      c[0].replace("_", " "), gb(c[1]) if c[1] is not None else "")
    return table


def print_estimate(console: Console, est: Estimate) -> None:
    verdict = "[green]feasible[/green]" if est.feasible else "[red]infeasible[/red]"
    console.print(f"[bold]{est.model.name}[/bold] on [bold]{est.hardware.name}[/bold]: {est.plan.label}  {verdict}")
    for r in est.reasons:
        console.print(f"  [red]x[/red] {r.message}")
    console.print(
        f"  prefill/TTFT {seconds(est.prefill_s)}, decode step {ms(est.decode_step_s)}, total {seconds(est.total_s)}, "
        f"throughput {est.throughput_tok_s:,.2f} tok/s (prompt {est.workload.prompt_len_tokens}, "
        f"gen {est.workload.gen_len_tokens}, batch {est.plan.batch_size})"
    )
    console.print(breakdown_table(est))
    console.print(memory_table(est))


def print_placement(console: Console, est: Estimate) -> None:
    pl = est.placement
    console.print(f"[bold]placement[/bold] (rank order tp, dp, pp; {pl.nodes_used} node(s))")
    per_stage = pl.tp * pl.dp
    for stage in range(pl.pp):
        gpus = ", ".join(pl.rank_gpus[stage * per_stage : (stage + 1) * per_stage])
        console.print(f"  stage {stage}: {gpus}")
    for name, link in (("TP", pl.tp_link), ("dp", pl.dp_link), ("PP", pl.pp_link)):
        if link.kind != "local":
            console.print(f"  {name} link: {link.kind} {link.bandwidth_bytes_s / GB:,.0f} GB/s, "
                          f"{link.latency_s * 1e6:.1f} us ({link.path})")
    console.print(f"  host->device per GPU with all ranks streaming: pinned {pl.h2d_pinned_bytes_s / GB:.1f} GB/s, "
                  f"pageable {pl.h2d_pageable_bytes_s / GB:.1f} GB/s; NVMe {pl.nvme_read_bytes_s / GB:.2f} GB/s")
    for note in pl.notes:
        console.print(f"  note: {note}")


def print_bindings(console: Console, items: list[Binding], est: Estimate) -> None:
    console.print("[bold]what binds[/bold]")
    for b in items:
        console.print(f"  {b.phase}: {b.resource} ({ms(b.seconds)}, {b.share:.0%} of the step): {b.detail}")
    for what, used, cap in memory_headroom(est):
        console.print(f"  {what}: {gb(used)} of {gb(cap)} ({used / max(cap, 1):.0%})")


def knob_table(effects: list[KnobEffect]) -> Table:
    table = Table(title="what each knob would change (predicted)", title_justify="left")
    for col in ("change", "decode step", "x now", "throughput", "x now", "GPU peak", "feasible"):
        table.add_column(col, justify="left" if col in ("change", "feasible") else "right")
    for e in effects:
        est = e.estimate
        table.add_row(
            e.label, ms(est.decode_step_s), f"{e.decode_ratio:.2f}", f"{est.throughput_tok_s:,.2f}",
            f"{e.throughput_ratio:.2f}", gb(est.gpu_peak_bytes),
            "yes" if est.feasible else f"[red]no[/red] ({est.reasons[0].kind})",
        )
    return table
