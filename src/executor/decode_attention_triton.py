"""The two Triton kernels of the split-KV decode attention (``hpi.executor.decode_attention``, whose docstring
says what they do and why). A module of its own so that Triton is imported only where the kernels run, and so that
pass 1's helpers are module-level ``@triton.jit`` functions, which both the compiler and Triton's interpreter
resolve by name."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_block(q, k_base, v_base, mask_row, n, slots, lo, hi, dense, d, d_ok, m_i, l_i, acc, scale,
                 sk_l, sv_l, IEEE: tl.constexpr, WHOLE: tl.constexpr):
    """One block of slots ``n`` into the online softmax (m_i, l_i, acc); only slots in [lo, hi) count (a block of
    the trimmed walk may reach into the next split's). Keys and values are loaded where the mask allows. ``dense``:
    every slot in [lo, hi) is allowed (a causal mask, a window, left padding), so the block's mask bytes are not
    read and no load waits on theirs; a disallowed slot is never loaded, so whatever it holds (NaN in a cache never
    written) cannot reach the output through 0 * NaN. WHOLE: [lo, hi) is the block's own split (the masked walk),
    so only the cache's end bounds it (the code measured before the other walks, instruction for instruction)."""
    if WHOLE:
        span = n < slots
    else:
        span = (n >= lo) & (n < hi) & (n < slots)
    valid = span & (tl.load(mask_row + n, mask=span & (dense == 0), other=1) != 0)
    k = tl.load(k_base + n[:, None] * sk_l + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = tl.where(valid[None, :], scores * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no slot yet: exp(-inf - 0) = 0, not NaN
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + n[:, None] * sv_l + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def allowed_span(mask_row, start, slots, CHUNK: tl.constexpr, SCAN: tl.constexpr):
    """The split's first allowed slot, one past its last (from one pass over its mask bytes; (end, start) when it
    has none, an empty range) and whether every slot between is allowed."""
    end = start + CHUNK
    lo = end
    hi = start
    count = start * 0
    for offset in range(0, CHUNK, SCAN):
        n = start + offset + tl.arange(0, SCAN)
        inside = (n < end) & (n < slots)
        ok = inside & (tl.load(mask_row + n, mask=inside, other=0) != 0)
        lo = tl.minimum(lo, tl.min(tl.where(ok, n, end), 0))
        hi = tl.maximum(hi, tl.max(tl.where(ok, n + 1, start), 0))
        count += tl.sum(ok.to(tl.int32), 0)
    return lo, hi, count == tl.maximum(hi - lo, 0)


@triton.jit
def split_pass(q_ptr, k_ptr, v_ptr, mask_ptr, part_ptr, lse_ptr, count_ptr, out_ptr,
               sq_n, sq_h, sk_n, sk_h, sk_l, sv_n, sv_h, sv_l, sm_n, so_n, so_h,
               slots, scale,
               CHUNK: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
               D_PAD: tl.constexpr,
               BLOCK: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr, WALK: tl.constexpr,
               SCAN: tl.constexpr, ONE_LAUNCH: tl.constexpr, SPLITS_PAD: tl.constexpr):
    pair = tl.program_id(0)  # row * KV + kv head
    split = tl.program_id(1)
    row = pair // KV
    head = pair % KV
    g = tl.arange(0, ROWS)
    d = tl.arange(0, D_PAD)
    g_ok = g < G
    d_ok = d < D
    q = tl.load(q_ptr + row * sq_n + (head * G + g)[:, None] * sq_h + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + row * sk_n + head * sk_h
    v_base = v_ptr + row * sv_n + head * sv_h
    mask_row = mask_ptr + row * sm_n
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    start = split * CHUNK
    # WALK (decode_attention.WALKS): 2 and 3 trim the walk to the split's allowed span, 1 and 3 skip the mask's
    # bytes where that span is all allowed
    if WALK == 0:
        lo = start
        hi = start + CHUNK
        dense = start < 0  # False: every block's mask bytes are read
    else:
        lo, hi, dense = allowed_span(mask_row, start, slots, CHUNK, SCAN)
        if WALK == 2:
            dense = start < 0  # the mask is read in every block
    if WALK >= 2:  # only the blocks from the first allowed slot to the last
        for first in range(lo, hi, BLOCK):
            m_i, l_i, acc = attend_block(q, k_base, v_base, mask_row, first + tl.arange(0, BLOCK), slots, lo, hi,
                                         dense, d, d_ok, m_i, l_i, acc, scale, sk_l, sv_l, IEEE, False)
    else:  # every block of the split
        for offset in range(0, CHUNK, BLOCK):
            m_i, l_i, acc = attend_block(q, k_base, v_base, mask_row, start + offset + tl.arange(0, BLOCK), slots,
                                         lo, hi, dense, d, d_ok, m_i, l_i, acc, scale, sk_l, sv_l, IEEE,
                                         WALK == 0)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    slot = (pair * SPLITS + split) * ROWS + g
    # Only the G real query rows: the padded ones are never combined (a quarter of the bytes at G = 4).
    tl.store(part_ptr + slot[:, None] * D_PAD + d[None, :], out, mask=g_ok[:, None])
    tl.store(lse_ptr + slot, lse, mask=g_ok)
    if ONE_LAUNCH:  # the pair's last split to finish combines them all (decode_attention: ONE_LAUNCH)
        tl.debug_barrier()  # every thread's stores before the release below (one thread performs a scalar atomic)
        if tl.atomic_add(count_ptr + pair, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            for head_row in tl.static_range(G):
                w, parts = weighted_parts(part_ptr, lse_ptr, pair, head_row, d, SPLITS, SPLITS_PAD, ROWS, D_PAD,
                                          ".cg")
                combined = tl.sum(w[:, None] * parts, 0) / tl.sum(w, 0)
                tl.store(out_ptr + row * so_n + (head * G + head_row) * so_h + d,
                         combined.to(out_ptr.dtype.element_ty), mask=d_ok)
            tl.store(count_ptr + pair, 0)  # ready for the next launch (a graph replays this one)


@triton.jit
def weighted_parts(part_ptr, lse_ptr, pair, g, d, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                   ROWS: tl.constexpr, D_PAD: tl.constexpr, CACHE: tl.constexpr):
    """Query head ``g``'s split outputs of ``pair`` [SPLITS_PAD, D_PAD] and their softmax weights
    ``exp(lse_split - max lse)`` [SPLITS_PAD] (0 for the padding splits). CACHE: the loads' cache modifier (".cg",
    L2 only, where the parts were written by other programs of the same launch)."""
    split = tl.arange(0, SPLITS_PAD)
    slot = (pair * SPLITS + split) * ROWS + g
    lse = tl.load(lse_ptr + slot, mask=split < SPLITS, other=float("-inf"), cache_modifier=CACHE)
    m = tl.max(lse, 0)  # finite: a query's own slot is always allowed
    w = tl.exp(lse - m)
    parts = tl.load(part_ptr + slot[:, None] * D_PAD + d[None, :], mask=(split < SPLITS)[:, None], other=0.0,
                    cache_modifier=CACHE)
    return w, parts


@triton.jit
def combine_pass(part_ptr, lse_ptr, out_ptr, so_n, so_h,
                 KV: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                 D_PAD: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                 SIGNAL: tl.constexpr):
    pair = tl.program_id(0)
    g = tl.program_id(1)  # one query head a program: every split's part loaded at once, no serial chain
    row = pair // KV
    head = pair % KV
    d = tl.arange(0, D_PAD)
    w, part = weighted_parts(part_ptr, lse_ptr, pair, g, d, SPLITS, SPLITS_PAD, ROWS, D_PAD, "")
    if SIGNAL:  # its loads are issued: a dependent launch after it (the o_proj product) may start warming L2
        tl.extra.cuda.gdc_launch_dependents()
    out = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(out_ptr + row * so_n + (head * G + g) * so_h + d, out.to(out_ptr.dtype.element_ty), mask=d < D)
