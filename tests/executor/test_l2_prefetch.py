"""hpi.executor.l2_prefetch: the bulk L2 prefetch of the output projection's weight before the decode attention.

On the CPU: the launch's arithmetic, the kernel as sm_90 compiles it (``tests/executor/sm90.py``: one bulk prefetch a
thread, no load or store), and the plumbing through ``decode_attention`` and the static-cache decode path in
Triton's interpreter (the prefetch itself launches nothing there). On a GPU of sm_90 (skipped elsewhere; run on the
device): it launches, and the attention and the product after it give the same bits as without it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hpi.executor import l2_prefetch  # noqa: E402
from tests.executor.sm90 import Launches, compile_for_sm90, opcodes  # noqa: E402
from tests.executor.test_decode_attention import CASES, _inputs, _interpreted  # noqa: E402

O_PROJ_8B = 4096 * 4096 * 2  # Llama-3-8B's o_proj, bf16


@pytest.mark.parametrize("nbytes", [16, O_PROJ_8B, 32 * 65536 + 16, 65536 * 31])
def test_the_chunks_cover_the_weight_and_the_programs_cover_the_chunks(nbytes):
    count, programs = l2_prefetch.chunks(nbytes)
    assert (count - 1) * l2_prefetch.CHUNK_BYTES < nbytes <= count * l2_prefetch.CHUNK_BYTES
    assert (programs - 1) * l2_prefetch.PER_PROGRAM < count <= programs * l2_prefetch.PER_PROGRAM
    if nbytes == O_PROJ_8B:
        assert (count, programs) == (512, 16)  # 33.5 MB in 512 instructions, 16 one-warp programs


def test_nothing_is_launched_on_the_cpu_or_when_switched_off(monkeypatch):
    weight = torch.zeros(64, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(l2_prefetch, "_ENABLED", [True])
    assert not l2_prefetch.covers(weight) and not l2_prefetch.prefetch(weight)  # a CPU tensor
    monkeypatch.setattr(l2_prefetch, "_ENABLED", [False])
    assert not l2_prefetch.enabled()


@pytest.mark.skipif(l2_prefetch.INTERPRETED, reason="compiles the kernel: run without TRITON_INTERPRET")
def test_the_launch_asks_for_every_chunk_and_compiles_to_one_bulk_prefetch_a_thread(monkeypatch):
    """The launch for the 8B's o_proj: 16 programs of one warp over the flat bytes; sm_90's PTX of it has one
    ``cp.async.bulk.prefetch.L2.global`` (each of the warp's 32 threads runs it for its chunk) and reads or writes no
    memory itself."""
    pytest.importorskip("triton")
    kernel = l2_prefetch._kernel()
    launches = Launches()
    monkeypatch.setattr(l2_prefetch, "_kernel", lambda: launches)
    monkeypatch.setattr(l2_prefetch, "covers", lambda weight: True)
    weight = torch.zeros(4096, 4096, dtype=torch.bfloat16)
    assert l2_prefetch.prefetch(weight)
    assert launches.grid == (16,)
    flat, nbytes = launches.args
    assert flat.dtype == torch.uint8 and flat.data_ptr() == weight.data_ptr() and nbytes == O_PROJ_8B
    assert launches.kwargs == {"CHUNK": 65536, "PER_PROGRAM": 32, "num_warps": 1}
    ptx, _ = compile_for_sm90(kernel, launches)
    ops = opcodes(ptx)  # (opcodes stops at the first capital: the bulk prefetch counts under its prefix)
    assert ops["cp.async.bulk.prefetch."] == 1 and ptx.count("cp.async.bulk.prefetch.L2.global [") == 1
    assert not [op for op in ops if op.startswith(("ld.global", "st.global"))], ops


def test_each_familys_output_projection_is_found():
    """Llama's o_proj, OPT's out_proj and BLOOM's dense: the weight the product after the attention reads."""
    from transformers import BloomConfig

    from hpi.executor.modeling import ShardSpec, build_stage
    from tests.executor.test_padding import _tiny

    configs = {"llama": _tiny("llama"), "opt": _tiny("opt"),
               "bloom": BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=300)}
    names = {"llama": "o_proj", "opt": "out_proj", "bloom": "dense"}
    for family, config in configs.items():
        layers = config.num_hidden_layers
        stage = build_stage(config, ShardSpec.whole(layers), dtype=torch.float32, seed=0)
        attentions = [m for m in stage.modules() if type(m).__name__.endswith("Attention")]
        assert len(attentions) == layers, family
        for attention in attentions:
            assert l2_prefetch.output_projection_weight(attention) is getattr(attention, names[family]).weight
    assert l2_prefetch.output_projection_weight(torch.nn.Linear(2, 2)) is None


def test_the_static_cache_decode_asks_for_each_layers_output_projection_only_when_switched_on():
    """The tiny Llama decodes over a static cache through the kernel (Triton's interpreter) with the prefetch
    recorded: switched on, every decode step's attention call of each layer asks for that layer's o_proj weight
    and the tokens are the ones generated with it off; off, nothing is asked. The same call compiled
    (``fullgraph=True``) with a weight to prefetch traces without a break."""
    result = _interpreted("""
import json, torch
from hpi.executor import decode_attention as da, l2_prefetch
from hpi.executor.generate import left_pad
from hpi.executor.modeling import ShardSpec, build_stage
from tests.executor.test_decode_attention import CASES, _inputs
from tests.executor.test_graphs import _generate
from tests.executor.test_padding import _tiny
asked = []
l2_prefetch.beside = lambda weight: asked.append(weight)  # records, launches nothing (returns None)
config = _tiny("llama")
g = torch.Generator().manual_seed(11)
ids, padding = left_pad([torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (7, 3)], 0)
stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.float32, seed=0)
weights = [layer.self_attn.o_proj.weight for layer in stage.layers]
off = _generate([stage], ids, padding, graphs=True)
asked_off = len(asked)
l2_prefetch.use(True)
on = _generate([stage], ids, padding, graphs=True)
per_layer = [sum(w is weight for w in asked) for weight in weights]
q, k, v, allowed = _inputs(CASES[1], torch.float32, "cpu")
w = torch.ones(8, 8)
fn = torch.compile(lambda q, k, v, m: da.decode_attention(q, k, v, m, 0.125, prefetch=w), fullgraph=True)
before = len(asked)
fn(q, k, v, allowed)
print(json.dumps({"same": on == off, "asked_off": asked_off, "per_layer": per_layer, "asked_on": before - asked_off,
                  "compiled_asked": len(asked) - before}))
""")
    assert result["same"] and result["asked_off"] == 0
    assert len(set(result["per_layer"])) == 1 and result["per_layer"][0] > 0, result  # every layer, every step
    assert sum(result["per_layer"]) == result["asked_on"]  # and no other weight
    assert result["compiled_asked"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the bulk prefetch needs a GPU of sm_90 or newer")
def test_the_prefetch_launches_and_changes_no_bit_on_a_gpu(monkeypatch):
    """Llama-3-8B's o_proj shape in bf16: the prefetch launches, on the current stream and on a side stream; the
    attention with it (forked and joined inside the op) and o_proj's product after it equal, bit for bit, the same
    calls without it."""
    from hpi.executor import decode_attention as da

    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v, allowed = _inputs(CASES[1], torch.bfloat16, "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    runs = []
    for on in (False, True):
        monkeypatch.setattr(l2_prefetch, "_ENABLED", [on])
        assert l2_prefetch.prefetch(weight) == on
        side = l2_prefetch.beside(weight)
        assert (side is not None) == on and side != torch.cuda.current_stream()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        out = da.decode_attention(q, k, v, allowed, 0.125, prefetch=weight)
        runs.append((out, torch.nn.functional.linear(x, weight)))
    torch.cuda.synchronize()
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
