"""Run ``hpi serve``: bind the port, start the ranks (the same launch path as ``hpi run``), serve HTTP until
stopped, then stop every rank. Returns the process's exit code.

Lifecycle:
- the port (and ``--metrics-port``'s) is bound before any rank starts (a port in use is one line, exit 2,
  nothing started), then the run folder is claimed (``hpi.executor.rundir``: locked; a folder another run holds
  is one line, exit 2);
- the ranks start in a launcher thread (``hpi.executor.launch.start``), build the model, warm up and report
  ready; ``/health`` answers from the first moment, ``/ready`` and the generation routes once warm;
- SIGINT / SIGTERM: uvicorn stops accepting, in-flight requests finish for up to ``drain_s``, then rank 0
  cancels what is left and stops every rank; exit 0;
- a rank that dies (or stalls past the hang timeout): every waiting request is answered 500 with the rank's
  name and its last log lines, the server stops, the other ranks are stopped, exit 1.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass, replace

from hpi.executor.rundir import claim_run_folder
from hpi.serve.app import create_app
from hpi.serve.completions import Service
from hpi.serve.engine_client import DEAD, EngineClient

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STOP_GRACE_S = 60.0  # after the HTTP server stops: how long the ranks get to stop by themselves


@dataclass(frozen=True)
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None  # Jinja text replacing the tokenizer's own
    drain_s: float = 30.0
    max_body_bytes: int = 8 * 2**20
    metrics_port: int | None = None  # /metrics on its own listener (at ``host``) instead of the API's port
    url_file: str | None = None  # where the server's address goes once it listens (for whoever started it)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything starts; a port in use is the user's to fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"hpi serve: cannot listen on {host}:{port}: {e.strerror}: pick another --port or "
                         "--host") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def build_service(deployment, engine: EngineClient, http: HttpOptions) -> Service:
    from hpi.executor.modeling import load_hf_config
    from hpi.serve.tokens import eos_ids, load_tokenizer

    spec = deployment.spec
    config = load_hf_config(spec.model, spec.checkpoint)
    tokenizer = load_tokenizer(spec.checkpoint, config.vocab_size, http.chat_template)
    name = http.served_model_name or spec.model
    return Service(engine, tokenizer, name, spec.serve.max_model_len, eos_ids(tokenizer, config), config.vocab_size,
                   spec.serve.max_queue)


def build_metrics(deployment, service: Service):
    """The server's metrics (``hpi.serve.metrics``) with the plan's prediction where a profile gave one."""
    from hpi.serve.metrics import Metrics

    spec, est = deployment.spec, deployment.prediction
    return Metrics(service.model_name, deployment.plan.label, spec.serve.n_slots,
                   predicted_decode_step_s=est.decode_step_s if est is not None else None,
                   h2d_ceiling_bytes_s=est.placement.h2d_pinned_bytes_s if est is not None else None,
                   nvme_path=spec.nvme_path if deployment.plan.offload == "nvme" else None)


def start_metrics_listener(registry, host: str, port: int):
    """``/metrics`` on its own port (prometheus_client's threaded HTTP server); a port in use is the user's."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ValueError(f"hpi serve: cannot listen on {host}:{port} for --metrics-port: {e.strerror}: pick "
                         "another --metrics-port") from None
    return server


def serve(deployment, http: HttpOptions, *, say=None) -> int:
    """Serve ``deployment`` (mode "serve") over HTTP until stopped; the exit code."""
    import uvicorn

    say = say or (lambda text: (sys.stderr.write(text + "\n"), sys.stderr.flush()))
    sock = bind(http.host, http.port)
    engine = EngineClient(hang_timeout_s=deployment.spec.serve.hang_timeout_s)
    metrics_server = None
    try:  # both ports are ours before the run folder is claimed: a busy one is one line, exit 2, nothing written
        service = build_service(deployment, engine, http)
        if deployment.spec.serve.metrics:
            from hpi.serve.events import EventHub

            metrics = build_metrics(deployment, service)
            engine.observe(metrics, EventHub(on_drop=metrics.events_dropped.inc))
            if http.metrics_port is not None:
                metrics_server = start_metrics_listener(metrics.registry, http.host, http.metrics_port)
        deployment = claim_run_folder(deployment, prog="hpi serve")
    except BaseException:
        sock.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        raise
    spec = replace(deployment.spec, serve=replace(deployment.spec.serve, address=engine.address))
    deployment = replace(deployment, spec=spec)
    app = create_app(service, api_key=http.api_key, max_body_bytes=http.max_body_bytes,
                     metrics_here=http.metrics_port is None)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=max(int(http.drain_s), 1),
                            lifespan="off")
    server = _Server(config, engine)
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    if http.url_file is not None:  # --port 0 picks a port: whoever started us (hpi eval, a GUI) learns it here
        from hpi.atomic import write_json

        write_json(http.url_file, {"url": url, "pid": os.getpid(), "run_dir": deployment.spec.out_dir})
    cancel = threading.Event()
    stopped_by_us = threading.Event()
    engine.on_dead.append(lambda message: setattr(server, "should_exit", True))
    launcher = threading.Thread(target=_run_ranks, args=(deployment, engine, cancel, stopped_by_us, say),
                                name="hpi-launcher", daemon=True)

    engine.start()
    launcher.start()
    threading.Thread(target=_announce, args=(engine, url, service.model_name, deployment, say), daemon=True).start()
    say(f"hpi serve: {service.model_name} ({deployment.plan.label}, {spec.device}) at {url}; loading the model")
    try:
        server.run(sockets=[sock])
    finally:
        stopped_by_us.set()
        engine.stop(drain_s=0.0)
        launcher.join(STOP_GRACE_S)
        if launcher.is_alive():
            cancel.set()
            launcher.join()
        sock.close()
        if metrics_server is not None:
            metrics_server.shutdown()
    if engine.state == DEAD:
        say(f"hpi serve: failed: {engine.message}")
        return EXIT_FAILED
    say("hpi serve: stopped")
    return EXIT_OK


class _Server:
    """uvicorn's server that hands its event loop to the engine client before it starts serving, and turns
    SIGINT / SIGTERM into a graceful stop without re-raising them afterwards (uvicorn's own handler re-raises
    the signal once it has stopped, which would kill this process before it stops the ranks)."""

    def __new__(cls, config, engine: EngineClient):
        import asyncio
        import contextlib
        import signal

        import uvicorn

        class Server(uvicorn.Server):
            async def startup(self, sockets=None):
                engine.attach(asyncio.get_running_loop())
                await super().startup(sockets=sockets)

            @contextlib.contextmanager
            def capture_signals(self):
                def stop(sig, frame):  # a second Ctrl-C stops without waiting for running requests
                    self.force_exit = self.should_exit and sig == signal.SIGINT
                    self.should_exit = True

                previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        return Server(config)


def _announce(engine: EngineClient, url: str, name: str, deployment, say) -> None:
    if engine.wait_ready() and engine.state != DEAD:
        info = engine.info
        say(f"hpi serve: ready: {url}/v1 serves {name!r}: {info.get('n_slots')} slots of "
            f"{info.get('max_model_len')} tokens, {info.get('policy')} steps of up to {info.get('step_tokens')} "
            f"tokens{', CUDA-graphed decode' if info.get('graphs') else ''}")


def _run_ranks(deployment, engine: EngineClient, cancel: threading.Event, stopped_by_us: threading.Event,
               say) -> None:
    """The launcher thread: start the ranks and wait; a failure marks the engine dead (HTTP 500)."""
    from hpi.executor.launch import LaunchError, start
    from hpi.executor.serve_loop import AUTHKEY_ENV

    def relay(line: str) -> None:  # rank 0's own lines (warnings, its errors) to the server's stderr
        say(f"[rank0] {line}")

    try:
        start(deployment, stream=relay, extra_env={AUTHKEY_ENV: engine.authkey_hex}, cancel=cancel)
    except LaunchError as e:
        text = str(e).replace("\n", " | ")
        if engine.state == DEAD:  # the front saw it first (a stalled step): where the ranks were, for the log
            say(f"hpi serve: the ranks when stopped: {text}")
        elif not (stopped_by_us.is_set() and e.reason == "interrupted"):
            engine.fail(text)
        return
    except Exception as e:  # noqa: BLE001 - any launcher failure ends the server with its reason
        engine.fail(f"the launcher failed: {type(e).__name__}: {e}")
        return
    if not stopped_by_us.is_set():
        engine.fail("every rank exited while the server was running (see the rank logs)")
