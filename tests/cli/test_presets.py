"""``hpi presets`` and ``hpi config``: documents that validate against the schema in the repository, DeepSpeed
configs that DeepSpeed's own config classes read back, command lines that name the preset's plan, the NVMe
folder's rules per OS, and the files written."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest

import hpi.planner
from hpi.cli import main
from hpi.cli.app import build_parser
from hpi.cli.args import plan_from_args
from hpi.cli.checks import nvme_offload_path
from hpi.cli.errors import UsageError
from hpi.planner.catalog import load_model
from hpi.planner.cost.shape import swaps_per_module
from hpi.planner.profiles import profile_names
from hpi.planner.search import nvme_buffer_elems_for
from hpi.planner.specs.plan import Plan

SCHEMA = Path(hpi.planner.__file__).parent / "schemas" / "presets.schema.json"
MODELS = ("llama-3-8b", "llama-3-70b", "mixtral-8x7b")  # 8B, 70B and a mixture of experts
NVME = "/local_nvme/hpi"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


PAIRS = [(h, m) for h in profile_names() for m in MODELS]


@pytest.mark.parametrize("hardware,model", PAIRS)
def test_presets_json_validates_and_keeps_the_ordering(capsys, validator, hardware, model):
    code, out, err = run(capsys, "presets", "--model", model, "--hardware", hardware, "--concurrency", "16",
                         "--nvme-path", NVME, "--json")
    assert code == 0, err
    doc = json.loads(out)
    errors = sorted(validator.iter_errors(doc), key=str)
    assert not errors, errors[0]
    lat, bal, thr = (p["predicted"] for p in doc["presets"])
    assert lat["decode_step_s"] <= bal["decode_step_s"] <= 2 * lat["decode_step_s"]
    assert thr["throughput_tok_s"] >= max(lat["throughput_tok_s"], bal["throughput_tok_s"])
    for p in doc["presets"]:
        assert p["deepspeed_config"]["zero_optimization"]["offload_param"]["device"] == p["plan"]["offload"]
        assert p["config_file"] == f"{p['name']}.deepspeed_zero3_tp{p['plan']['tp']}_pp{p['plan']['pp']}.json"


def test_the_schema_refuses_what_a_gui_could_not_load(validator):
    good = _fresh_doc("h200-2gpu", "llama-3-8b")
    assert validator.is_valid(good)
    for spoil in (
        lambda d: d.update(version=2),
        lambda d: d["presets"].reverse(),  # the order is latency, balanced, throughput
        lambda d: d["presets"].pop(),
        lambda d: d["presets"][0].pop("overrides"),
        lambda d: d["presets"][0]["plan"].update(tp=0),
        lambda d: d["presets"][1].update(status="confirmed by a run"),  # but confirmed_by is null
        lambda d: d["presets"][2]["predicted"].update(decode_step_s=0),
        lambda d: d["provenance"]["sources"].update(guessed=1),
        lambda d: d.update(extra=True),
    ):
        doc = json.loads(json.dumps(good))
        spoil(doc)
        assert not validator.is_valid(doc)


def _fresh_doc(hardware: str, model: str, *extra: str) -> dict:
    """hpi presets --json's document (run in-process, stdout captured here)."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["presets", "--model", model, "--hardware", hardware, *extra, "--json"]) == 0
    return json.loads(buf.getvalue())


@pytest.mark.parametrize("hardware,model", [("a6000-workstation", "llama-3-70b"), ("h200-2gpu", "mixtral-8x7b"),
                                            ("rtx4090-wsl2", "mixtral-8x7b")])
def test_commands_name_the_presets_plan(hardware, model):
    doc = _fresh_doc(hardware, model, "--nvme-path", NVME)  # the WSL2 laptop's presets offload to NVMe
    parser, _ = build_parser()
    spec = load_model(model)
    for p in doc["presets"]:
        assert (p["commands"]["serve"] is None) == (p["plan"]["kv_offload"] or p["plan"]["dp"] > 1)
        for name in ("run", "serve"):
            if p["commands"][name] is None:
                continue
            args = parser.parse_args(p["commands"][name].split()[1:])
            if name == "serve":  # serve names the plan's batch --max-batch
                assert args.max_batch == p["plan"]["batch_size"]
                args.batch = args.max_batch
            assert plan_from_args(args, spec) == Plan.from_dict(p["plan"])
            assert (args.nvme_path == NVME) == (p["plan"]["offload"] == "nvme")


def test_out_writes_the_document_and_each_config(tmp_path, capsys):
    code, out, err = run(capsys, "presets", "--model", "llama-3-8b", "--hardware", "h200-2gpu", "--concurrency", "8",
                         "--out", str(tmp_path / "p"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert json.loads((tmp_path / "p" / "presets.json").read_text()) == doc
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == sorted(["presets.json", *{p["config_file"] for p in doc["presets"]}])
    for p in doc["presets"]:
        assert json.loads((tmp_path / "p" / p["config_file"]).read_text()) == p["deepspeed_config"]


def test_text_output_states_the_definitions_and_the_status(capsys):
    code, out, err = run(capsys, "presets", "--model", "llama-3-70b", "--hardware", "a6000-workstation",
                         "--concurrency", "32")  # 32 requests: their KV cache on pinned CPU memory wins
    assert code == 0, err
    text = " ".join(out.split())
    assert "Balanced: the highest tokens/s whose decode step stays within 2x Latency's" in text
    assert "Balanced wins by: highest throughput (15.42 tok/s at batch 32) of the 65 feasible plans" in text
    assert out.count("predicted only") == 3
    assert out.count("hpi serve --model llama-3-70b --hardware a6000-workstation") == 1  # Latency's
    assert out.count("(not servable: hpi serve keeps the KV cache on the GPU") == 2  # Balanced's and Throughput's
    _, help_text, _ = run_help(capsys)
    assert "Latency: the lowest decode step at batch 1" in " ".join(help_text.split())


def run_help(capsys):
    with pytest.raises(SystemExit):
        main(["presets", "--help"])
    out, err = capsys.readouterr()
    return 0, out, err


def test_records_confirm_a_preset(tmp_path, capsys):
    code, out, _ = run(capsys, "presets", "--model", "llama-3-8b", "--hardware", "h200-2gpu", "--json")
    plan = json.loads(out)["presets"][0]["plan"]
    record = {"kind": "hpi.RunRecord", "version": 2, "plan": plan, "hardware": "h200-2gpu",
              "spec": {"model": "llama-3-8b", "hardware": "h200-2gpu",
                       "workload": {"prompt_len_tokens": 512, "gen_len_tokens": 32}},
              "decode_step_s": {"median": 0.0161, "p90": 0.017, "mean": 0.0162}, "ttft_s": 0.05,
              "throughput_tok_s": 61.0}
    (tmp_path / "h200.json").write_text(json.dumps(record))
    code, out, err = run(capsys, "presets", "--model", "llama-3-8b", "--hardware", "h200-2gpu", "--json",
                         "--records", str(tmp_path))
    assert code == 0, err
    first = json.loads(out)["presets"][0]
    assert first["status"] == "confirmed by a run"
    assert first["confirmed_by"]["decode_step_s"] == 0.0161 and first["confirmed_by"]["record"] == "h200"


# ---- hpi config ---------------------------------------------------------------------------------------------
def test_config_of_a_preset_is_the_presets_config(capsys):
    code, out, _ = run(capsys, "presets", "--model", "llama-3-70b", "--hardware", "a6000-workstation",
                       "--concurrency", "16", "--json")
    balanced = json.loads(out)["presets"][1]
    code, out, err = run(capsys, "config", "--model", "llama-3-70b", "--hardware", "a6000-workstation",
                         "--preset", "balanced", "--concurrency", "16")
    assert code == 0, err
    assert json.loads(out) == balanced["deepspeed_config"]


def test_config_of_plan_flags_is_written_under_its_layouts_name(tmp_path, capsys):
    code, out, err = run(capsys, "config", "--model", "llama-3-8b", "--hardware", "h200-2gpu", "--tp", "2",
                         "--offload", "cpu", "--quant-bits", "4", "--out", str(tmp_path))
    assert code == 0, err
    cfg = json.loads((tmp_path / "deepspeed_zero3_tp2_pp1.json").read_text())
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["weight_quantization"]["quantized_initialization"]["num_bits"] == 4


def test_templates_cover_every_layout_with_cpu_and_nvme(tmp_path, capsys):
    code, out, err = run(capsys, "config", "--templates", "--model", "llama-3-8b", "--hardware", "h200-4gpu",
                         "--out", str(tmp_path), "--nvme-path", NVME)
    assert code == 0, err
    files = sorted(p.name for p in tmp_path.glob("deepspeed_zero3_*.json"))
    # h200-4gpu builds tp 1, 2, 4 x pp 1, 2, 4 with tp * pp <= 4: six layouts, each with CPU and NVMe offload
    layouts = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]
    assert files == sorted(f"deepspeed_zero3_tp{tp}_pp{pp}_{o}.json" for tp, pp in layouts for o in ("cpu", "nvme"))
    index = (tmp_path / "README.md").read_text()
    for name in files:
        assert f"`{name}`" in index
        cfg = json.loads((tmp_path / name).read_text())
        offload = cfg["zero_optimization"]["offload_param"]
        assert offload["device"] == name.removesuffix(".json").rsplit("_", 1)[1]
        if offload["device"] == "nvme":
            assert offload["nvme_path"] == NVME and "thread_count" not in cfg["aio"]
            assert cfg["aio"]["intra_op_parallelism"] == 8
    assert "intra_op_parallelism" in index and "thread_count" in index


def test_templates_without_nvme_path_are_refused_only_where_nvme_fits(tmp_path, capsys):
    code, _, err = run(capsys, "config", "--templates", "--model", "llama-3-8b", "--hardware", "h200-2gpu",
                       "--out", str(tmp_path / "t"))
    assert code == 2 and "--nvme-path DIR" in err
    assert not (tmp_path / "t").exists()


# ---- NVMe folders per OS ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,os_kind,expected,warned", [
    ("/mnt/nvme/hpi", "linux", "/mnt/nvme/hpi", False),
    ("/mnt/c/hpi", "linux", "/mnt/c/hpi", False),  # on Linux /mnt/c is just a folder
    ("/home/me/nvme", "wsl2", "/home/me/nvme", False),
    ("/mnt/c/nvme", "wsl2", "/mnt/c/nvme", True),
    ("C:\\nvme\\hpi", "wsl2", "/mnt/c/nvme/hpi", True),
    ("D:/swap", "wsl2", "/mnt/d/swap", True),
])
def test_nvme_paths_accepted(path, os_kind, expected, warned):
    got, warning = nvme_offload_path(path, os_kind, "hpi config")
    assert got == expected
    assert (warning is not None) == warned
    if warned:
        assert "9P" in warning and "/home" in warning


@pytest.mark.parametrize("path,os_kind,message", [
    ("\\\\server\\share\\nvme", "linux", "network share \\(UNC\\)"),
    ("//server/share/nvme", "wsl2", "network share \\(UNC\\)"),
    ("\\\\server\\share", "windows", "network share \\(UNC\\)"),
    ("C:\\nvme", "windows", "needs libaio, which Windows lacks"),
    ("C:\\nvme", "linux", "Windows drive path, but the profile runs linux"),
    ("nvme/here", "linux", "is relative"),
])
def test_nvme_paths_refused_with_the_fix(path, os_kind, message):
    with pytest.raises(UsageError, match=message):
        nvme_offload_path(path, os_kind, "hpi config")


def test_wsl2_mnt_c_is_warned_on_stderr_and_written(tmp_path, capsys):
    code, out, err = run(capsys, "config", "--model", "llama-3-8b", "--hardware", "rtx4090-wsl2", "--offload", "nvme",
                         "--nvme-path", "C:\\hpi\\nvme")
    assert code == 0
    assert json.loads(out)["zero_optimization"]["offload_param"]["nvme_path"] == "/mnt/c/hpi/nvme"
    assert err.startswith("hpi config: warning: /mnt/c/hpi/nvme is a Windows drive") and len(err.splitlines()) == 1


# ---- DeepSpeed reads every config back ----------------------------------------------------------------------
def _deepspeed_reads(cfg: dict, plan: dict, model: str) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT

    ds = DeepSpeedConfig(json.loads(json.dumps(cfg)))
    off = ds.zero_config.offload_param
    assert int(ds.zero_config.stage) == 3
    assert (off.device, off.pin_memory, off.buffer_count, off.buffer_size) == (
        plan["offload"], plan["pin_memory"], plan["nvme_buffer_count"], plan["nvme_buffer_elems"])
    assert ds.zero_config.prefetch_bucket_size == plan["prefetch_bucket_elems"]
    if plan["offload"] == "nvme":
        assert set(cfg["aio"]) == set(AIO_DEFAULT_DICT)  # read key by key: no key DeepSpeed would drop unread
        assert ds.aio_config == cfg["aio"]
        assert str(off.nvme_path) == NVME
        # the swap buffer holds the largest tensor partition (DeepSpeed refuses a smaller one)
        assert off.buffer_size >= nvme_buffer_elems_for(load_model(model), plan["tp"], plan["dp"])
        # and there are as many buffers as one module swaps in at once (DeepSpeed stops with fewer)
        assert off.buffer_count >= swaps_per_module(load_model(model), plan["tp"], plan["dp"])


@pytest.mark.deepspeed
def test_deepspeed_reads_every_preset_and_template_config(tmp_path, capsys):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    n = 0
    for hardware, model in PAIRS:
        code, out, err = run(capsys, "presets", "--model", model, "--hardware", hardware, "--concurrency", "16",
                             "--nvme-path", NVME, "--json")
        assert code == 0, err
        for p in json.loads(out)["presets"]:
            _deepspeed_reads(p["deepspeed_config"], p["plan"], model)
            n += 1
    for hardware, model in (("a6000-workstation", "llama-3-70b"), ("h200-4gpu", "mixtral-8x7b"),
                            ("rtx4090-wsl2", "llama-3-8b")):
        out_dir = tmp_path / hardware
        code, _, err = run(capsys, "config", "--templates", "--model", model, "--hardware", hardware,
                           "--out", str(out_dir), "--nvme-path", NVME)
        assert code == 0, err
        for f in out_dir.glob("deepspeed_zero3_*.json"):
            cfg = json.loads(f.read_text())
            off = cfg["zero_optimization"]["offload_param"]
            plan = {"offload": off["device"], "pin_memory": off["pin_memory"], "nvme_buffer_count": off["buffer_count"],
                    "nvme_buffer_elems": off["buffer_size"],
                    "prefetch_bucket_elems": cfg["zero_optimization"]["stage3_prefetch_bucket_size"],
                    "tp": int(f.name.split("_tp")[1].split("_")[0]), "dp": 1}
            _deepspeed_reads(cfg, plan, model)
            n += 1
    assert n >= 3 * len(PAIRS) + 2 + 12


def test_config_of_a_plan_that_does_not_fit_warns_in_one_line(capsys):
    code, out, err = run(capsys, "config", "--model", "llama-3-70b", "--hardware", "h100-sxm-1gpu")
    assert code == 0
    assert json.loads(out)["zero_optimization"]["offload_param"]["device"] == "none"
    assert err.startswith("hpi config: warning: none tp1 pp1 dp1 w16 b1 is predicted not to fit h100-sxm-1gpu: "
                          "GPU memory")
    assert len(err.splitlines()) == 1


# ---- --serving, and --preset on hpi run / hpi serve ---------------------------------------------------------
def test_serving_presets_are_all_servable_and_others_say_why_not():
    plain = _fresh_doc("a6000-workstation", "llama-3-70b", "--concurrency", "32")
    balanced = plain["presets"][1]
    assert balanced["plan"]["kv_offload"] and balanced["commands"]["serve"] is None
    assert balanced["serve_blocker"] == "hpi serve keeps the KV cache on the GPU in its slot cache: drop --kv-offload"
    serving = _fresh_doc("a6000-workstation", "llama-3-70b", "--concurrency", "32", "--serving")
    assert serving["workload"]["serving"] is True
    for p in serving["presets"]:
        assert not p["plan"]["kv_offload"] and p["plan"]["dp"] == 1
        assert p["serve_blocker"] is None and p["commands"]["serve"].startswith("hpi serve ")
        kv = next(o for o in p["overrides"] if o["knob"] == "kv_offload")
        assert kv["valid"] == {"choices": [False]}
    # servable plans are a subset: nothing servable beats the unrestricted Throughput
    best = plain["presets"][2]["predicted"]["throughput_tok_s"]
    assert serving["presets"][2]["predicted"]["throughput_tok_s"] <= best


@pytest.mark.parametrize("name", ["latency", "balanced", "throughput"])
def test_run_and_serve_deploy_the_preset_hpi_presets_shows(name):
    from hpi.cli import run as run_cli
    from hpi.cli import serve as serve_cli

    pytest.importorskip("deepspeed")
    pytest.importorskip("fastapi")
    parser, _ = build_parser()
    shown = _fresh_doc("h200-2gpu", "llama-3-8b", "--concurrency", "16")["presets"]
    served = _fresh_doc("h200-2gpu", "llama-3-8b", "--concurrency", "16", "--serving")["presets"]
    i = ("latency", "balanced", "throughput").index(name)
    args = parser.parse_args(["run", "--model", "llama-3-8b", "--hardware", "h200-2gpu", "--preset", name,
                              "--concurrency", "16", "--device", "cpu"])
    assert run_cli.resolve(args).spec.plan == Plan.from_dict(shown[i]["plan"])
    args = parser.parse_args(["serve", "--model", "llama-3-8b", "--hardware", "h200-2gpu", "--preset", name,
                              "--max-batch", "16", "--device", "cpu"])
    deployment = serve_cli._resolve(args)
    assert deployment.spec.plan == Plan.from_dict(served[i]["plan"])
    assert deployment.spec.serve.n_slots == served[i]["plan"]["batch_size"]
