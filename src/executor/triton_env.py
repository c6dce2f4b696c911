"""Where hpi's Triton kernels can run, read once at import (a compiled step traces the modules' ``covers``, and
dynamo guards on plain module constants), and what Triton's interpreter needs to run them on the CPU.

``TRITON``: Triton is importable. ``INTERPRETED``: ``TRITON_INTERPRET=1``, Triton's interpreter runs the kernels on
CPU tensors (the tests' way; ``hpi.executor.decode_attention``, ``skinny_gemm`` and ``dependent_launch`` read it).
"""

from __future__ import annotations

import importlib.util
import os

TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_scalar_index() -> None:
    """Let Triton's interpreter take a computed loop bound (the trimmed walk's ``range(lo, hi, BLOCK)``).

    The interpreter holds a scalar as a NumPy array of shape (1,) and turns it into a Python int with ``int()``
    (``triton/runtime/interpreter.py``, ``_patch_lang_tensor``: ``__index__``), which NumPy 2.4 refuses for any
    array of more than 0 dimensions. ``.item()`` takes the one element of any shape; the patch wraps the
    interpreter's own (which it re-applies at every launch) and changes nothing else."""
    from triton.runtime import interpreter

    if numpy_converts_shaped_scalars():
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "hpi_scalar_index", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.hpi_scalar_index = True
    interpreter._patch_lang_tensor = patched


def numpy_converts_shaped_scalars() -> bool:
    """Whether this NumPy turns a one-element array of shape (1,) into an int (``int()``; NumPy 2.4 refuses)."""
    import numpy as np

    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return False
    return True
