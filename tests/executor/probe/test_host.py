"""hpi.executor.probe.host: the OS from platform and /proc/version, and the trial pin within RLIMIT_MEMLOCK."""

from __future__ import annotations

import pytest

from hpi.executor.probe import detect_os


@pytest.mark.parametrize("system, version, kind", [
    ("Linux", "Linux version 6.8.0-49-generic (buildd@lcy02)", "linux"),
    ("Linux", "Linux version 5.15.153.1-microsoft-standard-WSL2 (root@941d701f84f1)", "wsl2"),
    ("Windows", "", "windows"),
])
def test_detect_os(system, version, kind):
    assert detect_os(system, version) == kind


def test_trial_pin_without_cuda_stays_within_rlimit_memlock():
    from hpi.executor.probe import memlock_limits, pin_trial

    soft, _ = memlock_limits()
    trial = pin_trial(2 << 20, False, soft)
    assert trial["method"] == "mlock" and (soft is None or trial["bytes"] <= soft)
    assert trial["ok"] or trial["error"]  # a failure says why
    if soft is None or soft >= 4 << 20:
        assert trial["ok"], trial
