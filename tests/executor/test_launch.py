"""hpi.executor.launch and ``hpi run``: real torchrun launches of a stand-in worker (fake_worker.py) on the CPU.

Each launch costs a few seconds on a 2-core machine (torchrun and each rank import torch); the file keeps to
about ten of them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from hpi.cli import checks as cli_checks
from hpi.cli import main
from hpi.executor import launch as launch_mod
from hpi.executor.diagnose import diagnose
from hpi.executor.launch import LaunchError, launch
from hpi.executor.spec import RunSpec
from hpi.planner.specs.plan import Plan
from hpi.records import DecodeSteps, RunRecord, Timings

pytest.importorskip("torch")  # torchrun

FAKE = str(Path(__file__).with_name("fake_worker.py"))
WORKER = (FAKE,)


def spec_for(tmp_path: Path, fake: str = "succeed", world: int = 2, **extra) -> RunSpec:
    return RunSpec(plan=Plan(tp=world), model="tiny-llama", device="cpu", out_dir=str(tmp_path / "run"),
                   extra={"fake": fake, **extra})


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return state != "Z" and b"fake_worker" in cmdline


def assert_nothing_left(out_dir: Path, expect_pids: int | None = None) -> None:
    """No rank of the run is alive, and this test process has no child left (torchrun or worker)."""
    pids = [int(p.read_text()) for p in sorted((out_dir / "pids").glob("rank*"))] if (out_dir / "pids").is_dir() else []
    if expect_pids is not None:
        assert len(pids) == expect_pids
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)], "a worker rank outlived launch()"
    psutil = pytest.importorskip("psutil")
    left = [c for c in psutil.Process().children(recursive=True)
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {[' '.join(c.cmdline()) for c in left]}"


# ---- launch ---------------------------------------------------------------------------------------------


def test_two_ranks_succeed_and_rank0_streams(tmp_path):
    spec = spec_for(tmp_path)
    lines: list[str] = []
    record = launch(spec, worker=WORKER, stream=lines.append, timeout_s=60)
    out = Path(spec.out_dir)
    assert isinstance(record, RunRecord) and record.world_size == 2
    assert RunRecord.from_json(json.loads((out / "record.json").read_text())) == record
    assert RunSpec.read(out / "spec.json") == spec
    assert lines[0] == "rank 0 of 2 ready (local rank 0)"  # rank 0's lines only, in order, record last
    assert json.loads(lines[-1]) == record.to_json() and not any("rank 1" in line for line in lines)
    logs = list((out / "logs" / "node0").glob("hpi_*/attempt_0/1/stdout.log"))
    assert logs and "rank 1 of 2 ready" in logs[0].read_text()  # every rank's output lands in files
    assert_nothing_left(out, expect_pids=2)


def test_a_dying_rank_is_named_with_its_exit_code_and_last_lines(tmp_path):
    spec = spec_for(tmp_path, "exit", rank=1)
    with pytest.raises(LaunchError) as info:
        launch(spec, worker=WORKER, timeout_s=60)
    e, message = info.value, str(info.value)
    assert message.splitlines()[0] == "rank 1 (node 0, local rank 1) exited with code 3"
    assert (e.rank, e.exit_code, e.out_of_memory) == (1, 3, False)
    assert "rank 1 log line 14" in message and "rank 1 log line 5" in message
    assert "rank 1 log line 4" not in message  # the last 10 lines, not the whole log
    assert "rank 1 cannot go on" in message  # its stderr too
    assert not (Path(spec.out_dir) / "record.json").exists()
    assert_nothing_left(Path(spec.out_dir), expect_pids=2)


def test_out_of_memory_is_reported_as_such_with_its_figures(tmp_path):
    spec = spec_for(tmp_path, "oom", rank=1)
    with pytest.raises(LaunchError) as info:
        launch(spec, worker=WORKER, timeout_s=60)
    first = str(info.value).splitlines()[0]
    assert first.startswith("rank 1 ") and "out of memory" in first and "Tried to allocate 2.00 GiB" in first
    assert info.value.out_of_memory and info.value.rank == 1  # not rank 0, whose barrier broke after it
    assert_nothing_left(Path(spec.out_dir))


def test_interrupt_tears_the_whole_tree_down(tmp_path):
    spec = spec_for(tmp_path, "sleep")

    def ctrl_c_when_sleeping(line: str) -> None:
        if line == "sleeping":
            time.sleep(0.3)  # let rank 1 get there too
            raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(LaunchError, match="^interrupted") as info:
        launch(spec, worker=WORKER, stream=ctrl_c_when_sleeping, timeout_s=60, grace_s=3)
    assert info.value.reason == "interrupted"
    assert time.monotonic() - started < 45
    assert_nothing_left(Path(spec.out_dir), expect_pids=2)


def test_timeout_tears_down(tmp_path):
    spec = spec_for(tmp_path, "sleep", world=1)
    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"^timed out after 5 s") as info:
        launch(spec, worker=WORKER, timeout_s=5, grace_s=2)
    assert info.value.reason == "timeout"
    assert time.monotonic() - started < 5 + 2 + 5
    assert_nothing_left(Path(spec.out_dir))


def test_localhost_two_node_rendezvous(tmp_path):
    """Two launches, nnodes=2, one rank each, meeting at one static rendezvous port: issue 3's 2-node test."""
    spec = RunSpec(plan=Plan(dp=2, batch_size=2), model="tiny-llama", device="cpu", out_dir=str(tmp_path / "run"),
                   extra={"fake": "succeed"})
    port = launch_mod.free_port()
    results: dict[int, object] = {}

    def node(k: int) -> None:
        try:
            results[k] = launch(spec, nnodes=2, node_rank=k, master_port=port, worker=WORKER, timeout_s=60)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[k] = e

    threads = [threading.Thread(target=node, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not isinstance(results[0], BaseException), results[0]
    assert not isinstance(results[1], BaseException), results[1]
    assert isinstance(results[0], RunRecord) and results[0].world_size == 2
    assert results[1] == launch_mod.NodeSummary(node_rank=1, nnodes=2, local_world_size=1, log_dir=results[1].log_dir)
    assert results[1].log_dir.endswith("node1")
    out = Path(spec.out_dir)
    # global rank 1 ran on node 1 (static rendezvous keeps the node order)
    log = next((out / "logs" / "node1").glob("hpi_*/attempt_0/0/stdout.log"))
    assert "rank 1 of 2 ready (local rank 0)" in log.read_text()
    assert_nothing_left(out, expect_pids=2)


def test_launch_refuses_uneven_or_portless_multinode(tmp_path):
    spec = spec_for(tmp_path, world=3)
    with pytest.raises(ValueError, match="nnodes"):
        launch(spec, nnodes=2, master_port=1234, worker=WORKER)
    with pytest.raises(ValueError, match="master_port"):
        launch(spec_for(tmp_path), nnodes=2, worker=WORKER)


def test_launch_env():
    cpu = launch_mod.launch_env(RunSpec(plan=Plan(), model="m", device="cpu"), base={"CUDA_VISIBLE_DEVICES": "3"})
    assert cpu["DS_ACCELERATOR"] == "cpu" and cpu["OMP_NUM_THREADS"] == "1" and cpu["CUDA_VISIBLE_DEVICES"] == "3"
    gpu = launch_mod.launch_env(RunSpec(plan=Plan(tp=2), model="m"), visible_gpus=[2, 0], base={})
    assert "DS_ACCELERATOR" not in gpu and gpu["CUDA_VISIBLE_DEVICES"] == "2,0"
    for env in (cpu, gpu):
        assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"],
                env["NVSHMEM_DISABLE_NVLS"]) == ("0", "1", "1")


def test_diagnosis_of_a_sigkill_and_of_torchrun_dying_alone(tmp_path):
    summary = """
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-22_05:03:43
  host      : localhost
  rank      : 5 (local_rank: 1)
  exitcode  : -9 (pid: 20742)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 20742
============================================================
"""
    e = diagnose(1, summary, tmp_path, node_rank=1, nproc=4)
    assert str(e).splitlines()[0] == "rank 5 (node 1, local rank 1) was killed by SIGKILL"
    assert "out-of-memory killer" in str(e) and e.exit_code == -9
    e = diagnose(1, "RuntimeError: rendezvous timed out\n", tmp_path, node_rank=0, nproc=2)
    assert "torchrun exited with code 1" in str(e) and "rendezvous timed out" in str(e)


# ---- hpi run --------------------------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_hpi_run_on_cpu_prints_the_record_as_last_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch_mod, "WORKER", WORKER)
    out_dir = tmp_path / "run"
    checkpoint = tmp_path / "ckpt"  # text prompts need a tokenizer's folder; the fake worker reads none of it
    checkpoint.mkdir()
    code, out, err = run_cli(capsys, "run", "--model", "tiny-llama", "--device", "cpu", "--dtype", "fp32",
                             "--prompt", "Hello", "--checkpoint", str(checkpoint), "--out", str(out_dir), "--json",
                             "--timeout", "60")
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert record["kind"] == "hpi.RunRecord" and record["spec"]["prompts"] == ["Hello"] and record["device"] == "cpu"
    spec = RunSpec.read(out_dir / "spec.json")
    assert spec.prompts == ("Hello",) and spec.dtype == "fp32" and spec.mode == "benchmark"
    ds = json.loads((out_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is False
    assert "rank 0 of 1 ready" in err  # rank 0's progress goes to stderr; stdout holds the record only
    assert_nothing_left(out_dir)


def test_hpi_run_failure_is_one_message_and_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch_mod, "WORKER", WORKER)
    monkeypatch.setenv("HPI_FAKE_WORKER", "exit")
    monkeypatch.setenv("HPI_FAKE_RANK", "0")
    code, out, err = run_cli(capsys, "run", "--model", "tiny-llama", "--device", "cpu", "--out", str(tmp_path / "r"),
                             "--timeout", "60")
    assert code == 1
    assert "\nhpi run: failed: rank 0 (node 0, local rank 0) exited with code 3\n" in err
    assert "Traceback" not in err and "rank 0 log line 14" in err
    assert_nothing_left(tmp_path / "r")


def test_hpi_run_refuses_an_infeasible_plan_unless_forced(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_launch(spec, **kw):
        calls.append((spec, kw))
        return RunRecord(timings=Timings(decode_step_s=DecodeSteps(1.0, 1.0, 1.0)))

    monkeypatch.setattr(launch_mod, "launch", fake_launch)
    monkeypatch.setattr(cli_checks, "cuda_available", lambda who: None)  # the launch is faked: it needs no GPU
    argv = ["run", "--model", "llama-3-70b", "--hardware", "a6000-workstation", "--out", str(tmp_path / "r")]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and not calls
    assert len(err.strip().splitlines()) == 1
    assert "infeasible on a6000-workstation" in err and "GPU memory" in err and "--force" in err

    code, out, err = run_cli(capsys, *argv, "--force")
    assert code == 0 and len(calls) == 1
    spec, kw = calls[0]
    assert spec.extra["predicted"]["feasible"] is False and spec.hardware == "a6000-workstation"
    assert "decode step: 1 s (predicted" in out


def test_hpi_run_feasible_plan_passes_the_prediction_and_placement(tmp_path, capsys, monkeypatch):
    calls = []
    record = RunRecord(world_size=1)
    monkeypatch.setattr(launch_mod, "launch", lambda spec, **kw: calls.append((spec, kw)) or record)
    monkeypatch.setattr(cli_checks, "cuda_available", lambda who: None)  # the launch is faked: it needs no GPU
    code, out, err = run_cli(capsys, "run", "--model", "llama-3-70b", "--hardware", "a6000-workstation", "--offload",
                             "cpu", "--quant-bits", "4", "--out", str(tmp_path / "r"), "--json")
    assert code == 0, err
    spec, kw = calls[0]
    assert spec.plan.offload == "cpu" and spec.plan.weight_bits == 4 and spec.extra["predicted"]["feasible"]
    assert kw["nproc_per_node"] == 1 and kw["visible_gpus"] is None
    assert json.loads(out.strip().splitlines()[-1]) == record.to_json()
    ds = json.loads((tmp_path / "r" / "ds_config.json").read_text())
    assert ds["weight_quantization"]["quantized_initialization"]["num_bits"] == 4


@pytest.mark.parametrize("extra,needle", [
    (["--offload", "nvme"], "--nvme-path"),
    (["--chat"], "--chat needs a prompt"),
    (["--checkpoint", "/nonexistent/ckpt"], "no such directory"),
    (["--prompts", "/nonexistent/prompts.txt"], "cannot read prompts"),
    (["--temperature", "-1"], "temperature"),
])
def test_hpi_run_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: pytest.fail("must not launch"))
    code, out, err = run_cli(capsys, "run", "--model", "tiny-llama", "--device", "cpu", "--out", str(tmp_path / "r"),
                             *extra)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_hpi_run_summary_reads_the_worker_record_shape(tmp_path, capsys, monkeypatch):
    record = {"kind": "hpi.RunRecord", "decode_step_s": {"median": 0.5, "p90": 0.6}, "ttft_s": 2.0,
              "predicted": {"decode_step_s": 0.25, "ttft_s": 1.0},
              "h2d": {"achieved_bytes_s": 33e9, "profile_pinned_bytes_s": 53.6e9}}
    monkeypatch.setattr(launch_mod, "launch", lambda spec, **kw: RunRecord.from_json(record))
    code, out, err = run_cli(capsys, "run", "--model", "tiny-llama", "--device", "cpu", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "decode step: 0.5 s (predicted 0.25 s, measured/predicted 2.00)" in out
    assert "time to first token: 2 s (predicted 1 s" in out
    assert "host->device: 33.00 GB/s of 53.6 GB/s pinned (62%)" in out
