"""The Grafana dashboard (deploy/grafana/hpi-dashboard.json) asks only for metrics hpi serve exports: every PromQL
expression in it is read down to the metric names it selects, and each must be a family in
``hpi.serve.metrics.EXPORTED`` (a histogram through its ``_bucket``/``_sum``/``_count`` series, a summary through
``_sum``/``_count``), and every exported family is on the dashboard. A panel naming an unknown metric fails the
check (the negative cases below); promtool, where installed, parses every expression."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "hpi-dashboard.json"

pytest.importorskip("prometheus_client")
from hpi.serve.metrics import EXPORTED, HISTOGRAMS, Metrics  # noqa: E402

# The series PromQL reads of a histogram and of a summary (hpi_collective_seconds has no quantiles: sum and count).
SERIES_OF_KIND = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
# Each family that is read through its series, by kind, from a fresh server's registry (the rank families that
# appear only after steps are gauges and counters, read by their own names).
SERIES = {f.name: SERIES_OF_KIND[f.type] for f in Metrics("m", "p", 1).registry.collect() if f.type in SERIES_OF_KIND}

# Grafana's variables, and what they stand for when an expression is checked outside Grafana.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*", "$plan": ".*"}
# PromQL's operator and modifier words: never metric names.
KEYWORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                      "offset", "inf", "nan"})


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel, rows' nested panels and variables included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [(inner["title"], t["expr"]) for t in inner.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)  # Grafana's function around a selector
            found.append((f"variable {var['name']}", m.group(1) if m else query))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers, ranges, grouping
    clauses, numbers, function calls, keywords and Grafana variables are taken out."""
    if "__name__" in expr:
        raise ValueError(f"{expr!r} selects by __name__: name the metric so this check can see it")
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    text = re.sub(r"(?<![\w:])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|0x[0-9a-fA-F]+", " ", text)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][\w:]*", text):
        called = re.match(r"\s*\(", text[m.end():])
        if not called and m.group(0).lower() not in KEYWORDS:
            names.add(m.group(0))
    return names


def unknown(expr: str, exported: frozenset[str] = EXPORTED) -> set[str]:
    """Names in ``expr`` that are neither an exported family nor a series of an exported histogram or summary."""
    def known(name: str) -> bool:
        if name in exported:
            return name not in SERIES  # a histogram or summary is only ever queried through its series
        stem, suffix = name[: name.rfind("_")], name[name.rfind("_"):]
        return stem in exported and suffix in SERIES.get(stem, ())
    return {name for name in metric_names(expr) if not known(name)}


def test_the_kinds_come_from_the_server():
    assert {name for name, series in SERIES.items() if "_bucket" in series} == set(HISTOGRAMS)
    assert {name for name, series in SERIES.items() if "_bucket" not in series} == {"hpi_collective_seconds"}
    assert set(SERIES) <= EXPORTED


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_every_query_names_only_exported_metrics(dashboard):
    found = expressions(dashboard)
    assert len(found) >= 20
    bad = {f"{title}: {expr}": sorted(unknown(expr)) for title, expr in found if unknown(expr)}
    assert not bad, f"dashboard queries name metrics hpi serve does not export: {bad}"
    assert all(metric_names(expr) for _, expr in found), "a query that selects no metric shows nothing"


def test_the_dashboard_shows_every_metric_the_server_exports(dashboard):
    shown = set().union(*(metric_names(expr) for _, expr in expressions(dashboard)))
    families = {n[: n.rfind("_")] if n[: n.rfind("_")] in SERIES else n for n in shown}
    assert families == EXPORTED, f"not on the dashboard: {sorted(EXPORTED - families)}"


def test_the_panels_the_issue_names_are_there(dashboard):
    titles = {p["title"]: p for p in dashboard["panels"]}
    for title in ("Time to first token", "Inter-token latency", "End-to-end request latency", "Throughput",
                  "Requests running and waiting", "KV-cache slots used", "Collective time by op and group",
                  "Pipeline bubble", "NVMe queue depth and read rate", "Host-to-device bandwidth",
                  "Decode step: predicted vs measured"):
        assert title in titles, title
    for title in ("Time to first token", "Inter-token latency", "End-to-end request latency"):
        exprs = [t["expr"] for t in titles[title]["targets"]]
        assert [e.split(",")[0] for e in exprs] == ["histogram_quantile(0.5", "histogram_quantile(0.99"], exprs
    step = set().union(*(metric_names(t["expr"]) for t in titles["Decode step: predicted vs measured"]["targets"]))
    assert step == {"hpi_predicted_decode_step_seconds", "hpi_decode_step_seconds_bucket",  # model and reality
                    "hpi_decode_step_seconds_sum", "hpi_decode_step_seconds_count"}


def test_no_two_panels_overlap_on_the_grid(dashboard):
    cells = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_every_panel_is_wired_to_the_datasource_variable(dashboard):
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for t in panel["targets"]:
            assert '{model=~"$model", plan=~"$plan"}' in t["expr"], (panel["title"], t["expr"])


@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.99, sum by (le) (rate(hpi_ttft_seconds_bucket{model=~"$model"}[$__rate_interval])))',
     {"hpi_ttft_seconds_bucket"}),  # a misspelt histogram
    ("sum(rate(hpi_prompt_tokens[5m]))", {"hpi_prompt_tokens"}),  # a counter without its _total
    ("hpi_requests_running_count", {"hpi_requests_running_count"}),  # a gauge has no _count series
    ("hpi_decode_step_seconds", {"hpi_decode_step_seconds"}),  # a histogram by its bare family name
    ("rate(hpi_requests_total_sum[1m])", {"hpi_requests_total_sum"}),  # histogram series of a counter
    ("sum(rate(hpi_collective_seconds_bucket[1m]))", {"hpi_collective_seconds_bucket"}),  # a summary has no buckets
    ('vllm:num_requests_running{model_name="x"}', {"vllm:num_requests_running"}),  # another server's metric
    ("sum(hpi_requests_waiting) / on (model) group_left hpi_nope_ratio offset 5m", {"hpi_nope_ratio"}),
])
def test_an_unknown_metric_in_a_query_is_caught(expr, names):
    assert unknown(expr) == names


@pytest.mark.parametrize("expr, names", [
    ('sum by (op, group) (rate(hpi_collective_seconds_sum{op="all_reduce", group=~"tp|pp"}[1m]))',
     {"hpi_collective_seconds_sum"}),
    ("max(hpi_nvme_queue_depth) > bool 0.5e1 and on (model) hpi_h2d_bandwidth_ratio",
     {"hpi_nvme_queue_depth", "hpi_h2d_bandwidth_ratio"}),
    ('label_replace(hpi_requests_running, "by", "$1", "model", "(.*)")', {"hpi_requests_running"}),
])
def test_names_are_read_through_promql_syntax(expr, names):
    assert metric_names(expr) == names and not unknown(expr)


def test_selecting_by_name_is_refused():
    with pytest.raises(ValueError, match="__name__"):
        metric_names('{__name__=~"hpi_.*"}')


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus; scripts/dev-setup.sh installs it as root)")
    return found


def test_promtool_parses_every_query(dashboard, tmp_path):
    rules = []
    for i, (_, expr) in enumerate(expressions(dashboard)):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"hpi:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    done = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_the_scrape_config_example_is_valid():
    config = DASHBOARD.parents[1] / "prometheus" / "prometheus.yml"
    done = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
