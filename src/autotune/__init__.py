"""hpi autotune: an Optuna study seeded and steered by the planner, measured by the executor (or by a
hidden simulated machine), each run making the planner more accurate.

    from hpi.autotune import TuneSettings, tune
    summary = tune(TuneSettings(model="llama-3-8b", hardware="h100-sxm-1gpu", simulate=True, n_trials=12))

Names are loaded on first use, so that ``hpi``'s command module (``hpi.cli.autotune``) imports neither optuna
nor matplotlib until the command runs.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DiscretePlan": "hpi.autotune.space",
    "Space": "hpi.autotune.space",
    "derive_space": "hpi.autotune.space",
    "params_of": "hpi.autotune.space",
    "suggest_plan": "hpi.autotune.space",
    "HiddenMachine": "hpi.autotune.simulate",
    "Surrogate": "hpi.autotune.surrogate",
    "TuneSettings": "hpi.autotune.tuner",
    "tune": "hpi.autotune.tuner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
