"""``hpi serve``'s ``/metrics`` and ``/v1/events`` on a real server (CPU, TP 2 on gloo, a profile for the
prediction): counts and sums match what the requests did, each TP rank's all-reduces are counted, the events
stream while a request runs; ``--metrics-port`` moves ``/metrics`` and ``--no-metrics`` removes both routes."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")
httpx = pytest.importorskip("httpx2")

KEY = "metrics-key"
TINY_LAYERS = 4  # tiny-llama's decoder layers: two row-parallel all-reduces each per step (o_proj, down_proj)


@pytest.fixture(scope="module")
def server(sv, serve_checkpoint, tmp_path_factory):
    s = sv.start_server(tmp_path_factory.mktemp("metrics"), "--checkpoint", str(serve_checkpoint), "--tp", "2",
                        "--max-batch", "2", "--max-model-len", "64", "--hardware", "h200-2gpu", api_key=KEY)
    yield s
    assert s.stop() == 0, s.log
    assert not s.workers()


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """Every sample of ``url``'s exposition: name -> {sorted label items: value}."""
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, r.text
    out: dict[str, dict[tuple, float]] = {}
    for family in parser.text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def families(url: str) -> set[str]:
    """The families of ``url``'s exposition by the names PromQL uses (counters with ``_total``)."""
    text = httpx.get(url, timeout=30).text
    return {f.name + "_total" if f.type == "counter" else f.name for f in parser.text_string_to_metric_families(text)}


def one(samples: dict[str, dict[tuple, float]], name: str, **labels) -> float:
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    hits = [v for k, v in samples.get(name, {}).items() if set(labels.items()) <= set(k)]
    assert len(hits) == 1, (name, labels, sorted(samples))
    return hits[0]


def test_counts_and_sums_match_what_the_requests_did(server):
    before = scrape(server.url + "/metrics")
    client = server.openai()
    a = client.completions.create(model=server.model, prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=server.model, prompt=[8, 9, 10, 11, 12], max_tokens=3,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    b = chunks[-1].usage
    after = scrape(server.url + "/metrics")

    def delta(name: str, **labels) -> float:
        return one(after, name, **labels) - (one(before, name, **labels) if name in before else 0.0)

    assert (a.usage.prompt_tokens, b.prompt_tokens, a.usage.completion_tokens, b.completion_tokens) == (3, 5, 4, 3)
    assert delta("hpi_prompt_tokens_total") == 8
    assert delta("hpi_generation_tokens_total") == 7
    assert delta("hpi_requests_total", finished_reason="length") == 2
    assert delta("hpi_requests_total", finished_reason="stop") == 0
    assert delta("hpi_time_to_first_token_seconds_count") == 2
    assert delta("hpi_inter_token_latency_seconds_count") == 7 - 2  # one gap per token after the first
    assert delta("hpi_e2e_request_latency_seconds_count") == 2
    assert delta("hpi_request_queue_time_seconds_count") == 2
    assert delta("hpi_e2e_request_latency_seconds_sum") >= delta("hpi_time_to_first_token_seconds_sum") > 0
    # one request at a time: a prefill step each, then one decode step per token after the first
    assert delta("hpi_prefill_seconds_count") == 2 and delta("hpi_decode_step_seconds_count") == 7 - 2
    assert one(after, "hpi_requests_running") == 0 and one(after, "hpi_requests_waiting") == 0
    assert one(after, "hpi_kv_slots_used_ratio") == 0.0
    assert one(after, "hpi_time_to_first_token_seconds_bucket", le="2560.0") == one(
        after, "hpi_time_to_first_token_seconds_count")  # vLLM's largest TTFT bucket holds every request


def test_tp2_counts_each_ranks_all_reduces_and_exports_every_family_that_applies(server, tmp_path):
    from hpi.serve.metrics import EXPORTED

    server.openai().completions.create(model=server.model, prompt=[3, 4], max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 30
    while True:  # the ranks publish their totals about once a second (an idle beat carries the last ones)
        s = scrape(server.url + "/metrics")
        steps = one(s, "hpi_prefill_seconds_count") + one(s, "hpi_decode_step_seconds_count")
        counts = [sum(v for k, v in s.get("hpi_collective_seconds_count", {}).items()
                      if {("op", op), ("tp_rank", r)} <= set(k)) for op in ("all_reduce", "all_gather") for r in "01"]
        settled = counts == [2 * TINY_LAYERS * steps] * 2 + [steps] * 2 and "hpi_pipeline_bubble_ratio" in s
        if settled or time.monotonic() > deadline:  # the bubble needs two reads with steps between them
            break
        time.sleep(0.5)
    assert counts == [2 * TINY_LAYERS * steps] * 2 + [steps] * 2  # every eager step's collectives, on each rank
    assert all(one(s, "hpi_collective_seconds_sum", op="all_reduce", tp_rank=r) > 0 for r in ("0", "1"))
    assert 0.0 <= one(s, "hpi_pipeline_bubble_ratio") <= 1.0
    assert one(s, "hpi_h2d_bytes_total") == 0 and one(s, "hpi_h2d_bandwidth_ratio") == 0  # a resident plan
    predicted = json.loads((server.out_dir / "spec.json").read_text())["extra"]["predicted"]["decode_step_s"]
    assert one(s, "hpi_predicted_decode_step_seconds") == pytest.approx(predicted)
    exposed = families(server.url + "/metrics")
    assert exposed <= EXPORTED
    assert EXPORTED - exposed == {"hpi_nvme_queue_depth", "hpi_nvme_read_bytes_total"}  # no NVMe offload


def test_metrics_are_open_and_events_need_the_key(server):
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 200
    assert httpx.get(server.url + "/v1/events", timeout=30).status_code == 401


def test_events_stream_one_per_step_while_a_request_runs(server):
    events: list[dict] = []
    opened = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", server.url + "/v1/events", headers=server.headers, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            opened.set()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: "):]))
                if len(events) >= 4:
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert opened.wait(30)
    time.sleep(0.3)  # the subscription is registered once the response started
    server.openai().completions.create(model=server.model, prompt=[21, 22, 23], max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    t.join(30)
    assert [e["kind"] for e in events] == ["prefill", "decode", "decode", "decode"]
    assert [e["tokens"] for e in events] == [3, 1, 1, 1]
    assert [e["active_slots"] for e in events] == [1, 1, 1, 0]  # the last step finished the request
    assert all(e["step_s"] > 0 for e in events) and events[1]["step"] == events[0]["step"] + 1
    assert set(events[-1]["stage_busy_s_total"]) == {"0"}
    assert events[-1]["collective_s_total"]["all_reduce/tp"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_port_moves_metrics_and_no_metrics_removes_them(sv, serve_checkpoint, tmp_path):
    port = _free_port()
    s = sv.start_server(tmp_path / "elsewhere", "--checkpoint", str(serve_checkpoint), "--max-batch", "1",
                        "--max-model-len", "32", "--metrics-port", str(port))
    try:
        assert s.get("/metrics").status_code == 404
        exposed = families(f"http://127.0.0.1:{port}/metrics")
        assert "hpi_time_to_first_token_seconds" in exposed
        assert "hpi_predicted_decode_step_seconds" not in exposed  # no --hardware: no prediction
        assert "hpi_h2d_bandwidth_ratio" not in exposed
    finally:
        assert s.stop() == 0, s.log
    off = sv.start_server(tmp_path / "off", "--checkpoint", str(serve_checkpoint), "--max-batch", "1",
                          "--max-model-len", "32", "--no-metrics")
    try:
        assert off.post("/v1/completions", {"model": off.model, "prompt": "w1", "max_tokens": 2}).status_code == 200
        assert off.get("/metrics").status_code == 404 and off.get("/v1/events").status_code == 404
    finally:
        assert off.stop() == 0, off.log
