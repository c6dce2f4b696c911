"""hpi.executor.decode_attention: the split-KV Triton decode attention against sdpa over repeated KV heads.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before Triton
decorates a kernel: each such test runs in its own process) in fp32; on a GPU (skipped without CUDA; run on the
device, results in benchmarks/results) in bf16 against sdpa's own kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from hpi.executor import decode_attention as da  # noqa: E402
from tests.executor.sm90 import Launches, compile_for_sm90, opcodes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def reference(query, keys, values, allowed, scaling):
    """Plain attention with each KV head repeated for its query heads, in float64: [n, H, d]."""
    n, heads, d = query.shape
    groups = heads // keys.shape[1]
    k = keys.double().repeat_interleave(groups, dim=1)  # [n, H, L, d]
    v = values.double().repeat_interleave(groups, dim=1)
    scores = torch.einsum("nhd,nhld->nhl", query.double(), k) * scaling
    scores = scores.masked_fill(~allowed.expand(n, -1)[:, None, :], float("-inf"))
    return torch.einsum("nhl,nhld->nhd", scores.softmax(-1), v)


# (rows, heads, kv heads, slots, head size, last position, padded rows, window)
CASES = [
    (1, 32, 8, 200, 64, 150, False, None),   # Llama-3's grouping, several splits, slots past the position
    (3, 8, 2, 130, 64, 129, True, None),     # several rows, left padding
    (2, 4, 4, 64, 128, 10, False, None),     # no grouping (G = 1), one split
    (1, 16, 2, 700, 24, 5, False, None),     # G = 8, a head of 24 (padded to 32), splits with no slot at all
    (2, 8, 1, 300, 32, 250, True, 40),       # one KV head, a sliding window
]


def _inputs(case, dtype, device, holes: bool = False):
    """Query, keys, values and mask of a case. ``holes``: every third slot before the position is also disallowed
    (a mask that is not one run: each walk must read its bytes), and the keys and values of every disallowed slot
    are NaN, which no output may show."""
    n, heads, kv, slots, d, pos, padded, window = case
    g = torch.Generator().manual_seed(sum(case[:5]))
    q = torch.randn(n, heads, d, generator=g).to(device, dtype)
    k = torch.randn(n, kv, slots, d, generator=g).to(device, dtype)
    v = torch.randn(n, kv, slots, d, generator=g).to(device, dtype)
    positions = torch.arange(slots)
    allowed = (positions <= pos)[None, :]
    if window is not None:
        allowed = allowed & (pos - positions < window)[None, :]
    if padded:  # row 0 has 3 pad slots at the front, the others none
        allowed = allowed.repeat(n, 1)
        allowed[0, :3] = False
    if holes:
        allowed = allowed & ((positions % 3 != 1) | (positions == pos))[None, :]
        shut = ~allowed.expand(n, -1)[:, None, :, None]
        k, v = k.masked_fill(shut.to(device), float("nan")), v.masked_fill(shut.to(device), float("nan"))
    return q, k, v, allowed.to(device)


def _interpreted(script: str) -> dict:
    """Run ``script`` with Triton's interpreter on, from the repository root; it prints one JSON line."""
    pytest.importorskip("triton", reason="the kernels' CPU tests run them in Triton's interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_splits_fill_the_gpu_but_never_split_below_a_block():
    assert da.splits_for(1, 8, 544) == 9  # 9 blocks of 64 slots, fewer than the 32 splits 256 programs would want
    assert da.splits_for(1, 8, 4096) == 32  # 256 programs
    assert da.splits_for(64, 8, 4096) == 1  # the rows and heads fill the GPU alone
    assert da.splits_for(1, 8, 1) == 1


def test_a_one_block_split_walks_its_block_untrimmed(monkeypatch):
    """Llama-3-8B's shape at 768 slots: batch 1 makes 12 one-block splits, which walk untrimmed (a trim could skip at
    most the one block, and its span scan cost more than that on one H100); batch 16 makes 2 of 6 blocks, which walk
    as ``WALK`` says. The launch carries the walk's number (``WALKS``)."""
    assert (da.split_slots(1, 8, 768), da.split_slots(16, 8, 768)) == (64, 384)
    assert [da.launched_walk(64, w) for w in da.WALKS] == ["masked", "bounded", "masked", "bounded"]
    assert [da.launched_walk(384, w) for w in da.WALKS] == list(da.WALKS)
    assert da.launched_walk(384) == da.WALK == "masked_trimmed"  # hpi run's walk
    split, combine = Launches(), Launches()
    monkeypatch.setattr(da, "_kernels", lambda: (split, combine))
    for n, walk, chunk in ((1, "masked", 64), (16, "masked_trimmed", 384)):
        q, kv = torch.zeros(n, 32, 128), torch.zeros(n, 8, 768, 128)
        da.triton_decode_attention(q, kv, kv, torch.ones(1, 768, dtype=torch.bool), 0.125)
        assert (split.kwargs["WALK"], split.kwargs["CHUNK"]) == (da.WALKS[walk], chunk)


def test_without_a_gpu_it_is_sdpa_over_the_grouped_query():
    for case in CASES:
        q, k, v, allowed = _inputs(case, torch.float32, "cpu")
        assert not da.covers(q, k, allowed) or os.environ.get("TRITON_INTERPRET") == "1"
        got = da.decode_attention(q, k, v, allowed, 0.125)
        torch.testing.assert_close(got, reference(q, k, v, allowed, 0.125).float(), atol=1e-5, rtol=1e-5)


def case_errors() -> dict:
    """Run under the interpreter (``_interpreted``): each case's splits, and per walk of pass 1 (``da.WALKS``) and
    mask (the case's own, then with holes and NaN behind them) the kernel's largest error against float64 attention
    over finite values, under the module's ``TARGET_PROGRAMS`` as the caller set it."""
    out = {"splits": [da.splits_for(case[0], case[2], case[3]) for case in CASES], "errors": {}}
    for walk, holes in ((w, h) for w in da.WALKS for h in (False, True)):
        da.WALK, errors = walk, []
        for case in CASES:
            q, k, v, allowed = _inputs(case, torch.float32, "cpu", holes)
            assert da.covers(q, k, allowed) and not da.covers(q, k, allowed.float())  # an additive mask: sdpa
            got = da.decode_attention(q, k, v, allowed, 0.125)
            want = reference(q, k.nan_to_num(), v.nan_to_num(), allowed, 0.125)
            errors.append(float((got.double() - want).abs().max().nan_to_num(float("inf"))))
        out["errors"][f"{walk}{'+holes' if holes else ''}"] = errors
    return out


def test_kernel_equals_attention_over_repeated_heads_in_fp32():
    """Every case: several splits, splits with no allowed slot, padded rows, a window, G from 1 to 8, a head size
    that is not a power of two; in each walk of pass 1, with the case's mask and with holes in it. Each output element
    within 1e-5 of float64 attention."""
    errors = _interpreted("""
import json
from tests.executor.test_decode_attention import case_errors
print(json.dumps(case_errors()["errors"]))
""")
    assert sorted(errors) == sorted(f"{w}{h}" for w in da.WALKS for h in ("", "+holes"))
    assert all(len(e) == len(CASES) and max(e) < 1e-5 for e in errors.values()), errors


def test_splits_that_walk_several_blocks_equal_attention_over_repeated_heads():
    """With 4 programs aimed for, the cases' 1-8 row-head pairs make 1 or 2 splits of up to 11 blocks: each split walks
    several blocks (``CASES`` alone walk one, untrimmed in every walk: ``launched_walk``), the last split's run
    passing the cache's end, and splits with no allowed slot (position 5 of 700). Each within 1e-5 of float64
    attention."""
    got = _interpreted("""
import json
from hpi.executor import decode_attention as da
from tests.executor.test_decode_attention import case_errors
da.TARGET_PROGRAMS = 4
print(json.dumps(case_errors()))
""")
    assert got["splits"] == [1, 1, 1, 2, 2]  # of 4, 3, 1, 11 and 5 blocks
    assert all(max(e) < 1e-5 for e in got["errors"].values()), got


def test_one_launch_equals_attention_over_repeated_heads_and_leaves_its_counters_at_zero():
    """The one-launch form (``use_one_launch``: the last split of each pair combines them in pass 1), every case and
    walk, with one-block splits and with splits of several blocks (4 programs aimed for), each run twice on the
    same counters: within 1e-5 of float64 attention, and every counter back at zero after each launch."""
    got = _interpreted("""
import json
from hpi.executor import decode_attention as da
from tests.executor.test_decode_attention import case_errors
da.use_one_launch(True)
out = {}
for target in (da.TARGET_PROGRAMS, 4):
    da.TARGET_PROGRAMS = target
    out[target] = [case_errors(), case_errors()]
counts = [int(c.abs().sum()) for c in da._COUNTERS.values()]
print(json.dumps({"runs": out, "counters": len(counts), "nonzero": sum(counts)}))
""")
    assert got["counters"] >= 3 and got["nonzero"] == 0  # one counter set per (device, pairs): 1, 2, 3, 6 and 8 pairs
    for runs in got["runs"].values():
        assert all(max(e) < 1e-5 for run in runs for e in run["errors"].values()), runs
    assert got["runs"]["4"][0]["splits"] == [1, 1, 1, 2, 2]


def test_one_launch_launches_pass_1_alone_with_the_output_and_counters(monkeypatch):
    split, combine = Launches(), Launches()
    monkeypatch.setattr(da, "_kernels", lambda: (split, combine))
    monkeypatch.setattr(da, "_COUNTERS", {})
    q, kv = torch.zeros(2, 32, 128), torch.zeros(2, 8, 768, 128)
    da.use_one_launch(True)
    try:
        out = da.triton_decode_attention(q, kv, kv, torch.ones(1, 768, dtype=torch.bool), 0.125)
    finally:
        da.use_one_launch(False)
    assert not hasattr(combine, "grid") and split.grid == (16, 12) and split.kwargs["ONE_LAUNCH"]
    counts = da._COUNTERS[(torch.device("cpu"), 16)]
    assert split.args[6] is counts and split.args[7] is out and counts.dtype == torch.int32
    # 2 rows x 8 KV heads, 12 splits of a block (256 programs aimed for), padded to 16 for the combine
    assert split.kwargs["SPLITS_PAD"] == 16 and split.args[-4:-2] == (out.stride(0), out.stride(1))
    da.triton_decode_attention(q, kv, kv, torch.ones(1, 768, dtype=torch.bool), 0.125)
    assert combine.grid == (16, 4) and not split.kwargs["ONE_LAUNCH"]  # the two-launch form: pass 2 combines


def test_static_cache_decode_through_the_kernel_gives_the_eager_tokens():
    """The tiny Llama and Mistral (window 6), left-padded, decode over a static cache through the kernel (the
    graphed path; on a CPU it runs without capture) and generate every token of the dynamic-cache eager path."""
    result = _interpreted("""
import json, torch
from hpi.executor.generate import left_pad
from hpi.executor.modeling import ShardSpec, build_stage
from tests.executor.test_graphs import _generate
from tests.executor.test_padding import _tiny
calls = []
from hpi.executor import decode_attention as da
original = da.triton_decode_attention
def counted(*a):
    calls.append(1)
    return original(*a)
da.triton_decode_attention = counted
out = {}
for family in ("llama", "mistral"):
    config = _tiny(family)
    g = torch.Generator().manual_seed(11)
    ids, padding = left_pad([torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (7, 3)], 0)
    n = config.num_hidden_layers
    stages = [build_stage(config, ShardSpec.for_stage([1, n - 1], i), dtype=torch.float32, seed=0) for i in range(2)]
    eager = _generate(stages, ids, padding, graphs=False)
    before = len(calls)
    static = _generate(stages, ids, padding, graphs=True)
    out[family] = {"same": static == eager, "kernel_calls": len(calls) - before}
print(json.dumps(out))
""")
    for family, got in result.items():
        assert got["same"], family
        assert got["kernel_calls"] > 0, family  # the static path went through the kernel


def test_compile_keeps_the_kernel_as_one_opaque_op():
    """``torch.compile(fullgraph=True)`` traces through ``decode_attention`` without a break (the custom op's fake
    gives the shape) and the compiled function runs the kernel and returns its numbers."""
    result = _interpreted("""
import json, torch
from hpi.executor import decode_attention as da
from tests.executor.test_decode_attention import CASES, _inputs, reference
q, k, v, allowed = _inputs(CASES[1], torch.float32, "cpu")
fn = torch.compile(lambda q, k, v, m: da.decode_attention(q, k, v, m, 0.125) * 2, fullgraph=True)
got = fn(q, k, v, allowed)
print(json.dumps(float((got.double() / 2 - reference(q, k, v, allowed, 0.125)).abs().max())))
""")
    assert result < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("walk", list(da.WALKS))
@pytest.mark.parametrize("one_launch", [False, True], ids=["two-launches", "one-launch"])
def test_kernel_matches_sdpa_in_bf16_on_a_gpu(case, walk, one_launch, monkeypatch):
    """Each case at the module's own target (one-block splits) and at 4 programs (splits of several blocks, where
    the trimmed walks trim), with and without holes in the mask; in both forms (``use_one_launch``)."""
    monkeypatch.setattr(da, "WALK", walk)
    monkeypatch.setattr(da, "ONE_LAUNCH", [one_launch])
    for target, holes in ((t, h) for t in (da.TARGET_PROGRAMS, 4) for h in (False, True)):
        monkeypatch.setattr(da, "TARGET_PROGRAMS", target)
        q, k, v, allowed = _inputs(case, torch.bfloat16, "cuda", holes)
        got = da.decode_attention(q, k, v, allowed, 0.125)
        want = reference(q, k.nan_to_num(), v.nan_to_num(), allowed, 0.125)
        assert (got.double() - want).abs().max().item() < 2e-2, (target, holes)  # bf16: ~3 significant digits


def _sm90_ptx(monkeypatch, walk: str, one_launch: bool = False) -> str:
    """Pass 1 as a launch at batch 16 (Llama-3-8B's heads, 768 slots) compiles it for sm_90, here on the CPU
    (``tests/executor/sm90.py``)."""
    from hpi.executor import decode_attention_triton as kernels

    split, combine = Launches(), Launches()
    monkeypatch.setattr(da, "_kernels", lambda: (split, combine))
    monkeypatch.setattr(da, "WALK", walk)
    monkeypatch.setattr(da, "ONE_LAUNCH", [one_launch])
    q = torch.zeros(16, 32, 128, dtype=torch.bfloat16)
    kv = torch.zeros(16, 8, 768, 128, dtype=torch.bfloat16)
    da.triton_decode_attention(q, kv, kv, torch.ones(1, 768, dtype=torch.bool), 0.125)
    return compile_for_sm90(kernels.split_pass, split)[0]


def _sm90_ptx_ops(monkeypatch, walk: str) -> dict[str, int]:
    """Instruction counts of pass 1 (``_sm90_ptx``)."""
    return opcodes(_sm90_ptx(monkeypatch, walk))


@pytest.mark.skipif(da.INTERPRETED, reason="compiles the kernel: run without TRITON_INTERPRET")
def test_one_launch_orders_every_threads_stores_before_the_counter_and_reads_the_parts_from_l2(monkeypatch):
    """The one-launch form's handshake as sm_90 runs it: a CTA barrier after the program's stores of its part, then
    one thread's acquire-release atomic at GPU scope (its result shared through shared memory), and the last
    program's loads of the other programs' parts bypass L1 (``ld.global.cg``: an L1 line from an earlier replay
    would be stale). The walk's own pipeline is untouched; the two-launch form has none of it."""
    pytest.importorskip("triton", reason="compiles the Triton kernel")
    one, two = _sm90_ptx(monkeypatch, "masked", True), _sm90_ptx(monkeypatch, "masked")
    ops, plain = opcodes(one), opcodes(two)
    l2_loads = {k for k in ops if k.startswith("ld.global.cg")}
    assert ops["atom.global.gpu.acq_rel.add.u32"] == 1 and l2_loads
    assert not any(k.startswith(("atom", "ld.global.cg")) for k in plain)
    code = [line.strip() for line in one.splitlines() if line.strip() and not line.strip().startswith(("//", "."))]
    at = next(i for i, line in enumerate(code) if "atom.global" in line)
    last_store = max(i for i, line in enumerate(code[:at]) if "st.global" in line)
    assert any(line.startswith("bar.sync") for line in code[last_store:at])
    kinds = ("cp.async.cg.shared.global", "st.shared.v4.b32", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16")
    assert [ops[k] for k in kinds] == [plain[k] for k in kinds]


@pytest.mark.skipif(da.INTERPRETED, reason="compiles the kernel: run without TRITON_INTERPRET")
def test_every_walk_compiles_for_sm90_with_the_masked_walks_pipeline_and_shared_memory_traffic(monkeypatch):
    """The walks differ in what they walk, not in how a block is read: every form's keys and values go through the
    software pipeline (cp.async into shared memory) and its products read shared memory as the masked walk's do.
    A select on the loaded values (the first trimmed form, commit 700a9f1) sent them through registers and back:
    14 st.shared.v4 against 6, and 0.3-1.7 us a call slower than the masked walk wherever the cache was mostly
    written, on one H100 (benchmarks/results/2026-12-07-attn-trim).
    Only the other walks read the split's mask first (the span scan's vector load)."""
    pytest.importorskip("triton", reason="compiles the Triton kernel")
    ops = {walk: _sm90_ptx_ops(monkeypatch, walk) for walk in da.WALKS}
    kinds = ("cp.async.cg.shared.global", "st.shared.v4.b32", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16")
    masked = ops["masked"]
    assert all(masked[k] > 0 for k in kinds)
    for walk, counts in ops.items():
        assert [counts[k] for k in kinds] == [masked[k] for k in kinds], walk
        assert counts["ld.global.b32"] == (0 if walk == "masked" else 1), walk
