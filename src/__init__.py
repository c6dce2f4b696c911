"""hpi (Hybrid Parallel Inference): plan, tune, run and serve 70B-1T parameter language models on GPUs
they do not fit.

The installed package is this folder, ``src/``, under the one import name ``hpi`` (pyproject's
``package-dir``). Data flows one way through its parts:

- ``hpi.planner``   pure: model, hardware and workload specs, the cost model, search, explain, calibrate;
                    never imports torch, DeepSpeed, the executor or the CLI;
- ``hpi.autotune``  an Optuna study steered by the planner, measured by the executor;
- ``hpi.executor``  every side effect of a run: DeepSpeed configs, processes, ranks, measurements;
- ``hpi.cli``       the ``hpi`` command: one module per command family, thin.

Importing ``hpi`` itself imports nothing else (``hpi plan`` starts in a fraction of a second).
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("hybrid-parallel-inference")
except _metadata.PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
