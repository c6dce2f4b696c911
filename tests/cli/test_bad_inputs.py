"""Every hpi command refuses bad input the same way: exit code 2, exactly one line on stderr that names the fix,
no traceback, nothing on stdout, nothing written (a case runs in a folder of its own, listed before and after).

``CASES`` is the table: the examples of issue 14 and more, across every command ``hpi --help`` lists. Each case
runs in-process through ``hpi.cli.app.main`` (fast: no torch import unless the case is about torch or CUDA).
``benchmarks/bad_inputs.py`` runs the same table as subprocesses against any ``hpi`` executable (the before /
after counts of issue 14).

In ``argv``: ``{long}`` is a 300-character name, ``{pkg_profiles}`` the profiles folder inside the installed hpi
package, ``{tmp}`` the case's folder; relative paths are in the case's folder, which holds the ``FIXTURES``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
CPU_RECORD = DATA / "tiny-llama-cpu.record.json"  # a real hpi run of tiny-llama on this CPU (1 rank, fp32)
LONG = "x" * 300


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()  # set for the case
    hide: tuple[str, ...] = ()  # modules made unimportable (a missing extra)
    absent: tuple[str, ...] = ()  # the case is bad only where these modules are missing (a database driver)
    cuda_absent: bool = False  # the case is bad only where torch sees no CUDA GPU

    @property
    def id(self) -> str:
        text = " ".join(a if len(a) < 40 else a[:12] + "..." for a in self.argv) or "(no arguments)"
        extra = [f"{k}={v}" for k, v in self.env] + [f"without {m}" for m in self.hide]
        return text + (f" [{', '.join(extra)}]" if extra else "")


def case(*argv: str, env: dict[str, str] | None = None, hide: tuple[str, ...] = (), absent: tuple[str, ...] = (),
         cuda_absent: bool = False) -> Case:
    return Case(tuple(argv), tuple((env or {}).items()), hide, absent, cuda_absent)


# ---- the files a case may name ------------------------------------------------------------------------------
def _plan(**changes) -> str:
    plan = {"offload": "none", "tp": 1, "pp": 1, "dp": 1, "weight_bits": 16, "pin_memory": True, "kv_offload": False,
            "batch_size": 1, "micro_batches": 1, "prefetch_bucket_elems": 50000000, "max_live_elems": 1000000000,
            "persistence_threshold_elems": 100000, "nvme_buffer_count": 5, "nvme_buffer_elems": 100000000}
    plan.update(changes)
    return json.dumps(plan)


def _gpu_record() -> str:
    """The CPU record as if it had run on an H200: a record calibrate takes, to reach its --out checks."""
    doc = json.loads(CPU_RECORD.read_text())
    doc.update(device="cuda", devices=["NVIDIA H200"], hardware="h200-2gpu")
    return json.dumps(doc)


def _tiny_llama_config() -> str:
    import hpi

    return (Path(hpi.__file__).parent / "planner" / "catalog" / "models" / "tiny-llama.json").read_text()


def _profile_copy() -> str:
    import hpi

    return (Path(hpi.__file__).parent / "planner" / "hardware_profiles" / "h200-2gpu.yaml").read_text()


FIXTURES = {
    "afile": "a file where a folder is expected\n",
    "plan_good.json": lambda: _plan(),
    "plan_two.json": lambda: _plan(tp="two"),
    "plan_float.json": lambda: _plan(tp=2.5),
    "plan_bool.json": lambda: _plan(tp=True),
    "plan_null.json": lambda: _plan(tp=None),
    "plan_neg.json": lambda: _plan(tp=-2),
    "plan_zero_dp.json": lambda: _plan(dp=0),
    "plan_inf.json": lambda: _plan(tp=1).replace('"tp": 1', '"tp": 1e999'),
    "plan_offload.json": lambda: _plan(offload="gpu"),
    "plan_bits.json": lambda: _plan(weight_bits=3),
    "plan_pin.json": lambda: _plan(pin_memory="yes"),
    "plan_batch_dp.json": lambda: _plan(batch_size=3, dp=2),
    "plan_missing.json": '{"offload": "cpu", "tp": 2}',
    "plan_unknown.json": lambda: _plan(tpp=2),
    "plan_empty.json": '{"model": "llama-3-70b", "hardware": "a6000-workstation", "n_feasible": 0, "plans": [], '
                       '"closest_infeasible": []}',
    "plan_plans_str.json": '{"plans": "best"}',
    "plan_list.json": "[1, 2, 3]",
    "plan_malformed.json": '{"tp": 2,',
    "empty.txt": "",
    "blank.txt": "\n   \n\n",
    "bad.yaml": "name: bad\ngpu: [unclosed\n",
    "list.yaml": "- a\n- b\n",
    "noname.yaml": "description: a profile with nothing in it\n",
    "config_bad.json": '{"model_type": "llama", "hidden_size": 64}',
    "config_malformed.json": "{",
    "config_list.json": "[]",
    "fp8_ckpt/config.json": json.dumps({  # a DeepSeek-shaped checkpoint shipped FP8 block-quantized, as the hub's
        "model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "q_lora_rank": 24, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "vocab_size": 100,
        "max_position_embeddings": 64, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                "weight_block_size": [128, 128]}}),
    "bad_ckpt/config.json": _tiny_llama_config,
    "bad_ckpt/model.safetensors": "not a safetensors file: its first 8 bytes are no header length\n",
    "emptydir/notes.txt": "no records here\n",
    "profiles_empty/notes.txt": "no profiles here\n",
    "tpl_dir/notes.txt": "a folder, not a template\n",
    "dir.yaml/notes.txt": "a folder named like a profile\n",
    "record_cpu.json": lambda: CPU_RECORD.read_text(),
    "record_gpu.json": _gpu_record,
    "record_malformed.json": '{"kind": "run_record",',
    "h200-2gpu.yaml": _profile_copy,
    "manifest_bad.yaml": "records: x\n  bad: [\n",
}


def materialize(folder: Path) -> None:
    """Write the fixtures into ``folder``."""
    for name, content in FIXTURES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content() if callable(content) else content)


def package_profiles() -> str:
    """The profiles folder inside the installed hpi package (``hpi probe`` must not write there)."""
    import hpi

    return str(Path(hpi.__file__).resolve().parent / "planner" / "hardware_profiles")


def expand(argv: tuple[str, ...], folder: Path, pkg_profiles: str | None = None) -> list[str]:
    pkg_profiles = pkg_profiles or package_profiles()
    return [a.replace("{long}", LONG).replace("{pkg_profiles}", pkg_profiles).replace("{tmp}", str(folder))
            for a in argv]


# ---- the table ------------------------------------------------------------------------------------------------
PLAN = ("plan", "--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu")
PREDICT = ("predict", "--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu")
EXPLAIN = ("explain", "--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu")
PRESETS = ("presets", "--model", "llama-3-8b", "--hardware", "h200-2gpu")
CONFIG = ("config", "--model", "llama-3-8b", "--hardware", "h200-2gpu")
RUN = ("run", "--model", "tiny-llama", "--device", "cpu", "--dtype", "fp32", "--out", "runs/x")
SERVE = ("serve", "--model", "tiny-llama", "--device", "cpu", "--dtype", "fp32", "--out", "runs/s")
EVAL = ("eval", "--url", "http://127.0.0.1:9", "--checkpoint", ".", "--tasks", "hpi_arith_mc")  # port 9: refused
CHECK = ("check", "--model", "llama-3-8b", "--hardware", "h200-2gpu")
CAL = ("calibrate", "record_gpu.json", "--hardware", "h200-2gpu.yaml")
TUNE = ("autotune", "--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu", "--simulate", "--trials", "2",
        "--no-report")
NO_PROFILES = {"HPI_PROFILES_DIR": "/nonexistent/hpi-profiles"}

CASES: list[Case] = [
    # no command, an unknown one, missing arguments
    case(), case("nosuch"), case("--bogus"), case("plan"), case("plan", "--model"),
    # hpi plan: numbers
    *[case(*PLAN, flag, value) for flag, value in (
        ("--tp", "0"), ("--tp", "-1"), ("--tp", "2.7"), ("--tp", "inf"), ("--tp", "nan"), ("--tp", "1e400"),
        ("--tp", "two"), ("--dp", "0"), ("--pp", "0"), ("--batch", "0"), ("--batch", "inf"), ("--batch", "1e400"),
        ("--batch", "2.7"), ("--batch", "-3"), ("--batch", "99999999999999999999"), ("--tp", "1e20"),
        ("--prompt-len", "0"), ("--prompt-len", "-5"), ("--gen-len", "0"), ("--gen-len", "1e400"), ("--top", "0"),
        ("--top", "-1"), ("--top", "1.5"), ("--max-batch", "0"), ("--max-batch", "-4"), ("--quant-bits", "3"),
        ("--offload", "gpu"), ("--objective", "fast"))],
    # hpi plan: models, profiles, files
    case("plan", "--model", "nosuch", "--hardware", "h100-sxm-1gpu"),
    case("plan", "--model", "{long}", "--hardware", "h100-sxm-1gpu"),
    case("plan", "--model", "y" * 5000, "--hardware", "h100-sxm-1gpu"),
    case("plan", "--model", "{tmp}", "--hardware", "h100-sxm-1gpu"),
    case("plan", "--model", "config_bad.json", "--hardware", "h100-sxm-1gpu"),
    case("plan", "--model", "config_malformed.json", "--hardware", "h100-sxm-1gpu"),
    case("plan", "--model", "config_list.json", "--hardware", "h100-sxm-1gpu"),
    case("plan", "--model", "missing.json", "--hardware", "h100-sxm-1gpu"),
    case("plan", "--model", "afile/config.json", "--hardware", "h100-sxm-1gpu"),
    *[case("plan", "--model", "llama-3-8b", "--hardware", h) for h in (
        "nosuch", "{long}", "missing.yaml", "bad.yaml", "afile/x.yaml", "list.yaml", "noname.yaml", "dir.yaml")],
    case(*PLAN, env=NO_PROFILES),
    case(*PLAN, "--pin-memory", "--no-pin-memory"),
    # hpi predict: numbers the plan divides by, plan rules
    *[case(*PREDICT, *extra) for extra in (
        ("--tp", "0"), ("--dp", "0"), ("--micro-batches", "0"), ("--offload", "nvme", "--nvme-buffer-count", "0"),
        ("--offload", "nvme", "--nvme-buffer-size", "0"), ("--batch", "3", "--dp", "2"), ("--micro-batches", "2"),
        ("--prefetch-bucket", "-1"), ("--prefetch-bucket", "1e400"), ("--max-live", "nan"),
        ("--persistence-threshold", "2.5"), ("--tp", "3"), ("--dtype", "int8"), ("--fetch-wait", "never"),
        ("--cuda-graphs", "--no-cuda-graphs"), ("--offload", "nvme", "--aio-block-size", "1000"),
        ("--offload", "nvme", "--aio-block-size", "1050000"), ("--offload", "nvme", "--aio-block-size", "4MiB"),
        ("--offload", "nvme", "--aio-queue-depth", "0"), ("--offload", "nvme", "--aio-threads", "-1"))],
    # hpi predict --plan FILE: every way a plan file can be wrong, and flags beside it
    *[case(*PREDICT, "--plan", f) for f in (
        "missing.json", "plan_malformed.json", "plan_two.json", "plan_empty.json", "plan_missing.json",
        "plan_unknown.json", "plan_list.json", "{tmp}", "plan_float.json", "plan_bool.json", "plan_neg.json",
        "plan_zero_dp.json", "plan_offload.json", "plan_bits.json", "plan_pin.json", "plan_null.json",
        "plan_inf.json", "plan_plans_str.json", "plan_batch_dp.json")],
    *[case(*PREDICT, "--plan", "plan_good.json", *extra) for extra in (
        ("--tp", "2"), ("--batch", "4"), ("--offload", "cpu"), ("--no-pin-memory",))],
    # hpi explain
    *[case(*EXPLAIN, *extra) for extra in (
        ("--tp", "0"), ("--batch", "inf"), ("--micro-batches", "0"), ("--plan", "plan_empty.json"),
        ("--plan", "plan_good.json", "--tp", "2"), ("--plan", "plan_two.json"))],
    case("explain", "--model", "llama-3-8b", "--hardware", "nosuch"),
    # hpi presets: numbers, a machine nothing fits, NVMe folders per OS, output folders, records
    *[case(*PRESETS, *extra) for extra in (
        ("--concurrency", "0"), ("--concurrency", "-2"), ("--concurrency", "1.5"), ("--concurrency", "inf"),
        ("--prompt-len", "0"), ("--dtype", "int8"), ("--out", "afile"), ("--out", "afile/sub"),
        ("--records", "missing.json"), ("--records", "config_malformed.json"), ("--nvme-path", "C:\\nvme"),
        ("--nvme-path", "\\\\server\\share\\nvme"), ("--nvme-path", "relative/nvme"))],
    case("presets", "--model", "llama-3-70b", "--hardware", "rtx4090-wsl2"),
    case("presets", "--model", "mixtral-8x7b", "--hardware", "rtx4090-wsl2"),  # its presets need --nvme-path
    case("presets", "--model", "mixtral-8x7b", "--hardware", "rtx4090-wsl2", "--nvme-path", "//nas/share/nvme"),
    case("presets", "--model", "llama-3-8b"), case("presets", "--model", "nosuch", "--hardware", "h200-2gpu"),
    # hpi config: a preset beside plan flags, templates without a folder, NVMe without a folder or on a share
    *[case(*CONFIG, *extra) for extra in (
        ("--preset", "fast"), ("--preset", "latency", "--tp", "2"), ("--preset", "latency", "--plan", "plan_good.json"),
        ("--preset", "balanced", "--concurrency", "0"), ("--templates",), ("--templates", "--tp", "2", "--out", "t"),
        ("--templates", "--preset", "latency", "--out", "t"), ("--templates", "--out", "t"),
        ("--templates", "--out", "afile"), ("--offload", "nvme"), ("--offload", "nvme", "--nvme-path", "nvme"),
        ("--offload", "nvme", "--nvme-path", "\\\\nas\\share"), ("--offload", "nvme", "--nvme-path", "D:\\x"),
        ("--tp", "3"), ("--out", "afile"), ("--plan", "plan_two.json"))],
    # --preset on hpi run and hpi serve: a machine to choose for, no plan flags beside it
    case(*RUN, "--preset", "latency"), case(*RUN, "--preset", "fast"),
    case(*RUN, "--preset", "latency", "--hardware", "h200-2gpu", "--tp", "2"),
    case(*RUN, "--preset", "latency", "--hardware", "h200-2gpu", "--plan", "plan_good.json"),
    case(*RUN, "--preset", "throughput", "--hardware", "h200-2gpu", "--concurrency", "0"),
    case(*SERVE, "--preset", "latency"),
    case(*SERVE, "--preset", "balanced", "--hardware", "h200-2gpu", "--kv-offload"),
    # hpi run: numbers, output folders, prompts, plan files, context length, the device
    *[case(*RUN, *extra) for extra in (
        ("--tp", "0"), ("--timeout", "nan"), ("--timeout", "-5"), ("--timeout", "0"), ("--timeout", "inf"),
        ("--temperature", "nan"), ("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"),
        ("--seed", "-1"), ("--nnodes", "0"), ("--node-rank", "1"), ("--master-port", "0"),
        ("--master-port", "70000"), ("--prompt", ""), ("--prompts", "missing.txt"), ("--prompts", "empty.txt"),
        ("--prompts", "blank.txt"), ("--prompts", "{tmp}"), ("--checkpoint", "/nonexistent/ckpt"),
        ("--plan", "plan_empty.json"), ("--plan", "plan_good.json", "--tp", "2"), ("--plan", "plan_missing.json"),
        ("--plan", "plan_two.json"), ("--prompt-len", "100000"), ("--gen-len", "100000"), ("--device", "tpu"),
        ("--chat",), ("--cuda-graphs", "--offload", "cpu"), ("--batch", "2.7"),
        ("--quant-bits", "4", "--offload", "cpu"), ("--offload", "nvme", "--nvme-path", "/nonexistent/nvme"),
        ("--hardware", "nosuch"), ("--out", "/proc/hpi-run"), ("--out", "afile/run"), ("--out", "{long}"),
        ("--out", "afile"))],
    case("run", "--model", "nosuch", "--device", "cpu", "--out", "runs/x"),
    case("run", "--model", "deepseek-v3", "--cuda-graphs", "--device", "cpu", "--out", "runs/x"),  # expert routing
    case("run", "--model", "deepseek-v3", "--checkpoint", "fp8_ckpt", "--device", "cpu", "--out", "runs/x"),
    case("run", "--model", "tiny-llama", "--checkpoint", "bad_ckpt", "--device", "cpu", "--out", "runs/x"),
    case("run", "--model", "llama-3-70b", "--hardware", "a6000-workstation", "--device", "cpu", "--out", "runs/x"),
    case(*RUN, hide=("torch",)),
    case("run", "--model", "tiny-llama", "--out", "runs/x", cuda_absent=True),
    # hpi serve
    *[case(*SERVE, *extra) for extra in (
        ("--port", "-1"), ("--port", "70000"), ("--port", "2.5"), ("--max-batch", "0"), ("--max-model-len", "0"),
        ("--max-model-len", "100000"), ("--max-queue", "0"), ("--step-tokens", "0"), ("--drain-timeout", "nan"),
        ("--hang-timeout", "-1"), ("--kv-offload",), ("--dp", "2"), ("--out", "/proc/hpi-serve"),
        ("--chat-template", "missing.jinja"), ("--chat-template", "tpl_dir"), ("--plan", "plan_good.json", "--tp", "2"),
        ("--policy", "greedy"), ("--prompt-len", "0"), ("--metrics-port", "0"), ("--metrics-port", "70000"),
        ("--metrics-port", "x"), ("--metrics-port", "9100", "--no-metrics"), ("--metrics-port", "8000"))],
    case("serve", "--device", "cpu", "--out", "runs/s"),
    case("serve", "--model", "nosuch", "--device", "cpu", "--out", "runs/s"),
    case("serve", "--model", "deepseek-v3", "--device", "cpu", "--out", "runs/s"),  # MLA: not in the slot cache yet
    case("serve", "--model", "kimi-k2", "--device", "cpu", "--max-batch", "2", "--out", "runs/s"),
    case(*SERVE, hide=("fastapi",)),
    case("serve", "--model", "tiny-llama", "--out", "runs/s", cuda_absent=True),
    # hpi chat
    *[case("chat", *extra) for extra in (
        ("--max-tokens", "0"), ("--temperature", "nan"), ("--temperature", "-1"), ("--url", "notaurl"),
        ("--url", "::::"), ("--url", "http://127.0.0.1:99999/v1"),
        ("--url", "http://127.0.0.1:9/v1", "--prompt", "hi"))],
    case("chat", "--prompt", "hi", hide=("openai",)),
    # hpi eval: the server, the checkpoint, the tasks and the history folder are checked before anything runs;
    # the flags of the runtime it starts are refused beside --url, a running server's beside none
    *[case("eval", *extra) for extra in (
        ("--checkpoint", ".", "--tasks", "hpi_arith_mc", "--serve-dir", "tpl_dir"),
        ("--checkpoint", ".", "--tasks", "hpi_arith_mc", "--api-key", "k"), ("--tasks", "hpi_arith_mc"),
        ("--checkpoint", ".", "--tasks", "hpi_arith_mc", "--tp", "0"),
        ("--checkpoint", ".", "--tasks", "hpi_arith_mc", "--offload", "disk"),
        ("--checkpoint", ".", "--tasks", "hpi_arith_mc", "--nvme-path", "nosuch"),
        ("--checkpoint", ".", "--tasks", "hpi_arith_mc", "--preset", "fastest"),
        (*EVAL, "--tp", "2"), (*EVAL, "--preset", "latency"), (*EVAL, "--plan", "p.json"),
        (*EVAL, "--device", "cpu", "--no-cuda-graphs"),
        ("--url", "localhost:8000", "--checkpoint", ".", "--tasks", "hpi_arith_mc"),
        ("--url", "http://127.0.0.1:9", "--tasks", "hpi_arith_mc"),
        ("--url", "http://127.0.0.1:9", "--checkpoint", "nosuch", "--tasks", "hpi_arith_mc"),
        ("--url", "http://127.0.0.1:9", "--checkpoint", "."), ("--url", "http://127.0.0.1:9", "--checkpoint", ".",
                                                              "--tasks", " , "),
        (*EVAL, "--limit", "0"), (*EVAL, "--batch-size", "0"), (*EVAL, "--max-length", "-1"),
        (*EVAL, "--num-fewshot", "-1"), (*EVAL, "--include-path", "nosuch"), (*EVAL, "--serve-dir", "tpl_dir"),
        (*EVAL, "--out", "/proc/hpi-evals"), (*EVAL, "--reference", "vllm"),
        ("--url", "http://127.0.0.1:9", "--checkpoint", ".", "--tasks", "no_such_task"), EVAL)],
    case(*EVAL, hide=("lm_eval",)),
    # hpi models, hpi hardware
    case("models", "--bogus"), case("models", "--json", "extra"),
    case("hardware", env=NO_PROFILES), case("hardware", env={"HPI_PROFILES_DIR": "{tmp}/profiles_empty"}),
    case("hardware", env={"HPI_PROFILES_DIR": "{tmp}/afile"}),
    # hpi probe: every path is checked before anything is measured
    *[case("probe", "--quick", *extra) for extra in (
        ("--out", "x.txt"), ("--out", "/proc/hpi/x.yaml"), ("--out", "afile/x.yaml"), ("--out", "{long}.yaml"),
        ("--out", "{pkg_profiles}/x.yaml"), ("--name", "bad name!"), ("--nvme-path", "/no/such/dir"),
        ("--nvme-path", "afile"), ("--out", "a/b.yaml", "--name", "c"), ("--name", "{long}"), ("--out", "dir.yaml"),
        ("--name", "y" * 250))],
    # hpi check
    *[case(*CHECK, *extra) for extra in (
        ("--tp", "0"), ("--batch", "inf"), ("--plan", "plan_empty.json"), ("--plan", "plan_good.json", "--tp", "2"),
        ("--plan", "plan_two.json"))],
    case("check", "--model", "llama-3-8b", "--hardware", "nosuch"),
    # hpi calibrate: records, the profile, --out (validated before anything is written), another device's records
    case("calibrate"), case("calibrate", "--hardware", "h200-2gpu.yaml"),
    case("calibrate", "/nonexistent/record.json", "--hardware", "h200-2gpu.yaml"),
    case("calibrate", "emptydir", "--hardware", "h200-2gpu.yaml"),
    case("calibrate", "record_malformed.json", "--hardware", "h200-2gpu.yaml"),
    case("calibrate", "record_gpu.json", "--hardware", "nosuch"),
    case("calibrate", "record_cpu.json", "--hardware", "h200-2gpu.yaml"),
    *[case(*CAL, *extra) for extra in (
        ("--holdout", "1.5"), ("--holdout", "nan"), ("--holdout", "-0.1"), ("--seed", "-1"), ("--seed", "2.5"),
        ("--date", "notadate"), ("--out", "/proc/hpi/x.yaml"), ("--out", "afile/x.yaml"), ("--out", "x.txt"),
        ("--out", "bad.yaml"), ("--out", "new.yaml"), ("--out", "{long}.yaml"), ("--out", "dir.yaml"))],
    # hpi validate: the plot path is checked before minutes of validation
    *[case("validate", *extra) for extra in (
        ("--records", "/nonexistent/records"), ("--manifest", "/nonexistent/manifest.yaml"),
        ("--manifest", "manifest_bad.yaml"), ("--plot", "/proc/hpi/x.png"), ("--plot", "afile/x.png"),
        ("--plot", "x.txt"), ("--plot", "{long}.png"), ("--records", "emptydir"),
        ("--records", "record_malformed.json"))],
    # hpi autotune: numbers, the study's name and storage, its folder, extras, context, the device
    *[case(*TUNE, *extra) for extra in (
        ("--trials", "0"), ("--trials", "-1"), ("--trials", "2.5"), ("--timeout", "nan"), ("--timeout", "-5"),
        ("--trial-timeout", "nan"), ("--sim-spread", "nan"), ("--sim-spread", "-1"), ("--sim-spread", "inf"),
        ("--sim-noise", "nan"), ("--study", "../../x"), ("--study", "a/b"), ("--study", ""), ("--study", "{long}"),
        ("--storage", "notaurl://x"), ("--storage", "::::"), ("--storage", "sqlite:////missing/dir/s.db"),
        ("--storage", "sqlite:///afile/s.db"), ("--studies-dir", "/proc/hpi"), ("--studies-dir", "afile/x"),
        ("--studies-dir", "{long}"), ("--studies-dir", "afile"), ("--top-configs", "0"), ("--seeds", "-1"),
        ("--max-batch", "0"), ("--baseline-batch", "0"), ("--warmup-steps", "-1"),
        ("--checkpoint", "/nonexistent/ckpt"), ("--objective", "balanced"), ("--dtype", "int8"), ("--tp", "0"),
        ("--batch", "inf"), ("--prompt-len", "100000"), ("--hardware", "nosuch"))],
    case(*TUNE, "--storage", "postgresql://hpi@localhost/studies", absent=("psycopg2",)),
    case(*TUNE, "--storage", "mysql://hpi@localhost/studies", absent=("MySQLdb",)),
    case(*TUNE, hide=("optuna",)),
    case("autotune", "--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu", "--trials", "2", "--device", "cpu",
         "--baseline", "ds-examples"),
    case("autotune", "--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu", "--trials", "2", cuda_absent=True),
]


def skip_reason(c: Case) -> str | None:
    """Why ``c`` is not a bad input on this machine (a driver installed, a GPU present), or None."""
    for module in c.absent:
        if importlib.util.find_spec(module) is not None:
            return f"{module} is installed here"
    if c.cuda_absent:
        try:
            import torch
        except ImportError:
            return None  # without torch the case is refused for that
        if torch.cuda.is_available():
            return "this machine has a CUDA GPU"
    return None


def listing(root: Path) -> dict[str, int]:
    """Every file and folder under ``root`` with its size (folders: -1); what vanishes while it looks is left out."""
    found: dict[str, int] = {}
    for folder, dirs, files in os.walk(root):  # os.walk skips what it cannot list
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = -1
        for name in files:
            try:
                found[os.path.relpath(os.path.join(folder, name), root)] = os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return dict(sorted(found.items()))


# ---- the test -------------------------------------------------------------------------------------------------
def test_the_table_covers_every_command():
    from hpi.cli.app import build_parser

    _, handlers = build_parser()
    commands = {c.argv[0] for c in CASES if c.argv}
    assert set(handlers) <= commands, set(handlers) - commands
    assert len(CASES) >= 150 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(c: Case, tmp_path, monkeypatch, capsys):
    from hpi.cli.app import main
    from hpi.planner.profiles import clear_cache

    why = skip_reason(c)
    if why:
        pytest.skip(why)
    folder = tmp_path / "cwd"
    folder.mkdir()
    materialize(folder)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("HPI_DEBUG", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where an internal error's log would go
    for key, value in c.env:
        monkeypatch.setenv(key, value.replace("{tmp}", str(folder)))
    for module in c.hide:
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, module, None)  # import raises ModuleNotFoundError
    clear_cache()
    before = listing(tmp_path)
    code = main(expand(c.argv, folder))
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.endswith("\n") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert out == ""
    assert listing(tmp_path) == before  # nothing written, no log of an internal error
    assert os.getcwd() == str(folder)
