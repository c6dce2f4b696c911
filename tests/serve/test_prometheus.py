"""A real Prometheus server (Debian's ``prometheus`` binary, on localhost with a temp config and storage) scrapes
what hpi exports, and its HTTP API answers for it. First a bare prometheus_client endpoint (the fixture's own
check), then ``hpi serve`` on the CPU with TP 2 on gloo while requests run."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

SCRAPE_INTERVAL_S = 1
READY_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Prometheus:
    proc: subprocess.Popen
    url: str
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query: its vector, each item {"metric": labels, "value": [time, "number"]}."""
        return self.api("query", query=promql)["result"]

    def wait_for(self, promql: str, done, timeout: float = 60.0) -> list[dict]:
        """Query until ``done(result)`` holds (scrapes land every SCRAPE_INTERVAL_S); the last result either way."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if done(result) or time.monotonic() > deadline:
                return result
            time.sleep(SCRAPE_INTERVAL_S / 2)

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def prometheus_binary() -> str:
    """The prometheus binary's path; the test skips, saying why, where it is not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus; scripts/dev-setup.sh "
                    "installs it as root)")
    return binary


def start_prometheus(tmp_path: Path, targets: list[str], attempts: int = 3) -> Prometheus:
    """Prometheus on a free localhost port scraping ``targets`` ("host:port", path /metrics) every second."""
    binary = prometheus_binary()
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "scrape_configs": [{"job_name": "hpi", "metrics_path": "/metrics", "scrape_timeout": "1s",
                            "static_configs": [{"targets": targets}]}]}))
    for attempt in range(attempts):  # the free port can be taken between the probe and Prometheus binding it
        port, log_path = free_port(), tmp_path / f"prometheus-{attempt}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                     f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                    stdout=log, stderr=subprocess.STDOUT)
        server = Prometheus(proc, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(server.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return server
            except OSError:
                time.sleep(0.2)
        server.stop()
        if "address already in use" not in server.log:
            break
    raise RuntimeError(f"prometheus did not become ready:\n{server.log}")


@pytest.fixture
def prometheus(tmp_path):
    """``prometheus(targets)`` starts one; every one started is stopped at teardown (and checked to be gone)."""
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        started.append(start_prometheus(tmp_path / f"prometheus-{len(started)}", targets))
        return started[-1]

    yield start
    for server in started:
        server.stop()
        assert server.proc.returncode is not None


def test_the_fixture_scrapes_a_prometheus_client_endpoint(prometheus):
    registry = prometheus_client.CollectorRegistry()
    ttft = prometheus_client.Histogram("hpi_time_to_first_token_seconds", "test", ["model"], registry=registry,
                                       buckets=(0.1, 1.0))
    for seconds in (0.05, 0.5, 2.0):
        ttft.labels(model="m").observe(seconds)
    http, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        prom = prometheus([f"127.0.0.1:{http.server_port}"])
        result = prom.wait_for('hpi_time_to_first_token_seconds_count{model="m"}', lambda r: bool(r))
        assert [float(x["value"][1]) for x in result] == [3.0], prom.log
        ttft.labels(model="m").observe(0.2)  # a later scrape sees the new count
        result = prom.wait_for("hpi_time_to_first_token_seconds_count", lambda r: r and r[0]["value"][1] == "4")
        assert [float(x["value"][1]) for x in result] == [4.0]
        series = prom.query("hpi_time_to_first_token_seconds_bucket")
        buckets = {x["metric"]["le"]: float(x["value"][1]) for x in series}
        assert buckets == {"0.1": 1.0, "1.0": 3.0, "+Inf": 4.0}
        assert [t["health"] for t in prom.targets()] == ["up"]
    finally:
        http.shutdown()
        thread.join(10)
    assert prom.wait_for("up", lambda r: r and r[0]["value"][1] == "0", timeout=10)[0]["value"][1] == "0"



DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "hpi-dashboard.json"
REQUEST_TOKENS = 8


@pytest.fixture(scope="module")
def served(sv, tmp_path_factory):
    """hpi serve, TP 2 on gloo, random tiny-llama weights; --hardware gives it a prediction and a pinned ceiling."""
    prometheus_binary()  # skip before starting a server nothing will scrape
    s = sv.start_server(tmp_path_factory.mktemp("metrics-tp2"), "--model", "tiny-llama", "--tp", "2", "--max-batch",
                        "2", "--max-model-len", "64", "--served-model-name", "tiny", "--hardware", "h200-2gpu")
    yield s
    assert s.stop() == 0, s.log
    assert not s.workers()


@pytest.fixture(scope="module")
def scraped(served, tmp_path_factory):
    """A Prometheus that scraped ``served`` while requests ran: requests go out two at a time until Prometheus has
    seen one running (so a scrape landed mid-request), then the totals settle. Yields (prometheus, requests sent)."""
    prom = start_prometheus(tmp_path_factory.mktemp("prometheus"), [served.url.removeprefix("http://")])
    client, sent, stop = served.openai(), [], threading.Event()

    def send(i: int) -> None:
        while not stop.is_set():
            client.completions.create(model="tiny", prompt=f"w{i + 3} w{len(sent) + 10}", max_tokens=REQUEST_TOKENS,
                                      temperature=0, extra_body={"ignore_eos": True})
            sent.append(i)

    try:
        senders = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in senders:
            t.start()
        seen = prom.wait_for("max_over_time(hpi_requests_running[5m]) > 0", bool, timeout=120)
        stop.set()
        for t in senders:
            t.join(120)
        assert seen, f"Prometheus never saw a request running:\n{prom.log}"
        yield prom, len(sent)
    finally:
        stop.set()
        prom.stop()


def value(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def settled(prom: Prometheus, promql: str, expected: float) -> float:
    return value(prom.wait_for(promql, lambda r: len(r) == 1 and float(r[0]["value"][1]) == expected))


def test_prometheus_scrapes_request_metrics_from_hpi_serve(scraped):
    prom, n = scraped
    assert n >= 1
    assert settled(prom, "sum(hpi_time_to_first_token_seconds_count)", n) == n
    assert settled(prom, "sum(hpi_e2e_request_latency_seconds_count)", n) == n
    assert settled(prom, "sum(hpi_generation_tokens_total)", n * REQUEST_TOKENS) == n * REQUEST_TOKENS
    assert settled(prom, "sum(hpi_prompt_tokens_total)", 2 * n) == 2 * n
    assert settled(prom, 'sum(hpi_requests_total{finished_reason="length"})', n) == n
    labels = prom.query("hpi_time_to_first_token_seconds_count")[0]["metric"]
    assert labels["model"] == "tiny" and labels["job"] == "hpi"


def test_prometheus_sees_the_tp_all_reduce_on_each_rank(scraped):
    prom, _ = scraped
    result = prom.query("sum by (tp_rank) (hpi_collective_seconds_count{group=\"tp\"})")
    counts = {r["metric"]["tp_rank"]: float(r["value"][1]) for r in result}
    assert set(counts) == {"0", "1"} and all(c > 0 for c in counts.values()), counts


def test_every_dashboard_query_evaluates_against_the_scraped_server(scraped):
    prom, _ = scraped
    dashboard = json.loads(DASHBOARD.read_text())
    answered, empty = 0, set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$model", ".*").replace("$plan", ".*")
            answered += 1  # an expression Prometheus refuses raises in Prometheus.api
            if not prom.query(expr):
                empty.add((panel["title"], target["legendFormat"]))
    assert answered >= 20
    # A TP 2 plan without NVMe offload: only the NVMe drive's series cannot apply to it.
    assert empty == {("NVMe queue depth and read rate", "queue depth"), ("NVMe queue depth and read rate", "read B/s")}
