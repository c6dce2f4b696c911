"""The study's report: ``report.md`` with PNG plots under ``plots/``, beside the study.

Plots (matplotlib, imported here only, drawn headless with Agg):

- ``throughput_vs_batch.png``: measured throughput against batch per discrete plan, out-of-memory trials
  at zero, and the refreshed planner's curve for the best discrete plan (the inverted U);
- ``pinned_vs_pageable.png``: the best pinned and pageable throughput of each host-copying discrete plan,
  measured where a trial ran it, else predicted (hatched);
- ``predicted_vs_measured.png``: each measured trial against the uncalibrated prediction and the refreshed
  (calibrated + residual) one;
- ``importance.png``: Optuna's parameter importances (PED-ANOVA) over the measured trials;
- ``pareto.png``: decode step against throughput of the measured trials, the Pareto front marked;
- ``convergence.png``: best measured value after each trial (and, simulated, the hidden optimum).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from hpi import atomic
from hpi.autotune.study import trial_prediction
from hpi.planner.specs.plan import Plan


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _trials(study) -> list:
    return sorted((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("plan")), key=lambda t: t.number)


def _measured(t) -> dict[str, Any] | None:
    return t.user_attrs.get("measured") if t.user_attrs.get("status") == "ok" else None


def _family(plan: dict[str, Any]) -> str:
    """A plan's label less its batch: what a throughput-against-batch curve follows."""
    return Plan.from_dict(plan).label.rsplit(" b", 1)[0]


def _throughput(prediction: dict[str, Any], surrogate) -> float:
    """Predicted throughput, with the residual model applied when throughput is the objective."""
    return prediction["value"] if surrogate.maximize else prediction["throughput_tok_s"]


def _save(plt, fig, path: Path, ax=None) -> None:
    """Write one figure and free it; ``ax`` given: the line plots' common grid and legend first."""
    if ax is not None:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic.write_figure(path, fig, dpi=110)
    plt.close(fig)


def plot_throughput_vs_batch(plt, trials, surrogate, best_plan: Plan | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for t in trials:
        m = _measured(t)
        if m and m.get("throughput_tok_s"):
            series.setdefault(_family(t.user_attrs["plan"]), []).append((t.user_attrs["plan"]["batch_size"],
                                                                         m["throughput_tok_s"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name, alpha=0.85)
    ooms = [t.user_attrs["plan"]["batch_size"] for t in trials if t.user_attrs.get("status") == "oom"]
    if ooms:
        ax.plot(ooms, [0] * len(ooms), "rx", markersize=9, label="out of memory")
    if best_plan is not None:
        batches = [b for b in surrogate.space.batches() if b % best_plan.dp == 0]
        variants, values = [], []
        for b in batches:
            try:
                variants.append(best_plan.with_(batch_size=b,
                                                micro_batches=1 if best_plan.pp == 1 else best_plan.micro_batches))
            except ValueError:
                continue
        for v in variants:
            p = surrogate.predict(v)
            values.append(_throughput(p, surrogate) if p["feasible"] else math.nan)
        ax.plot([v.batch_size for v in variants], values, "k--", alpha=0.6, label="refreshed planner, best plan")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("throughput (tok/s)")
    ax.set_title("throughput against batch")
    _save(plt, fig, path, ax=ax)


def plot_pinned_vs_pageable(plt, trials, surrogate, path: Path) -> None:
    best: dict[tuple[str, bool], tuple[float, bool, Plan]] = {}
    for t in trials:
        plan = Plan.from_dict(t.user_attrs["plan"])
        m = _measured(t)
        if not plan.copies_from_host_memory or not m or not m.get("throughput_tok_s"):
            continue
        key = (_family(t.user_attrs["plan"]).replace(" pinned", "").replace(" pageable", ""), plan.pin_memory)
        if key not in best or m["throughput_tok_s"] > best[key][0]:
            best[key] = (m["throughput_tok_s"], True, plan)
    for (name, pinned), (_, _, plan) in list(best.items()):  # the other side, predicted, where not measured
        other = (name, not pinned)
        if other not in best:
            p = surrogate.predict(plan.with_(pin_memory=not pinned))
            if p["feasible"]:
                best[other] = (_throughput(p, surrogate), False, plan)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = sorted({k[0] for k in best})
    for i, name in enumerate(names):
        for j, pinned in enumerate((True, False)):
            v = best.get((name, pinned))
            if v is None:
                continue
            ax.bar(i + (j - 0.5) * 0.38, v[0], width=0.36, color="tab:blue" if pinned else "tab:orange",
                   hatch=None if v[1] else "//", edgecolor="black", label=None)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="tab:blue", label="pinned"), Patch(facecolor="tab:orange", label="pageable"),
               Patch(facecolor="white", hatch="//", edgecolor="black", label="predicted (not run)")]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("best throughput (tok/s)")
    ax.set_title("pinned vs pageable host memory" if names else "pinned vs pageable: no plan copies from host memory")
    ax.legend(handles=handles, fontsize=7)
    _save(plt, fig, path)


def plot_predicted_vs_measured(plt, trials, surrogate, path: Path) -> None:
    key = "throughput_tok_s" if surrogate.maximize else "decode_step_s"
    xs, nominal, refreshed = [], [], []
    for t in trials:
        m = _measured(t)
        if not m or not m.get(key) or t.user_attrs.get("reused_from") is not None:
            continue
        prediction = trial_prediction(t)
        nom = getattr(prediction, key) if prediction else None
        p = surrogate.predict(Plan.from_dict(t.user_attrs["plan"]))
        xs.append(m[key])
        nominal.append(nom if nom else math.nan)
        refreshed.append(p["value"])  # the objective's figure, residual applied
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(xs, nominal, "o", label="uncalibrated planner (at run time)", alpha=0.8)
    ax.plot(xs, refreshed, "s", label="refreshed planner (end of study)", alpha=0.8, mfc="none")
    finite = [v for v in xs + nominal + refreshed if v == v and v > 0]
    if finite:
        lo, hi = min(finite) * 0.8, max(finite) * 1.25
        ax.plot([lo, hi], [lo, hi], "k:", label="measured = predicted")
        ax.set_xscale("log")
        ax.set_yscale("log")
    unit = "tok/s" if surrogate.maximize else "s"
    ax.set_xlabel(f"measured {key} ({unit})")
    ax.set_ylabel(f"predicted ({unit})")
    ax.set_title("predicted vs measured")
    _save(plt, fig, path, ax=ax)


def importances(study) -> dict[str, float]:
    """Optuna's importances over the measured trials ({} when too few to tell)."""
    import optuna

    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.user_attrs.get("status") == "ok"]
    if len(completed) < 3:
        return {}
    # PED-ANOVA (Optuna 5's default; fANOVA needs scikit-learn): which parameters set the best trials apart.
    # It ranks for LOW targets, so throughput is negated. Measured trials only: an overflow's 0 is no measurement.
    import warnings

    sign = -1.0 if study.direction.name == "MAXIMIZE" else 1.0

    def target(t) -> float:
        return sign * t.value if t.user_attrs.get("status") == "ok" else float("nan")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dict(optuna.importance.get_param_importances(study, target=target))
        except (ImportError, ValueError, RuntimeError, ZeroDivisionError):
            return {}


def plot_importance(plt, imp: dict[str, float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names], color="tab:green")
    ax.set_xlabel("importance (PED-ANOVA)")
    ax.set_title("parameter importance" if imp else "parameter importance: too few measured trials")
    _save(plt, fig, path)


def plot_pareto(plt, trials, path: Path) -> None:
    pts = []
    for t in trials:
        m = _measured(t)
        if m and m.get("decode_step_s") and m.get("throughput_tok_s"):
            pts.append((m["decode_step_s"], m["throughput_tok_s"], t.number))
    front, best = [], -math.inf
    for d, thr, n in sorted(pts, key=lambda p: (p[0], -p[1])):
        if thr > best:
            front.append((d, thr, n))
            best = thr
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", alpha=0.5, label="measured trials")
    ax.plot([p[0] for p in front], [p[1] for p in front], "r-o", label="Pareto front")
    for d, thr, n in front:
        ax.annotate(str(n), (d, thr), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("decode step (s, lower is better)")
    ax.set_ylabel("throughput (tok/s, higher is better)")
    ax.set_title("latency / throughput Pareto front")
    if pts:
        ax.set_xscale("log")
        ax.set_yscale("log")
    _save(plt, fig, path, ax=ax)


def plot_convergence(plt, trials, maximize: bool, doc: dict[str, Any], path: Path) -> None:
    xs, ys, best = [], [], None
    for t in trials:
        m = _measured(t)
        v = (m or {}).get("value")
        if v is not None and (best is None or (v > best if maximize else v < best)):
            best = v
        xs.append(t.number)
        ys.append(best if best is not None else math.nan)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(xs, ys, where="post", label="best measured")
    sim = doc.get("simulation")
    if sim:
        ax.axhline(sim["value"], color="k", ls=":", label="hidden machine's optimum")
        ax.axhline(sim["value"] * (0.97 if maximize else 1.03), color="grey", ls="--", lw=0.8, label="within 3%")
    base = (doc.get("baseline") or {}).get("measured")
    if base:
        ax.axhline(base["throughput_tok_s"] if maximize else base["decode_step_s"], color="tab:red", ls="-.",
                   label=f"baseline {doc['baseline']['kind']}")
    ax.set_xlabel("trial")
    ax.set_ylabel("throughput (tok/s)" if maximize else "decode step (s)")
    ax.set_title("best value after each trial")
    _save(plt, fig, path, ax=ax)


def _trial_rows(trials) -> list[str]:
    rows = ["| # | source | plan | status | throughput tok/s | decode step s | predicted | note |",
            "|---|---|---|---|---|---|---|---|"]
    for t in trials:
        a = t.user_attrs
        m = a.get("measured") or {}
        pred = (a.get("predicted") or {}).get("value")
        note = a.get("error", "")[:80] if a.get("status") in ("crash", "timeout") else ""
        if a.get("status") == "oom":
            note = (a.get("oom") or {}).get("message", "")[:80]
        if a.get("status") == "predicted_overflow":
            note = "not launched: " + ", ".join(k for k, v in (a.get("predicted") or {}).get("constraints", {}).items()
                                                if v > 0)
        if a.get("reused_from") is not None:
            note = f"same plan as trial {a['reused_from']}: not re-run"
        if a.get("interrupted"):
            note = "interrupted: re-queued"
        thr, dec = m.get("throughput_tok_s"), m.get("decode_step_s")
        rows.append(f"| {t.number} | {a.get('source', '')} | `{a.get('label', '')}` | "
                    f"{a.get('status', t.state.name.lower())} | {'' if thr is None else f'{thr:,.4g}'} | "
                    f"{'' if dec is None else f'{dec:.4g}'} | {'' if pred is None else f'{pred:,.4g}'} | "
                    f"{note.replace('|', '/')} |")
    return rows


def _calibration_rows(surrogate) -> list[str]:
    nom, cal = surrogate.nominal.efficiency, surrogate.profile.efficiency
    changed = [(f, getattr(nom, f), getattr(cal, f)) for f in nom.__dataclass_fields__
               if getattr(nom, f) != getattr(cal, f)]
    if not changed:
        return ["The profile's efficiencies were not changed by calibration (no GPU records, or too few)."]
    rows = ["| efficiency | profile | calibrated to this study's runs |", "|---|---|---|"]
    rows += [f"| {f} | {a:.4g} | {b:.4g} |" for f, a, b in changed]
    return rows


def _plots(study_dir: Path, study, surrogate, doc: dict[str, Any], trials, imp) -> str | None:
    """Draw every plot; returns why none were drawn (matplotlib missing, e.g. on a GPU node without it)."""
    try:
        plt = _plt()
    except ImportError as e:
        return f"no plots: {e} (pip install matplotlib, then run the same command again)"
    plots = study_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    best = doc.get("best")
    best_plan = Plan.from_dict({k: best[k] for k in Plan.__dataclass_fields__}) if best else None
    plot_throughput_vs_batch(plt, trials, surrogate, best_plan, plots / "throughput_vs_batch.png")
    plot_pinned_vs_pageable(plt, trials, surrogate, plots / "pinned_vs_pageable.png")
    plot_predicted_vs_measured(plt, trials, surrogate, plots / "predicted_vs_measured.png")
    plot_importance(plt, imp, plots / "importance.png")
    plot_pareto(plt, trials, plots / "pareto.png")
    plot_convergence(plt, trials, surrogate.maximize, doc, plots / "convergence.png")
    return None


def write_report(study_dir: Path, study, surrogate, doc: dict[str, Any]) -> Path:
    trials = _trials(study)
    best = doc.get("best")
    imp = importances(study)
    no_plots = _plots(study_dir, study, surrogate, doc, trials, imp)

    lines = [f"# hpi autotune: {doc['study']}", "",
             f"{doc['model']} on {doc['hardware']}, objective **{doc['objective']}**"
             + (" (simulated: a hidden machine answers the trials)" if doc["simulated"] else "")
             + f"; {doc['trials']} trials, {doc['runs']} runs launched; storage `{doc['storage']}`.", ""]
    if best:
        lines += ["## Best plan", "", f"`{best['label']}` (trial {best['trial']}, {best['source']}): "
                  f"**{best['throughput_tok_s']:,.4g} tok/s**, decode step {best['decode_step_s']:.4g} s, "
                  f"prefill {best.get('prefill_s') or 0:.4g} s.", "",
                  "```json", json.dumps({k: best[k] for k in Plan.__dataclass_fields__}, indent=1), "```", ""]
        if doc.get("launch_command"):
            lines += ["Run it again:", "", "```bash", doc["launch_command"], "```", ""]
        ds = study_dir / "best_ds_config.json"
        if ds.is_file():
            lines += ["Its DeepSpeed config (`best_ds_config.json`):", "", "```json", ds.read_text().strip(), "```", ""]
    else:
        lines += ["## No measured plan", "", "No trial produced a measurement; the trial table says why.", ""]
    base = doc.get("baseline")
    if base:
        lines += ["## Baseline", ""]
        if base.get("status") == "ok":
            m = base["measured"]
            lines += [f"{base['kind']} at batch {base['batch']}: {m['throughput_tok_s']:,.4g} tok/s, decode step "
                      f"{m['decode_step_s']:.4g} s. Best / baseline: "
                      f"**{doc.get('ratio_over_baseline', float('nan')):.2f}x** ({doc['objective']}).", ""]
        else:
            lines += [f"{base['kind']}: {base['status']} {base.get('error', base.get('why', ''))}", ""]
    sim = doc.get("simulation")
    if sim:
        lines += ["## Simulation", "",
                  f"Hidden machine's optimum: {sim['value']:,.4g} (`{sim['true_optimum_plan']}`). The study's best is "
                  f"{(sim['final_gap'] or 0) * 100:.1f}% off it (true, noise-free figures); within 3% from trial "
                  f"{sim['trials_to_within_3pct'] or 'never'}; trial 1 was {(sim['trial1_gap'] or 0) * 100:.1f}% off. "
                  f"A grid of the same lattice ({sim['grid_size']:,} points, {sim['grid_points_within_3pct']} within "
                  f"3%) needs {sim['expected_grid_trials'] or float('inf'):,.0f} trials on average in random order.",
                  "", "```json", json.dumps(sim["machine"], indent=1), "```", ""]
    lines += ["## Plots", ""] + ([no_plots, ""] if no_plots else [])
    for name, title in () if no_plots else (("throughput_vs_batch", "Throughput against batch"),
                                            ("pinned_vs_pageable", "Pinned vs pageable"),
                                            ("predicted_vs_measured", "Predicted vs measured"),
                                            ("importance", "Parameter importance"),
                                            ("pareto", "Latency / throughput Pareto front"),
                                            ("convergence", "Convergence")):
        lines += [f"### {title}", "", f"![{title}](plots/{name}.png)", ""]
    if imp:
        lines += ["Importances: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()), ""]
    lines += ["## Calibration", ""] + _calibration_rows(surrogate) + [""]
    effects = {k: v for k, v in surrogate.residual.effects().items() if abs(v) > 0.01}
    if effects:
        lines += ["Residual effects left after calibration (log measured / predicted): "
                  + ", ".join(f"{k} {v:+.2f}" for k, v in effects.items()), ""]
    lines += ["## Trials", ""] + _trial_rows(trials) + [""]
    path = study_dir / "report.md"
    atomic.write_text(path, "\n".join(lines))
    return path
