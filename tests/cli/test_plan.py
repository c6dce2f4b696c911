"""The ``hpi`` command line: every command on every catalogue model and profile, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpi.cli import main
from hpi.planner.catalog import model_names
from hpi.planner.profiles import profile_names

MODELS = model_names()
PROFILES = profile_names()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("hardware", PROFILES)
def test_plan_json_on_every_model_and_profile(capsys, model, hardware):
    code, out, err = run(capsys, "plan", "--model", model, "--hardware", hardware, "--json", "--top", "3")
    assert code == 0, err
    doc = last_json(out)
    assert doc["n_plans_evaluated"] > 0
    assert doc["n_plans_evaluated"] >= doc["n_feasible"]
    for entry in doc["plans"]:
        assert entry["feasible"] and entry["reasons"] == []
        for key in ("prefill_s", "decode_step_s", "total_s", "ttft_s", "throughput_tok_s", "offload", "tp", "pp"):
            assert key in entry
    decode = [p["decode_step_s"] for p in doc["plans"]]
    assert decode == sorted(decode)
    if not doc["plans"]:  # nothing fits: the closest plans must say why
        assert doc["closest_infeasible"] and all(p["reasons"] for p in doc["closest_infeasible"])


@pytest.mark.parametrize("model", MODELS)
def test_predict_and_explain_on_every_model(capsys, model):
    bits = "16" if model == "tiny-llama" else "4"  # tiny-llama's FFN (176) is off DeepSpeed's 64-weight groups
    for command in ("predict", "explain"):
        code, out, err = run(capsys, command, "--model", model, "--hardware", "dgx-h100", "--offload", "cpu",
                             "--quant-bits", bits, "--json")
        assert code == 0, err
        doc = last_json(out)
        for key in ("feasible", "reasons", "prefill_s", "decode_step_s", "total_s", "ttft_s", "throughput_tok_s",
                    "memory", "breakdown", "placement", "model", "plan"):
            assert key in doc
        assert set(doc["memory"]) >= {"gpu_peak_bytes", "cpu_bytes", "pinned_bytes", "nvme_bytes"}
        assert doc["model"]["params_total"] >= doc["model"]["params_active"] > 0
        decode = doc["breakdown"]["decode_step"]["exposed"]
        assert sum(decode.values()) == pytest.approx(doc["decode_step_s"], rel=1e-9)
    assert doc["knobs"] and doc["binds"]


@pytest.mark.parametrize("hardware", PROFILES)
def test_predict_readable_output_on_every_profile(capsys, hardware):
    code, out, err = run(capsys, "predict", "--model", "llama-3-8b", "--hardware", hardware, "--offload", "cpu")
    assert code == 0, err
    assert "decode step" in out and "placement" in out and "stage 0" in out


def test_plan_table_example_from_readme(capsys):
    code, out, _ = run(capsys, "plan", "--model", "llama-3-70b", "--hardware", "a6000-workstation", "--top", "5")
    assert code == 0
    assert "top 5 plans" in out and "evaluated" in out and "hpi explain" in out


def test_throughput_and_balanced_objectives_and_pareto(capsys):
    code, out, _ = run(capsys, "plan", "--model", "llama-3-70b", "--hardware", "h200-2gpu", "--objective", "throughput",
                       "--json")
    doc = last_json(out)
    thr = [p["throughput_tok_s"] for p in doc["plans"]]
    assert code == 0 and thr == sorted(thr, reverse=True)
    front = doc["pareto"]
    assert [p["decode_step_s"] for p in front] == sorted(p["decode_step_s"] for p in front)
    assert [p["throughput_tok_s"] for p in front] == sorted(p["throughput_tok_s"] for p in front)
    code, out, _ = run(capsys, "plan", "--model", "llama-3-70b", "--hardware", "h200-2gpu", "--objective", "balanced",
                       "--pareto")
    assert code == 0 and "Pareto front" in out


def test_plan_restricted_axes(capsys):
    code, out, _ = run(capsys, "plan", "--model", "llama-3-70b", "--hardware", "dgx-h100", "--tp", "4",
                       "--offload", "none", "--json")
    doc = last_json(out)
    assert code == 0 and doc["plans"]
    assert all(p["tp"] == 4 and p["offload"] == "none" for p in doc["plans"])


def test_plan_file_round_trip(capsys, tmp_path):
    _, out, _ = run(capsys, "plan", "--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu", "--json", "--top", "1")
    best = last_json(out)["plans"][0]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(best))
    code, out, _ = run(capsys, "predict", "--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu", "--plan", str(path),
                       "--json")
    assert code == 0
    assert last_json(out)["decode_step_s"] == pytest.approx(best["decode_step_s"], rel=1e-12)


def test_models_and_hardware_listings(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0 and {m["name"] for m in last_json(out)} == set(MODELS)
    code, out, _ = run(capsys, "hardware", "--json")
    assert code == 0 and {p["name"] for p in last_json(out)} == set(PROFILES)
    assert run(capsys, "models")[0] == 0 and run(capsys, "hardware")[0] == 0


def test_infeasible_explain_proposes_fixes(capsys):
    code, out, _ = run(capsys, "explain", "--model", "llama-3-70b", "--hardware", "a6000-workstation", "--json")
    doc = last_json(out)
    assert code == 0 and not doc["feasible"]
    assert any("GPU memory" in r and "resident weights" in r for r in doc["reasons"])
    assert doc["fixes"], "a one-knob fix (offload or quantize) exists"


# ---- bad input: one line on stderr, exit code 2, no traceback --------------------------------------------
BAD = [
    (["plan", "--model", "gpt-17", "--hardware", "dgx-h100"], "llama-3-70b"),
    (["plan", "--model", "llama-3-8b", "--hardware", "my-laptop"], "a6000-workstation"),
    (["predict", "--model", "llama-3-70b", "--hardware", "dgx-h100", "--tp", "3"], "n_heads(64) % tp(3)"),
    (["predict", "--model", "llama-3-70b", "--hardware", "h100-sxm-1gpu", "--tp", "2"], "tp(2) * pp(1) * dp(1)"),
    (["predict", "--model", "tiny-llama", "--hardware", "dgx-h100", "--pp", "8"], "pp(8) > n_layers(4)"),
    (["predict", "--model", "llama-3-8b", "--hardware", "dgx-h100", "--offload", "disk"], "invalid choice"),
    (["predict", "--model", "llama-3-8b", "--hardware", "dgx-h100", "--batch", "3", "--dp", "2"], "batch(3) % dp(2)"),
    (["plan", "--model", "llama-3-8b"], "--hardware"),
    (["predict", "--model", "llama-3-8b", "--hardware", "dgx-h100", "--plan", "/nonexistent.json"], "cannot read plan"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_bad_files_name_the_file_and_field(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama", "hidden_size": 64}')
    code, _, err = run(capsys, "predict", "--model", str(config), "--hardware", "dgx-h100")
    assert code == 2 and "config.json" in err and "field 'num_attention_heads' is missing" in err
    profile = tmp_path / "broken.yaml"
    profile.write_text("name: broken\ngpu: [unclosed\n")
    code, _, err = run(capsys, "predict", "--model", "llama-3-8b", "--hardware", str(profile))
    assert code == 2 and "broken.yaml" in err and len(err.strip().splitlines()) == 1
    plan = tmp_path / "plan.json"
    plan.write_text('{"offload": "cpu", "tpp": 2}')
    code, _, err = run(capsys, "predict", "--model", "llama-3-8b", "--hardware", "dgx-h100", "--plan", str(plan))
    assert code == 2 and "tpp" in err


def test_console_script_runs_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "hpi.cli", "models"], capture_output=True, text=True)
    assert proc.returncode == 0 and "kimi-k2" in proc.stdout


def test_planner_never_imports_torch_deepspeed_or_transformers():
    code = (
        "import sys, hpi.cli, hpi.planner.search, hpi.planner.explain, hpi.planner.published, hpi.planner.report\n"
        "from hpi.cli import main\n"
        "main(['plan', '--model', 'llama-3-8b', '--hardware', 'h200-2gpu', '--json'])\n"
        "bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cuda_graphs_are_priced_by_default_where_a_plan_allows_them(capsys):
    base = ("predict", "--model", "llama-3-70b", "--hardware", "h200-4gpu", "--tp", "4", "--json")
    code, out, _ = run(capsys, *base)
    graphed = last_json(out)
    code2, out2, _ = run(capsys, *base, "--no-cuda-graphs")
    eager = last_json(out2)
    assert code == code2 == 0
    assert graphed["workload"]["decode_graphs"] is True and eager["workload"]["decode_graphs"] is False
    assert graphed["decode_step_s"] < 0.5 * eager["decode_step_s"]  # no launches per layer, no rank drift
    assert graphed["prefill_s"] == pytest.approx(eager["prefill_s"])
    code, _, err = run(capsys, *base, "--cuda-graphs", "--no-cuda-graphs")
    assert code == 2 and "not allowed with argument" in err
