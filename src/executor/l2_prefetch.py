"""Ask L2 for a weight before the kernel that reads it, while the kernels in between leave HBM idle (Hopper).

Why: in the compiled batch-1 decode step each decoder layer runs its attention (rotary and cache write, the two
passes of ``hpi.executor.decode_attention``) between the q/k/v product and o_proj, about 10 µs a layer on one H200
that read only the cache's few MB; then o_proj streams its weight (33.5 MB for Llama-3-8B) from a cold start, ramp
and tail included (benchmarks/results/2026-12-04-h200-split/call2/profile-544.txt). On the H200, whose HBM limit is
3.54 ms a step, such fixed costs are what separate the step from 0.8 of it (issue 20).

What this does: one Triton kernel issues ``cp.async.bulk.prefetch.L2.global`` (PTX ISA 8.0, sm_90): one
instruction per ``CHUNK_BYTES`` of the weight, a thread each. The kernel does not end before the bytes are in (on one
H100 it held its stream ~10 µs for 33.6 MB, about HBM's rate), so launched on the attention's own stream it adds
that time and the product after it gains less (a product read from L2 took 11.1 against 14.5 µs): 1.5-1.6x the plain
product's time (benchmarks/results/2026-12-07-l2-prefetch). ``beside`` launches it on a side stream, forked from
the attention's stream before the attention's kernels and joined after them, so the copy runs beside the attention
and o_proj, after the join, reads L2. A prefetch is a hint: it changes no value. ``hpi.executor.decode_attention``
does this for the layer's output projection (``prefetch`` argument of its op), where it is switched on (``use``)
and ``covers`` the weight.

Off by default: ``benchmarks/l2_prefetch_bench.py`` measures the prefetch against a plain product after an
attention-long spin, and ``benchmarks/compile_decode.py`` (variant ``compiled_skinny_l2``) the compiled step with it.
On the CPU, Triton's interpreter and GPUs before sm_90 it launches nothing.
"""

from __future__ import annotations

import functools

import torch

from hpi.executor.triton_env import INTERPRETED, TRITON

CHUNK_BYTES = 65536  # bytes one bulk-prefetch instruction asks for (a multiple of 16, PTX's unit)
PER_PROGRAM = 32  # chunks a program asks for: one warp, one chunk a thread
ALIGN = 16  # the instruction's address and size unit (PTX: cp.async.bulk.prefetch)
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense")  # Llama/Mistral/Qwen2, OPT, BLOOM: the attention's output
_ENABLED = [False]


def use(enabled: bool) -> None:
    """Switch the prefetch on or off for this process. A compiled step keeps the choice it was traced with: reset
    dynamo (``torch._dynamo.reset()``) after switching."""
    _ENABLED[0] = enabled


def enabled() -> bool:
    return _ENABLED[0]


def output_projection_weight(attention: torch.nn.Module) -> torch.Tensor | None:
    """The weight of an attention module's output projection, the product that follows its attention (None: the
    module has none of ``OUTPUT_PROJECTIONS``)."""
    for name in OUTPUT_PROJECTIONS:
        weight = getattr(getattr(attention, name, None), "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight
    return None


def chunks(nbytes: int, chunk_bytes: int = CHUNK_BYTES) -> tuple[int, int]:
    """(instructions, programs) that ask for ``nbytes``: one instruction per chunk, ``PER_PROGRAM`` a program."""
    count = -(-nbytes // chunk_bytes)
    return count, -(-count // PER_PROGRAM)


@functools.cache
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def covers(weight: torch.Tensor) -> bool:
    """Whether ``prefetch`` launches for this tensor: switched on, Triton compiled for a CUDA GPU of sm_90 or newer
    (not the interpreter), a contiguous tensor whose address and size are whole 16-byte units."""
    if not (_ENABLED[0] and TRITON and not INTERPRETED and weight.is_cuda and _sm90(weight.device.index or 0)):
        return False
    nbytes = weight.numel() * weight.element_size()
    return weight.is_contiguous() and weight.data_ptr() % ALIGN == 0 and nbytes % ALIGN == 0 and nbytes > 0


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def bulk_prefetch(base_ptr, nbytes, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
        c = tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
        start = c.to(tl.int64) * CHUNK
        inside = start < nbytes
        start = tl.where(inside, start, 0)  # a thread past the end asks for the first 16 bytes again
        size = tl.where(inside, tl.minimum(nbytes - start, CHUNK), 16).to(tl.int32)
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; // dummy $0", "=r,l,r",
                                  [base_ptr + start, size], dtype=tl.int32, is_pure=False, pack=1)

    return bulk_prefetch


def prefetch(weight: torch.Tensor) -> bool:
    """Ask L2 for every byte of ``weight`` on the current stream where ``covers`` it; True if launched. The kernel
    holds its stream until the bytes are in (one H100: ~10 µs for 33.6 MB, benchmarks/results/2026-12-07-l2-prefetch):
    ``beside`` runs it on a side stream instead."""
    if not covers(weight):
        return False
    flat = weight.reshape(-1).view(torch.uint8)
    _, programs = chunks(flat.numel())
    _kernel()[(programs,)](flat, flat.numel(), CHUNK=CHUNK_BYTES, PER_PROGRAM=PER_PROGRAM, num_warps=1)
    return True


_SIDE: dict[int, torch.cuda.Stream] = {}


def beside(weight: torch.Tensor) -> torch.cuda.Stream | None:
    """Launch ``prefetch`` on a side stream that first waits for the current one; returns that stream (the caller
    makes its stream wait for it before the product that reads ``weight``: in a graph's capture the fork and the join
    become the graph's edges) or None where nothing was launched. The kernel allocates nothing, so no tensor needs
    ``record_stream``."""
    if not covers(weight):
        return None
    index = weight.device.index or 0
    side = _SIDE.get(index)
    if side is None:
        side = _SIDE[index] = torch.cuda.Stream(device=weight.device)
    side.wait_stream(torch.cuda.current_stream(weight.device))
    with torch.cuda.stream(side):
        prefetch(weight)
    return side
