#!/usr/bin/env bash
# On the CPU machine (dev setup, transformers 5.25.0): run transformers 5.17.0's build_alibi_tensor (the GPU image's
# version, which has no _get_alibi_slopes), taken from its wheel, under hpi.executor.bloom.alibi_slopes, and compare
# with 5.25.0's path and its _get_alibi_slopes. Output: alibi_5_17.txt.
set -euo pipefail
work=$(mktemp -d)
python3 -m pip download -q --no-deps transformers==5.17.0 -d "$work"
(cd "$work" && unzip -q -o transformers-5.17.0-*.whl 'transformers/models/bloom/modeling_bloom.py')
python3 - "$work/transformers/models/bloom/modeling_bloom.py" <<'PY'
import math, sys
import torch
import transformers.models.bloom.modeling_bloom as m
from hpi.executor import bloom

src = open(sys.argv[1]).read()
assert "_get_alibi_slopes" not in src, "5.17.0 has _get_alibi_slopes after all"
ns = {"torch": torch, "math": math}
exec(src[src.index("def build_alibi_tensor"):src.index("def dropout_add")], ns)
current = m.build_alibi_tensor
for n in (4, 8, 12, 16, 112):
    m.build_alibi_tensor = ns["build_alibi_tensor"]
    try:
        old = bloom.alibi_slopes(n, 0, 1, "cpu")
    finally:
        m.build_alibi_tensor = current
    assert torch.equal(old, bloom.alibi_slopes(n, 0, 1, "cpu")) and torch.equal(old, m._get_alibi_slopes(n, "cpu")), n
    print(f"{n} heads: 5.17.0 == 5.25.0 == _get_alibi_slopes, bit for bit")
PY
