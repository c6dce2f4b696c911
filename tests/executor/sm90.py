"""Reading a Triton kernel as a GPU would compile it, without a GPU: shared by the kernels' tests
(``test_dequant_triton.py``, ``test_decode_attention.py``).

``Launches`` stands in for a kernel and records what the code under test launches it with; ``compile_for_sm90``
binds those arguments and options the way ``JITFunction.run`` does (``triton/runtime/jit.py``; Triton 3.6's private
``_pack_args``) and compiles for sm_90 (H100/H200): only the CUDA driver is missing. ``opcodes`` counts a PTX's
instructions by opcode (a predicate guard such as ``@%p3`` or ``@!%p3`` is not part of it).
"""

from __future__ import annotations

import collections
import re


class Launches:
    """Stands in for a kernel: records the grid, arguments and options it is launched with."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grid, self.args, self.kwargs = grid, args, kwargs
        return launch


def compile_for_sm90(kernel, launches: Launches):
    """(PTX, the bound options) of what ``launches``' recorded launch of ``kernel`` (a ``JITFunction``) compiles
    for sm_90. ``_pack_args`` raises KeyError on an option the backend does not know (a typo in a launch's
    options)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    kwargs = {**launches.kwargs, "debug": False, "instrumentation_mode": knobs.compilation.instrumentation_mode}
    bound, specialization, options = create_function_from_signature(kernel.signature, kernel.params, backend)(
        *launches.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=backend.target,
                              options=options.__dict__)
    return compiled.asm["ptx"], options


def opcodes(ptx: str) -> collections.Counter:
    """Instructions of ``ptx`` counted by opcode."""
    return collections.Counter(re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][a-z0-9_.]*)", ptx, re.M))
