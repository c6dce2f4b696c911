"""Matrix products with a few rows (decode at batch 2-16) as a hand-written Triton kernel that reads each weight
once, at the HBM rate: the weight products of the graphed decode step (``hpi.executor.graphs``).

Why: a decode step's products have one row per sequence, so they read the weight and do almost no arithmetic;
their time is the weight's bytes over the HBM rate. At batch 1 inductor turns each into a tuned reduction that
reads at about that rate (``graphs.COMPILE_OPTIONS``). From two rows on it keeps a matrix product, and cuBLAS
(or inductor's GEMM templates) ran Llama-3-8B's at about 0.85 of the H100's HBM copy rate in the step, 0.6-0.7
on their own (16 x 14336 x 4096: cuBLAS 89.0 µs, the best template 56.1 µs, for 117 MB), so the batch-16 step took
1.24-1.29x batch 1's (benchmarks/results/2026-12-06-issue20-ds-numel, call 2; issue 20 asks for 1.15x).

The kernel (the split-K skinny GEMM that decode engines write for this case): ``out[M, N] = x[M, K] @ W[N, K]^T``
with M at most ``MAX_ROWS``. One program owns ``BLOCK_N`` output columns and a ``1 / SPLIT_K`` share of K; it
walks its share in ``BLOCK_K`` steps, loading a [BLOCK_N, BLOCK_K] tile of W (contiguous along K: coalesced) and
the matching [M, BLOCK_K] tile of x (the rows padded to 16, ``tl.dot``'s least; padded rows are masked loads, so
no byte of W is read twice), and accumulates ``x @ W^T`` in fp32 with ``tl.dot``. Enough programs to keep every
SM's loads in flight come from the columns when N is wide and from splitting K when it is not (k_proj / v_proj
of a GQA model: 1,024 columns). With SPLIT_K 1 the program adds the bias and stores the output; otherwise each
split stores its fp32 partial sum and a second kernel adds the splits in a fixed order (no atomics: the same
inputs give the same bits at every replay), then the bias, and rounds once.

Dependent launch (``hpi.executor.dependent_launch``, Hopper on, off by default): in a decode step each product
follows a small kernel (a norm, the attention, an activation) and, launched plainly, ramps its loads from nothing
once that kernel is done: some µs a product that a 16-row step of 128 products pays. Launched as a programmatic
dependent launch, the product's programs may start once the kernel before has issued its loads; each asks L2 for the
first ``Config.pre_k`` of its weight share (``prefetch.global.L2``, one per 128-byte line; weights no kernel of the
step writes), then waits (``gdc_wait``) for the kernel before to be done, and only then runs the plain loop, whose
first tiles now come from L2. It signals its own dependents once its loads are issued (``gdc_launch_dependents``).
The loop is the plain kernel's in either form: the prefetch costs no register and leaves Triton's software
pipeline as it is. (A first form loaded the first tile into registers before the wait, outside the pipelined loop:
1-9% slower a product on one H100, benchmarks/results/2026-12-06-pdl.) Measured on one H100 this form does not gain
either: a step's 16-row products 5.565 against 5.563 ms (benchmarks/results/2026-12-06-pdl-l2), so it stays off.
The interpreter and older GPUs run the plain kernel.

The launch configuration (``Config``) is timed, not guessed: the first call of a shape on a GPU times
``candidates`` with ``triton.testing.do_bench`` (which clears L2 between runs, as a streamed 15 GB step does)
and keeps the fastest for the process (``_TUNED``); that call comes in the graph's warm-up, before the capture.
A call that finds no timing (Triton's interpreter, a stream being captured) takes ``default_config``.

Stacked siblings (``SIBLINGS``): a layer's q/k/v products, and its gate/up products, read one input one after
another. Launched one by one, the small ones are mostly ramp and tail: in a graph streaming the 8B's weights from HBM,
k_proj's 8 MB took 6.6 µs with the kernel and 8.3 with cuBLAS where the copy rate needs 2.8, q_proj's 32 MB 14.1 /
15.8 µs against 10.7 (benchmarks/results/2026-12-06-skinny, call 2). ``install`` stacks their weights into one tensor
(each sibling's weight a view of its rows, so no byte is stored twice) and the first sibling's call runs the one
product of the stack, the kernel's or ``F.linear``'s by the rows, whose column views the others return.

Where it applies (``covers``): switched on (``use_skinny``), Triton importable, a CUDA tensor (or the
interpreter), no gradient asked for, ``MIN_ROWS <= M <= MAX_ROWS``, a 2-D weight contiguous along K, one of
``DTYPES``. Batch 1 stays with inductor's reduction (compiled) or cuBLAS (eager graph): ``MIN_ROWS`` is 2.
``install`` gives every plain ``nn.Linear`` of a stage this dispatch (``SkinnyLinear``); the generator installs it
where it captures decode graphs on a GPU; ZeRO-3 stages are never graphed (graphs.py), so their DeepSpeed-managed
linears are untouched. ``skinny_linear`` is a torch custom op (``hpi::skinny_linear``), so ``torch.compile`` keeps
the launch as one opaque call inside the compiled step. On the CPU the tests run the kernels in Triton's
interpreter (``TRITON_INTERPRET=1``) in fp32 against float64 products.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpi.executor import dependent_launch
from hpi.executor.triton_env import INTERPRETED, TRITON

MIN_ROWS = 2  # batch 1: inductor's tuned reduction (compiled) or cuBLAS's GEMV (eager graph)
MAX_ROWS = 16  # one tl.dot tile of rows; wider products are compute-shaped enough for cuBLAS
PAD_ROWS = 16  # tl.dot's least dimension
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
REDUCE_BLOCK = 256  # columns per program of the split-sum kernel
PREFETCH_BYTES = 32768  # weight bytes a program asks L2 for before the dependent-launch wait: the first pipeline
# stages' tiles (4 stages of 16 x 256 bf16), 8 MB for the 256 programs of a 4096-column product
LINE_BYTES = 128  # L2's line: one prefetch each
_ENABLED = [True]


@dataclass(frozen=True)
class Config:
    """One launch of the product kernel: columns and K elements per tile, K splits, warps, pipeline stages."""

    block_n: int
    block_k: int
    split_k: int
    warps: int = 4
    stages: int = 4

    def k_per_split(self, k: int) -> int:
        """K elements of each split, whole tiles (the last split's tail is masked)."""
        per = -(-k // self.split_k)
        return -(-per // self.block_k) * self.block_k

    def programs(self, n: int) -> int:
        return -(-n // self.block_n) * self.split_k

    def pre_k(self, k: int, element_bytes: int) -> int:
        """K elements of each program's weight share that a dependent launch asks L2 for before its wait: whole
        tiles, doubled while they stay within ``PREFETCH_BYTES`` and the split (a power of two, as ``tl.arange``
        needs)."""
        pre = self.block_k
        while 2 * pre <= self.k_per_split(k) and 2 * pre * self.block_n * element_bytes <= PREFETCH_BYTES:
            pre *= 2
        return pre


def _splits_to_fill(n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """The least power-of-two K split that gives every SM a program, none smaller than one tile of K."""
    split = 1
    while -(-n // block_n) * split < sms and k // (2 * split) >= block_k:
        split *= 2
    return split


def candidates(n: int, k: int, sms: int) -> list[Config]:
    """The configurations the first call of a shape times: column tiles of 16-64, K tiles of 128 or 256, each with
    the split that fills the SMs and twice that (two programs an SM hide more of each one's load latency)."""
    out = []
    for block_n in (16, 32, 64):
        for block_k in (128, 256):
            split = _splits_to_fill(n, k, block_n, block_k, sms)
            for s in (split, 2 * split):
                if k // s >= block_k or s == 1:
                    out.append(Config(block_n, block_k, s))
    return list(dict.fromkeys(out))


def default_config(n: int, k: int, sms: int) -> Config:
    """The configuration a call takes where it cannot time any: 32 columns, 256 of K, the split that fills."""
    return Config(32, 256, _splits_to_fill(n, k, 32, 256, sms))


def use_skinny(enabled: bool) -> None:
    """Switch the kernel and the stacked siblings on or off for this process (off: each product its own
    ``F.linear``; a benchmark compares the two). A compiled
    step keeps the choice it was traced with: reset dynamo (``torch._dynamo.reset()``) after switching."""
    _ENABLED[0] = enabled


def covers(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes ``x2d @ weight.T`` (module docstring)."""
    if not (_ENABLED[0] and TRITON and (x2d.is_cuda or INTERPRETED)):
        return False
    if torch.is_grad_enabled() and (x2d.requires_grad or weight.requires_grad):
        return False  # inference only: the op has no backward
    return (MIN_ROWS <= x2d.shape[0] <= MAX_ROWS and weight.dim() == 2 and weight.stride(1) == 1
            and x2d.dtype in DTYPES and weight.dtype == x2d.dtype)


@functools.cache
def _kernels():
    """The product and split-sum kernels, built on first use (Triton is imported only where it runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def product(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, M, N, K, sx, sw, so,
                ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                K_SPLIT: tl.constexpr, PRE_LINES: tl.constexpr, LINE: tl.constexpr, EVEN: tl.constexpr,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
        col_block = tl.program_id(0)
        split = tl.program_id(1)
        r = tl.arange(0, ROWS)
        n = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
        r_ok = r < M
        n_ok = n < N
        start = split * K_SPLIT
        if PDL:  # a dependent launch (module docstring): warm L2 with the first lines of the weight share while the
            # kernel before still finishes, then wait for it before reading x or writing anything. Addresses are
            # clamped into W: PTX promises nothing of a prefetch outside an allocation.
            lines = tl.minimum(start + tl.arange(0, PRE_LINES) * LINE, K - 1)
            rows = tl.minimum(n, N - 1)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l",
                                      [w_ptr + rows[:, None] * sw + lines[None, :]], dtype=tl.int32,
                                      is_pure=False, pack=1)
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for offset in range(0, K_SPLIT, BLOCK_K):
            kk = start + offset + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            x = tl.load(x_ptr + r[:, None] * sx + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            if EVEN:  # every column and K element of the tile exists: W's loads need no mask
                w = tl.load(w_ptr + n[:, None] * sw + kk[None, :])
            else:
                w = tl.load(w_ptr + n[:, None] * sw + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()  # every load is issued: the next kernel may start its own
        keep = r_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + r[:, None] * so + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=keep)
        else:
            tl.store(part_ptr + (split * ROWS + r[:, None]) * N + n[None, :], acc, mask=keep)

    @triton.jit
    def split_sum(part_ptr, b_ptr, out_ptr, N, so,
                  ROWS: tl.constexpr, SPLIT_K: tl.constexpr, SPLIT_PAD: tl.constexpr, BLOCK: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
        col_block = tl.program_id(0)
        row = tl.program_id(1)
        n = col_block * BLOCK + tl.arange(0, BLOCK)
        s = tl.arange(0, SPLIT_PAD)
        n_ok = n < N
        parts = tl.load(part_ptr + (s[:, None] * ROWS + row) * N + n[None, :],
                        mask=(s < SPLIT_K)[:, None] & n_ok[None, :], other=0.0)
        acc = tl.sum(parts, 0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * so + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)

    return product, split_sum


def triton_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: Config) -> torch.Tensor:
    """``x2d @ weight.T + bias`` under ``config``: x2d [M, K] (M <= MAX_ROWS), weight [N, K] -> [M, N]."""
    product, split_sum = _kernels()
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    m, k = x2d.shape
    n = weight.shape[0]
    k_split = config.k_per_split(k)
    even = n % config.block_n == 0 and k_split * config.split_k == k
    out = torch.empty(m, n, device=x2d.device, dtype=x2d.dtype)
    split = config.split_k
    part = torch.empty(split * PAD_ROWS, n, device=x2d.device, dtype=torch.float32) if split > 1 else out
    b = bias if bias is not None else out  # not read without HAS_BIAS
    pdl = dependent_launch.active(x2d.device)  # the interpreter and older GPUs: the plain kernel
    line = LINE_BYTES // x2d.element_size()
    pre_lines = max(1, config.pre_k(k, x2d.element_size()) // line) if pdl else 1
    product[(-(-n // config.block_n), split)](
        x2d, weight, b, out, part, m, n, k, x2d.stride(0), weight.stride(0), out.stride(0),
        ROWS=PAD_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split, K_SPLIT=k_split,
        PRE_LINES=pre_lines, LINE=line, EVEN=even, HAS_BIAS=bias is not None,
        IEEE=x2d.dtype == torch.float32, PDL=pdl, num_warps=config.warps, num_stages=config.stages,
        **({"launch_pdl": True} if pdl else {}))
    if split > 1:
        split_sum[(-(-n // REDUCE_BLOCK), m)](part, b, out, n, out.stride(0), ROWS=PAD_ROWS, SPLIT_K=split,
                                              SPLIT_PAD=1 << (split - 1).bit_length(), BLOCK=REDUCE_BLOCK,
                                              HAS_BIAS=bias is not None)
    return out


_TUNED: dict[tuple, Config] = {}


def time_configs(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 configs: list[Config]) -> list[tuple[Config, float]]:
    """(config, ms) of each config on the GPU, L2 cleared before every run (``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    return [(c, do_bench(lambda c=c: triton_linear(x2d, weight, bias, c), warmup=5, rep=25)) for c in configs]


def config_for(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Config:
    """The fastest candidate for this shape, timed at its first call (module docstring), else the default."""
    n, k = weight.shape
    key = (x2d.device, n, k, x2d.dtype, bias is not None)
    if key in _TUNED:
        return _TUNED[key]
    if not x2d.is_cuda:
        return default_config(n, k, sms=8)
    sms = torch.cuda.get_device_properties(x2d.device).multi_processor_count
    if torch.cuda.is_current_stream_capturing():  # no timing inside a capture
        return default_config(n, k, sms)
    timed = time_configs(x2d, weight, bias, candidates(n, k, sms))
    _TUNED[key] = min(timed, key=lambda t: t[1])[0]
    return _TUNED[key]


@torch.library.custom_op("hpi::skinny_linear", mutates_args=())
def skinny_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return triton_linear(x2d, weight, bias, config_for(x2d, weight, bias))


@skinny_linear.register_fake
def _(x2d, weight, bias):
    return x2d.new_empty(x2d.shape[0], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, through the kernel where it ``covers`` the call (any leading dims: their product is M)."""
    x2d = x.reshape(-1, x.shape[-1])
    if not covers(x2d, weight):
        return F.linear(x, weight, bias)
    return skinny_linear(x2d, weight, bias).reshape(*x.shape[:-1], weight.shape[0])


class SkinnyLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose forward goes through ``linear``: same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# Products of one input that a decoder layer runs one after another, in this order (transformers' Llama, Mistral,
# Qwen2 attention and MLP forwards): computed as one product of their stacked weights (``StackedLinear``).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Stacked:
    """One group of siblings: their weights (and biases) stacked along N in one tensor, each sibling's weight a view
    of its rows; the input of the last stacked product and its per-sibling parts, until the last sibling takes its
    part."""

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        with torch.no_grad():
            self.weight = torch.cat([m.weight for m in linears])
            self.bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        self.widths = [m.out_features for m in linears]
        start = 0
        for m, width in zip(linears, self.widths):  # the siblings' parameters become views of the stack
            m.weight = torch.nn.Parameter(self.weight[start:start + width], requires_grad=False)
            if self.bias is not None:
                m.bias = torch.nn.Parameter(self.bias[start:start + width], requires_grad=False)
            start += width
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()


class StackedLinear(SkinnyLinear):
    """A sibling of ``SIBLINGS``: the first computes the whole stack's product (``linear``: the kernel where it
    covers the call, else ``F.linear``) and leaves the others their parts, column views of it; a later sibling called
    with that same input returns its part, any other call is its own product (a forward that calls them in another
    order is correct, just not stacked)."""

    _stack: _Stacked
    _index: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stack = self._stack
        if not _ENABLED[0]:  # switched off: every sibling its own F.linear, as before install
            return F.linear(x, self.weight, self.bias)
        if self._index == 0:
            stack.input = x
            stack.parts = linear(x, stack.weight, stack.bias).split(stack.widths, dim=-1)
        elif stack.input is not x:
            return linear(x, self.weight, self.bias)
        part = stack.parts[self._index]
        if self._index == len(stack.widths) - 1:
            stack.input, stack.parts = None, ()  # the group is done: hold no tensor past it
        return part


def _stack_siblings(module: torch.nn.Module) -> int:
    """Stack each group of ``SIBLINGS`` under ``module`` whose members are plain linears of one input size, dtype,
    device and bias setting; returns how many linears were stacked."""
    stacked = 0
    for parent in module.modules():
        for names in SIBLINGS:
            linears = [getattr(parent, n, None) for n in names]
            if not all(type(m) is torch.nn.Linear for m in linears):
                continue
            first = linears[0]
            if any((m.in_features, m.weight.dtype, m.weight.device, m.bias is None)
                   != (first.in_features, first.weight.dtype, first.weight.device, first.bias is None)
                   for m in linears):
                continue
            stack = _Stacked(linears)
            for index, m in enumerate(linears):
                m.__class__ = StackedLinear
                m._stack, m._index = stack, index
            stacked += len(linears)
    return stacked


def install(module: torch.nn.Module) -> int:
    """Give every plain ``nn.Linear`` under ``module`` the kernel's dispatch; returns how many changed. The
    siblings of ``SIBLINGS`` are stacked (``StackedLinear``), the others become ``SkinnyLinear``. Subclasses
    (DeepSpeed's quantized linears, hpi's TP wrappers' own types) are left as they are."""
    changed = _stack_siblings(module)
    for m in module.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = SkinnyLinear
            changed += 1
    return changed
