"""Probe (kept with its records, not part of hpi): what pass 1 of the split-KV decode attention pays for beyond the
bytes it reads. A copy of ``hpi.executor.decode_attention``'s pass 1 (interleaved splits) with two switches:
``MASK_LOADS`` (True: keys and values are loaded only where the mask allows, as the module does; False: loaded for
every slot before ``extent``, the mask applied to the scores only, so no load waits on the mask's) and ``TRIM``
(True: a split walks only the blocks before ``extent``; False: every block of the cache, as the module does).
``extent`` is the decode position + 1, given by the host here. Pass 2 is the module's. Each row: µs a call in a
replayed CUDA graph, the module's kernel in both split layouts beside the four probe forms, and the largest error
against sdpa.

    python3 benchmarks/results/2026-12-07-attn-walk/probe_walk.py > $OUT/walk.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/: graph_timing
from graph_timing import time_us  # noqa: E402

from hpi.executor import decode_attention as da  # noqa: E402


@triton.jit
def walk(q_ptr, k_ptr, v_ptr, mask_ptr, part_ptr, lse_ptr, sq_n, sq_h, sk_n, sk_h, sk_l, sv_n, sv_h, sv_l, sm_n,
         slots, extent, scale, STEPS: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
         D: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, MASK_LOADS: tl.constexpr, TRIM: tl.constexpr):
    pair = tl.program_id(0)
    split = tl.program_id(1)
    row = pair // KV
    head = pair % KV
    g = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    g_ok = g < G
    q = tl.load(q_ptr + row * sq_n + (head * G + g)[:, None] * sq_h + d[None, :], mask=g_ok[:, None], other=0.0)
    k_base = k_ptr + row * sk_n + head * sk_h
    v_base = v_ptr + row * sv_n + head * sv_h
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    if TRIM:
        live = tl.cdiv(extent, BLOCK)
        steps = (live - split + SPLITS - 1) // SPLITS  # >= 0: split < SPLITS and live >= 1
    else:
        steps = STEPS
    for step in range(0, steps):
        n = (step * SPLITS + split) * BLOCK + tl.arange(0, BLOCK)
        inside = n < slots
        valid = inside & (tl.load(mask_ptr + row * sm_n + n, mask=inside, other=0) != 0)
        if MASK_LOADS:
            load = valid
        else:
            load = n < extent
        k = tl.load(k_base + n[:, None] * sk_l + d[None, :], mask=load[:, None], other=0.0)
        scores = tl.where(valid[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * sv_l + d[None, :], mask=load[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    slot = (pair * SPLITS + split) * ROWS + g
    tl.store(part_ptr + slot[:, None] * D + d[None, :], out, mask=g_ok[:, None])
    tl.store(lse_ptr + slot, lse, mask=g_ok)


def probe(q, k, v, allowed, scale, extent, mask_loads, trim):
    _, combine_pass = da._kernels()
    n, heads, d = q.shape
    kv, slots = k.shape[1], k.shape[2]
    groups = heads // kv
    rows = max(da.MIN_DOT, 1 << (groups - 1).bit_length())
    splits = da.splits_for(n, kv, slots)
    steps = -(-(-(-slots // da.BLOCK_N)) // splits)
    mask = allowed.view(torch.uint8)
    part = torch.empty(n * kv * splits * rows, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(n * kv * splits * rows, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    walk[(n * kv, splits)](q, k, v, mask, part, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                           v.stride(0), v.stride(1), v.stride(2), 0, slots, extent, scale,
                           STEPS=steps, KV=kv, G=groups, ROWS=rows, D=d, BLOCK=da.BLOCK_N, SPLITS=splits,
                           MASK_LOADS=mask_loads, TRIM=trim, num_warps=da.WARPS, num_stages=da.STAGES)
    combine_pass[(n * kv, groups)](part, lse, out, out.stride(0), out.stride(1), KV=kv, G=groups, ROWS=rows, D=d,
                                   D_PAD=d, SPLITS=splits, SPLITS_PAD=1 << (splits - 1).bit_length(), SIGNAL=False)
    return out


def main() -> None:
    dev = torch.device("cuda")
    for slots, position in ((544, 528), (768, 512), (768, 767), (1024, 512), (1024, 1023)):
        for batch in (16, 1):
            g = torch.Generator(device="cpu").manual_seed(batch)
            q = torch.randn(batch, 32, 128, generator=g).to(dev, torch.bfloat16)
            k = torch.randn(batch, 8, slots, 128, generator=g).to(dev, torch.bfloat16)
            v = torch.randn(batch, 8, slots, 128, generator=g).to(dev, torch.bfloat16)
            allowed = (torch.arange(slots) <= position)[None, :].to(dev)
            scale = 128 ** -0.5
            ref = da.grouped_sdpa(q, k, v, allowed, scale).float()
            kv_bytes = 2 * batch * 8 * (position + 1) * 128 * 2
            forms = {f"module_{'interleaved' if lay else 'runs'}":
                     (lambda lay=lay: _module(q, k, v, allowed, scale, lay)) for lay in (True, False)}
            for ml in (True, False):
                for trim in (False, True):
                    forms[f"probe_mask_loads={ml}_trim={trim}"] = (
                        lambda ml=ml, trim=trim: probe(q, k, v, allowed, scale, position + 1, ml, trim))
            for name, fn in forms.items():
                out = fn()
                us, timer = time_us(fn, 200, dev)
                print(json.dumps({"slots": slots, "position": position, "batch": batch, "form": name,
                                  "splits": da.splits_for(batch, 8, slots), "us_per_call": round(us, 3),
                                  "kv_gb_s": round(kv_bytes / us / 1e3, 1), "timer": timer,
                                  "max_abs_err": float((out.float() - ref).abs().max())}), flush=True)


def _module(q, k, v, allowed, scale, interleaved):
    saved = da.INTERLEAVED
    da.INTERLEAVED = interleaved
    try:
        return da.triton_decode_attention(q, k, v, allowed, scale)
    finally:
        da.INTERLEAVED = saved


if __name__ == "__main__":
    main()
