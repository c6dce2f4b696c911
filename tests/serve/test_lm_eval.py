"""lm-evaluation-harness against a real ``hpi serve`` (CPU, fp32) on the offline tasks the repository keeps:
the ``hpi`` model (hpi.evaluation.lm) and lm-eval's own ``local-completions`` client, unchanged, both give lm-eval's
``hf`` model's scores on the same checkpoint, request by request (hpi.evaluation.parity)."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("lm_eval")

from hpi.evaluation.offline_tasks import TASK_NAMES, TASKS_DIR  # noqa: E402
from hpi.evaluation.parity import LOGLIKELIHOOD_TOLERANCE, compare  # noqa: E402

LIMIT = 20  # items per task: 80 choice requests, 20 rolling documents, 20 generations
MAX_MODEL_LEN = 256  # longer than every item (the longest counting run is ~65 words)


def evaluate(model: str, model_args: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASK_NAMES), limit=LIMIT,
                                   batch_size=8, task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                   log_samples=True, device="cpu")


@pytest.fixture(scope="module")
def eval_server(tmp_path_factory, task_checkpoint, sv):
    server = sv.start_server(tmp_path_factory.mktemp("eval-serve"), "--checkpoint", str(task_checkpoint),
                             "--max-model-len", str(MAX_MODEL_LEN))
    yield server
    assert server.stop() == 0, server.log


@pytest.fixture(scope="module")
def hf_results(task_checkpoint):
    return evaluate("hf", f"pretrained={task_checkpoint},dtype=float32")


def assert_parity(results: dict, reference: dict) -> None:
    """Scores, every request's log-likelihood and every decision (argmax, greedy flag, generated text) agree."""
    parity = compare(results, reference)
    assert parity.ok, parity.failures()
    assert {r.task for r in parity.requests} == set(TASK_NAMES)
    by_task = {r.task: r for r in parity.requests}
    # every scored request was compared and agrees to fp32 rounding; every decision is the same
    assert len(by_task["hpi_arith_mc"].loglikelihood_deltas) == 4 * LIMIT
    assert len(by_task["hpi_count_ppl"].loglikelihood_deltas) == LIMIT
    assert by_task["hpi_arith_gen"].decisions == LIMIT
    for r in parity.requests:
        assert r.max_delta <= LOGLIKELIHOOD_TOLERANCE and r.agreement == 1.0, r
    assert all(s.delta == pytest.approx(0.0, abs=1e-6 * max(1.0, abs(s.reference))) for s in parity.scores)


def test_the_hpi_model_scores_the_offline_tasks_as_hf_does(eval_server, hf_results, task_checkpoint):
    import hpi.evaluation.lm  # noqa: F401 - registers "hpi" with lm-eval

    results = evaluate("hpi", f"url={eval_server.url},tokenizer={task_checkpoint},max_length={MAX_MODEL_LEN}")
    assert_parity(results, hf_results)
    generated = [s["resps"][0][0] for s in results["samples"]["hpi_arith_gen"]]
    assert all(generated), "every generation returned text"


def test_lm_evals_local_completions_works_against_hpi_serve_unchanged(eval_server, hf_results, task_checkpoint):
    results = evaluate("local-completions",
                       f"base_url={eval_server.url}/v1/completions,model={eval_server.model},"
                       f"tokenizer_backend=huggingface,tokenizer={task_checkpoint},max_length={MAX_MODEL_LEN}")
    # local-completions reads the server's text: the continuation as decoded after the prompt, which with a
    # word-level tokenizer starts with the space between them; hf decodes the new tokens alone. The tokens are
    # the same: exactly one leading space apart. The task's regex filter sees the same number either way.
    texts = [s["resps"][0][0] for s in results["samples"]["hpi_arith_gen"]]
    hf_texts = [s["resps"][0][0] for s in hf_results["samples"]["hpi_arith_gen"]]
    assert texts == [" " + t for t in hf_texts]
    for sample in results["samples"]["hpi_arith_gen"]:
        sample["resps"] = [[r[0][1:]] for r in sample["resps"]]
    assert_parity(results, hf_results)


def test_hpi_eval_keeps_results_a_launch_descriptor_and_parity(eval_server, task_checkpoint, tmp_path, capsys):
    import lm_eval

    from hpi.cli.app import main
    from hpi.evaluation.job import checkpoint_fingerprint

    history = tmp_path / "evals"
    assert main(["eval", "--url", eval_server.url, "--checkpoint", str(task_checkpoint), "--tasks",
                 ",".join(TASK_NAMES), "--limit", "5", "--batch-size", "4", "--max-length", str(MAX_MODEL_LEN),
                 "--serve-dir", str(eval_server.out_dir), "--reference", "hf", "--out", str(history)]) == 0
    (entry,) = history.iterdir()
    results = json.loads((entry / "results.json").read_text())
    assert set(results["results"]) == set(TASK_NAMES) and "samples" not in results
    launch = json.loads((entry / "launch.json").read_text())
    assert launch["checkpoint_fingerprint"] == checkpoint_fingerprint(task_checkpoint)
    assert launch["serve_spec"]["plan"]["tp"] == 1 and launch["server"]["max_model_len"] == MAX_MODEL_LEN
    assert launch["software"]["lm_eval"] == lm_eval.__version__ and launch["job"]["limit"] == 5
    parity = json.loads((entry / "parity.json").read_text())
    assert parity["ok"] and parity["failures"] == []
    assert all(r["agreement"] == 1.0 and r["max_loglikelihood_delta"] <= LOGLIKELIHOOD_TOLERANCE
               for r in parity["requests"])
    capsys.readouterr()
    assert main(["eval", "--history", "--out", str(history)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 1 and listed[0].startswith(entry.name) and listed[0].endswith("parity ok")


def test_hpi_eval_exits_1_when_the_reference_is_another_model(eval_server, task_checkpoint, tmp_path, capsys):
    """The same tokenizer over other weights (seed 1): the reference disagrees and the job says so."""
    import torch

    from hpi.cli.app import main
    from hpi.evaluation.offline_tasks import task_tokenizer
    from hpi.executor.modeling import load_hf_config
    from hpi.executor.weights import save_checkpoint

    config = load_hf_config("tiny-llama")
    other = save_checkpoint(config, seed=1, out_dir=tmp_path / "other", dtype=torch.float32)
    task_tokenizer(config.vocab_size).save_pretrained(other)
    history = tmp_path / "evals"
    assert main(["eval", "--url", eval_server.url, "--checkpoint", str(other), "--tasks", "hpi_arith_mc",
                 "--limit", "5", "--max-length", str(MAX_MODEL_LEN), "--reference", "hf", "--out", str(history)]) == 1
    assert "hpi eval: parity off: hpi_arith_mc: |log-likelihood delta| = " in capsys.readouterr().err
    (entry,) = history.iterdir()
    assert json.loads((entry / "parity.json").read_text())["ok"] is False


def test_hpi_eval_progress_json_is_one_line_per_update_then_the_entry(eval_server, task_checkpoint, tmp_path, capsys):
    from hpi.cli.app import main

    assert main(["eval", "--url", eval_server.url, "--checkpoint", str(task_checkpoint), "--tasks",
                 "hpi_arith_mc,hpi_arith_gen", "--limit", "3", "--batch-size", "4", "--max-length",
                 str(MAX_MODEL_LEN), "--progress-json", "--out", str(tmp_path / "evals")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    progress = [(d["request_type"], d["done"], d["total"]) for d in lines[:-1]]
    assert progress == [("loglikelihood", 4, 12), ("loglikelihood", 8, 12), ("loglikelihood", 12, 12),
                        ("generate_until", 3, 3)]  # the three generations share their arguments: one batch
    assert all(d["event"] == "progress" for d in lines[:-1])
    (entry,) = (tmp_path / "evals").iterdir()
    assert lines[-1] == {"event": "done", "entry": str(entry), "parity_ok": None}


LAYOUTS = {  # the layouts tests/serve/test_parity.py serves; hpi eval starts hpi serve with each
    "plain": (),
    "zero3-cpu-offload": ("--offload", "cpu"),
    "tp2": ("--tp", "2"),
    "pp2": ("--pp", "2"),
    "tp2-pp2-zero3": ("--tp", "2", "--pp", "2", "--offload", "cpu"),
}
CPU_FP32 = ("--device", "cpu", "--dtype", "fp32")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hpi_eval_starts_the_runtime_and_passes_parity_in_every_layout(layout, task_checkpoint, tmp_path, capsys):
    """No --url: hpi eval starts hpi serve with the plan's flags in its history entry, scores, stops it, then runs
    the reference in the server's precision (fp32 on the CPU here); nothing is left running."""
    import psutil

    from hpi.cli.app import main

    code = main(["eval", "--checkpoint", str(task_checkpoint), *CPU_FP32, *LAYOUTS[layout], "--tasks",
                 ",".join(TASK_NAMES), "--limit", "5", "--max-length", str(MAX_MODEL_LEN), "--reference", "hf",
                 "--log-samples", "--out", str(tmp_path / "evals")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "the runtime was ready in" in captured.err
    (entry,) = (tmp_path / "evals").iterdir()
    parity = json.loads((entry / "parity.json").read_text())
    assert parity["ok"] and all(r["agreement"] == 1.0 for r in parity["requests"])
    launch = json.loads((entry / "launch.json").read_text())
    plan = launch["serve_spec"]["plan"]
    flags = dict(zip(LAYOUTS[layout][::2], LAYOUTS[layout][1::2]))
    assert (plan["tp"], plan["pp"], plan["offload"]) == (int(flags.get("--tp", 1)), int(flags.get("--pp", 1)),
                                                          flags.get("--offload", "none"))
    assert launch["serve_spec"]["serve"]["max_model_len"] == MAX_MODEL_LEN and launch["server"]["dtype"] == "float32"
    layout_doc = launch["deployment"]
    assert layout_doc["world_size"] == plan["tp"] * plan["pp"] and layout_doc["zero3"] == (plan["offload"] == "cpu")
    ds = layout_doc["deepspeed_config"]  # the config the ranks were given, where ZeRO-3 runs
    assert ds is None if plan["offload"] == "none" else (
        ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu")
    assert (launch["job"]["reference_dtype"], launch["job"]["reference_device"]) == ("float32", "cpu")
    assert "api_key" not in launch["job"]
    samples = json.loads((entry / "samples.json").read_text())
    assert {task: len(docs) for task, docs in samples.items()} == dict.fromkeys(TASK_NAMES, 5)
    assert (entry / "runtime" / "spec.json").is_file() and "hpi serve: stopped" in (
        entry / "runtime-serve.log").read_text()
    pid = json.loads((entry / "runtime-url.json").read_text())["pid"]  # hpi serve, stopped and reaped
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    left = []  # nothing it started (torchrun, the ranks) names its run folder any longer
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(entry) in part for part in proc.info["cmdline"] or ()):
            left.append(proc)
    assert not left


def test_hpi_eval_relays_the_runtimes_refusal_and_keeps_nothing(task_checkpoint, tmp_path, capsys):
    """A plan hpi serve refuses (tiny-llama's 4 heads do not split 3 ways) is its one line, exit 2, no entry."""
    from hpi.cli.app import main

    history = tmp_path / "evals"
    code = main(["eval", "--checkpoint", str(task_checkpoint), *CPU_FP32, "--tp", "3", "--tasks", "hpi_arith_mc",
                 "--limit", "2", "--max-length", str(MAX_MODEL_LEN), "--out", str(history)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.fullmatch(r"hpi serve: n_heads\(4\) % tp\(3\) != 0 for \S+: use a tp that divides 4", err[0]), err
    assert not history.exists()


def test_hpi_eval_few_shot_prompts_keep_parity(eval_server, task_checkpoint, tmp_path, capsys):
    from hpi.cli.app import main

    assert main(["eval", "--url", eval_server.url, "--checkpoint", str(task_checkpoint), "--tasks", "hpi_arith_mc",
                 "--num-fewshot", "2", "--limit", "5", "--max-length", str(MAX_MODEL_LEN), "--reference", "hf",
                 "--out", str(tmp_path / "evals")]) == 0, capsys.readouterr().err
    (entry,) = (tmp_path / "evals").iterdir()
    results = json.loads((entry / "results.json").read_text())
    assert results["n-shot"]["hpi_arith_mc"] == 2
    assert json.loads((entry / "parity.json").read_text())["ok"]


def test_lm_evals_own_cli_runs_the_hpi_model_by_its_entry_point(eval_server, hf_results, task_checkpoint, tmp_path):
    """``hpi-lm-eval`` is lm-eval's CLI with the lm_eval.models entry points registered: --model hpi scores as
    lm-eval's hf model does."""
    import subprocess
    import sys

    out = tmp_path / "lm-eval-out"
    done = subprocess.run([sys.executable, "-m", "hpi.evaluation.lm_eval_cli", "--model", "hpi", "--model_args",
                           f"url={eval_server.url},tokenizer={task_checkpoint},max_length={MAX_MODEL_LEN}",
                           "--tasks", "hpi_arith_mc,hpi_arith_gen", "--include_path", str(TASKS_DIR), "--limit",
                           str(LIMIT), "--batch_size", "8", "--output_path", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = out.rglob("results_*.json")
    scores = json.loads(written.read_text())["results"]
    for task, metric in (("hpi_arith_mc", "acc,none"), ("hpi_arith_mc", "acc_norm,none"),
                         ("hpi_arith_gen", "exact_match,first_number")):
        assert scores[task][metric] == hf_results["results"][task][metric], (task, metric)


def test_hpi_eval_deploys_the_preset_hpi_presets_shows(task_checkpoint, tmp_path, capsys):
    """--preset with --hardware: the runtime hpi eval starts serves the preset chosen among servable plans for
    --max-batch requests (Latency: batch 1, so one KV slot)."""
    from hpi.cli.app import main
    from hpi.planner.catalog import load_model
    from hpi.planner.presets import select_presets
    from hpi.planner.profiles import load_profile
    from hpi.planner.specs.workload import Workload

    assert main(["eval", "--checkpoint", str(task_checkpoint), *CPU_FP32, "--preset", "latency", "--hardware",
                 "h200-2gpu", "--tasks", "hpi_arith_mc", "--limit", "3", "--max-length", str(MAX_MODEL_LEN),
                 "--out", str(tmp_path / "evals")]) == 0, capsys.readouterr().err
    (entry,) = (tmp_path / "evals").iterdir()
    launch = json.loads((entry / "launch.json").read_text())
    shown = select_presets(load_model(str(task_checkpoint)), load_profile("h200-2gpu"),
                           Workload(MAX_MODEL_LEN - 32, 32, compute_dtype="fp32"), concurrency=16, serving=True)
    expected = shown.named("latency").plan
    plan = launch["serve_spec"]["plan"]
    assert (plan["tp"], plan["pp"], plan["offload"], plan["batch_size"]) == (
        expected.tp, expected.pp, expected.offload, expected.batch_size)
    assert launch["server"]["n_slots"] == expected.batch_size == 1
    assert launch["serve_spec"]["hardware"] == "h200-2gpu"
