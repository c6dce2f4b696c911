"""hpi.executor.triton_env: the interpreter runs a kernel whose loop bound is computed on the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton", reason="the patch is for Triton's interpreter")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, torch, triton, triton.language as tl
from hpi.executor import triton_env

@triton.jit
def sum_allowed_span(mask_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, N)
    ok = tl.load(mask_ptr + i) != 0
    lo = tl.min(tl.where(ok, i, N), 0)
    hi = tl.max(tl.where(ok, i + 1, 0), 0)
    total = tl.zeros([BLOCK], tl.int32)
    for first in range(lo, hi, BLOCK):  # bounds computed from loaded data: a scalar of shape (1,) when interpreted
        n = first + tl.arange(0, BLOCK)
        total += tl.where(n < hi, n, 0)
    tl.store(out_ptr + tl.arange(0, BLOCK), total)

mask = torch.zeros(64, dtype=torch.uint8)
mask[5:40] = 1
out = torch.zeros(8, dtype=torch.int32)
result = {}
try:
    sum_allowed_span[(1,)](mask, out, N=64, BLOCK=8)
    result["unpatched"] = "ran"
except Exception as e:
    result["unpatched"] = type(e).__name__
triton_env.interpreter_scalar_index()
triton_env.interpreter_scalar_index()  # a second call wraps nothing again
sum_allowed_span[(1,)](mask, out, N=64, BLOCK=8)
result["sum"] = int(out.sum())
print(json.dumps(result))
"""


def test_the_interpreter_takes_a_loop_bound_computed_in_the_kernel():
    """Slots 5..39 walked in blocks of 8 from the first allowed slot to the last: their sum, 770. Without the patch
    this NumPy's interpreter either raises (a (1,)-shaped scalar to int) or, on an older NumPy, runs as well."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["sum"] == sum(range(5, 40))
    from hpi.executor.triton_env import numpy_converts_shaped_scalars

    assert got["unpatched"] == ("ran" if numpy_converts_shaped_scalars() else "InterpreterError")
