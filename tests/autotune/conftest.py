"""Shared pieces of the autotune tests: a runner that answers like the hidden machine unless told otherwise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

pytest.importorskip("optuna")

from hpi.autotune.runners import RunFailed  # noqa: E402
from hpi.autotune.simulate import HiddenMachine, SimulatedOutOfMemory, SimulatedRunner  # noqa: E402
from hpi.autotune.tuner import TuneSettings  # noqa: E402
from hpi.planner.catalog import load_model  # noqa: E402
from hpi.planner.profiles import load_profile  # noqa: E402


@dataclass
class FakeRunner:
    """The hidden machine's answers, except where ``behave(call_index, plan)`` raises first; counts calls."""

    cfg: TuneSettings
    behave: Callable[[int, Any], None] | None = None
    calls: list = field(default_factory=list)

    def __post_init__(self) -> None:
        machine = HiddenMachine(load_profile(self.cfg.hardware), self.cfg.seed)
        self.inner = SimulatedRunner(load_model(self.cfg.model), machine, self.cfg.workload, self.cfg.model)

    def run(self, plan, out_dir, timeout_s, note, *, noise_key=0):
        self.calls.append(plan)
        if self.behave is not None:
            self.behave(len(self.calls) - 1, plan)
        try:
            return self.inner.run(plan, out_dir, timeout_s, note, noise_key=noise_key)
        except SimulatedOutOfMemory as e:
            raise RunFailed("oom", str(e), where=e.where) from None


@pytest.fixture
def config(tmp_path):
    def make(**overrides) -> TuneSettings:
        base = {"model": "llama-3-70b", "hardware": "h100-sxm-1gpu", "simulate": True, "n_trials": 3,
                "studies_dir": str(tmp_path / "studies"), "report": False}
        return TuneSettings(**{**base, **overrides})

    return make


@pytest.fixture
def fake_runner():
    return FakeRunner
