"""One-token decode attention over a static KV cache, split along the cache (flash-decoding), in Triton.

Why: a graphed decode step (``hpi.executor.graphs``) attends over every slot of its static cache behind a
device-built mask, since a CUDA graph cannot change a tensor's length between replays. sdpa's kernels then do
the work of the whole cache every step: on one H200 cuDNN's attention took 16.4 us a layer with 544 slots and
6.0 us with 128 (Llama-3-8B shape, batch 1: 0.53 ms of a 5.06 ms compiled step, 10% of it, for 71 MB of keys
and values that take 17 us to read; benchmarks/results/2026-12-04-h200-fused, call 5). At batch 1 there are only
``kv_heads`` (query-row, KV-head) pairs, 8 for the 8B, so a kernel that walks the cache in one program per pair
leaves most of the GPU idle.

What this does (the split-KV scheme of flash-decoding, as vLLM's and SGLang's Triton decode kernels do):
- pass 1, one program per (row, KV head, split): the split's slots in blocks of ``BLOCK_N``; the G query heads
  that share the KV head are G rows of one ``tl.dot`` (padded to 16, ``tl.dot``'s least), so each key and value
  is read once for all of them; an online softmax (running max, sum and weighted values, fp32) over the blocks;
  it writes the split's normalized output and its log-sum-exp. A masked-off slot is never loaded (the loads are
  masked), so slots past the current position cost no bytes. The walk (``WALK``, ``WALKS``): "masked" steps
  through every block of the split, reading each block's mask bytes first; on one H100 each step costs 0.6-1.1 us
  beyond its bytes and an empty block about 1.5 us (benchmarks/results/2026-12-07-attn-trim). The others first
  read the split's mask once (``allowed_span``: its first and last allowed slot, and whether every slot between is
  allowed) and then walk only that span ("masked_trimmed", "trimmed") and/or skip the mask's bytes where the span
  is all allowed ("bounded", "trimmed"). hpi's default is "masked_trimmed": on one H100, batch 16, Llama-3-8B's
  shape, it took 0.466 / 0.756 / 0.889 of the masked walk's time at positions 0 / 256 / 512 of 768 slots and 0.941
  at 528 of 544, 1.006-1.03 where the cache is full, and 1.02-1.05 at batch 1 (a span scan before the first
  block, about 0.2 us), so a split of one block, as batch 1's are, walks untrimmed (``launched_walk``); the
  compiled step with it replayed in 0.993 of the masked walk's at batch 16 (benchmarks/results/2026-12-07-walks).
  Skipping the mask bytes did not pay: "trimmed" took 0.995-1.04 of "masked_trimmed". A first trimmed form
  that zeroed the disallowed values with a select sent them through registers and back to shared memory and lost
  3-12% (2026-12-07-attn-trim); ``tests/executor/test_decode_attention.py`` rules that out in every walk's sm_90
  PTX.
- pass 2, one program per (row, query head): every split's output and log-sum-exp loaded at once and weighted
  by ``exp(lse_split - max lse)``. (A first version walked the splits in a loop, one program per KV head: 4.5 us
  a layer on one H200 against 4.3 for pass 1.)
- one launch (``use_one_launch``, off by default: slower on one H100, its docstring says why): pass 1's programs
  count themselves done on a counter per (row, KV head), after a CTA barrier and with one acquire-release atomic,
  and the pair's last program combines the splits as pass 2 would, reading the others' parts from L2
  (``ld.global.cg``), then resets the counter: one kernel a layer fewer, for a serial combine at the end of the
  slowest program.
The number of splits is fixed by the shapes (enough programs to fill the GPU, at least a block each), so a graph
replays the same grid at every position.

Measured (one H200, 8B shape, batch 1, 544 slots; benchmarks/results/2026-12-04-h200-split): 4.4 + 1.6 us a
layer against cuDNN's 16.4 + 1.2, and the compiled step 4.51 ms against 5.87 with sdpa in the same process, with
the same greedy tokens at all 32 teacher-forced positions.

Under ``hpi.executor.dependent_launch`` pass 2 signals its dependents once its loads are issued, so that the
product after it, a dependent launch, may warm L2 with its weights while it finishes; both passes stay plain launches
(pass 1 reads the cache row the kernel before writes).

The mask is the one the stage built (``masks.static_causal_mask``: causal, a sliding window, left padding), as
a boolean [rows or 1, slots]; it is the only source of which slots count. Every query may attend to its own
slot, so no row is empty.

Used by the static-cache decode step (``hpi.executor.attention``: ``hpi run``'s graphed decode, eager or
compiled); serving's slot cache keeps sdpa (``hpi.executor.slots``) until its per-bucket graphs are measured with it.
``decode_attention`` is a torch custom op (``hpi::decode_attention``) so that ``torch.compile`` keeps the Triton
launch as one opaque call inside the compiled step. Without CUDA or Triton it runs sdpa over the grouped query
(``grouped_sdpa``), which is also the reference the tests compare with; on the CPU the tests run the Triton
kernels themselves through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from hpi.executor import dependent_launch, triton_env
from hpi.executor.triton_env import INTERPRETED, TRITON

BLOCK_N = 64  # slots per block of pass 1
WARPS = 4  # pass 1's warps a program (Triton's default)
STAGES = 3  # pass 1's software-pipeline stages over its blocks (Triton's default on CUDA)
MIN_DOT = 16  # tl.dot's least dimension: the G query heads of a KV head, and the head size, are padded to it
TARGET_PROGRAMS = 256  # pass-1 programs to aim for: about two per SM of an H100/H200 (132 SMs)
MAX_HEAD_DIM = 256  # a head is padded to a power of two (tl.arange), at least 16 (tl.dot), at most this
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# How pass 1 walks its split (``split_pass``'s WALK). "masked": every block, reading each block's mask bytes and
# loading keys and values where they allow. The others first find the split's first and last allowed slot and
# whether every slot between is allowed (one pass over its mask bytes): "bounded" walks every block and, where
# that span is all allowed, reads no mask byte in the walk (no load waits on one); "masked_trimmed" walks only the
# blocks of the span, reading their mask bytes; "trimmed" both. The benches switch it (``WALK``).
WALKS = {"masked": 0, "bounded": 1, "masked_trimmed": 2, "trimmed": 3}
WALK = "masked_trimmed"  # hpi run's walk: measured against the others in the module's docstring
MAX_SCAN = 1024  # mask bytes a program reads at once when it looks for its split's allowed span
# One launch instead of two (``use_one_launch``): each pass-1 program counts itself done on its (row, KV head)'s
# counter, and the last of the pair's splits combines them, as pass 2 would, in the same launch: one kernel fewer a
# layer. The counters are one int32 per pair, zero between launches (the last program resets its own), kept per
# device and size (``_counters``): launches of the same shape on two streams at once would share them.
ONE_LAUNCH = [False]
_ENABLED = [True]
_COUNTERS: dict[tuple, torch.Tensor] = {}


def grouped_sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                 scaling: float | None) -> torch.Tensor:
    """sdpa over the unrepeated cache: query [n, H, d], keys/values [n, kv, L, d], allowed [n or 1, L] -> [n, H, d].
    The G query heads of a KV head become G query rows of it (``hpi.executor.attention``)."""
    n, heads, d = query.shape
    kv = keys.shape[1]
    grouped = query.reshape(n, kv, heads // kv, d)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=allowed[:, None, None, :], scale=scaling)
    return out.reshape(n, heads, d)


def covers(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> bool:
    """Whether the Triton kernel takes this call: switched on, Triton importable, a CUDA tensor (or the
    interpreter), a boolean mask (an additive one goes to sdpa), a head size up to ``MAX_HEAD_DIM``, one of its
    dtypes, and G query heads per KV head."""
    if not (_ENABLED[0] and TRITON and (query.is_cuda or INTERPRETED) and allowed.dtype == torch.bool):
        return False
    heads, kv, d = query.shape[1], keys.shape[1], query.shape[-1]
    return (d <= MAX_HEAD_DIM and query.dtype in DTYPES and keys.dtype == query.dtype and heads % kv == 0
            and keys.stride(-1) == 1 and query.stride(-1) == 1)


def use_split_kv(enabled: bool) -> None:
    """Switch the Triton kernel on or off for this process (off: sdpa; a benchmark compares the two). A compiled
    step keeps the choice it was traced with: reset dynamo (``torch._dynamo.reset()``) after switching."""
    _ENABLED[0] = enabled


def use_one_launch(enabled: bool) -> None:
    """Combine the splits in pass 1's last program of each pair (one launch) or in pass 2 (two, the default: on one
    H100 the one-launch form made the 8B's compiled step slower, 5.790 against 5.699 ms, pass 1 taking 9.2 instead of
    4.3 µs a layer to save pass 2's 1.6; benchmarks/results/2026-12-07-fewer-kernels). Read at each call, inside the
    op (not when torch.compile traces it): a captured graph keeps the launches it was captured with."""
    ONE_LAUNCH[0] = enabled


def _counters(device: torch.device, pairs: int) -> torch.Tensor:
    """The one-launch form's per-pair counters, zeroed once: made at the first (eager) call of a shape, before a
    graph captures the step, so the graph reuses them rather than capturing a memset."""
    key = (device, pairs)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(pairs, device=device, dtype=torch.int32)
    return _COUNTERS[key]


def splits_for(rows: int, kv_heads: int, slots: int) -> int:
    """Pass 1's splits of the cache: enough programs for ``TARGET_PROGRAMS``, none smaller than a block."""
    blocks = -(-slots // BLOCK_N)
    return max(1, min(blocks, -(-TARGET_PROGRAMS // (rows * kv_heads))))


def split_slots(rows: int, kv_heads: int, slots: int) -> int:
    """Slots of one split of pass 1, whole blocks (``splits_for``'s share of the cache, rounded up to blocks)."""
    per_split = -(-slots // splits_for(rows, kv_heads, slots))
    return -(-per_split // BLOCK_N) * BLOCK_N


# A trimmed walk of a one-block split can skip at most that block, and its span scan cost more than the block:
# at batch 1 (Llama-3-8B's shape, 9-16 one-block splits) "masked_trimmed" took 1.02-1.05 of "masked", also where
# most splits were empty (benchmarks/results/2026-12-07-walks). Such a launch walks its block untrimmed.
_UNTRIMMED = {"masked_trimmed": "masked", "trimmed": "bounded"}


def launched_walk(chunk: int, walk: str | None = None) -> str:
    """The walk pass 1 runs over splits of ``chunk`` slots (``split_slots``): ``walk`` (default ``WALK``),
    untrimmed where a split is one block."""
    walk = WALK if walk is None else walk
    return _UNTRIMMED.get(walk, walk) if chunk <= BLOCK_N else walk


@functools.cache
def _kernels():
    """The two Triton kernels, built on first use (Triton is imported only where it runs)."""
    if INTERPRETED:
        triton_env.interpreter_scalar_index()
    from hpi.executor import decode_attention_triton as kernels

    return kernels.split_pass, kernels.combine_pass


def triton_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """The two passes (module docstring): query [n, H, d], keys/values [n, kv, L, d], allowed [n or 1, L]
    (bool) -> [n, H, d] in the query's dtype."""
    split_pass, combine_pass = _kernels()
    n, heads, d = query.shape
    kv, slots = keys.shape[1], keys.shape[2]
    groups = heads // kv
    rows = max(MIN_DOT, 1 << (groups - 1).bit_length())
    d_pad = max(MIN_DOT, 1 << (d - 1).bit_length())
    splits = splits_for(n, kv, slots)
    chunk = split_slots(n, kv, slots)
    mask = allowed.view(torch.uint8)  # the kernel reads one byte a slot (``covers``: a boolean mask)
    mask_row_stride = 0 if mask.shape[0] == 1 else mask.stride(0)
    part = torch.empty(n * kv * splits * rows, d_pad, device=query.device, dtype=torch.float32)
    lse = torch.empty(n * kv * splits * rows, device=query.device, dtype=torch.float32)
    out = torch.empty(n, heads, d, device=query.device, dtype=query.dtype)
    ieee = query.dtype == torch.float32
    one_launch = ONE_LAUNCH[0]
    counts = _counters(query.device, n * kv) if one_launch else lse  # lse: a pointer the two-launch form never uses
    splits_pad = 1 << (splits - 1).bit_length()
    split_pass[(n * kv, splits)](
        query, keys, values, mask, part, lse, counts, out,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), mask_row_stride, out.stride(0), out.stride(1),
        slots, scale,
        CHUNK=chunk, KV=kv, G=groups, ROWS=rows, D=d, D_PAD=d_pad, BLOCK=BLOCK_N, SPLITS=splits, IEEE=ieee,
        WALK=WALKS[launched_walk(chunk)], SCAN=min(MAX_SCAN, 1 << (chunk - 1).bit_length()),
        ONE_LAUNCH=one_launch, SPLITS_PAD=splits_pad, num_warps=WARPS, num_stages=STAGES)
    if not one_launch:
        combine_pass[(n * kv, groups)](part, lse, out, out.stride(0), out.stride(1),
                                       KV=kv, G=groups, ROWS=rows, D=d, D_PAD=d_pad, SPLITS=splits,
                                       SPLITS_PAD=splits_pad, SIGNAL=dependent_launch.active(query.device))
    return out


@torch.library.custom_op("hpi::decode_attention", mutates_args=())
def _decode_attention_op(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                         scale: float) -> torch.Tensor:
    return triton_decode_attention(query, keys, values, allowed, scale)


@_decode_attention_op.register_fake
def _(query, keys, values, allowed, scale):
    return torch.empty_like(query)


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                     scaling: float | None) -> torch.Tensor:
    """Attention of one query token per row over its cache: query [n, H, d], keys/values [n, kv, L, d],
    allowed [n or 1, L] (True: attend) -> [n, H, d]. The Triton kernel where it ``covers`` the call, else sdpa."""
    if not covers(query, keys, allowed):
        return grouped_sdpa(query, keys, values, allowed, scaling)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    return _decode_attention_op(query, keys, values, allowed, scale)
